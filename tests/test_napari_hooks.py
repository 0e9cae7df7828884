"""The reader contribution on real files: a public slice and a SpatialData store with masks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_stofm._napari.layers import layer_name  # noqa: E402 - after the napari check


@pytest.mark.realdata
def test_reader_on_a_real_slice(make_napari_viewer, shared_data_dir, tmp_path):
    import shutil

    src = shared_data_dir / "merfish_human_lung_cancer" / "tessera_warmup.h5ad"
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    path = tmp_path / src.name  # a copy, so the autosave lands in tmp_path
    shutil.copy(src, path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-stofm")
    cells = layers[0]
    session = cells.metadata["stofm_session"]
    assert cells.data.shape[0] == session.adata.n_obs == 3177
    np.testing.assert_allclose(cells.data, np.asarray(session.adata.obsm["spatial"])[:, ::-1])
    cell_type = [l for l in layers if l.name == layer_name("cell_type")]
    assert cell_type, [l.name for l in layers]
    layer = cell_type[0]
    ann = session.annotations["cell_type"]
    terr = session.territories
    assert terr.source == "voronoi" and terr.hidden_cells.size == 0
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))
    # each cell's own class shows at its position
    rc = terr.world_to_pixel(session.xy[:, ::-1])
    labelled = ann.codes >= 0
    assert (layer.data[rc[labelled, 0], rc[labelled, 1]] == ann.codes[labelled] + 1).mean() > 0.99


def _spatialdata_with_masks(path):
    import anndata as ad
    import scipy.sparse as sp
    import spatialdata as sd
    from spatialdata.models import Labels2DModel, TableModel
    from spatialdata.transformations import Scale, Sequence, Translation

    from napari_stofm.io.sample import make_sample_slice

    src = make_sample_slice(n_cells=400, seed=3)
    xy = np.asarray(src.obsm["spatial"])
    pixel = 1.0  # microns per mask pixel
    x0, y0 = np.floor(xy.min(axis=0)) - 5.0  # where the mask image starts
    h = int(np.ceil((xy[:, 1].max() - y0) / pixel)) + 8
    w = int(np.ceil((xy[:, 0].max() - x0) / pixel)) + 8
    masks = np.zeros((h, w), dtype=np.int32)
    ids = np.arange(1000, 1000 + src.n_obs)  # instance ids unrelated to row order
    rr, cc = np.ogrid[:h, :w]
    for cell_id, (x, y) in zip(ids, xy, strict=True):
        r, c = (y - y0) / pixel - 0.5, (x - x0) / pixel - 0.5  # SpatialData: pixel i spans [i, i + 1)
        masks[((rr - r) ** 2 + (cc - c) ** 2 <= 2.25) & (masks == 0)] = cell_id
    assert np.isin(ids, masks).all()
    transform = Sequence([Scale([pixel, pixel], axes=("y", "x")), Translation([y0, x0], axes=("y", "x"))])
    labels = Labels2DModel.parse(masks, dims=("y", "x"), transformations={"global": transform})
    order = np.random.default_rng(0).permutation(src.n_obs)  # table rows in another order
    table = ad.AnnData(X=sp.csr_matrix(src.X[order]), obs=pd.DataFrame(
        {"cell_id": ids[order], "region_el": pd.Categorical(["cells"] * src.n_obs),
         "cell_type": src.obs["cell_type"].to_numpy()[order]},
        index=[f"c{i}" for i in ids[order]]), var=src.var.copy())
    table = TableModel.parse(table, region="cells", region_key="region_el", instance_key="cell_id")
    sd.SpatialData(labels={"cells": labels}, tables={"table": table}).write(path)
    return xy[order], masks, ids[order], (y0, x0)


def test_reader_on_spatialdata_uses_the_cell_masks(make_napari_viewer, tmp_path):
    pytest.importorskip("spatialdata")
    path = tmp_path / "slice.zarr"
    xy, masks, ids, origin = _spatialdata_with_masks(path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-stofm")
    cells = layers[0]
    session = cells.metadata["stofm_session"]
    np.testing.assert_allclose(session.xy, xy, atol=1.0)  # mask centroids
    terr = session.territories
    assert terr.source == "masks"
    # the territory of every table row is exactly its mask, wherever the rows are
    remap = np.zeros(ids.max() + 1, dtype=np.int64)
    remap[ids] = np.arange(len(ids)) + 1
    np.testing.assert_array_equal(terr.instance_map, remap[masks])
    np.testing.assert_allclose(terr.scale, (1.0, 1.0))
    np.testing.assert_allclose(terr.translate, (origin[0] + 0.5, origin[1] + 0.5))
    # and each cell's position falls inside its own territory
    rc = terr.world_to_pixel(session.xy[:, ::-1])
    assert (terr.instance_map[rc[:, 0], rc[:, 1]] == np.arange(len(ids)) + 1).all()
    layer = [l for l in layers if l.name == layer_name("cell_type")][0]
    np.testing.assert_allclose(layer.scale, (1.0, 1.0))
    ann = session.annotations["cell_type"]
    np.testing.assert_array_equal(layer.data, terr.class_image(ann.codes))


def test_reader_declines_other_files(tmp_path):
    from napari_stofm._napari.hooks import get_reader

    other = tmp_path / "image.tif"
    other.write_bytes(b"II*\x00")
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path)) is None  # a folder that is no zarr store
    assert get_reader(str(tmp_path / "x.h5ad")) is not None
