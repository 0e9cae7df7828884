"""The plugin in a real napari viewer (Qt + OpenGL; run under Xvfb on a headless machine).

The model is the suite's small randomly initialised SToFM (``tiny_checkpoint``). The sample
slice's embedding and one run's result on it are computed once per module, headlessly
(``sample_embedding``, ``run_result``); a test puts copies of them in its own viewer's
slice, as the run widget finds a cached embedding for a user who runs twice. No test
depends on another having run first. Autosaves and caches go to a per-test folder (conftest).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sample_embedding(tiny_checkpoint):
    """The sample slice embedded by the test checkpoint (obsm + uns for a session's AnnData;
    :func:`_inject` puts copies there)."""
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.model.stofm import SToFM
    from napari_stofm.pipeline.embed import embed

    adata = make_sample_slice()
    embed(adata, SToFM.load(tiny_checkpoint), device="cpu")
    return {"obsm": {k: np.asarray(adata.obsm[k]).copy() for k in ("X_stofm", "X_stofm_cell")},
            "uns": {k: v for k, v in adata.uns["stofm"].items() if not isinstance(v, dict)}}


@pytest.fixture(scope="module")
def run_result(tiny_checkpoint, sample_embedding, tmp_path_factory):
    """What the Run widget computes on the sample with its partial cell types (6 regions,
    labels from the slice's own column), computed once, headlessly, on the same slice
    and embedding; :func:`_copy_result` gives each test its own copy to show."""
    from napari_stofm import keys
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.review.session import SliceSession

    adata = make_sample_slice()
    adata.uns[keys.SOURCE] = {"format": "generated", "name": "sample_seed0_3000"}  # as the sample hook names it
    session = SliceSession(adata, name="SToFM sample", autosave_dir=tmp_path_factory.mktemp("run_result"))
    _inject(session, sample_embedding)
    _partial_cell_types(session)
    result = session.compute(weights=str(tiny_checkpoint), n_regions=6, label_key="partial_cell_type", device="cpu")
    assert result.embedding_reused is True
    return result


def _copy_result(result):
    """A run result of one's own, as the widget receives it from its worker (the slice's
    territories stay those of the viewer's session)."""
    from napari_stofm.pipeline.predict import RunResult

    return RunResult({k: a.copy() for k, a in result.annotations.items()}, copy.deepcopy(result.clusterer),
                     copy.deepcopy(result.embedding), prediction=copy.deepcopy(result.prediction),
                     messages=list(result.messages))


@pytest.fixture
def messages(monkeypatch):
    """Every error / info message the plugin shows in napari."""
    import napari.utils.notifications as notifications

    shown = []
    real_error, real_info = notifications.show_error, notifications.show_info

    def error(message):
        shown.append(("error", str(message)))
        real_error(message)

    def info(message):
        shown.append(("info", str(message)))
        real_info(message)

    monkeypatch.setattr(notifications, "show_error", error)
    monkeypatch.setattr(notifications, "show_info", info)
    return shown


def _open_sample(viewer):
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    cells = layers[0]
    assert cells.metadata["stofm_role"] == "cells"
    return cells, cells.metadata["stofm_session"]


def _inject(session, emb):
    for k, v in emb["obsm"].items():
        session.adata.obsm[k] = v.copy()
    session.adata.uns["stofm"] = copy.deepcopy(emb["uns"])


def _run(viewer, qtbot, checkpoint, *, source=None, label_key=None, n_regions=6):
    dock, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    widget.weights_combo.setCurrentText("checkpoint folder")
    widget.weights_path.setText(str(checkpoint))
    widget.regions_spin.blockSignals(True)
    widget.regions_spin.setValue(n_regions)
    widget.regions_spin.blockSignals(False)
    if source is not None:
        widget.source_combo.setCurrentText(source)
        widget.label_key.setCurrentText(label_key)
    worker = widget.run()
    assert worker is not None, widget.last_error
    qtbot.waitUntil(lambda: widget.worker is None and not widget.showing, timeout=RUN_TIMEOUT_MS)
    assert widget.last_error is None, widget.last_error
    return widget


def _labels(viewer, key):
    """The Labels layer of labelling ``key``, found by the name it is shown under."""
    from napari_stofm._napari.layers import layer_name

    found = [l for l in viewer.layers if l.name == layer_name(key)]
    assert found, [l.name for l in viewer.layers]
    assert found[0].metadata["stofm_key"] == key
    return found[0]


def _partial_cell_types(session, keep=0.3, seed=0):
    rng = np.random.default_rng(seed)
    partial = session.adata.obs["cell_type"].copy()
    partial[rng.random(session.adata.n_obs) > keep] = np.nan
    session.adata.obs["partial_cell_type"] = partial


# ----------------------------------------------------------------------------- open + run


def test_sample_opens_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    assert cells.data.shape == (session.adata.n_obs, 2)
    # napari shows (y, x); obsm['spatial'] is (x, y)
    np.testing.assert_allclose(cells.data, session.xy[:, ::-1])
    assert "cell_type" in cells.features and "cell_id" in cells.features
    assert cells.metadata["adata"] is session.adata
    # the sample's own labels are editable Labels layers over the territories
    region = _labels(viewer, "region")
    assert region.metadata["stofm_key"] == "region"
    terr = session.territories
    assert region.data.shape == terr.shape
    np.testing.assert_allclose(region.scale, terr.scale)
    np.testing.assert_allclose(region.translate, terr.translate)
    codes = session.annotations["region"].codes
    np.testing.assert_array_equal(region.data, terr.class_image(codes))


def test_edits_are_mapped_without_any_widget_open(make_napari_viewer, qtbot):
    from napari_stofm._napari.binding import binding_of

    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    layer = _labels(viewer, "region")
    qtbot.waitUntil(lambda: binding_of(layer) is not None, timeout=5_000)
    ann = session.annotations["region"]
    cell = int(np.flatnonzero(ann.codes == 1)[5])
    rows, cols = np.nonzero(session.territories.instance_map == cell + 1)
    layer.data_setitem((rows, cols), 1)
    assert ann.codes[cell] == 0 and ann.curated[cell]
    # the sample has no folder: the autosave goes to the user cache, debounced
    qtbot.waitUntil(lambda: session.store.exists(), timeout=10_000)


def test_run_widget_produces_two_labels_layers(make_napari_viewer, qtbot, tiny_checkpoint, messages):
    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    _partial_cell_types(session)
    widget = _run(viewer, qtbot, tiny_checkpoint, source="labels column of this slice", label_key="partial_cell_type")
    assert widget.last_result.embedding_reused is False  # the model really ran
    assert session.adata.obsm["X_stofm"].shape[0] == session.adata.n_obs
    _assert_one_monotonic_progress(widget)

    regions = _labels(viewer, "stofm_region")
    types = _labels(viewer, "stofm_cell_type")
    ann_r = session.annotations["stofm_region"]
    ann_t = session.annotations["stofm_cell_type"]
    assert ann_r.n_classes == 6 and ann_r.categories[0] == "Region 1"
    assert set(ann_t.categories) == set(session.adata.obs["cell_type"].cat.categories)
    for layer, ann in ((regions, ann_r), (types, ann_t)):
        terr = session.territories
        np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
        np.testing.assert_allclose(layer.scale, terr.scale)
        np.testing.assert_allclose(layer.translate, terr.translate)
        for code, hex_color in enumerate(ann.colors):
            expected = [int(hex_color[i: i + 2], 16) / 255 for i in (1, 3, 5)]
            np.testing.assert_allclose(layer.colormap.color_dict[code + 1][:3], expected, atol=1e-6)
        feats = layer.features.set_index("index")
        assert list(feats.loc[1:, "class"]) == ann.categories
        assert feats.loc[1:, "n_cells"].sum() == (ann.codes >= 0).sum()
    # the labelled cells keep their given cell type
    given = session.adata.obs["partial_cell_type"].notna().to_numpy()
    names = np.array(ann_t.categories, dtype=object)[ann_t.codes[given]]
    assert (names == session.adata.obs["partial_cell_type"][given].astype(str).to_numpy()).all()
    # predictions written to obs as well (what a script would read)
    assert "stofm_region" in session.adata.obs and "stofm_cell_type_confidence" in session.adata.obs
    # the result's autosave is written by a worker, and holds both labellings as shown
    qtbot.waitUntil(lambda: session.store.exists(), timeout=10_000)  # moved into place when complete
    saved = session.store.load(session.adata.obs_names)
    assert saved["stofm_region"].equals(ann_r) and saved["stofm_cell_type"].equals(ann_t)
    assert not [m for m in messages if m[0] == "error"]


def _assert_one_monotonic_progress(widget):
    """The run's bar: one total for the whole run, never back, never a long sit at 0 (the
    stages share one bar), full at the end, the stage names in the message on the way."""
    from napari_stofm.progress import OVERALL_TOTAL

    history = widget.task.history
    assert history and all(total == OVERALL_TOTAL for _, total in history)
    dones = [done for done, _ in history]
    assert dones == sorted(dones), "the progress bar went back"
    assert sum(1 for d in dones if d == 0) <= 2  # only the first reports of the run are at 0
    assert widget.task.state == "done" and widget.progress_bar.value() == widget.progress_bar.maximum()
    assert widget.status.text().startswith("done: 6 regions")


def test_changing_region_count_reclusters_without_the_model(make_napari_viewer, qtbot, tiny_checkpoint,
                                                            sample_embedding, monkeypatch):
    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    _inject(session, sample_embedding)
    widget = _run(viewer, qtbot, tiny_checkpoint, n_regions=5)
    assert widget.last_result.embedding_reused is True
    layer = _labels(viewer, "stofm_region")

    import napari_stofm.pipeline.embed as embedding

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not run again")

    monkeypatch.setattr(embedding, "embed", no_model)
    monkeypatch.setattr(embedding, "compute_embedding", no_model)
    widget.regions_spin.setValue(8)  # debounced re-clustering in a worker
    qtbot.waitUntil(lambda: session.annotations["stofm_region"].n_classes == 8, timeout=20_000)
    qtbot.waitUntil(lambda: layer.features.shape[0] == 9, timeout=5_000)
    ann = session.annotations["stofm_region"]
    np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))
    assert len([l for l in viewer.layers if (l.metadata or {}).get("stofm_key") == "stofm_region"]) == 1


def test_cancel_leaves_the_slice_unchanged(make_napari_viewer, qtbot, tiny_checkpoint, messages):
    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    widget.weights_combo.setCurrentText("checkpoint folder")
    widget.weights_path.setText(str(tiny_checkpoint))
    layer_names = [l.name for l in viewer.layers]
    widget.run()
    widget.cancel()  # before the first cancellation point
    assert widget.status.text().startswith("cancelling")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert "cancelled" in (widget.last_error or "")
    assert [l.name for l in viewer.layers] == layer_names
    assert "stofm_region" not in session.annotations
    assert any("cancelled" in m for _, m in messages)
    # the bar and the message are left clean: empty, saying so, Cancel off, Run on again
    assert widget.task.state == "cancelled" and widget.progress_bar.value() == 0
    assert widget.progress_bar.maximum() > 0  # not a busy bar
    assert widget.status.text() == "SToFM cancelled; nothing was changed."
    assert not widget.cancel_button.isEnabled() and widget.run_button.isEnabled()


def test_the_layers_of_a_run_are_made_by_the_worker(make_napari_viewer, qtbot, sample_embedding, run_result):
    """What the worker prepared (label images in the smallest dtype, colours, tables) is what
    the layers hold: the UI thread renders nothing, and nothing of it is kept afterwards."""
    from napari_stofm._napari.binding import binding_of
    from napari_stofm._napari.layers import prepare_labels, prepared_for

    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    _inject(session, sample_embedding)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    result = _copy_result(run_result)
    displays = {k: prepare_labels(session.territories, a) for k, a in result.annotations.items()}
    widget._on_result(session, result, displays)
    qtbot.waitUntil(lambda: not widget.showing, timeout=5_000)
    assert widget.last_error is None, widget.last_error
    for key, display in displays.items():
        layer = _labels(viewer, key)
        assert layer.data is display.data and layer.data.dtype == np.uint8
        ann = session.annotations[key]
        np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))
        assert binding_of(layer) is not None and prepared_for(session, key) is None
    # a second run of the same slice brings the existing layers in step with its own displays
    again = _copy_result(run_result)
    displays2 = {k: prepare_labels(session.territories, a) for k, a in again.annotations.items()}
    widget._on_result(session, again, displays2)
    qtbot.waitUntil(lambda: not widget.showing, timeout=5_000)
    for key, display in displays2.items():
        assert _labels(viewer, key).data is display.data
    # and painting still maps to cells
    layer = _labels(viewer, "stofm_region")
    ann = session.annotations["stofm_region"]
    cell = int(np.flatnonzero(ann.codes == 0)[3])
    rows, cols = np.nonzero(session.territories.instance_map == cell + 1)
    layer.data_setitem((rows, cols), 2)
    qtbot.waitUntil(lambda: ann.codes[cell] == 1, timeout=5_000)


def test_compute_for_display_prepares_every_annotation(tiny_checkpoint, sample_embedding, tmp_path):
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.progress import OVERALL_TOTAL
    from napari_stofm.review.session import SliceSession
    from napari_stofm.widgets.run_widget import compute_for_display

    session = SliceSession(make_sample_slice(), name="sample", autosave_dir=tmp_path)
    _inject(session, sample_embedding)
    reports = []
    result, displays = compute_for_display(session, weights=str(tiny_checkpoint), n_regions=4, device="cpu",
                                           progress=lambda d, t, m="": reports.append((d, t, m)))
    assert set(displays) == set(result.annotations) and "stofm_region" not in session.annotations
    for key, display in displays.items():
        assert display.annotation is result.annotations[key]
        np.testing.assert_array_equal(display.data, session.territories.class_image(result.annotations[key].codes))
    dones = [d for d, _, _ in reports]
    assert dones == sorted(dones) and reports[-1][0] == OVERALL_TOTAL


# ----------------------------------------------------------------------------- edits


@pytest.fixture
def predicted(make_napari_viewer, qtbot, sample_embedding, run_result):
    """A viewer on the sample showing a copy of ``run_result`` through the Run widget's own code."""
    viewer = make_napari_viewer()
    cells, session = _open_sample(viewer)
    _inject(session, sample_embedding)
    _partial_cell_types(session)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    widget._on_result(session, _copy_result(run_result))
    assert widget.last_error is None, widget.last_error
    qtbot.waitUntil(lambda: not widget.showing, timeout=5_000)  # one layer per turn of the event loop
    assert viewer.layers.selection.active.name == "tissue regions (SToFM)"
    return viewer, session


def _cell_pixel(session, cell):
    terr = session.territories
    rows, cols = np.nonzero(terr.instance_map == cell + 1)
    k = len(rows) // 2
    return int(rows[k]), int(cols[k])


def test_paint_changes_cells_and_undo_redo_restore_them(predicted):
    viewer, session = predicted
    layer = _labels(viewer, "stofm_region")
    ann = session.annotations["stofm_region"]
    terr = session.territories
    before_codes, before_curated = ann.codes.copy(), ann.curated.copy()
    cell = int(np.flatnonzero(ann.codes == 0)[len(ann.codes) // 10])
    target = 2
    layer.brush_size = 9
    layer.paint(_cell_pixel(session, cell), target + 1)  # napari's own brush API

    assert ann.codes[cell] == target and ann.curated[cell]
    changed = np.flatnonzero(ann.codes != before_codes)
    assert cell in changed
    assert ann.curated[changed].all() and not ann.curated[ann.codes == before_codes].any()
    # every territory shows one class: the image is the annotation rendered again
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
    assert layer.features.set_index("index").loc[target + 1, "n_curated"] == changed.size

    layer.undo()
    np.testing.assert_array_equal(ann.codes, before_codes)
    np.testing.assert_array_equal(ann.curated, before_curated)
    np.testing.assert_array_equal(layer.data, terr.class_image(before_codes))

    layer.redo()
    assert ann.codes[cell] == target and ann.curated[cell]
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))


def test_fill_data_setitem_and_erase(predicted, qtbot):
    viewer, session = predicted
    layer = _labels(viewer, "stofm_cell_type")
    ann = session.annotations["stofm_cell_type"]
    terr = session.territories

    # data_setitem over the whole territory of one cell
    cell = int(np.flatnonzero(ann.codes == 1)[0])
    rows, cols = np.nonzero(terr.instance_map == cell + 1)
    layer.data_setitem((rows, cols), 4)
    qtbot.waitUntil(lambda: ann.codes[cell] == 3, timeout=5_000)
    assert ann.curated[cell]

    # erase (label 0) one cell: it becomes unassigned
    other = int(np.flatnonzero((ann.codes == 0) & ~ann.curated)[0])
    layer.selected_label = 0
    rows, cols = np.nonzero(terr.instance_map == other + 1)
    layer.data_setitem((rows, cols), 0)
    qtbot.waitUntil(lambda: ann.codes[other] == -1, timeout=5_000)
    assert ann.curated[other]

    # fill: a non-contiguous fill turns every cell of class 5 into class 6
    layer.contiguous = False
    victims = np.flatnonzero(ann.codes == 5)
    assert victims.size
    layer.fill(_cell_pixel(session, int(victims[0])), 7)
    assert (ann.codes[victims] == 6).all() and ann.curated[victims].all()
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
    layer.undo()
    assert (ann.codes[victims] == 5).all() and not ann.curated[victims].any()


def test_painting_a_class_that_does_not_exist_is_refused(predicted, messages):
    viewer, session = predicted
    layer = _labels(viewer, "stofm_region")
    ann = session.annotations["stofm_region"]
    before = ann.codes.copy()
    layer.brush_size = 9
    layer.paint(_cell_pixel(session, 10), ann.n_classes + 5)
    np.testing.assert_array_equal(ann.codes, before)
    np.testing.assert_array_equal(layer.data, session.territories.class_image(before))
    assert any(kind == "error" and "not a class" in m for kind, m in messages)


def test_hover_shows_cell_class_and_confidence(predicted):
    viewer, session = predicted
    layer = _labels(viewer, "stofm_region")
    ann = session.annotations["stofm_region"]
    cell = 42
    status = layer.get_status(session.xy[cell][::-1], world=True)
    text = status["coordinates"]
    assert str(session.adata.obs_names[cell]) in text
    assert ann.categories[ann.codes[cell]] in text
    assert f"{ann.confidence[cell]:.2f}" in text
    tooltip = layer._get_tooltip_text(np.asarray(session.xy[cell][::-1]), world=True)
    assert str(session.adata.obs_names[cell]) in tooltip


def test_review_widget_classes_navigation_and_refine(predicted, qtbot):
    viewer, session = predicted
    layer = _labels(viewer, "stofm_cell_type")
    viewer.layers.selection.active = layer
    dock, review = viewer.window.add_plugin_dock_widget("napari-stofm", "Review labels")
    review.select_layer(layer)
    ann = session.annotations["stofm_cell_type"]
    assert review.table.rowCount() == ann.n_classes
    assert review.table.item(0, 1).text() == ann.categories[0]

    review.rename(0, "Glutamatergic")
    assert ann.categories[0] == "Glutamatergic"
    assert layer.features.set_index("index").loc[1, "class"] == "Glutamatergic"
    review.recolor(1, "#123456")
    np.testing.assert_allclose(layer.colormap.color_dict[2][:3], [0x12 / 255, 0x34 / 255, 0x56 / 255], atol=1e-6)
    code = review.add_class("Doublet")
    assert ann.categories[code] == "Doublet" and review.table.rowCount() == ann.n_classes
    assert layer.selected_label == code + 1
    n_before = ann.n_classes
    moved = np.flatnonzero(ann.codes == n_before - 2)
    review.merge(n_before - 2, 0)
    assert ann.n_classes == n_before - 1 and (ann.codes[moved] == 0).all()
    np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))

    cell = review.next_least_confident()
    assert cell == int(ann.least_confident(1)[0])
    np.testing.assert_allclose(viewer.camera.center[-2:], session.xy[cell][::-1], atol=1e-6)
    assert review.next_least_confident() != cell

    # correct a few cells, then refine: only the others may change
    terr = session.territories
    for c in np.flatnonzero(ann.codes == 2)[:15]:
        rows, cols = np.nonzero(terr.instance_map == c + 1)
        layer.data_setitem((rows, cols), 4)
    qtbot.waitUntil(lambda: ann.curated.sum() >= 15, timeout=5_000)
    curated = ann.curated.copy()
    codes_before = ann.codes.copy()
    conf_before = ann.confidence.copy()
    review.confirm_refine = False  # no "N cells would change" question (tests/test_refine_undo.py asks it)
    review.refine()
    qtbot.waitUntil(lambda: review.refine_worker is None, timeout=60_000)
    assert review.last_error is None, review.last_error
    np.testing.assert_array_equal(ann.codes[curated], codes_before[curated])
    np.testing.assert_array_equal(ann.confidence[curated], conf_before[curated])
    changed = ann.codes != codes_before
    assert not (changed & curated).any()
    assert (~np.isclose(ann.confidence, conf_before) & ~curated).any()  # the head really retrained
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))


# ----------------------------------------------------------------------------- export


def _curated_equal(ann, column, curated_column):
    names = np.array(ann.categories + [None], dtype=object)[ann.codes]
    mask = ann.curated
    got = np.asarray(column.astype(object))
    assert np.asarray(curated_column, dtype=bool).tolist() == mask.tolist()
    assert [str(x) for x in got[mask]] == [str(x) for x in names[mask]]


def test_export_widget_writes_and_rereads(predicted, qtbot, tmp_path, messages):
    import anndata as ad

    from napari_stofm.io.slices import read_slice

    viewer, session = predicted
    layer = _labels(viewer, "stofm_cell_type")
    ann = session.annotations["stofm_cell_type"]
    terr = session.territories
    for c in np.flatnonzero(ann.codes == 1)[:7]:
        rows, cols = np.nonzero(terr.instance_map == c + 1)
        layer.data_setitem((rows, cols), 3)
    qtbot.waitUntil(lambda: ann.curated.sum() >= 7, timeout=5_000)

    answers = []
    dock, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Export labels")
    widget.confirm_overwrite = lambda path: answers.append(path) or False

    outputs = {"h5ad": tmp_path / "curated.h5ad", "csv": tmp_path / "curated.csv",
               "spatialdata": tmp_path / "curated.zarr"}
    for fmt, path in outputs.items():
        assert widget.export(path, fmt=fmt) is not None, widget.last_error
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        assert widget.last_error is None, widget.last_error
        assert path.exists()

    h5 = ad.read_h5ad(outputs["h5ad"])
    _curated_equal(ann, h5.obs["stofm_cell_type"], h5.obs["stofm_cell_type_curated"])
    assert list(h5.uns["stofm_cell_type_colors"]) == ann.colors
    csv = pd.read_csv(outputs["csv"])
    curated_col = [c for c in csv.columns if c.startswith("stofm_cell_type") and c.endswith("curated")][0]
    _curated_equal(ann, csv["stofm_cell_type"], csv[curated_col])
    sdata_adata = read_slice(outputs["spatialdata"])
    _curated_equal(ann, sdata_adata.obs["stofm_cell_type"], sdata_adata.obs["stofm_cell_type_curated"])

    # an existing file is kept when the user says no
    stamp = outputs["h5ad"].stat().st_mtime_ns
    assert widget.export(outputs["h5ad"], fmt="h5ad") is None
    assert answers == [outputs["h5ad"]] and outputs["h5ad"].stat().st_mtime_ns == stamp

    # a write that fails half-way (disk full) leaves the old file intact and no debris
    import anndata

    old_bytes = outputs["h5ad"].read_bytes()

    def disk_full(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(anndata.AnnData, "write_h5ad", disk_full)
        widget.confirm_overwrite = lambda path: True
        assert widget.export(outputs["h5ad"], fmt="h5ad") is not None
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.last_error and "No space left" in widget.last_error
    assert outputs["h5ad"].read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert any(kind == "error" and "Export failed" in m for kind, m in messages)

    # the napari writer (File > Save Selected Layers) writes the selected labels
    viewer.layers.selection = {layer}
    saved = viewer.layers.save(str(tmp_path / "by_writer.h5ad"), selected=True, plugin="napari-stofm")
    assert saved
    w = ad.read_h5ad(tmp_path / "by_writer.h5ad")
    _curated_equal(ann, w.obs["stofm_cell_type"], w.obs["stofm_cell_type_curated"])
    # the autosave beside nothing (a generated sample) went to the user cache, and restores
    cells2, session2 = _open_sample(viewer)
    assert session2.restored_from is not None
    np.testing.assert_array_equal(session2.annotations["stofm_cell_type"].curated, ann.curated)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gives_messages_not_crashes(make_napari_viewer, qtbot, tmp_path, messages, tiny_checkpoint):
    viewer = make_napari_viewer()
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"this is not HDF5")
    with pytest.raises(Exception) as info:
        viewer.open(str(broken), plugin="napari-stofm")
    assert "not an HDF5 file" in str(info.value)
    assert len(viewer.layers) == 0

    # run without any slice
    dock, run = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    assert run.run() is None and "open a slice" in run.last_error

    cells, session = _open_sample(viewer)
    run.slice_combo.refresh()
    run.weights_combo.setCurrentText("checkpoint folder")
    run.weights_path.setText(str(tmp_path / "no_such_checkpoint"))
    assert run.run() is None and "does not exist" in run.last_error

    # a folder that is not a checkpoint: fails in the worker, reported, nothing added
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    run.weights_path.setText(str(empty))
    names = [l.name for l in viewer.layers]
    assert run.run() is not None
    qtbot.waitUntil(lambda: run.worker is None, timeout=60_000)
    assert run.last_error and "SToFM failed" in run.last_error
    assert [l.name for l in viewer.layers] == names

    # reference source without a file
    run.weights_path.setText(str(tiny_checkpoint))
    run.source_combo.setCurrentText("reference slice")
    run.reference_path.setText("")
    assert run.run() is None and "reference" in run.last_error

    # export into a folder that does not exist: message, no file
    dock, export = viewer.window.add_plugin_dock_widget("napari-stofm", "Export labels")
    target = tmp_path / "missing" / "out.h5ad"
    assert export.export(target, fmt="h5ad") is None
    assert export.last_error and not target.exists()
    # wrong suffix
    assert export.export(tmp_path / "out.txt", fmt="csv") is None and "end in .csv" in export.last_error
    assert not (tmp_path / "out.txt").exists()
    assert sum(kind == "error" for kind, _ in messages) >= 5


def test_run_widget_adapt_box_reaches_the_run(make_napari_viewer, qtbot, tiny_checkpoint):
    """Ticking "Adapt to this slice first" passes the seconds to the run; weights without
    pretraining heads are refused with a message that says why (nothing is shown)."""
    viewer = make_napari_viewer()
    _open_sample(viewer)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    assert "adapt" not in widget.parameters() and not widget.adapt_seconds.isEnabled()
    widget.adapt_check.setChecked(True)
    widget.adapt_seconds.setValue(5)
    assert widget.adapt_seconds.isEnabled()
    widget.weights_combo.setCurrentText("checkpoint folder")
    widget.weights_path.setText(str(tiny_checkpoint))
    assert widget.parameters()["adapt"] == 5.0
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert "pretraining heads" in str(widget.last_error)
    assert not [layer for layer in viewer.layers if "(SToFM)" in layer.name]  # no prediction shown
