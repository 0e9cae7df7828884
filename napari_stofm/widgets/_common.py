"""Small shared pieces of the dock widgets: slice picker, progress relay, messages."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox

from napari_stofm._napari.layers import session_of, slice_layers
from napari_stofm.errors import Cancelled, StofmError

log = logging.getLogger(__name__)


class ProgressRelay(QObject):
    """Carries ``progress(done, total, message)`` calls from a worker thread to the GUI thread."""

    progressed = Signal(int, int, str)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        self.progressed.emit(int(done), int(total), str(message or ""))


class SliceCombo(QComboBox):
    """Picks one of the viewer's slices (by the layer that carries it)."""

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self._layers = []
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        self.refresh()

    def refresh(self, event=None) -> None:
        current = self.current_layer()
        self._layers = slice_layers(self.viewer)
        self.blockSignals(True)
        self.clear()
        for layer in self._layers:
            session = session_of(layer)
            self.addItem(f"{session.name} ({session.adata.n_obs} cells)")
        if current in self._layers:
            self.setCurrentIndex(self._layers.index(current))
        self.blockSignals(False)
        if current not in self._layers:
            self.currentIndexChanged.emit(self.currentIndex())

    def current_layer(self):
        i = self.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def current_session(self):
        return session_of(self.current_layer())


def show_error(message: str) -> None:
    from napari.utils.notifications import show_error as _show_error

    _show_error(message)


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as _show_info

    _show_info(message)


def report_failure(err: BaseException, what: str) -> str:
    """Turn an exception from a worker into one message in napari; return it."""
    if isinstance(err, Cancelled):
        message = f"{what} cancelled; nothing was changed."
        show_info(message)
        return message
    if isinstance(err, (StofmError, FileExistsError, PermissionError, OSError)):
        message = f"{what} failed: {err}"
    else:
        log.exception("%s failed", what, exc_info=err)
        message = f"{what} failed unexpectedly ({type(err).__name__}: {err}). Please report this."
    show_error(message)
    return message


def start_worker(func: Callable, *args, on_return: Callable, on_error: Callable, on_finish: Optional[Callable] = None,
                 **kwargs):
    """Run ``func`` in napari's thread pool; callbacks run on the GUI thread.

    Exceptions are caught in the worker and handed to ``on_error`` with the result
    signal (napari 0.9's task-status hook cannot take a worker's ``errored`` signal).
    """
    from napari.qt.threading import create_worker

    def guarded(*a, **k):
        try:
            return True, func(*a, **k)
        except Exception as err:  # noqa: BLE001 - worker guard: every failure goes to on_error, which reports it
            return False, err

    def dispatch(outcome):
        ok, value = outcome
        (on_return if ok else on_error)(value)

    worker = create_worker(guarded, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    worker.returned.connect(dispatch)
    worker.errored.connect(on_error)
    if on_finish is not None:
        worker.finished.connect(on_finish)
    worker.start()
    return worker
