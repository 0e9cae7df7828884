"""The legend on the canvas follows the visible SToFM labels: rename, recolour, merge, visibility."""
from __future__ import annotations

import numpy as np
import pytest
from builders import noisy_cell_types

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def _swatches(legend):
    """The colour of each swatch the panel draws, in order."""
    import re

    return [c.lower() for c in re.findall(r'bgcolor="(#[0-9a-fA-F]{6})"', legend.panel.label.text())]


def test_the_legend_follows_a_rename_a_recolour_a_merge_and_the_visible_layer(make_napari_viewer, qtbot):
    from napari_stofm._napari.layers import add_or_update_labels, layer_name
    from napari_stofm._napari.legend import legend_for

    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    session = layers[0].metadata["stofm_session"]
    qtbot.waitUntil(lambda: legend_for(viewer) is not None, timeout=5_000)  # bound once the layers are in
    legend = legend_for(viewer)
    region = session.annotations["region"]
    assert legend.shown == [layer_name("region"), *region.categories]  # the sample's visible labels
    assert legend.visible

    noisy_cell_types(session)
    layer = add_or_update_labels(viewer, session, "stofm_cell_type")  # on top: shown first
    ann = session.annotations["stofm_cell_type"]
    assert legend.shown[: ann.n_classes + 1] == [layer.name, *ann.categories]
    for other in viewer.layers:
        if other is not layer and (other.metadata or {}).get("stofm_role") == "labels":
            other.visible = False
    assert legend.shown == [layer.name, *ann.categories]
    assert _swatches(legend) == [c.lower() for c in ann.colors]

    session.rename("stofm_cell_type", 0, "Glutamatergic")
    assert legend.shown[1] == "Glutamatergic"
    session.recolor("stofm_cell_type", 1, "#123456")
    assert _swatches(legend)[1] == "#123456"
    session.merge("stofm_cell_type", 2, 0)
    assert legend.shown == [layer.name, *ann.categories] and len(legend.shown) == ann.n_classes + 1
    layer.undo()  # the merge undone: the class is back in the legend
    assert len(legend.shown) == ann.n_classes + 1 == len(session.adata.obs["cell_type"].cat.categories) + 1

    layer.visible = False
    assert legend.shown == [] and not legend.visible
    layer.visible = True
    legend.set_enabled(False)  # the Review widget's "Legend on canvas" box
    assert not legend.visible
    legend.set_enabled(True)
    # drawn inside the canvas, in its top-right corner
    canvas = legend.canvas
    assert legend.panel.parent() is canvas
    assert legend.panel.geometry().right() <= canvas.width() and legend.panel.y() >= 0
    assert np.isclose(legend.panel.x() + legend.panel.width(), canvas.width() - 10, atol=2)
