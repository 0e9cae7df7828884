"""Small shared pieces of the dock widgets: slice picker, progress of a worker, messages."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from napari_stofm._napari.layers import session_of, slice_layers
from napari_stofm.errors import Cancelled, StofmError
from napari_stofm.progress import OVERALL_TOTAL

log = logging.getLogger(__name__)


class ProgressRelay(QObject):
    """Carries ``progress(done, total, message)`` calls from a worker thread to the GUI thread."""

    progressed = Signal(int, int, str)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        self.progressed.emit(int(done), int(total), str(message or ""))


class TaskProgress(QWidget):
    """The progress bar, message and Cancel button of one long library call in a worker.

    :meth:`start` returns the ``progress`` callback and ``cancel`` Event to give the call.
    The bar follows the call's reports (one overall count, see
    :class:`napari_stofm.progress.StagedProgress`; a step that cannot be measured, reported
    as ``0 of 1``, shows as a busy bar), and the message says the stage and the time left.
    The call is not mirrored in napari's activity dock: while any napari progress is open,
    its status-bar indicator plays an animation whose every frame recomposes the window, which
    on a software-rendered display (Mesa llvmpipe: virtual machines, remote desktops) took
    most of two CPU cores from the run. :meth:`finish` leaves bar and message in a clean
    state: full and the outcome when done, empty and "cancelled" / the error otherwise.
    Reports that arrive after :meth:`finish` (or from an earlier call) are ignored.
    ``cancel_button`` is laid out by the owner (next to its Run button, say).
    """

    STATES = ("done", "cancelled", "failed")
    #: the bar and message are redrawn at most this often (each redraw recomposes the window:
    #: on a software-rendered display, 10 redraws a second took 0.64 CPU cores, 2 took 0.13);
    #: the latest report is shown when the interval is over
    MIN_INTERVAL_S = 0.5

    def __init__(self, parent=None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, OVERALL_TOTAL)
        self.bar.setValue(0)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_event: Optional[threading.Event] = None
        self.running = False
        self.cancelling = False
        self.state: Optional[str] = None  # the outcome of the last call
        self.history: list = []  # (done, total) of every report shown, for scripts and tests
        self._call = 0
        self._latest = None  # the last report not shown yet: (done, total, message)
        self._shown_at = float("-inf")
        self._flush = QTimer(self)
        self._flush.setSingleShot(True)
        self._flush.timeout.connect(self._show_latest)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.message)

    def start(self, description: str):
        """A new call begins: returns ``(progress, cancel)`` for it."""
        self._call += 1
        call = self._call
        self.cancel_event = threading.Event()
        self.running, self.cancelling, self.state, self.history = True, False, None, []
        self._latest, self._shown_at = None, float("-inf")
        relay = ProgressRelay(self)
        relay.progressed.connect(lambda done, total, message: self._on_progress(call, done, total, message))
        self._relay = relay
        self.bar.setRange(0, OVERALL_TOTAL)
        self.bar.setValue(0)
        self.message.setText(f"{description}: starting…")
        self.cancel_button.setEnabled(True)
        return relay, self.cancel_event

    def cancel(self) -> None:
        """Ask the running call to stop (at its next cancellation point)."""
        if not self.running or self.cancel_event is None:
            return
        self.cancel_event.set()
        self.cancelling = True
        self.cancel_button.setEnabled(False)
        self.message.setText("cancelling… (stops at the end of the current step)")

    def _on_progress(self, call: int, done: int, total: int, message: str) -> None:
        if call != self._call or not self.running:
            return
        total = max(int(total), 1)
        done = min(max(int(done), 0), total)
        self.history.append((done, total))
        self._latest = (done, total, message)
        wait = self._shown_at + self.MIN_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._show_latest()
        elif not self._flush.isActive():
            self._flush.start(int(wait * 1000) + 1)

    def _show_latest(self) -> None:
        if self._latest is None or not self.running:
            return
        (done, total, message), self._latest = self._latest, None
        self._shown_at = time.monotonic()
        if total == 1 and done == 0:  # a step that cannot be measured: busy, not a bar stuck at 0 %
            self.bar.setRange(0, 0)
        else:
            self.bar.setRange(0, total)
            self.bar.setValue(done)
        if message and not self.cancelling:
            self.message.setText(message)

    def finish(self, state: str, message: str = "") -> None:
        """The call is over (``state``: 'done', 'cancelled' or 'failed')."""
        if state not in self.STATES:
            raise ValueError(f"state must be one of {self.STATES}, got {state!r}")
        self.running, self.cancelling, self.state = False, False, state
        self._flush.stop()
        self._latest = None
        self.cancel_event = None
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, OVERALL_TOTAL)
        self.bar.setValue(OVERALL_TOTAL if state == "done" else 0)
        self.message.setText(message or {"done": "done", "cancelled": "cancelled: nothing was changed",
                                          "failed": "failed"}[state])


def button_row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


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


def report_failure(err: BaseException, what: str, task: Optional[TaskProgress] = None) -> str:
    """Turn an exception from a worker into one message in napari; return it (and leave
    ``task`` in its clean cancelled / failed state)."""
    if isinstance(err, Cancelled):
        message = f"{what} cancelled; nothing was changed."
        show_info(message)
        if task is not None:
            task.finish("cancelled", message)
        return message
    if isinstance(err, (StofmError, FileExistsError, PermissionError, OSError)):
        message = f"{what} failed: {err}"
    else:
        log.exception("%s failed", what, exc_info=err)
        message = f"{what} failed unexpectedly ({type(err).__name__}: {err}). Please report this."
    show_error(message)
    if task is not None:
        task.finish("failed", message)
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
