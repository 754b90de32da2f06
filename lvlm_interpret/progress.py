"""Progress of a slow computation (iGOS++'s iterations), for whoever waits on it: the page's progress bar, the HTTP
backend's job status, a Cancel that stops it (the callback raises)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

Reporter = Callable[[int, int], None]  # (done, total); may raise to stop the computation
_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("progress_reporter", default=None)


@contextlib.contextmanager
def reporting_progress(callback: Reporter):
    """While active, a slow method calls `callback(done, total)` after each step of its work."""
    token = _REPORTER.set(callback)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def current_reporter() -> Reporter | None:
    """The callback of the innermost `reporting_progress`, or None."""
    return _REPORTER.get()
