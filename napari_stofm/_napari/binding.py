"""Keep a napari Labels layer and its :class:`~napari_stofm.heads.annotation.Annotation` in step.

napari's paint, fill and erase change pixels; :class:`LabelsBinding` maps every edit back
to the cells it covers (a cell takes the class that covers most of its territory), marks
them curated, and repaints the whole territory of every touched cell so the image always
shows one class per cell. The repaint is recorded inside napari's own undo step, together
with what it did to the annotation, so ``layer.undo()`` / ``layer.redo()`` restore pixels
and annotation (codes and curated flags) together.

Hovering a Labels layer adds the cell under the cursor (id, class, confidence) to the
status bar text napari shows.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import numpy as np

from napari_stofm._napari import compat
from napari_stofm._napari.compat import unwrap_proxy as unwrap
from napari_stofm._napari.layers import IN_STEP, labels_colormap, labels_features, refresh_labels_layer
from napari_stofm.errors import StofmError
from napari_stofm.keys import display_name
from napari_stofm.review.session import EditResult, SliceSession

log = logging.getLogger(__name__)

_BINDINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BOUND_VIEWERS: "weakref.WeakSet" = weakref.WeakSet()

AUTOSAVE_DELAY_MS = 1500
_UNKNOWN_STEP = object()  # undo/redo step of a napari whose history compat cannot read


class _EditAtom(compat.PixelHistoryAtom):
    """A napari history atom ``(indices, old_values, new_values)`` that also records the
    annotation change of the edit it belongs to (napari replays it like any other)."""

    edit: Optional[EditResult] = None

    def __new__(cls, indices, old, new, edit=None):
        obj = super().__new__(cls, indices, old, new)
        obj.edit = edit
        return obj


class _ChangeAtom(compat.PixelHistoryAtom):
    """A napari history atom of a session step that is not a paint edit (refine, merge,
    re-cluster): napari replays its pixels, the binding then puts the annotation back
    (``change``: the session's :class:`~napari_stofm.review.session.ChangeRecord`)."""

    change = None

    def __new__(cls, indices, old, new, change=None):
        obj = super().__new__(cls, indices, old, new)
        obj.change = change
        return obj


def binding_of(layer) -> Optional["LabelsBinding"]:
    return _BINDINGS.get(unwrap(layer)) if layer is not None else None


def bind(layer, session: SliceSession, key: str) -> "LabelsBinding":
    """The binding of ``layer`` (created on first call)."""
    layer = unwrap(layer)
    binding = _BINDINGS.get(layer)
    if binding is None or binding.session is not session or binding.key != key:
        if binding is not None:
            binding.detach()
        binding = LabelsBinding(layer, session, key)
        _BINDINGS[layer] = binding
    return binding


def bind_viewer(viewer) -> list:
    """Bind every SToFM Labels layer of a viewer (and the ones added later)."""
    from napari_stofm._napari.layers import ROLE_LABELS, session_of

    viewer = unwrap(viewer)

    def _bind(layer):
        meta = layer.metadata or {}
        if meta.get("stofm_role") == ROLE_LABELS and meta.get("stofm_key"):
            session = session_of(layer)
            if session is not None and meta["stofm_key"] in session.annotations:
                return bind(layer, session, meta["stofm_key"])
        return None

    if viewer not in _BOUND_VIEWERS:
        def _on_inserted(event):
            _bind(event.value)

        def _on_removed(event):
            # the last layer of a slice is gone: save what is pending, then release its autosave
            # lock now, not at exit (a timer firing later would otherwise lock it again)
            binding = binding_of(event.value)
            if binding is not None:
                binding.finish_autosave()
            meta = event.value.metadata or {}
            session = meta.get("stofm_session")
            if session is None or not hasattr(session, "close"):
                return
            if not any((layer.metadata or {}).get("stofm_session") is session for layer in viewer.layers):
                session.close()

        viewer.layers.events.inserted.connect(_on_inserted)
        viewer.layers.events.removed.connect(_on_removed)
        _BOUND_VIEWERS.add(viewer)
        _add_legend(viewer)
    return [b for b in (_bind(layer) for layer in list(viewer.layers)) if b is not None]


def _add_legend(viewer) -> None:
    """The canvas legend of the viewer's SToFM labels (none without a Qt canvas)."""
    try:
        from napari_stofm._napari.legend import ensure_legend

        ensure_legend(viewer)
    except ImportError:  # no Qt binding: a headless viewer has no canvas to draw on
        log.debug("no canvas legend", exc_info=True)


class LabelsBinding:
    def __init__(self, layer, session: SliceSession, key: str):
        layer = unwrap(layer)
        self._layer_ref = weakref.ref(layer)
        self.session = session
        self.key = key
        self._pending: list = []
        self._busy = False
        self.last_edit: Optional[EditResult] = None
        self.last_error: Optional[str] = None
        self._autosave_timer = None
        self._saving = False  # an autosave is being written by a worker thread
        self._save_again = False  # and another was asked for meanwhile
        layer.events.paint.connect(self._on_paint)
        layer.events.labels_update.connect(self._on_labels_update)
        session.subscribe(self._on_session_change)
        self._wrap_layer_methods()
        meta = layer.metadata
        in_step = isinstance(meta, dict) and bool(meta.pop(IN_STEP, False))
        if not in_step:  # pixels painted before the layer was bound are mapped now
            self.resync()

    # ------------------------------------------------------------------ lifecycle
    @property
    def layer(self):
        """The Labels layer (None once napari has deleted it)."""
        return self._layer_ref()

    def detach(self) -> None:
        self.session.unsubscribe(self._on_session_change)
        layer = self.layer
        if layer is None:
            return
        try:
            layer.events.paint.disconnect(self._on_paint)
            layer.events.labels_update.disconnect(self._on_labels_update)
        except (AttributeError, RuntimeError, TypeError):  # events already torn down / method not rebindable
            log.debug("could not disconnect the paint listeners of %s", getattr(layer, "name", layer), exc_info=True)
        for name in ("undo", "redo", "get_status"):
            compat.unpatch_method(layer, name)
        compat.unpatch_tooltip(layer)

    @property
    def annotation(self):
        return self.session.annotations[self.key]

    def _wrap_layer_methods(self) -> None:
        """Wrap this layer's undo/redo (to replay the annotation with the pixels) and its
        status/tooltip text (to add the cell under the cursor). napari has no event for
        undo/redo, and its status text comes from these methods."""
        layer = self.layer
        cls = type(layer)
        ref = weakref.ref(self)

        def undo():
            binding = ref()
            item = compat.last_undo_item(layer, missing=_UNKNOWN_STEP)
            cls.undo(layer)
            if binding is not None:
                binding._after_history(item, undoing=True)

        def redo():
            binding = ref()
            item = compat.last_redo_item(layer, missing=_UNKNOWN_STEP)
            cls.redo(layer)
            if binding is not None:
                binding._after_history(item, undoing=False)

        def get_status(position=None, **kwargs):
            status = cls.get_status(layer, position, **kwargs)
            binding = ref()
            if binding is not None and position is not None:
                text = binding.cell_text(position, world=kwargs.get("world", False))
                if text and isinstance(status, dict):
                    status["coordinates"] = f"{status.get('coordinates', '')}; {text}"
            return status

        def tooltip(position, text, **kwargs):
            binding = ref()
            if binding is not None:
                extra = binding.cell_text(position, world=kwargs.get("world", False))
                if extra:
                    text = f"{text}\n{extra}" if text else extra
            return text

        compat.patch_method(layer, "undo", undo)
        compat.patch_method(layer, "redo", redo)
        compat.patch_method(layer, "get_status", get_status)
        compat.patch_tooltip(layer, tooltip)

    def _render(self, bbox=None) -> np.ndarray:
        """The annotation's class image (of window ``bbox``) in the layer's dtype, which is
        first widened when classes were added past what it holds."""
        ann = self.annotation
        dtype = np.asarray(self.layer.data).dtype
        if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max < ann.n_classes:
            refresh_labels_layer(self.layer, self.session, self.key, classes_only=True)
            dtype = np.asarray(self.layer.data).dtype
        return self.session.territories.class_image(ann.codes, bbox=bbox, dtype=dtype)

    # ------------------------------------------------------------------ hover
    def cell_at(self, position, *, world: bool = True) -> int:
        """Cell index under a position (world or data coordinates), -1 if none."""
        pos = np.asarray(position, dtype=float)
        data_pos = self.layer.world_to_data(pos) if world else pos
        return self.session.territories.cell_at(np.asarray(data_pos)[-2:])

    def cell_text(self, position, *, world: bool = True) -> str:
        try:
            cell = self.cell_at(position, world=world)
        except Exception:  # noqa: BLE001 - napari calls this on every mouse move: a hover text must never raise
            log.debug("no cell under %r", position, exc_info=True)
            return ""
        if cell < 0:
            return ""
        ann = self.annotation
        code = int(ann.codes[cell])
        name = ann.categories[code] if code >= 0 else "unassigned"
        conf = float(ann.confidence[cell])
        conf_text = "n/a" if not np.isfinite(conf) else f"{conf:.2f}"
        flag = ", curated" if ann.curated[cell] else ""
        return f"cell {self.session.adata.obs_names[cell]}: {name} (confidence {conf_text}{flag})"

    # ------------------------------------------------------------------ edits
    def _on_paint(self, event) -> None:
        if self._busy:
            return
        item = event.value
        if not isinstance(item, list) or not item:
            return
        if self._written(item):
            self._process(item)
        else:
            # napari announces single paint/fill/data_setitem calls just before writing
            # the pixels; handle them once they are there.
            self._pending.append(item)
            _call_soon(self.flush)

    def _on_labels_update(self, event=None) -> None:
        if self._pending and not self._busy:
            self.flush()

    def flush(self) -> None:
        """Map every edit still waiting for its pixels."""
        while self._pending:
            item = self._pending.pop(0)
            self._process(item)

    def _written(self, item) -> bool:
        return compat.history_atom_written(self.layer.data, item[-1])

    def _process(self, item) -> None:
        bbox = _item_bbox(item, self.layer.data.shape)
        if bbox is None:
            return
        self._busy = True
        try:
            data = self.layer.data
            session = self.session
            edit = None
            self.last_error = None
            try:
                edit = session.apply_edit(self.key, np.asarray(data), bbox)
            except StofmError as err:
                self.last_error = str(err)
                _show_error(str(err))
            touched = edit.touched if edit is not None else np.empty(0, np.int64)
            region = _union(bbox, session.territories.cell_bbox(touched)) if touched.size else bbox
            want = self._render(region)
            current = np.asarray(data[region])
            diff = want != current
            rows, cols = np.nonzero(diff)
            rows = rows + region[0].start
            cols = cols + region[1].start
            old = current[diff].copy()
            new = want[diff]
            if rows.size:
                data[rows, cols] = new
            compat.append_to_history_item(self.layer, item, _EditAtom((rows, cols), old, new, edit))
            self.last_edit = edit
            if rows.size:
                compat.refresh_labels_region(self.layer, rows, cols, new)
            if edit is not None and edit.changed:
                self._update_features()
                self._schedule_autosave()
        finally:
            self._busy = False

    def _after_history(self, item, *, undoing: bool) -> None:
        """After napari replayed an undo/redo step: put the annotation back in step."""
        if item is _UNKNOWN_STEP:  # a napari whose history compat cannot read
            self.resync()
            return
        if item is None:
            return
        steps = [a for a in item if (isinstance(a, _EditAtom) and a.edit is not None)
                 or (isinstance(a, _ChangeAtom) and a.change is not None)]
        if not steps:
            if any(not isinstance(a, (_EditAtom, _ChangeAtom)) for a in item):
                self.resync()
            return
        self._busy = True
        classes = False
        try:
            # undo replays atoms last-first; redo first-last (napari stores a redo step reversed)
            for atom in (reversed(steps) if undoing else steps):
                if isinstance(atom, _ChangeAtom):
                    change = atom.change
                    (self.session.revert if undoing else self.session.reapply)(change, autosave=False)
                    classes = classes or change.classes_changed
                else:
                    edit = atom.edit
                    self.session.restore(self.key, edit.previous if undoing else edit.after)
        finally:
            self._busy = False
        if classes:
            self._update_classes()
        else:
            self._update_features()
        self._schedule_autosave()

    def relabel(self, cells, code: Optional[int] = None) -> Optional[EditResult]:
        """Give ``cells`` class ``code`` (None: keep their classes, i.e. accept them) and mark
        them curated (:meth:`SliceSession.relabel`), repainted as one undo step of the layer
        (``layer.undo()`` restores classes, curated flags and pixels)."""
        self.flush()
        layer = self.layer
        self._busy = True
        try:
            edit = self.session.relabel(self.key, cells, code)
            rows = cols = np.empty(0, np.int64)
            old = new = np.empty(0, dtype=np.asarray(layer.data).dtype)
            region = self.session.territories.cell_bbox(edit.cells) if edit.changed else None
            if region is not None and isinstance(layer.data, np.ndarray):
                want = self._render(region)
                current = layer.data[region]
                diff = want != current
                rows, cols = np.nonzero(diff)
                old, new = current[diff].copy(), want[diff]
                rows, cols = rows + region[0].start, cols + region[1].start
                layer.data[rows, cols] = new
            if edit.changed and not compat.push_history_item(layer, [_EditAtom((rows, cols), old, new, edit)]):
                compat.clear_history(layer)
            if rows.size:
                compat.refresh_labels_region(layer, rows, cols, new)
        finally:
            self._busy = False
        if edit.changed:
            self.last_edit = edit
            self._update_features()
            self._schedule_autosave()
        return edit

    def resync(self) -> int:
        """Map any pixel that disagrees with the annotation (e.g. painted before binding).

        Returns the number of cells whose class changed.
        """
        terr = self.session.territories
        if tuple(np.shape(self.layer.data)) != tuple(terr.shape):
            return 0
        want = self._render()
        data = np.asarray(self.layer.data)
        diff = want != data
        if not diff.any():
            return 0
        rows, cols = np.nonzero(diff)
        bbox = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        self._busy = True
        try:
            edit = self.session.apply_edit(self.key, data, bbox)
            self.session.territories.class_image(self.annotation.codes, out=data)
        except StofmError as err:
            _show_error(str(err))
            data[...] = want
            edit = None
        finally:
            self._busy = False
        self.layer.refresh()
        self._update_features()
        if edit is not None and edit.changed:
            self._schedule_autosave()
            return int(edit.cells.size)
        return 0

    # ------------------------------------------------------------------ session changes
    def _on_session_change(self, key: str, what: str) -> None:
        if self.layer is None:  # the layer was deleted
            self.session.unsubscribe(self._on_session_change)
            return
        if key != self.key or self._busy:
            return
        change = self.session.current_change
        if what == "classes":
            self._update_classes()
        elif change is not None and change.key == self.key:
            self._push_change(change)  # refine, merge, re-cluster: one undo step of the layer
        else:  # 'codes' (assign), 'merged', 'replaced'
            refresh_labels_layer(self.layer, self.session, self.key)
        if what != "classes":
            self._schedule_autosave()

    def _push_change(self, change) -> None:
        """Repaint the cells a session step changed and make that napari's next undo step
        (the earlier steps and brush strokes stay undoable behind it)."""
        layer = self.layer
        want = self._render()
        data = layer.data
        if not isinstance(data, np.ndarray) or data.shape != want.shape:
            refresh_labels_layer(layer, self.session, self.key)
            return
        diff = want != data
        rows, cols = np.nonzero(diff)
        old, new = data[rows, cols].copy(), want[rows, cols]
        data[rows, cols] = new
        if not compat.push_history_item(layer, [_ChangeAtom((rows, cols), old, new, change)]):
            compat.clear_history(layer)
        with compat.one_refresh(layer):
            if change.classes_changed:
                self._update_classes()
            else:
                self._update_features()

    def _update_classes(self) -> None:
        ann = self.annotation
        dtype = np.asarray(self.layer.data).dtype
        if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max < ann.n_classes:
            # classes were added past what the layer's dtype holds: a wider one
            refresh_labels_layer(self.layer, self.session, self.key, classes_only=True)
            return
        self.layer.colormap = labels_colormap(ann)
        self.layer.features = labels_features(ann)

    def _update_features(self) -> None:
        """Cell counts per class changed; names and colours did not."""
        self.layer.features = labels_features(self.annotation)

    # ------------------------------------------------------------------ autosave
    def _schedule_autosave(self) -> None:
        try:
            from qtpy.QtCore import QTimer
        except ImportError:  # no Qt: save now
            self.autosave_in_background()
            return
        if self._autosave_timer is None:
            self._autosave_timer = QTimer()
            self._autosave_timer.setSingleShot(True)
            self._autosave_timer.timeout.connect(self.autosave_in_background)
        self._autosave_timer.start(AUTOSAVE_DELAY_MS)

    def autosave_in_background(self) -> None:
        """Autosave the session (the debounced autosave of an edit, or a new result): the
        labels are copied now, on the UI thread, and written (compressed, fingerprinted, moved
        into place) by a worker thread, one write at a time."""
        if self._saving:
            self._save_again = True  # written when the current write ends
            return
        try:
            from napari.qt.threading import create_worker
        except ImportError:  # no Qt: save now
            self._autosave_in_place()
            return
        self._saving = True
        self._save_again = False
        try:
            worker = create_worker(self.session.autosave, self.session.autosave_snapshot(),
                                   _start_thread=False, _ignore_errors=True)
            worker.errored.connect(self._autosave_failed)
            worker.finished.connect(self._autosave_finished)
            worker.start()
        except Exception as err:  # noqa: BLE001 - timer callback: never lose the UI over a failed autosave; reported
            self._saving = False
            self._autosave_failed(err)

    def _autosave_finished(self) -> None:
        self._saving = False
        if self._save_again:
            self.autosave_in_background()

    def _autosave_failed(self, err) -> None:
        log.debug("autosave of %s failed", self.key, exc_info=err)
        _show_error(f"autosave of {display_name(self.key)} failed: {err}")

    def _autosave_in_place(self) -> None:
        try:
            self.session.autosave()
        except Exception as err:  # noqa: BLE001 - UI action: never lose the UI over a failed autosave; reported
            self._autosave_failed(err)

    def autosave_now(self) -> None:
        """Write the autosave now, on this thread (after a write in progress ends)."""
        if self._autosave_timer is not None:
            self._autosave_timer.stop()
        self._save_again = False
        self._autosave_in_place()

    def finish_autosave(self) -> None:
        """Write an autosave still waiting for its timer, or still being written by a worker,
        now (nothing when none is waiting)."""
        timer = self._autosave_timer
        try:
            pending = timer is not None and timer.isActive()
        except RuntimeError:  # the timer's Qt object is already gone
            pending = False
        if pending or self._saving or self._save_again:
            self.autosave_now()


# ----------------------------------------------------------------------------- helpers


def _item_bbox(item, shape):
    """Union bounding box (2 slices) of the pixels a history item touched."""
    r0 = c0 = None
    r1 = c1 = None
    for atom in item:
        if isinstance(atom, _EditAtom):
            continue
        box = compat.history_atom_bbox(atom, shape)
        if box is None:
            continue
        a0, a1, b0, b1 = box
        r0 = a0 if r0 is None else min(r0, a0)
        r1 = a1 if r1 is None else max(r1, a1)
        c0 = b0 if c0 is None else min(c0, b0)
        c1 = b1 if c1 is None else max(c1, b1)
    if r0 is None:
        return None
    return slice(r0, r1), slice(c0, c1)


def _union(a, b):
    if b is None:
        return a
    return (slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
            slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)))


def _call_soon(func) -> None:
    try:
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, func)
    except (ImportError, RuntimeError):  # pragma: no cover - no Qt (or no usable Qt application)
        func()


def _show_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # pragma: no cover  # noqa: BLE001 - last-resort error reporter: falls back to the log
        log.debug("napari could not show the error", exc_info=True)
        log.error(message)
