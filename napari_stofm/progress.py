"""Progress reporting and cancellation shared by every long-running library call.

A long call takes two optional keyword arguments:

``progress(done, total, message)``
    called as work advances (``total`` may change between stages);
``cancel``
    a ``threading.Event`` or any zero-argument callable returning ``True`` when the
    caller wants to stop; the call then raises :class:`napari_stofm.errors.Cancelled`.

Widgets pass a callback that forwards to napari's progress bar and an Event set by the
Cancel button; the CLI passes a text progress bar.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Protocol, Union

from napari_stofm.errors import Cancelled

ProgressCallback = Callable[[int, int, str], None]


class _EventLike(Protocol):
    def is_set(self) -> bool: ...


CancelToken = Union[_EventLike, Callable[[], bool], None]


def is_cancelled(cancel: CancelToken) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def check_cancelled(cancel: CancelToken) -> None:
    """Raise :class:`Cancelled` if ``cancel`` says so."""
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user; nothing was changed")


def report(progress: Optional[ProgressCallback], done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(int(done), int(total), message)


class TextProgress:
    """A small stderr progress bar for the command line (no extra dependency)."""

    def __init__(self, stream=None, width: int = 30, min_interval: float = 0.2):
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval = min_interval
        self._last = 0.0
        self._message = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if not finished and message == self._message and now - self._last < self.min_interval:
            return
        self._last = now
        self._message = message
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{message:<34.34} [{bar}] {done}/{total}")
        if finished:
            self.stream.write("\n")
        self.stream.flush()
