"""How slices are shown: names that tell prediction from file labels, the shown layer active, a
second slice beside the first, the whole slice in view."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def test_layer_names_tell_prediction_from_the_labels_in_the_file():
    from napari_stofm._napari.layers import layer_name

    assert layer_name("stofm_region") == "tissue regions (SToFM)"
    assert layer_name("stofm_cell_type") == "cell types (SToFM)"
    assert layer_name("cell_type") == "cell_type (in file)"


def test_opened_slice_shows_one_layer_active_and_whole(make_napari_viewer, qtbot, tmp_path):
    from napari_stofm.io.sample import make_sample_slice

    path = tmp_path / "animal1_bregma-0.29.h5ad"
    make_sample_slice(600, seed=5).write_h5ad(path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-stofm")
    session = layers[0].metadata["stofm_session"]
    assert session.name == "animal1_bregma-0.29"
    assert layers[0].name == "animal1_bregma-0.29 cells"
    shown = [l for l in viewer.layers if l.visible]
    assert len(shown) == 1 and shown[0].name == "region (in file)"
    assert viewer.layers.selection.active is shown[0] and viewer.layers[-1] is shown[0]
    viewer.camera.zoom = 50.0  # zoomed far in ...
    other = tmp_path / "animal1_bregma-0.34.h5ad"
    make_sample_slice(400, seed=6).write_h5ad(other)
    viewer.open(str(other), plugin="napari-stofm")  # ... then a second slice: the view takes in both
    qtbot.wait(50)
    extent = np.asarray(viewer.layers.extent.world)[:, -2:]
    assert viewer.camera.zoom < 50.0
    np.testing.assert_allclose(viewer.camera.center[-2:], extent.mean(axis=0), rtol=0.05)


def test_a_second_slice_is_placed_beside_the_first(make_napari_viewer, tmp_path):
    from napari_stofm._napari.layers import display_offset, world_yx
    from napari_stofm.io.sample import make_sample_slice

    viewer = make_napari_viewer()
    first = viewer.open_sample("napari-stofm", "sample_slice")
    path = tmp_path / "other.h5ad"
    adata = make_sample_slice(500, seed=8)
    adata.obsm["spatial"] = adata.obsm["spatial"] * 0.1 + 5.0  # another unit, another origin
    adata.write_h5ad(path)
    second = viewer.open(str(path), plugin="napari-stofm")
    s1, s2 = first[0].metadata["stofm_session"], second[0].metadata["stofm_session"]
    assert s1 is not s2
    np.testing.assert_array_equal(display_offset(s1), [0, 0])
    box1 = np.asarray(first[1].extent.world)[:, -2:]
    box2 = np.asarray(second[1].extent.world)[:, -2:]
    assert box2[0, 1] > box1[1, 1]  # to the right, not on top
    assert abs(box2[0, 0] - box1[0, 0]) < 0.05 * (box1[1, 0] - box1[0, 0])  # top edges aligned
    # every layer of the second slice moved the same way, the data did not
    np.testing.assert_allclose(second[0].data + second[0].translate, world_yx(s2))
    np.testing.assert_allclose(second[0].data, s2.xy[:, ::-1])
    # hovering the second slice names its own cell
    from napari_stofm._napari.binding import bind_viewer, binding_of

    bind_viewer(viewer)
    labels = [l for l in second if l.visible and l.metadata.get("stofm_role") == "labels"][0]
    assert binding_of(labels).cell_at(world_yx(s2, 17)[0]) == 17



def test_labels_layers_are_single_scale_editable_and_small(make_napari_viewer, qtbot):
    """napari 0.9 paints on level 0 of no multiscale Labels (a multiscale layer is not
    editable), so the layers stay single-scale, in the smallest dtype that holds the classes."""
    from napari_stofm._napari.binding import binding_of

    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    session = layers[0].metadata["stofm_session"]
    labels = [l for l in layers if l.metadata.get("stofm_role") == "labels"]
    assert labels
    for layer in labels:
        assert not layer.multiscale and layer.editable
        assert layer.data.dtype == np.uint8
        ann = session.annotations[layer.metadata["stofm_key"]]
        np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))
    qtbot.waitUntil(lambda: all(binding_of(l) is not None for l in labels), timeout=5_000)


def test_classes_added_past_what_the_dtype_holds_widen_the_layer(make_napari_viewer, qtbot):
    from napari_stofm._napari.binding import binding_of

    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    session = layers[0].metadata["stofm_session"]
    layer = next(l for l in layers if l.metadata.get("stofm_key") == "region")
    qtbot.waitUntil(lambda: binding_of(layer) is not None, timeout=5_000)
    ann = session.annotations["region"]
    for i in range(256 - ann.n_classes):
        ann.add_class(f"extra {i}", "#808080")
    code = session.add_class("region", "the 257th")  # napari is told now
    assert ann.n_classes == 257 and layer.data.dtype == np.uint16
    np.testing.assert_array_equal(layer.data, session.territories.class_image(ann.codes))
    cell = 10
    rows, cols = np.nonzero(session.territories.instance_map == cell + 1)
    layer.data_setitem((rows, cols), code + 1)
    qtbot.waitUntil(lambda: ann.codes[cell] == code, timeout=5_000)
    assert ann.curated[cell]


def test_a_prepared_display_is_used_only_while_it_shows_the_annotation(tmp_path):
    from napari_stofm._napari.layers import (
        discard_prepared,
        labels_layer_data,
        offer_prepared,
        prepare_labels,
        prepared_for,
    )
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.review.session import SliceSession

    session = SliceSession(make_sample_slice(400, seed=3), name="s", autosave_dir=tmp_path)
    session.load_existing_labels()
    ann = session.annotations["region"]
    display = prepare_labels(session.territories, ann)
    assert display.data.dtype == np.uint8
    np.testing.assert_array_equal(display.data, session.territories.class_image(ann.codes))
    offer_prepared(session, {"region": display})
    assert prepared_for(session, "region") is display
    assert labels_layer_data(session, "region")[0] is display.data  # not rendered again
    ann.curated[0] = True  # the features table it holds counts curated cells: no longer what it shows
    assert prepared_for(session, "region") is None
    assert labels_layer_data(session, "region")[0] is not display.data
    offer_prepared(session, {"region": prepare_labels(session.territories, ann)})
    ann.rename(0, "renamed")
    assert prepared_for(session, "region") is None
    offer_prepared(session, {"region": prepare_labels(session.territories, ann)})
    discard_prepared(session)
    assert prepared_for(session, "region") is None
