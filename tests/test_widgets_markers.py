"""The Review widget's marker genes: the selected class's top genes, and a click on a gene
colours the cells by its expression."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

MARKER_TIMEOUT_MS = 120_000


def _show_truth(viewer, tmp_path):
    """The sample slice in a session, with its true cell types as the 'stofm_cell_type' layer."""
    from napari_stofm import keys
    from napari_stofm._napari.layers import add_or_update_labels
    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.review.session import SliceSession

    adata = make_sample_slice(n_cells=800, seed=5)
    session = SliceSession(adata, name="markers sample", autosave_dir=tmp_path)
    truth = adata.obs["cell_type"]
    ann = Annotation.from_prediction(keys.CELL_TYPE, list(truth.cat.categories), truth.cat.codes.to_numpy().copy())
    session.annotations[keys.CELL_TYPE] = ann  # as opened labelled data: nothing to autosave yet
    ann.to_obs(adata)
    return session, add_or_update_labels(viewer, session, keys.CELL_TYPE)


def test_review_widget_lists_top_genes_and_shows_expression(make_napari_viewer, qtbot, tmp_path):
    from napari_stofm.io.sample import MARKERS

    viewer = make_napari_viewer()
    session, layer = _show_truth(viewer, tmp_path)
    dock, review = viewer.window.add_plugin_dock_widget("napari-stofm", "Review labels")
    review.select_layer(layer)
    panel = review.markers
    qtbot.waitUntil(lambda: panel.worker is None and panel.table is not None, timeout=MARKER_TIMEOUT_MS)
    assert panel.last_error is None, panel.last_error

    ann = session.annotations["stofm_cell_type"]
    code = ann.categories.index("Astrocyte")
    review.table.selectRow(code)
    assert panel.class_name == "Astrocyte"
    genes = [panel.genes.item(i).text() for i in range(panel.genes.count())]
    assert len(genes) == 10 and genes[0] in MARKERS["Astrocyte"]
    assert panel.label.text().startswith("top genes of Astrocyte: " + genes[0])

    # a click on a gene: one expression layer, coloured by that gene
    panel.genes.itemClicked.emit(panel.genes.item(0))
    shown = [l for l in viewer.layers if l.name == f"expression: {genes[0]}"]
    assert len(shown) == 1
    points = shown[0]
    np.testing.assert_allclose(points.data, session.xy[:, ::-1])
    values = points.features["expression"].to_numpy()
    is_astro = ann.codes == code
    assert values[is_astro].mean() > 2 * values[~is_astro].mean()
    brightness = points.face_color[:, :3].sum(axis=1)
    assert brightness[is_astro].mean() > brightness[~is_astro].mean()

    # another gene updates the same layer
    panel.genes.itemClicked.emit(panel.genes.item(1))
    expression_layers = [l for l in viewer.layers if l.name.startswith("expression: ")]
    assert [l.name for l in expression_layers] == [f"expression: {genes[1]}"]
    assert expression_layers[0] is points

    # an edit of the labels recomputes the markers off the UI thread
    before = panel.table.attrs["hash"]
    session.assign("stofm_cell_type", np.arange(40), code)
    qtbot.waitUntil(lambda: panel.worker is None and panel.table is not None
                    and panel.table.attrs["hash"] != before, timeout=MARKER_TIMEOUT_MS)
