"""Errors a user can cause; the CLI prints them as one line (no traceback)."""


class LMError(Exception):
    """Base of user-facing errors."""


class NonFiniteLossError(LMError, RuntimeError):
    """The loss became NaN/inf; training stops and the last good checkpoint stays."""


class CheckpointMismatchError(LMError, ValueError):
    """A checkpoint does not fit the model it is loaded into."""
