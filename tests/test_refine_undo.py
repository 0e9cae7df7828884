"""Refine (and merge / re-cluster) are previewed and are one undo step, headless and in napari.

No model runs here: the slice gets a made-up embedding (its cell types plus noise) and a
noisy cell-type annotation, which is all ``refine_from_corrections`` needs.
"""
from __future__ import annotations

import numpy as np
import pytest
from builders import noisy_cell_types

from napari_stofm.review.session import CELL_TYPE_KEY, REGION_KEY, SliceSession


def _prepare(session, seed=0):
    """A fake embedding and a noisy cell-type prediction on ``session`` (sample slice)."""
    return noisy_cell_types(session, seed)


def _state(ann):
    return (ann.codes.copy(), ann.curated.copy(), ann.predicted_codes.copy(), ann.confidence.copy(),
            list(ann.categories))


def _assert_state(ann, state):
    codes, curated, predicted, conf, categories = state
    np.testing.assert_array_equal(ann.codes, codes)
    np.testing.assert_array_equal(ann.curated, curated)
    np.testing.assert_array_equal(ann.predicted_codes, predicted)
    np.testing.assert_array_equal(ann.confidence, conf)
    assert ann.categories == categories


@pytest.fixture
def session(tmp_path):
    from napari_stofm.io.sample import make_sample_slice

    s = SliceSession(make_sample_slice(600, seed=3), name="refine", autosave_dir=tmp_path)
    _prepare(s)
    return s


# ----------------------------------------------------------------------------- headless


def test_preview_apply_undo_redo_headless(session):
    ann = session.annotations[CELL_TYPE_KEY]
    ann.assign(np.flatnonzero(ann.codes == 0)[:25], 1)
    start = _state(ann)

    preview = session.preview_refinement(CELL_TYPE_KEY)
    _assert_state(ann, start)  # a preview changes nothing
    assert not session.changes
    assert preview.n_changed > 0 and not ann.curated[preview.changed].any()
    np.testing.assert_array_equal(preview.before, ann.codes[preview.changed])
    gained = sum(c["gained"] for c in preview.counts.values())
    lost = sum(c["lost"] for c in preview.counts.values())
    assert gained == lost == preview.n_changed
    assert preview.describe().startswith(f"{preview.n_changed} uncorrected cells would change class")

    changed = session.apply_refinement(CELL_TYPE_KEY, preview)
    np.testing.assert_array_equal(changed, preview.changed)  # the count shown is what applying does
    np.testing.assert_array_equal(ann.codes[changed], preview.after)
    after = _state(ann)
    assert ann.provenance["n_refinements"] == 1

    record = session.undo_change()
    assert record is not None and record.label == "refine" and not record.applied
    _assert_state(ann, start)
    assert "n_refinements" not in ann.provenance
    assert session.undo_change() is None  # nothing older to undo

    assert session.redo_change() is record and record.applied
    _assert_state(ann, after)
    assert session.redo_change() is None


def test_merge_and_recluster_are_undoable_headless(session):
    from napari_stofm.heads.regions import RegionClusterer

    ann = session.annotations[CELL_TYPE_KEY]
    start = _state(ann)
    session.merge(CELL_TYPE_KEY, 2, 0)
    assert ann.n_classes == len(start[4]) - 1
    session.undo_change(CELL_TYPE_KEY)
    _assert_state(ann, start)
    session.redo_change(CELL_TYPE_KEY)
    assert ann.n_classes == len(start[4]) - 1

    session.clusterer = RegionClusterer(session.adata.obsm["X_stofm"], session.xy, seed=0)
    first = session.recluster(4)
    four = _state(first)
    assert session.recluster(3) is first and first.n_classes == 3
    assert session.undo_change(REGION_KEY).label == "recluster"
    _assert_state(session.annotations[REGION_KEY], four)
    assert session.adata.obs[REGION_KEY].nunique() == 4  # the obs column follows the undo


def test_a_new_step_drops_the_undone_ones(session):
    ann = session.annotations[CELL_TYPE_KEY]
    session.merge(CELL_TYPE_KEY, 1, 0)
    session.undo_change()
    session.merge(CELL_TYPE_KEY, 2, 0)
    assert [r.applied for r in session.changes] == [True]
    assert session.redo_change() is None
    assert ann.n_classes == len(session.changes[0].before.categories) - 1


# ----------------------------------------------------------------------------- napari


@pytest.fixture
def shown(make_napari_viewer, tmp_path):
    pytest.importorskip("napari")
    from napari_stofm._napari.binding import bind_viewer
    from napari_stofm._napari.layers import add_or_update_labels

    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    session = layers[0].metadata["stofm_session"]
    _prepare(session)
    layer = add_or_update_labels(viewer, session, CELL_TYPE_KEY)
    bind_viewer(viewer)
    return viewer, session, layer


def _cell_pixel(session, cell):
    rows, cols = np.nonzero(session.territories.instance_map == cell + 1)
    k = len(rows) // 2
    return int(rows[k]), int(cols[k])


def _paint_some(session, layer, ann):
    cells = np.flatnonzero(ann.codes == 0)[:: max(1, int((ann.codes == 0).sum()) // 12)][:12]
    layer.brush_size = 9
    layer.selected_label = 2  # class 1
    layer._begin_stroke()  # one brush stroke over several cells, as a mouse drag makes
    for cell in cells:
        layer.paint(_cell_pixel(session, cell), 2)
    layer._commit_stroke()
    assert ann.curated.sum() > 0


@pytest.mark.gui
def test_paint_refine_undo_undo_redo(shown, qtbot):
    viewer, session, layer = shown
    ann = session.annotations[CELL_TYPE_KEY]
    terr = session.territories
    original = _state(ann)
    original_pixels = np.asarray(layer.data).copy()
    _paint_some(session, layer, ann)
    painted, painted_pixels = _state(ann), np.asarray(layer.data).copy()
    np.testing.assert_array_equal(painted_pixels, terr.class_image(ann.codes))

    preview = session.preview_refinement(CELL_TYPE_KEY)
    changed = session.apply_refinement(CELL_TYPE_KEY, preview)
    assert changed.size == preview.n_changed > 0
    refined, refined_pixels = _state(ann), np.asarray(layer.data).copy()
    np.testing.assert_array_equal(refined_pixels, terr.class_image(ann.codes))
    assert len(layer._undo_history) == 2  # the stroke and the refine: the history was kept

    layer.undo()  # the refine
    _assert_state(ann, painted)
    np.testing.assert_array_equal(layer.data, painted_pixels)
    layer.undo()  # the brush stroke
    _assert_state(ann, original)
    np.testing.assert_array_equal(layer.data, original_pixels)
    assert not ann.curated.any()

    layer.redo()
    _assert_state(ann, painted)
    np.testing.assert_array_equal(layer.data, painted_pixels)
    layer.redo()
    _assert_state(ann, refined)
    np.testing.assert_array_equal(layer.data, refined_pixels)
    assert layer.features.set_index("index")["n_cells"].sum() == ann.n_cells - ann.n_unassigned


@pytest.mark.gui
def test_review_widget_asks_with_the_count_then_refines_as_one_step(shown, qtbot, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, session, layer = shown
    ann = session.annotations[CELL_TYPE_KEY]
    _paint_some(session, layer, ann)
    painted, painted_pixels = _state(ann), np.asarray(layer.data).copy()
    dock, review = viewer.window.add_plugin_dock_widget("napari-stofm", "Review labels")
    review.select_layer(layer)

    asked = []
    answer = [QMessageBox.StandardButton.No]
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *a, **k: asked.append(text) or answer[0])
    review.refine()
    qtbot.waitUntil(lambda: review.refine_worker is None, timeout=60_000)
    assert review.last_error is None, review.last_error
    n = session.preview_refinement(CELL_TYPE_KEY).n_changed
    assert asked and asked[0].startswith(f"{n} uncorrected cells would change class")
    _assert_state(ann, painted)  # said no: nothing applied
    assert "not refined" in review.info.text()

    answer[0] = QMessageBox.StandardButton.Yes
    review.refine()
    qtbot.waitUntil(lambda: review.refine_worker is None, timeout=60_000)
    assert int((ann.codes != painted[0]).sum()) == n
    assert f"refined: {n} uncorrected cells" in review.info.text()

    layer.undo()
    _assert_state(ann, painted)
    np.testing.assert_array_equal(layer.data, painted_pixels)
    assert review.table.rowCount() == ann.n_classes


@pytest.mark.gui
def test_merge_is_one_undo_step_of_the_layer(shown):
    viewer, session, layer = shown
    ann = session.annotations[CELL_TYPE_KEY]
    start, pixels = _state(ann), np.asarray(layer.data).copy()
    colors = dict(layer.colormap.color_dict)
    session.merge(CELL_TYPE_KEY, 1, 0)
    np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))
    layer.undo()
    _assert_state(ann, start)
    np.testing.assert_array_equal(layer.data, pixels)
    np.testing.assert_allclose(layer.colormap.color_dict[2], colors[2])
    layer.redo()
    assert ann.n_classes == len(start[4]) - 1
    np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))
