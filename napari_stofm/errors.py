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
