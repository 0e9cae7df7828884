"""Every private napari API napari-stofm touches, each behind one function with a fallback.

Written against napari 0.9.1 (:data:`WRITTEN_AGAINST`). A napari upgrade that renames or
drops one of these names should break this file only: each function below uses the
private API when it is there, and otherwise takes a public path (slower, but correct) or
does nothing and says so in a ``logging`` debug message on this module's logger.

Private napari names used here (and nowhere else in the package):

* ``napari.utils._proxies.PublicOnlyProxy.__wrapped__`` (the proxy napari hands plugin
  widgets) -- :func:`unwrap_proxy`
* ``Labels._undo_history`` / ``Labels._redo_history`` -- :func:`last_undo_item`,
  :func:`last_redo_item`, :func:`append_to_history_item`
* ``Labels._reset_history()`` -- :func:`clear_history`
* ``Labels._slice.image`` (a ``_ScalarFieldView`` with ``.raw`` / ``.view``) --
  :func:`displayed_slice_image`
* ``LabelColormapBase._data_to_texture()`` -- :func:`label_texture_values`
* ``Labels._accumulate_updated_slice()`` and ``Labels._partial_labels_refresh()`` --
  :func:`refresh_labels_region`
* ``Layer._get_tooltip_text()`` (what ``ViewerModel`` calls for the hover tooltip) --
  :func:`patch_tooltip`, :func:`unpatch_tooltip`
* instance ``__dict__`` overrides of layer methods (napari calls ``layer.undo()``,
  ``layer.get_status()``, ... by attribute lookup) -- :func:`patch_method`,
  :func:`unpatch_method`
* the history-atom format of ``Labels.events.paint`` (``_MaskedPaintAtom`` with
  ``slice_key`` / ``mask`` / ``new_value``, or the legacy ``(indices, old, new)`` 3-tuple
  that ``Labels._load_history`` replays) -- :func:`history_atom_bbox`,
  :func:`history_atom_written`, :class:`PixelHistoryAtom`
* ``Window._qt_window`` (the Qt main window) -- :func:`qt_window`
* ``Window._qt_viewer.canvas.native`` (the Qt widget the canvas draws in) -- :func:`canvas_widget`
* ``Layer._block_refresh()`` (several changes, one refresh) -- :func:`one_refresh`

Not used, because napari 0.9.1 does not support it: painting on a multiscale Labels layer
(``Labels._reset_editable`` makes every multiscale Labels layer read-only). The plugin's
Labels layers are single-scale, at a resolution capped by
:data:`napari_stofm.review.raster.DEFAULT_MAX_PIXELS`.

Not wrapped, because they are public: ``Labels.events.paint`` / ``labels_update``,
``layer.refresh()``, ``world_to_data``, ``napari.qt.threading.create_worker`` and its
documented ``_start_thread`` / ``_ignore_errors`` keyword arguments.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

#: the napari version every function here was written and tested against
WRITTEN_AGAINST = "0.9.1"

Bbox = Tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open


def _missing(what: str, consequence: str, *, exc_info: bool = False) -> None:
    log.debug("napari compat: %s is not available in this napari (written against %s); %s",
              what, WRITTEN_AGAINST, consequence, exc_info=exc_info)


# ----------------------------------------------------------------------------- proxies


def unwrap_proxy(obj):
    """The napari object behind the public-only proxy napari hands plugin widgets.

    Written against napari 0.9.1 (``napari.utils._proxies.PublicOnlyProxy``, a
    ``wrapt.ObjectProxy``: the object is its ``__wrapped__``). Fallback: an object with no
    ``__wrapped__`` is returned as it is (free; a proxy that hides the object some other
    way then makes the other functions here take their fallbacks).
    """
    return getattr(obj, "__wrapped__", obj) if obj is not None else None


# ----------------------------------------------------------------------------- undo history


def _last_history_item(layer, name: str, missing):
    history = getattr(unwrap_proxy(layer), name, None)
    if history is None:
        _missing(f"Labels.{name}", "the undo/redo step is unknown")
        return missing
    try:
        return history[-1] if len(history) else None
    except Exception as err:  # noqa: BLE001 - private-API shim: a history napari stores differently
        _missing(f"Labels.{name}[-1] ({err})", "the undo/redo step is unknown", exc_info=True)
        return missing


def last_undo_item(layer, missing=None):
    """The history item ``layer.undo()`` would replay next (a list of atoms); None when
    there is nothing to undo.

    Written against napari 0.9.1 (``Labels._undo_history``, a deque of lists). Fallback:
    ``missing`` (None unless given), with a debug message. The binding passes a marker
    and then re-maps the whole image to cells after the undo (one ``class_image`` of the
    slice; undone cells stay marked curated instead of getting their old flags back).
    """
    return _last_history_item(layer, "_undo_history", missing)


def last_redo_item(layer, missing=None):
    """The history item ``layer.redo()`` would replay next; None when there is nothing to
    redo.

    Written against napari 0.9.1 (``Labels._redo_history``). Fallback and its cost as in
    :func:`last_undo_item`.
    """
    return _last_history_item(layer, "_redo_history", missing)


def append_to_history_item(layer, item: list, atom) -> bool:
    """Add ``atom`` to a history item napari announced (``events.paint``'s value), so that
    ``layer.undo()`` / ``redo()`` replay it with the rest of that step.

    Written against napari 0.9.1, where the announced list is the very object stored in
    ``Labels._undo_history``. Always appends; returns whether napari is known to replay it.
    Fallback (history unreadable, or the item is not in it): False and a debug message;
    undo then restores only napari's own atoms and the binding re-maps the image to cells
    (one ``class_image`` of the slice per undo).
    """
    item.append(atom)
    history = getattr(unwrap_proxy(layer), "_undo_history", None)
    if history is None:
        _missing("Labels._undo_history", "cannot check that undo replays the cell repaint")
        return False
    try:
        stored = any(h is item for h in reversed(history))
    except Exception:  # noqa: BLE001 - private-API shim: any unreadable history means "not stored"
        log.debug("napari compat: Labels._undo_history cannot be searched", exc_info=True)
        stored = False
    if not stored:
        _missing("the announced history item in Labels._undo_history",
                 "undo will not replay the cell repaint; the binding re-maps pixels instead")
    return stored


def push_history_item(layer, item: list) -> bool:
    """Make ``item`` (a list of atoms the plugin already applied to ``layer.data``) the
    layer's next undo step, as a new edit does: the redo steps are dropped. No paint event
    is emitted. Returns whether it took.

    Written against napari 0.9.1 (``Labels._undo_history`` / ``_redo_history``, deques of
    lists that ``undo()`` / ``redo()`` replay). Fallback (histories missing or not
    appendable): False with a debug message; the caller then clears the history
    (:func:`clear_history`), so that undo never replays steps that no longer fit the pixels.
    """
    layer = unwrap_proxy(layer)
    undo, redo = getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)
    if undo is None or redo is None:
        _missing("Labels._undo_history / _redo_history", "the step is not undoable; the history is cleared")
        return False
    try:
        undo.append(item)
        redo.clear()
    except Exception as err:  # noqa: BLE001 - private-API shim: a history napari stores differently
        _missing(f"appending to Labels._undo_history ({err})", "the step is not undoable; the history is cleared",
                 exc_info=True)
        return False
    return True


def clear_history(layer) -> None:
    """Forget the layer's undo/redo steps (after its pixels were replaced wholesale).

    Written against napari 0.9.1 (``Labels._reset_history()``). Fallback: make the layer
    non-editable and editable again, which napari answers by clearing the history
    (cheap; the layer's mode is kept, though napari passes through pan/zoom).
    """
    layer = unwrap_proxy(layer)
    reset = getattr(layer, "_reset_history", None)
    if callable(reset):
        reset()
        return
    _missing("Labels._reset_history", "clearing the history by toggling layer.editable")
    mode, editable = layer.mode, layer.editable
    layer.editable = False
    layer.editable = True
    layer.mode = mode
    layer.editable = editable


class PixelHistoryAtom(tuple):
    """A history atom in napari's legacy ``(indices, old_values, new_values)`` format, which
    ``Labels._load_history`` replays as ``data[indices] = old`` (undo) / ``new`` (redo).

    Written against napari 0.9.1 (``data_setitem`` still records this format next to the
    newer ``_MaskedPaintAtom``). Subclass it to carry more (napari only unpacks the three
    fields). No fallback: a napari that stops replaying 3-tuples breaks undo of the cell
    repaint; :func:`append_to_history_item` then reports False.
    """

    def __new__(cls, indices, old, new):
        return super().__new__(cls, (indices, old, new))


def history_atom_bbox(atom, shape) -> Optional[Bbox]:
    """Bounding box ``(r0, r1, c0, c1)`` of the pixels one paint-history atom touched (last
    two axes, clipped to ``shape``), or None when it touched none.

    Written against napari 0.9.1: ``_MaskedPaintAtom`` (``slice_key``) from paint / fill /
    polygon, and the ``(indices, old, new)`` 3-tuple from ``data_setitem``. Fallback: an
    atom of any other form gives the whole image (correct; the edit is then mapped over
    the full slice, about one ``class_image`` of it per edit), with a debug message.
    """
    rows, cols = shape[-2], shape[-1]
    slice_key = getattr(atom, "slice_key", None)
    try:
        if slice_key is not None:
            rs, cs = slice_key[-2], slice_key[-1]
            a0, a1 = rs.start or 0, rs.stop if rs.stop is not None else rows
            b0, b1 = cs.start or 0, cs.stop if cs.stop is not None else cols
        else:
            indices = atom[0]
            if len(indices) < 2 or np.size(indices[-1]) == 0:
                return None
            rr, cc = np.asarray(indices[-2]), np.asarray(indices[-1])
            a0, a1, b0, b1 = int(rr.min()), int(rr.max()) + 1, int(cc.min()), int(cc.max()) + 1
    except Exception as err:  # noqa: BLE001 - private-API shim: any unknown atom form falls back to the whole image
        _missing(f"the history-atom format {type(atom).__name__} ({err})", "mapping the edit over the whole image",
                 exc_info=True)
        return 0, rows, 0, cols
    return max(a0, 0), min(a1, rows), max(b0, 0), min(b1, cols)


def history_atom_written(data, atom) -> bool:
    """Whether the pixels of a paint-history atom already hold its new values (napari
    announces some edits just before writing them).

    Written against napari 0.9.1 (``_MaskedPaintAtom.slice_key / mask / new_value``, or the
    ``(indices, old, new)`` 3-tuple). Fallback: an atom of another form counts as written
    (the edit is mapped at once; should napari write later, the pixels written then are
    mapped by the next edit or by ``resync``).
    """
    try:
        if hasattr(atom, "slice_key"):
            region = np.asarray(data[atom.slice_key])
            values = region if atom.mask is None else region[atom.mask]
            return bool(np.all(values == atom.new_value))
        indices, old, new = atom
        return bool(np.array_equal(np.asarray(data[indices]), np.broadcast_to(new, np.shape(old))))
    except Exception as err:  # noqa: BLE001 - private-API shim: any unknown atom form counts as written
        _missing(f"the history-atom format {type(atom).__name__} ({err})", "treating the edit as written",
                 exc_info=True)
        return True


# ----------------------------------------------------------------------------- display


def displayed_slice_image(layer):
    """The layer's displayed slice: an object with ``.raw`` (label values) and ``.view``
    (texture values sent to the GPU), or None.

    Written against napari 0.9.1 (``Labels._slice.image``, a ``_ScalarFieldView``).
    Fallback: None with a debug message (callers refresh the whole layer instead).
    """
    response = getattr(unwrap_proxy(layer), "_slice", None)
    image = getattr(response, "image", None)
    if image is None or not hasattr(image, "raw") or not hasattr(image, "view"):
        _missing("Labels._slice.image", "no access to the displayed slice")
        return None
    return image


def label_texture_values(colormap, values):
    """Label values mapped to the texture values napari sends to the GPU, or None.

    Written against napari 0.9.1 (``LabelColormapBase._data_to_texture``). Fallback: None
    with a debug message (callers refresh the whole layer instead).
    """
    to_texture = getattr(colormap, "_data_to_texture", None)
    if not callable(to_texture):
        _missing(f"{type(colormap).__name__}._data_to_texture", "no texture values")
        return None
    return to_texture(values)


def refresh_labels_region(layer, rows, cols, values=None) -> bool:
    """Show pixels ``(rows, cols)`` written straight into ``layer.data`` (``values``: what
    was written; read back from the data when None).

    Written against napari 0.9.1: the partial texture update napari's own
    ``data_setitem`` makes (``_slice.image.view``, ``_data_to_texture``,
    ``_accumulate_updated_slice``, ``_partial_labels_refresh``). Returns True when that
    path was taken. Fallback (any of those missing, a layer that is not 2-D numpy sharing
    memory with its slice, or any error on the way): ``layer.refresh()`` and False; same
    pixels, but a full re-slice and texture upload, about 0.1 s per 5 Mpx instead of
    milliseconds.
    """
    layer = unwrap_proxy(layer)
    rows, cols = np.asarray(rows), np.asarray(cols)
    if rows.size == 0:
        return True
    try:
        image = displayed_slice_image(layer)
        accumulate = getattr(layer, "_accumulate_updated_slice", None)
        partial = getattr(layer, "_partial_labels_refresh", None)
        if image is None or not callable(accumulate) or not callable(partial):
            raise AttributeError("Labels._accumulate_updated_slice / _partial_labels_refresh")
        data = layer.data
        if layer.ndim != 2 or not isinstance(data, np.ndarray) or not np.shares_memory(data, image.raw):
            raise AttributeError("not a 2-D numpy layer sharing memory with its slice")
        if layer.contour == 0:
            vals = data[rows, cols] if values is None else np.asarray(values, dtype=data.dtype)
            texture = label_texture_values(layer.colormap, vals)
            if texture is None:
                raise AttributeError("_data_to_texture")
            image.view[rows, cols] = texture
        accumulate((slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1)))
        partial()
        return True
    except Exception as err:  # noqa: BLE001 - private-API shim: another napari version or data backend
        _missing(f"the partial labels refresh ({err})", "refreshing the whole layer", exc_info=True)
        layer.refresh()
        return False


@contextlib.contextmanager
def one_refresh(layer):
    """Change several things of a layer (data, colormap, features) with one refresh at the
    end instead of one per change: each refresh of a large Labels layer re-slices it and
    uploads its whole texture.

    Written against napari 0.9.1 (``Layer._block_refresh()``, a context manager under
    which ``refresh()`` does nothing). Fallback: the changes refresh as they come (same
    result, a refresh per change), then the one at the end.
    """
    layer = unwrap_proxy(layer)
    block = getattr(layer, "_block_refresh", None)
    context = None
    if callable(block):
        try:
            context = block()
            context.__enter__()
        except Exception as err:  # noqa: BLE001 - private-API shim: refreshes are then not batched
            _missing(f"Layer._block_refresh ({err})", "refreshing per change", exc_info=True)
            context = None
    else:
        _missing("Layer._block_refresh", "refreshing per change")
    try:
        yield layer
    finally:
        if context is not None:
            context.__exit__(None, None, None)
        layer.refresh()


# ----------------------------------------------------------------------------- method patches


def patch_method(layer, name: str, func: Callable) -> bool:
    """Make ``layer.<name>`` call ``func`` for this layer only (an instance attribute that
    shadows the class's method); returns whether it took.

    Written against napari 0.9.1, whose layers keep a plain ``__dict__`` and call
    ``undo`` / ``redo`` / ``get_status`` / ``_get_tooltip_text`` by attribute lookup.
    Fallback: a layer that refuses instance attributes is left as it is (False, debug
    message): the behaviour ``func`` adds is missing, nothing else changes.
    """
    layer = unwrap_proxy(layer)
    try:
        setattr(layer, name, func)
    except Exception as err:  # noqa: BLE001 - private-API shim: a layer refusing the override is left unpatched
        _missing(f"an instance override of {type(layer).__name__}.{name} ({err})", "not patched", exc_info=True)
        return False
    return True


def unpatch_method(layer, name: str) -> None:
    """Undo :func:`patch_method` (the class's method shows again).

    Written against napari 0.9.1 (instance ``__dict__``). Fallback: ``delattr``, and
    nothing (debug message) when there is no instance override to remove.
    """
    layer = unwrap_proxy(layer)
    try:
        vars(layer).pop(name, None)
        return
    except TypeError:  # no __dict__
        pass
    try:
        delattr(layer, name)
    except Exception as err:  # noqa: BLE001 - private-API shim: an override that cannot be removed is left as it is
        _missing(f"removing the override of {type(layer).__name__}.{name} ({err})", "left as it is", exc_info=True)


def patch_tooltip(layer, func: Callable) -> bool:
    """Let ``func(position, text, **kwargs) -> str`` rewrite the layer's hover tooltip
    (``text``: napari's own tooltip; ``kwargs`` as napari passes them, e.g. ``world``).

    Written against napari 0.9.1, where ``ViewerModel`` asks the active layer for
    ``_get_tooltip_text(position, view_direction=, dims_displayed=, world=)``. Fallback:
    nothing is patched (False, debug message): the tooltip lacks what ``func`` adds; the
    status bar, patched through the public ``get_status``, still shows it.
    """
    layer = unwrap_proxy(layer)
    base = getattr(type(layer), "_get_tooltip_text", None)
    if not callable(base):
        _missing(f"{type(layer).__name__}._get_tooltip_text", "the tooltip is left as napari makes it")
        return False

    def _get_tooltip_text(position, **kwargs):
        return func(position, base(layer, position, **kwargs), **kwargs)

    return patch_method(layer, "_get_tooltip_text", _get_tooltip_text)


def unpatch_tooltip(layer) -> None:
    """Undo :func:`patch_tooltip`. Written against napari 0.9.1; fallback as
    :func:`unpatch_method`."""
    unpatch_method(layer, "_get_tooltip_text")


# ----------------------------------------------------------------------------- Qt


def qt_window(viewer):
    """The viewer's Qt main window (a ``QMainWindow``), or None.

    Written against napari 0.9.1 (``Window._qt_window``). Fallback: the only top-level
    ``QMainWindow`` of the application when there is exactly one (a linear scan of the
    top-level widgets); None (debug message) when there are none or several.
    """
    viewer = unwrap_proxy(viewer)
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    if window is not None:
        return window
    _missing("Window._qt_window", "looking for the application's only main window")
    try:
        from qtpy.QtWidgets import QApplication, QMainWindow

        app = QApplication.instance()
        mains = [w for w in (app.topLevelWidgets() if app is not None else []) if isinstance(w, QMainWindow)]
    except (ImportError, RuntimeError):  # no Qt binding, or a Qt application being torn down
        log.debug("napari compat: the Qt top-level widgets cannot be listed", exc_info=True)
        mains = []
    if len(mains) == 1:
        return mains[0]
    _missing("a unique Qt main window", "no window (None)")
    return None


def canvas_widget(viewer):
    """The Qt widget the viewer's canvas draws in (a ``QOpenGLWidget``), or None.

    Written against napari 0.9.1 (``Window._qt_viewer.canvas.native``). Fallback: the
    largest ``QOpenGLWidget`` inside the main window of :func:`qt_window` (a scan of its
    children); None (debug message) when there is none. Callers then go without what they
    would have drawn over the canvas.
    """
    viewer = unwrap_proxy(viewer)
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    native = getattr(getattr(qt_viewer, "canvas", None), "native", None)
    if native is not None:
        return native
    _missing("Window._qt_viewer.canvas.native", "looking for the main window's OpenGL widget")
    window = qt_window(viewer)
    if window is None:
        return None
    try:
        from qtpy.QtWidgets import QOpenGLWidget
    except ImportError:
        try:
            from qtpy.QtOpenGLWidgets import QOpenGLWidget
        except ImportError:
            _missing("QOpenGLWidget", "no canvas widget (None)")
            return None
    widgets = window.findChildren(QOpenGLWidget)
    if not widgets:
        _missing("an OpenGL widget in the main window", "no canvas widget (None)")
        return None
    return max(widgets, key=lambda w: w.width() * w.height())


__all__ = [
    "WRITTEN_AGAINST", "unwrap_proxy", "last_undo_item", "last_redo_item", "append_to_history_item",
    "push_history_item", "clear_history",
    "PixelHistoryAtom", "history_atom_bbox", "history_atom_written", "displayed_slice_image",
    "label_texture_values", "refresh_labels_region", "one_refresh", "patch_method", "unpatch_method",
    "patch_tooltip",
    "unpatch_tooltip", "qt_window", "canvas_widget",
]
