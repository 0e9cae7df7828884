"""Progress reporting and cancellation shared by every long-running library call.

A long call takes two optional keyword arguments:

``progress(done, total, message)``
    called as work advances (``total`` may change between stages);
``cancel``
    a ``threading.Event`` or any zero-argument callable returning ``True`` when the
    caller wants to stop; the call then raises :class:`napari_stofm.errors.Cancelled`.

A call made of several stages (embedding, regions, cell types, ...) reports through a
:class:`StagedProgress`: each stage reports its own ``(done, total, message)`` and the
caller's ``progress`` receives one overall count that only moves forward, out of
:data:`OVERALL_TOTAL`, with the stage name and an estimate of the time left in the message.

Widgets pass a callback that forwards to their progress bar and an Event set by the
Cancel button; the CLI passes a text progress bar (:class:`TextProgress`).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, Union

from napari_stofm.errors import Cancelled

ProgressCallback = Callable[[int, int, str], None]

#: the ``total`` of every overall progress report of a :class:`StagedProgress`
OVERALL_TOTAL = 1000


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


def format_duration(seconds: float) -> str:
    """``'a few seconds'``, ``'about 40 s'``, ``'about 3 min'``, ``'about 1 h 5 min'``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 10:
        return "a few seconds"
    if seconds < 90:
        return f"about {int(round(seconds / 5.0) * 5)} s"
    minutes = int(round(seconds / 60.0))
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60} min"


@dataclass
class _Stage:
    name: str
    weight: float
    parts: Tuple[Tuple[str, float], ...] = ()
    final: bool = False
    start: Optional[float] = None  # overall fraction where it began (None: not begun)
    width: float = 0.0
    part: int = 0  # the part being reported (index into parts)


class StagedProgress:
    """One overall progress over the stages of a long call, monotonic, with an ETA.

    ``progress``: the caller's callback; it receives ``(done, OVERALL_TOTAL, message)`` with
    ``done`` never smaller than before and a message ``"<stage>: <step> (i/n), about 2 min
    left"``. Declare the stages in the order they run with :meth:`add` (relative weights:
    about how long each takes); :meth:`stage` gives the callback a stage's own work reports
    to, in its own units (a stage whose reports restart at 0 for each of its steps names
    them in ``parts``: message prefixes with their share of the stage). A stage reporting
    for the first time closes the stages before it; the weights of stages not begun can
    still change (:meth:`set_weight`) without moving the bar back.

    The time left is the time so far times the work left over the work done, not counting
    the work that took no time (cached stages), shown once there is enough to go on.
    """

    #: the earliest the time left is estimated: this share of the work done, and seconds
    ETA_MIN_FRACTION = 0.03
    ETA_MIN_SECONDS = 2.0

    def __init__(self, progress: Optional[ProgressCallback] = None, stages: Sequence = (), *,
                 clock: Callable[[], float] = time.monotonic):
        self._progress = progress
        self._clock = clock
        self._stages: List[_Stage] = []
        self._lock = threading.RLock()
        self._fraction = 0.0  # overall, in [0, 1], never decreases
        self._skipped = 0.0  # overall fraction covered by reports that took no time
        self._t0 = clock()
        self._last_time = self._t0
        self._current: Optional[int] = None
        self.message = ""
        for stage in stages:
            self.add(*stage) if isinstance(stage, (tuple, list)) else self.add(stage)

    # ------------------------------------------------------------------ plan
    def add(self, name: str, weight: float = 1.0, parts: Sequence[Tuple[str, float]] = (), *,
            final: bool = False) -> "StagedProgress":
        """Declare a stage (after those declared before, but before any ``final`` one)."""
        with self._lock:
            if any(s.name == name for s in self._stages):
                self.set_weight(name, weight)
                return self
            stage = _Stage(name, max(float(weight), 0.0), tuple((str(p), max(float(w), 0.0)) for p, w in parts),
                           final=final)
            if final:
                self._stages.append(stage)
            else:
                at = next((i for i, s in enumerate(self._stages) if s.final and s.start is None), len(self._stages))
                self._stages.insert(at, stage)
        return self

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self._stages)

    def remove(self, name: str) -> None:
        """Drop a stage that has not begun (nothing when there is none)."""
        with self._lock:
            self._stages = [s for s in self._stages if s.name != name or s.start is not None]

    def set_weight(self, name: str, weight: float) -> None:
        """Change the weight of a stage that has not begun (a begun one keeps its share)."""
        with self._lock:
            stage = self._find(name)
            if stage.start is None:
                stage.weight = max(float(weight), 0.0)

    def _find(self, name: str) -> _Stage:
        for stage in self._stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} (stages: {[s.name for s in self._stages]})")

    # ------------------------------------------------------------------ reporting
    @property
    def fraction(self) -> float:
        """The overall fraction done, in [0, 1]."""
        return self._fraction

    def stage(self, name: str) -> ProgressCallback:
        """The callback of stage ``name``: ``(done, total, message)`` in the stage's own units."""
        return lambda done, total, message="": self.update(name, done, total, message)

    def begin(self, name: str, message: str = "") -> None:
        """Stage ``name`` begins (the stages before it are done)."""
        self.update(name, 0, 1, message)

    def update(self, name: str, done: float, total: float, message: str = "") -> None:
        with self._lock:
            index = next((i for i, s in enumerate(self._stages) if s.name == name), None)
            if index is None:  # an undeclared stage: runs after the current one, before the final ones
                self.add(name, self._mean_weight())
                index = next(i for i, s in enumerate(self._stages) if s.name == name)
            if self._current is not None and index < self._current:
                return  # a stage already closed reports late: the bar never goes back
            was = (self._current, self._stages[self._current].part if self._current is not None
                   and self._current < len(self._stages) else None)
            if index != self._current:
                self._open(index)
            stage = self._stages[index]
            local = self._local_fraction(stage, done, total, message)
            now = self._clock()
            if local is not None:
                target = min(stage.start + stage.width * local, 1.0)
                if target > self._fraction:
                    fresh = was != (index, stage.part)
                    if fresh and total > 0 and done >= total and now - self._last_time < 0.1:
                        self._skipped += target - self._fraction  # done at once (cached): nothing to learn from
                    self._fraction = target
            self._last_time = now
            self.message = self._describe(stage, done, total, message)
            self._emit()

    def finish(self, message: str = "done") -> None:
        """Everything is done: the bar goes to the end."""
        with self._lock:
            self._fraction = 1.0
            self._current = len(self._stages)
            self.message = message
            self._emit()

    def _mean_weight(self) -> float:
        weights = [s.weight for s in self._stages]
        return sum(weights) / len(weights) if weights else 1.0

    def _open(self, index: int) -> None:
        """Close the stages before ``index`` and give stage ``index`` its share of what is left."""
        start = self._fraction
        first = 0
        if self._current is not None and self._current < len(self._stages):
            current = self._stages[self._current]
            start = max(start, current.start + current.width)
            first = self._current + 1
        start = min(start, 1.0)
        for skipped in self._stages[first:index]:  # declared but never reported: nothing to do
            skipped.start, skipped.width = start, 0.0
        total = sum(s.weight for s in self._stages[index:])
        stage = self._stages[index]
        stage.start = start
        stage.width = (1.0 - start) * (stage.weight / total) if total > 0 else 0.0
        self._fraction = max(self._fraction, start)
        self._current = index

    @staticmethod
    def _local_fraction(stage: _Stage, done: float, total: float, message: str) -> Optional[float]:
        """How far into ``stage`` a report is (None: a step already passed reports late)."""
        frac = 0.0 if total <= 0 else min(max(float(done) / float(total), 0.0), 1.0)
        if not stage.parts:
            return frac
        match = next((i for i, (prefix, _) in enumerate(stage.parts) if message.startswith(prefix)), None)
        if match is not None:
            if match < stage.part:
                return None
            stage.part = match
        weights = [w for _, w in stage.parts]
        total_w = sum(weights) or 1.0
        return min((sum(weights[: stage.part]) + weights[stage.part] * frac) / total_w, 1.0)

    def eta_seconds(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left by the rate so far; None until there is enough to go on."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        measured = self._fraction - self._skipped
        if self._fraction >= 1.0:
            return 0.0
        if measured < self.ETA_MIN_FRACTION or elapsed < self.ETA_MIN_SECONDS:
            return None
        return elapsed * (1.0 - self._fraction) / measured

    def _describe(self, stage: _Stage, done, total, message: str) -> str:
        step = str(message or "")
        text = stage.name if not step or step == stage.name else f"{stage.name}: {step}"
        if total and total > 1 and 0 <= done <= total:
            text += f" ({int(done)}/{int(total)})"
        eta = self.eta_seconds()
        if eta is not None:
            text += f", {format_duration(eta)} left"
        return text

    def _emit(self) -> None:
        if self._progress is not None:
            self._progress(int(self._fraction * OVERALL_TOTAL), OVERALL_TOTAL, self.message)


def staged(progress) -> Tuple[Optional["StagedProgress"], bool]:
    """``(staged_progress, owned)``: ``progress`` itself when it is a :class:`StagedProgress`
    (a caller that plans more stages around this call), else a new one reporting to it
    (``owned``: this call finishes it). ``(None, False)`` without a callback."""
    if isinstance(progress, StagedProgress):
        return progress, False
    if progress is None:
        return None, False
    return StagedProgress(progress), True


class TextProgress:
    """A small stderr progress bar for the command line (no extra dependency)."""

    def __init__(self, stream=None, width: int = 30, min_interval: float = 0.2, message_width: int = 70):
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval = min_interval
        self.message_width = message_width
        self._last = 0.0
        self._message = None
        self._shown = 0

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
        count = f"{frac:4.0%}" if total == OVERALL_TOTAL else f"{done}/{total}"
        line = f"[{bar}] {count} {message[: self.message_width]}"
        self.stream.write("\r" + line.ljust(self._shown))
        self._shown = len(line)
        if finished:
            self.stream.write("\n")
            self._shown = 0
        self.stream.flush()
