"""The one exception type that carries a message meant for the user."""


class UserInputError(ValueError):
    """Bad input from a user: the message says what to change. CLI exit code 2, HTTP 400, a UI notice."""
