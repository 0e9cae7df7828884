"""napari_stofm._napari.compat: every wrapped private napari API, on the installed napari
(private path) and with the private name missing (fallback).

"Shows" means what the drawn canvas shows: :func:`_shown` centres the camera on one data
pixel, zooms in and reads the middle of a screenshot (run under Xvfb on a headless machine).
Everything else runs on a bare ``Labels`` layer (no viewer), and this module opens only two
viewers: with PySide6 6.12.0 on CPython 3.11 every viewer opened and closed drops ~7000
references to ``None`` (seemingly a refcount bug in its Qt event dispatch), and the
interpreter aborts with "none_dealloc" at exit once a run has dropped more than it holds.
"""
from __future__ import annotations

import ast
import inspect
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest

from napari_stofm._napari import compat  # imports without napari; the importorskip below skips this module

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

RED, BLUE = (1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0)

COMPAT_LOG = "napari_stofm._napari.compat"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _cache_folder(tmp_path_factory, monkeypatch):
    """Autosaves of the generated sample go to a per-test cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("compat_cache")))


def _cmap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: RED, 2: BLUE})


@pytest.fixture
def layer():
    """A bare 40x40 Labels layer (no viewer): label 1 on the right half, 0 on the left."""
    from napari.layers import Labels

    data = np.zeros((40, 40), np.uint8)
    data[:, 20:] = 1
    return Labels(data, colormap=_cmap(), opacity=1.0)


@pytest.fixture
def labels(make_napari_viewer):
    """A drawn viewer with a 40x40 Labels layer: label 1 (red) on the right half, 0 (transparent) left."""
    viewer = make_napari_viewer(show=True)  # drawn: screenshots show the real texture
    data = np.zeros((40, 40), np.uint8)
    data[:, 20:] = 1
    layer = viewer.add_labels(data, colormap=_cmap(), opacity=1.0)
    viewer.reset_view()
    return viewer, layer


@pytest.fixture
def napari_patch(make_napari_viewer):
    """A monkeypatch for napari's own objects, undone before the viewers close (the
    ``monkeypatch`` fixture is shared with ``make_napari_viewer`` and undone after)."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def debug_log(caplog):
    caplog.set_level(logging.DEBUG, logger=COMPAT_LOG)
    return caplog


def _said(caplog, text: str) -> bool:
    return any(r.name == COMPAT_LOG and text in r.getMessage() for r in caplog.records)


def _shown(viewer, layer, row: int, col: int) -> np.ndarray:
    """RGB the canvas shows at data pixel (row, col) of ``layer``."""
    viewer.camera.center = tuple(layer.data_to_world((row, col)))
    viewer.camera.zoom = 20.0 / float(min(layer.scale))  # a data pixel is 20 canvas pixels wide
    image = viewer.screenshot(canvas_only=True, flash=False)
    return np.asarray(image[image.shape[0] // 2, image.shape[1] // 2, :3], dtype=float)


def _looks(rgb, rgba, opacity: float = 1.0, atol: float = 4.0) -> bool:
    return bool(np.allclose(rgb, np.asarray(rgba[:3], dtype=float) * 255 * opacity, atol=atol))


def _paint_items(layer):
    """Every history item napari announces on ``events.paint``."""
    items = []
    layer.events.paint.connect(lambda event: items.append(event.value))
    return items


def _mro_delattr(patcher, cls, name):
    """Remove ``name`` from every class of ``cls``'s MRO that defines it (restored after the test)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            patcher.delattr(klass, name)


# ----------------------------------------------------------------------------- module


def test_module_docstring_names_every_private_name_it_uses():
    source = inspect.getsource(compat)
    tree = ast.parse(source)
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and re.match(r"^_[a-z]", node.attr)}
    used |= {node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and re.fullmatch(r"_[a-z][a-z_]*", node.value)}
    used -= {"_missing", "_last_history_item"}  # compat's own helpers
    doc = compat.__doc__
    assert used, "expected the private names compat wraps"
    assert [name for name in sorted(used) if name not in doc] == []
    assert "__wrapped__" in doc and compat.WRITTEN_AGAINST in doc


def test_every_public_function_names_its_napari_version_and_fallback():
    for name in compat.__all__:
        obj = getattr(compat, name)
        if callable(obj):
            doc = inspect.getdoc(obj) or ""
            assert f"napari {compat.WRITTEN_AGAINST}" in doc, name
            assert "allback" in doc, name


# ----------------------------------------------------------------------------- proxies


def test_unwrap_proxy_private_path(layer):
    from napari.utils._proxies import PublicOnlyProxy

    proxy = PublicOnlyProxy(layer)
    assert compat.unwrap_proxy(proxy) is layer
    # the compat functions accept the proxy a plugin widget holds
    assert compat.displayed_slice_image(proxy) is compat.displayed_slice_image(layer)


def test_unwrap_proxy_fallback_returns_plain_objects():
    plain = SimpleNamespace(a=1)
    assert compat.unwrap_proxy(plain) is plain
    assert compat.unwrap_proxy(None) is None


# ----------------------------------------------------------------------------- undo history


def test_last_undo_and_redo_item_private_path(layer):
    assert compat.last_undo_item(layer) is None and compat.last_redo_item(layer) is None
    layer.data_setitem((np.array([5, 6]), np.array([25, 25])), 2)
    item = compat.last_undo_item(layer)
    assert isinstance(item, list) and item
    assert compat.history_atom_bbox(item[-1], layer.data.shape) == (5, 7, 25, 26)
    layer.undo()
    assert compat.last_undo_item(layer) is None
    assert compat.last_redo_item(layer) is not None
    assert (layer.data[5:7, 25] == 1).all()


def test_last_undo_and_redo_item_fallback(layer, monkeypatch, debug_log):
    layer.data_setitem((np.array([5]), np.array([25])), 2)
    marker = object()
    monkeypatch.delattr(layer, "_undo_history")
    monkeypatch.delattr(layer, "_redo_history")
    assert compat.last_undo_item(layer) is None
    assert compat.last_undo_item(layer, missing=marker) is marker
    assert compat.last_redo_item(layer, missing=marker) is marker
    assert _said(debug_log, "Labels._undo_history") and _said(debug_log, "Labels._redo_history")


def test_append_to_history_item_private_path_is_replayed_by_undo(layer):
    items = _paint_items(layer)
    layer.data_setitem((np.array([3]), np.array([22])), 2)
    assert items
    # what the binding does: write more pixels, record them in the same step
    rows, cols = np.array([10, 11]), np.array([30, 31])
    old = layer.data[rows, cols].copy()
    layer.data[rows, cols] = 2
    assert compat.append_to_history_item(layer, items[-1], compat.PixelHistoryAtom((rows, cols), old, np.uint8(2)))
    layer.undo()
    assert layer.data[3, 22] == 1 and (layer.data[rows, cols] == 1).all()
    layer.redo()
    assert layer.data[3, 22] == 2 and (layer.data[rows, cols] == 2).all()


def test_append_to_history_item_fallback(layer, monkeypatch, debug_log):
    stray = [("not", "napari's")]
    atom = compat.PixelHistoryAtom((np.array([0]), np.array([0])), np.array([0]), 1)
    assert compat.append_to_history_item(layer, stray, atom) is False  # not a step napari stored
    assert stray[-1] is atom
    monkeypatch.delattr(layer, "_undo_history")
    other = []
    assert compat.append_to_history_item(layer, other, atom) is False
    assert other == [atom]
    assert _said(debug_log, "Labels._undo_history")


def test_clear_history_private_path(layer):
    layer.data_setitem((np.array([1]), np.array([1])), 2)
    layer.mode = "paint"
    compat.clear_history(layer)
    assert compat.last_undo_item(layer) is None and compat.last_redo_item(layer) is None
    assert layer.mode == "paint" and layer.editable


def test_clear_history_fallback_toggles_editable(layer, monkeypatch, debug_log):
    """A napari that renamed ``_reset_history`` (napari 0.9.1 clears the history on
    ``editable = False`` through that very method, so the rename is simulated)."""
    from napari.layers import Labels

    layer.data_setitem((np.array([1]), np.array([1])), 2)
    layer.mode = "paint"
    monkeypatch.setattr(Labels, "_renamed_reset_history", Labels._reset_history, raising=False)
    monkeypatch.setattr(Labels, "_on_editable_changed",
                        lambda self: None if self.editable else self._renamed_reset_history())
    monkeypatch.delattr(Labels, "_reset_history")
    compat.clear_history(layer)
    assert len(layer._undo_history) == 0 and len(layer._redo_history) == 0
    assert layer.mode == "paint" and layer.editable
    assert _said(debug_log, "Labels._reset_history")


def test_pixel_history_atom_is_napari_legacy_format():
    atom = compat.PixelHistoryAtom("idx", "old", "new")
    indices, old, new = atom
    assert (indices, old, new) == ("idx", "old", "new") and isinstance(atom, tuple)


# ----------------------------------------------------------------------------- history atoms


def test_history_atom_bbox_and_written_private_path(layer):
    items = _paint_items(layer)
    layer.brush_size = 3
    layer.paint((10, 30), 2)  # a mask-based atom
    masked = items[-1][-1]
    assert hasattr(masked, "slice_key")
    box = compat.history_atom_bbox(masked, layer.data.shape)
    changed = np.argwhere(layer.data == 2)
    r0, r1, c0, c1 = box
    assert r0 <= changed[:, 0].min() and changed[:, 0].max() < r1
    assert c0 <= changed[:, 1].min() and changed[:, 1].max() < c1
    assert compat.history_atom_written(layer.data, masked)
    layer.data[layer.data == 2] = 1  # as if napari had not written it yet
    assert not compat.history_atom_written(layer.data, masked)

    layer.data_setitem((np.array([2, 4]), np.array([21, 23])), 2)  # a 3-tuple atom
    legacy = items[-1][-1]
    assert compat.history_atom_bbox(legacy, layer.data.shape) == (2, 5, 21, 24)
    assert compat.history_atom_written(layer.data, legacy)
    empty = compat.PixelHistoryAtom((np.array([], int), np.array([], int)), np.array([]), np.array([]))
    assert compat.history_atom_bbox(empty, layer.data.shape) is None


def test_history_atom_fallback_for_an_unknown_format(debug_log):
    unknown = SimpleNamespace(where="somewhere")
    assert compat.history_atom_bbox(unknown, (40, 50)) == (0, 40, 0, 50)  # the whole image
    assert compat.history_atom_written(np.zeros((40, 50)), unknown) is True
    assert _said(debug_log, "history-atom format")


# ----------------------------------------------------------------------------- display


def test_displayed_slice_image_private_path(layer):
    image = compat.displayed_slice_image(layer)
    assert image is not None
    np.testing.assert_array_equal(np.asarray(image.raw), layer.data)
    assert np.shares_memory(layer.data, image.raw)


def test_displayed_slice_image_fallback(layer, monkeypatch, debug_log):
    _mro_delattr(monkeypatch, type(layer), "_slice")  # a class property in napari 0.9.1
    try:
        assert compat.displayed_slice_image(layer) is None
    finally:
        monkeypatch.undo()  # napari itself draws from it
    assert _said(debug_log, "Labels._slice.image")


def test_label_texture_values_private_path(layer):
    image = compat.displayed_slice_image(layer)
    texture = compat.label_texture_values(layer.colormap, np.array([0, 1], dtype=layer.data.dtype))
    np.testing.assert_array_equal(texture, [image.view[0, 0], image.view[0, 30]])


def test_label_texture_values_fallback(debug_log):
    assert compat.label_texture_values(SimpleNamespace(), np.array([1])) is None
    assert _said(debug_log, "_data_to_texture")


def test_refresh_labels_region_private_path_and_fallbacks(labels, debug_log):
    """One drawn viewer for all three cases (each viewer opened costs PySide6 ~7000
    references to None, see the module docs)."""
    from napari.layers import Labels

    viewer, layer = labels
    rows, cols = np.nonzero(np.ones((4, 4), bool))
    rows, cols = rows + 8, cols + 28
    assert _looks(_shown(viewer, layer, 10, 30), RED)
    layer.data[rows, cols] = 2  # straight into the data: napari does not know yet
    assert _looks(_shown(viewer, layer, 10, 30), RED)
    # private path: the partial texture update
    assert compat.refresh_labels_region(layer, rows, cols, np.full(rows.size, 2)) is True
    assert _looks(_shown(viewer, layer, 10, 30), BLUE)
    assert _looks(_shown(viewer, layer, 20, 30), RED)  # outside the region: unchanged
    layer.data[rows, cols] = 0  # values read back from the data when not given
    assert compat.refresh_labels_region(layer, rows, cols) is True
    assert _looks(_shown(viewer, layer, 10, 30), (0, 0, 0, 1))
    assert not _said(debug_log, "refreshing the whole layer")

    # fallback: either private method missing -> a full layer.refresh(), same pixels
    for k, missing in enumerate(["_partial_labels_refresh", "_accumulate_updated_slice"]):
        with pytest.MonkeyPatch.context() as mp:
            _mro_delattr(mp, Labels, missing)
            r, c = np.array([12 + k, 12 + k, 13 + k]), np.array([33, 34, 33])
            layer.data[r, c] = 2
            assert compat.refresh_labels_region(layer, r, c, np.full(3, 2)) is False
            assert _looks(_shown(viewer, layer, 12 + k, 33), BLUE), missing
            assert _looks(_shown(viewer, layer, 20, 20), RED), missing
    assert _said(debug_log, "refreshing the whole layer")


# ----------------------------------------------------------------------------- method patches


def _count_slicing(layer, monkeypatch) -> list:
    calls = []
    real = layer.set_view_slice
    monkeypatch.setattr(layer, "set_view_slice", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_one_refresh_private_path(layer, monkeypatch):
    from napari.utils.colormaps import DirectLabelColormap

    calls = _count_slicing(layer, monkeypatch)
    with compat.one_refresh(layer):
        layer.data = np.ones((40, 40), np.uint8)
        layer.colormap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: BLUE})
        layer.colormap = _cmap()
    assert len(calls) == 1  # the one refresh at the end
    np.testing.assert_array_equal(np.asarray(compat.displayed_slice_image(layer).raw), 1)


def test_one_refresh_fallback(layer, monkeypatch, debug_log):
    _mro_delattr(monkeypatch, type(layer), "_block_refresh")
    calls = _count_slicing(layer, monkeypatch)
    with compat.one_refresh(layer):
        layer.data = np.ones((40, 40), np.uint8)
        layer.colormap = _cmap()
    assert len(calls) >= 2  # refreshed per change, and once more at the end
    np.testing.assert_array_equal(np.asarray(compat.displayed_slice_image(layer).raw), 1)
    assert _said(debug_log, "Layer._block_refresh")


def test_patch_method_private_path(layer):
    cls = type(layer)
    assert compat.patch_method(layer, "get_status", lambda position=None, **kw: {"coordinates": "patched"})
    assert layer.get_status((0, 0))["coordinates"] == "patched"
    assert cls.get_status is not layer.get_status
    compat.unpatch_method(layer, "get_status")
    assert "patched" not in str(layer.get_status((0, 0), world=True).get("coordinates"))
    compat.unpatch_method(layer, "get_status")  # nothing left to remove: no error


def test_patch_method_fallback_for_a_layer_without_instance_attributes(debug_log):
    class Slotted:
        __slots__ = ()

        def undo(self):
            return "class"

    obj = Slotted()
    assert compat.patch_method(obj, "undo", lambda: "patched") is False
    assert obj.undo() == "class"
    compat.unpatch_method(obj, "undo")  # must not raise
    assert _said(debug_log, "instance override")


def test_patch_tooltip_private_path(layer):
    from napari.components import ViewerModel

    base = layer._get_tooltip_text(np.array([10.0, 30.0]), world=True)
    seen = {}

    def extra(position, text, **kwargs):
        seen.update(kwargs)
        return f"{text}|cell here"

    assert compat.patch_tooltip(layer, extra)
    assert layer._get_tooltip_text(np.array([10.0, 30.0]), world=True) == f"{base}|cell here"
    assert seen["world"] is True
    # napari itself asks the active layer for the tooltip through that name
    model = ViewerModel()
    model.layers.append(layer)
    model.layers.selection.active = layer
    model.tooltip.visible = True
    model.mouse_over_canvas = True
    model.cursor.position = (10.0, 30.0)
    calc = getattr(model, "_calc_status_from_cursor", None)
    if calc is not None:
        status = calc()
        assert status is not None and "cell here" in status[1]
    compat.unpatch_tooltip(layer)
    assert layer._get_tooltip_text(np.array([10.0, 30.0]), world=True) == base


def test_patch_tooltip_fallback(layer, monkeypatch, debug_log):
    _mro_delattr(monkeypatch, type(layer), "_get_tooltip_text")
    assert compat.patch_tooltip(layer, lambda position, text, **kw: "never") is False
    assert "_get_tooltip_text" not in vars(layer)
    compat.unpatch_tooltip(layer)
    assert _said(debug_log, "_get_tooltip_text")


# ----------------------------------------------------------------------------- Qt


def test_qt_window_private_path_and_fallback(make_napari_viewer, napari_patch, debug_log):
    from qtpy.QtWidgets import QMainWindow

    viewer = make_napari_viewer()
    window = compat.qt_window(viewer)
    assert isinstance(window, QMainWindow)
    assert window is viewer.window._qt_window
    assert not _said(debug_log, "Window._qt_window")
    # fallback: the application's only main window
    napari_patch.delattr(viewer.window, "_qt_window")
    assert compat.qt_window(viewer) is window
    assert _said(debug_log, "Window._qt_window")


def test_canvas_widget_private_path_and_fallback(make_napari_viewer, napari_patch, debug_log):
    from qtpy.QtWidgets import QWidget

    viewer = make_napari_viewer()
    native = compat.canvas_widget(viewer)
    assert isinstance(native, QWidget) and native is viewer.window._qt_viewer.canvas.native
    assert not _said(debug_log, "Window._qt_viewer.canvas.native")
    # fallback: the largest OpenGL widget of the main window
    napari_patch.setattr(type(viewer.window), "_qt_viewer", property(lambda self: None))
    assert compat.canvas_widget(viewer) is native
    assert _said(debug_log, "Window._qt_viewer.canvas.native")


# ----------------------------------------------------------------------------- through the binding


def _sample_region_layer(qtbot):
    """The generated sample's 'region' annotation as a bare, bound Labels layer."""
    from napari.layers import Labels

    from napari_stofm._napari.binding import bind
    from napari_stofm._napari.hooks import sample_slice

    data, kwargs, _ = next(t for t in sample_slice() if t[1]["metadata"].get("stofm_key") == "region")
    layer = Labels(data, **kwargs)
    session = kwargs["metadata"]["stofm_session"]
    bind(layer, session, "region")
    return session, layer


def test_binding_edit_shows_the_cell_repaint_without_partial_refresh(qtbot, monkeypatch):
    """With ``_partial_labels_refresh`` gone the binding's repaint of the whole territory
    still reaches the displayed slice (through ``layer.refresh()``), which is what napari
    uploads to the GPU (the screen itself: test_refresh_labels_region_private_path_and_fallbacks)."""
    from napari.layers import Labels

    session, layer = _sample_region_layer(qtbot)
    ann = session.annotations["region"]
    terr = session.territories
    cell = int(np.flatnonzero(ann.codes == 1)[5])
    rows, cols = np.nonzero(terr.instance_map == cell + 1)
    far = int(np.argmax(np.abs(rows - rows.mean()) + np.abs(cols - cols.mean())))  # left out of the stroke
    stroke = np.arange(rows.size) != far
    texture = compat.label_texture_values(layer.colormap, np.array([1, 2], dtype=layer.data.dtype))
    view = compat.displayed_slice_image(layer).view
    assert view[rows[far], cols[far]] == texture[1]
    _mro_delattr(monkeypatch, Labels, "_partial_labels_refresh")
    # most of the cell: it changes class, and the binding repaints the rest of its territory
    layer.data_setitem((rows[stroke], cols[stroke]), 1, refresh=False)
    qtbot.waitUntil(lambda: ann.codes[cell] == 0, timeout=5_000)
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
    view = compat.displayed_slice_image(layer).view
    assert view[rows[far], cols[far]] == texture[0]
    assert (view[rows, cols] == texture[0]).all()


def test_binding_undo_when_the_history_cannot_be_read(qtbot, monkeypatch):
    """Fallback of last_undo_item / last_redo_item in use: the binding maps the restored
    pixels back to cells instead of replaying the annotation change."""
    session, layer = _sample_region_layer(qtbot)
    ann = session.annotations["region"]
    terr = session.territories
    cell = int(np.flatnonzero(ann.codes == 1)[5])
    rows, cols = np.nonzero(terr.instance_map == cell + 1)
    layer.data_setitem((rows, cols), 1)
    qtbot.waitUntil(lambda: ann.codes[cell] == 0, timeout=5_000)

    monkeypatch.setattr(compat, "last_undo_item", lambda layer, missing=None: missing)
    monkeypatch.setattr(compat, "last_redo_item", lambda layer, missing=None: missing)
    layer.undo()
    assert ann.codes[cell] == 1  # pixels and annotation agree again
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
    layer.redo()
    assert ann.codes[cell] == 0
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
