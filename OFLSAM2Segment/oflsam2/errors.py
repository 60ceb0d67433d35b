"""Exceptions that reach the user. Every message says what is wrong and what to do about it."""


class OFLSAM2Error(Exception):
    """A problem the user can fix (bad input, missing checkpoint, mismatched adapter...)."""


class InputError(OFLSAM2Error):
    """The image, labels or options given by the user cannot be used as they are."""


class CheckpointError(OFLSAM2Error):
    """A SAM2 checkpoint is missing, corrupt, or does not fit the selected model."""


class AdapterError(OFLSAM2Error):
    """A saved OFL-SAM2 adapter cannot be used with the current model or settings."""


class Cancelled(OFLSAM2Error):
    """The run was cancelled by the user; nothing was written."""

    def __init__(self, message: str = "Cancelled by the user; no output was written."):
        super().__init__(message)


class ProtocolError(OFLSAM2Error):
    """A request that breaks the worker protocol (malformed, or from another version of the
    module); ``job`` is its id when that much could be read."""

    def __init__(self, message: str, job=None):
        super().__init__(message)
        self.job = job
