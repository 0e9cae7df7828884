"""Exceptions with messages that name the problem and the fix."""
from __future__ import annotations


class StofmError(Exception):
    """Base class of every error this package raises on purpose."""


class StofmInputError(StofmError, ValueError):
    """The slice given to the library cannot be used as it is (the message says how to fix it)."""


class CheckpointError(StofmError, ValueError):
    """A checkpoint directory is missing files or its tensors do not fit its configuration."""


class Cancelled(StofmError):
    """Long work was cancelled by the caller; nothing was written."""


class ExportError(StofmError, OSError):
    """An export could not be written (the message names the target, its folder and the fix).

    It is also an :class:`OSError`, so code that catches write failures keeps working.
    """


class ExportPermissionError(ExportError, PermissionError):
    """The folder of an export target is not writable."""


class ExportTargetNotOurs(StofmInputError, FileExistsError):
    """``overwrite=True`` was given for a target this package did not write (it is never replaced)."""


class AutosaveError(StofmError):
    """Something about a slice's autosave file (``<slice>.stofm-curation.npz``)."""


class AutosaveRefused(AutosaveError, StofmInputError):
    """An autosave exists but is not loaded: made for other cells (``kind='refused'``) or
    unreadable / inconsistent (``kind='corrupt'``). ``path`` is the file."""

    def __init__(self, message: str, *, path=None, kind: str = "refused"):
        super().__init__(message)
        self.path = path
        self.kind = kind


class AutosaveLocked(AutosaveError):
    """Another live session (this or another process) autosaves the same slice.

    ``holder`` is what its lock file says (pid, host, started_at); ``lock_path`` the lock file.
    """

    def __init__(self, message: str, *, holder=None, lock_path=None):
        super().__init__(message)
        self.holder = dict(holder or {})
        self.lock_path = lock_path
