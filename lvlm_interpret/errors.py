"""The exception types that carry a message meant for the user."""


class UserInputError(ValueError):
    """Bad input from a user: the message says what to change. CLI exit code 2, HTTP 400, a UI notice."""


class ServiceBusyError(UserInputError):
    """The request was not served now (queue full, out of memory, over its time limit): retrying later or asking
    for less may succeed. HTTP 503 with Retry-After."""


class TooLargeError(UserInputError):
    """An input over a size limit (an upload's bytes, an image's pixels): asking for less succeeds. HTTP 413."""


class UnknownRequestError(UserInputError):
    """A request id the service does not hold (never issued, forgotten, or issued before a restart). HTTP 404."""
