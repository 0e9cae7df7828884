"""The Review widget in a real napari viewer: the least-confident review shows the cell, and
the agreement panel compares the prediction with the slice's ground truth.

No model runs: the sample slice gets a noisy cell-type prediction (``builders.noisy_cell_types``).
"""
from __future__ import annotations

import numpy as np
import pytest
from builders import noisy_cell_types

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

KEY = "stofm_cell_type"


@pytest.fixture
def reviewed(make_napari_viewer):
    from napari_stofm._napari.layers import add_or_update_labels

    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    session = layers[0].metadata["stofm_session"]
    noisy_cell_types(session)
    layer = add_or_update_labels(viewer, session, KEY)
    dock, review = viewer.window.add_plugin_dock_widget("napari-stofm", "Review labels")
    review.select_layer(layer)
    return viewer, session, layer, review


def _marker(viewer):
    found = [l for l in viewer.layers if (l.metadata or {}).get("stofm_role") == "review_marker"]
    assert len(found) == 1, [l.name for l in viewer.layers]
    return found[0]


def _press(viewer, key):
    """A key pressed over the canvas, as napari dispatches it (active layer's keymap first)."""
    handler = viewer.window._qt_viewer.canvas._key_map_handler
    assert handler.press_key(key), key
    handler.release_key(key)


def test_the_least_confident_cell_is_highlighted_and_described(reviewed):
    viewer, session, layer, review = reviewed
    ann = session.annotations[KEY]
    cell = review.next_least_confident()
    assert cell == int(ann.least_confident(1)[0])
    marker = _marker(viewer)
    np.testing.assert_allclose(marker.data, session.xy[[cell], ::-1])  # a ring on the cell, (y, x)
    assert marker.visible and viewer.layers[-1] is marker  # drawn above the labels
    assert viewer.layers.selection.active is layer  # the layer stays the one keys and brush act on
    np.testing.assert_allclose(viewer.camera.center[-2:], session.xy[cell][::-1], atol=1e-6)
    name = ann.categories[ann.codes[cell]]
    text = review.cells.info.text()
    assert f"cell {session.adata.obs_names[cell]}: {name}, confidence {ann.confidence[cell]:.2f}" in text
    assert "1st least confident" in text

    second = review.next_least_confident()
    assert second == int(ann.least_confident(2)[1])
    np.testing.assert_allclose(marker.data, session.xy[[second], ::-1])
    assert review.cells.previous() == cell
    np.testing.assert_allclose(marker.data, session.xy[[cell], ::-1])


def test_accept_and_relabel_from_the_keyboard_are_undo_steps(reviewed):
    viewer, session, layer, review = reviewed
    ann = session.annotations[KEY]
    pixels = np.asarray(layer.data).copy()
    _press(viewer, "N")
    cell = review.current_cell
    assert cell == int(ann.least_confident(1)[0])
    code = int(ann.codes[cell])

    _press(viewer, "A")  # accept: curated, class unchanged
    assert ann.curated[cell] and ann.codes[cell] == code
    np.testing.assert_array_equal(layer.data, pixels)
    assert "curated" in review.cells.info.text()

    _press(viewer, "N")
    other = review.current_cell
    assert other != cell
    new = (int(ann.codes[other]) + 1) % ann.n_classes
    layer.selected_label = new + 1  # the class the brush paints
    _press(viewer, "R")
    assert ann.codes[other] == new and ann.curated[other]
    np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))

    layer.undo()  # the relabel ...
    assert ann.codes[other] != new and not ann.curated[other]
    layer.undo()  # ... then the accept
    assert not ann.curated[cell]
    np.testing.assert_array_equal(layer.data, pixels)
    layer.redo()
    assert ann.curated[cell]

    _press(viewer, "Shift-N")
    assert review.current_cell == cell


def test_agreement_with_the_ground_truth_and_side_by_side(reviewed):
    from napari_stofm._napari.layers import labels_layer_for

    viewer, session, layer, review = reviewed
    panel = review.agreement
    assert panel.truth_key == "cell_type"  # the sample's ground truth, found by name
    result = panel.result
    ann = session.annotations[KEY]
    truth = session.annotations["cell_type"]
    assert result.n_cells == ann.n_cells
    assert int(result.confusion.to_numpy().trace()) == int((ann.codes == truth.codes).sum())  # same class order
    assert result.accuracy == pytest.approx(float(np.mean(ann.codes == truth.codes)))
    assert panel.table.rowCount() == ann.n_classes and panel.table.columnCount() == truth.n_classes + 1
    assert panel.summary.text().startswith("ARI ")

    # an edit updates the comparison (debounced)
    before = result.accuracy
    wrong = np.flatnonzero(ann.codes != truth.codes)[:40]
    session.relabel(KEY, wrong, None)  # curated only: no change
    for c in wrong:
        session.relabel(KEY, [c], int(truth.codes[c]))
    panel.refresh()
    assert panel.result.accuracy > before

    truth_layer = labels_layer_for(viewer, session, "cell_type")
    assert panel.side_by_side(True)
    assert viewer.grid.enabled
    assert [l for l in viewer.layers if l.visible] == [l for l in viewer.layers if l in (layer, truth_layer)]
    panel.side_by_side(False)
    assert not viewer.grid.enabled and layer.visible and not truth_layer.visible
