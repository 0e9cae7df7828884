"""Reading and validating slices: .h5ad, SpatialData (shapes / labels), bad input."""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stofm.errors import StofmInputError
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.io.slices import is_slice_path, read_slice, validate_slice


@pytest.fixture
def small():
    return make_sample_slice(200, seed=1)


# ----------------------------------------------------------------------------- h5ad


def test_read_h5ad(tmp_path, small):
    path = tmp_path / "slice.h5ad"
    small.write_h5ad(path)
    assert is_slice_path(path)
    adata = read_slice(path)
    assert adata.n_obs == small.n_obs
    np.testing.assert_array_equal(adata.obsm["spatial"], small.obsm["spatial"])
    assert adata.uns["stofm_source"] == {"path": str(path), "format": "h5ad"}
    # the record survives writing the slice again
    adata.write_h5ad(tmp_path / "again.h5ad")


def test_not_a_slice(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert not is_slice_path(text)
    with pytest.raises(StofmInputError, match="not a slice.*h5ad"):
        read_slice(text)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert not is_slice_path(folder)
    with pytest.raises(StofmInputError, match="not a SpatialData"):
        read_slice(folder)
    with pytest.raises(StofmInputError, match="does not exist"):
        read_slice(tmp_path / "missing.h5ad")
    assert not is_slice_path(tmp_path / "missing.h5ad")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.h5ad"
    path.write_bytes(b"")
    with pytest.raises(StofmInputError, match=r"empty.h5ad.*empty \(0 bytes\)"):
        read_slice(path)


def test_truncated_h5ad(tmp_path, small):
    good = tmp_path / "good.h5ad"
    small.write_h5ad(good)
    data = good.read_bytes()
    for n, name in ((len(data) // 2, "half.h5ad"), (4000, "head.h5ad")):
        cut = tmp_path / name
        cut.write_bytes(data[:n])
        with pytest.raises(StofmInputError) as info:
            read_slice(cut)
        message = str(info.value)
        assert name in message
        assert "truncated" in message or "corrupt" in message


def test_text_renamed_to_h5ad(tmp_path):
    path = tmp_path / "table.h5ad"
    path.write_text("cell,x,y\n1,2,3\n")
    with pytest.raises(StofmInputError, match="not an HDF5 file"):
        read_slice(path)


# ----------------------------------------------------------------------------- validation


def test_missing_positions_lists_keys(small):
    small.obsm["X_umap"] = np.zeros((small.n_obs, 2))
    del small.obsm["spatial"]
    with pytest.raises(StofmInputError, match=r"no cell positions.*X_umap.*spatial_key"):
        validate_slice(small)


def test_missing_positions_suggests_obs_columns(small):
    small.obs["x_centroid"] = small.obsm["spatial"][:, 0]
    small.obs["y_centroid"] = small.obsm["spatial"][:, 1]
    del small.obsm["spatial"]
    with pytest.raises(StofmInputError, match=r"adata.obs\[\['x_centroid', 'y_centroid'\]\]"):
        validate_slice(small)


def test_missing_positions_in_file_names_file(tmp_path, small):
    del small.obsm["spatial"]
    path = tmp_path / "nopos.h5ad"
    small.write_h5ad(path)
    with pytest.raises(StofmInputError, match="nopos.h5ad: no cell positions"):
        read_slice(path)
    assert read_slice(path, validate=False).n_obs == small.n_obs


def test_wrong_shape(small):
    small.obsm["spatial"] = np.hstack([small.obsm["spatial"], np.zeros((small.n_obs, 1))])
    with pytest.raises(StofmInputError, match=r"shape \(200, 3\).*\[:, :2\]"):
        validate_slice(small)


def test_nan_coordinates_name_cells_and_fix(small):
    small.obsm["spatial"][[3, 7, 9, 11, 12, 20, 40], 0] = np.nan
    small.obsm["spatial"][5, 1] = np.inf
    with pytest.raises(StofmInputError) as info:
        validate_slice(small)
    message = str(info.value)
    assert "8 of 200 cells" in message
    for cell in ("cell_00003", "cell_00005", "cell_00007", "cell_00009", "cell_00011"):
        assert cell in message
    assert "cell_00040" not in message  # only the first five are listed
    assert "adata = adata[np.isfinite(adata.obsm['spatial']).all(1)].copy()" in message
    fixed = small[np.isfinite(small.obsm["spatial"]).all(1)].copy()
    assert validate_slice(fixed).n_cells == 192


def test_zero_cells(small):
    with pytest.raises(StofmInputError, match="zero cells"):
        validate_slice(small[:0].copy())


def test_duplicate_ids(small):
    names = list(small.obs_names)
    names[10] = names[3]
    small.obs_names = names
    with pytest.raises(StofmInputError, match=r"cell_00003.*obs_names_make_unique"):
        validate_slice(small)


def test_negative_expression(small):
    dense = small.X.toarray()
    dense[4, 2] = -1.5
    small.X = dense
    with pytest.raises(StofmInputError, match=r"1 negative values in 1 cells.*cell_00004.*raw counts"):
        validate_slice(small)


def test_non_finite_expression_sparse(small):
    small.X = small.X.tocsr(copy=True)
    small.X.data[[0, 1]] = np.nan
    with pytest.raises(StofmInputError, match=r"2 non-finite.*cell_00000"):
        validate_slice(small)


def test_empty_cells_warn_and_are_reported(small):
    X = small.X.toarray()
    X[[2, 8]] = 0
    small.X = sp.csr_matrix(X)
    with pytest.warns(UserWarning, match=r"2 of 200 cells have no counts.*cell_00002"):
        report = validate_slice(small)
    assert list(report.empty_cells) == [2, 8]
    assert report.empty_cell_ids == ["cell_00002", "cell_00008"]
    assert report.warnings


def test_report_of_good_slice(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = validate_slice(small)
    assert report.n_cells == 200 and report.n_genes == small.n_vars
    assert report.values == "counts"
    assert report.extent[0] == small.obsm["spatial"][:, 0].min()
    assert "200 cells" in str(report)
    small.X = small.X.multiply(0.5).tocsr()
    assert validate_slice(small).values == "non_negative"


def test_identical_positions(small):
    small.obsm["spatial"][:] = 1.0
    with pytest.raises(StofmInputError, match="same position"):
        validate_slice(small)


# ----------------------------------------------------------------------------- SpatialData


def _table(adata, region, instance_ids):
    from spatialdata.models import TableModel

    table = ad.AnnData(X=adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names.copy()), var=adata.var.copy())
    table.obs["region"] = pd.Categorical([region] * adata.n_obs)
    table.obs["cell_id"] = instance_ids
    return TableModel.parse(table, region=region, region_key="region", instance_key="cell_id")


def test_spatialdata_table_annotating_shapes(tmp_path, small):
    import spatialdata as sd
    from spatialdata.models import ShapesModel

    xy = small.obsm["spatial"]
    ids = np.arange(100, 100 + small.n_obs)
    order = np.random.default_rng(0).permutation(small.n_obs)  # shapes stored in another order
    circles = ShapesModel.parse(xy[order], geometry=0, radius=np.full(small.n_obs, 5.0), index=ids[order])
    sdata = sd.SpatialData(shapes={"cell_circles": circles}, tables={"table": _table(small, "cell_circles", ids)})
    path = tmp_path / "shapes.zarr"
    sdata.write(path)

    assert is_slice_path(path)
    adata = read_slice(path)
    np.testing.assert_allclose(adata.obsm["spatial"], xy)
    source = adata.uns["stofm_source"]
    assert source["format"] == "spatialdata" and source["table"] == "table"
    assert source["region"] == "cell_circles" and source["instance_key"] == "cell_id"
    assert "labels_element" not in source
    adata.write_h5ad(tmp_path / "from_sdata.h5ad")  # the record is writable


def test_spatialdata_table_annotating_labels(tmp_path, small):
    import spatialdata as sd
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale

    n = 30
    sub = small[:n].copy()
    image = np.zeros((60, 70), dtype=np.int32)
    centres = []
    for i in range(n):
        r, c = 2 * (i // 7) * 3 + 1, 2 * (i % 7) * 4 + 1
        image[r:r + 3, c:c + 3] = i + 1
        centres.append((c + 1.5, r + 1.5))
    labels = Labels2DModel.parse(image, dims=("y", "x"), transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))})
    sdata = sd.SpatialData(labels={"cell_labels": labels},
                           tables={"table": _table(sub, "cell_labels", np.arange(1, n + 1))})
    path = tmp_path / "labels.zarr"
    sdata.write(path)

    adata = read_slice(path)
    # spatialdata puts pixel centres at +0.5; pixel size 2
    np.testing.assert_allclose(adata.obsm["spatial"], 2.0 * np.array(centres))
    source = adata.uns["stofm_source"]
    assert source["labels_element"] == "cell_labels" and source["labels_annotated"]
    assert source["instance_key"] == "cell_id"
    assert source["positions_from"] == "centroids"


def test_spatialdata_table_choice(tmp_path, small):
    import spatialdata as sd
    from spatialdata.models import ShapesModel

    xy = small.obsm["spatial"]
    ids = np.arange(small.n_obs)
    circles = ShapesModel.parse(xy, geometry=0, radius=np.full(small.n_obs, 5.0), index=ids)
    t1 = _table(small, "cells", ids)
    t2 = _table(small, "cells", ids)
    t2.obsm["spatial"] = xy * 2
    path = tmp_path / "two.zarr"
    sd.SpatialData(shapes={"cells": circles}, tables={"first": t1, "second": t2}).write(path)
    with pytest.raises(StofmInputError, match=r"several tables.*table="):
        read_slice(path)
    with pytest.raises(StofmInputError, match="no table 'third'"):
        read_slice(path, table="third")
    adata = read_slice(path, table="second")
    np.testing.assert_allclose(adata.obsm["spatial"], xy * 2)
    assert adata.uns["stofm_source"]["positions_from"] == "obsm['spatial']"


def test_spatialdata_without_table(tmp_path, small):
    import spatialdata as sd
    from spatialdata.models import ShapesModel

    circles = ShapesModel.parse(small.obsm["spatial"], geometry=0, radius=np.full(small.n_obs, 5.0))
    path = tmp_path / "notable.zarr"
    sd.SpatialData(shapes={"cells": circles}).write(path)
    with pytest.raises(StofmInputError, match=r"no table.*shapes \['cells'\]"):
        read_slice(path)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_slices(shared_data_dir):
    her2 = shared_data_dir / "st_human_her2st" / "A1.h5ad"
    poa = sorted((shared_data_dir / "merfish_mouse_poa").glob("*.h5ad"))
    if not her2.is_file() or not poa:
        pytest.skip("st_human_her2st/A1.h5ad or merfish_mouse_poa/*.h5ad is missing")
    for path, n_cells in ((her2, 346), (poa[0], None)):
        assert is_slice_path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adata = read_slice(path)
        if n_cells is not None:
            assert adata.n_obs == n_cells
        assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
        assert adata.uns["stofm_source"]["format"] == "h5ad"
    assert validate_slice(adata).values == "non_negative"  # MERFISH POA is volume-normalised


@pytest.mark.parametrize(("path", "name"), [
    ("data/animal1_bregma-0.29.h5ad", "animal1_bregma-0.29"),
    ("/x/slice.v2.H5AD", "slice.v2"),
    ("/x/sample.zarr/", "sample"),
    ("x/tissue.ome.zarr", "tissue"),
    ("noext", "noext"),
])
def test_slice_names_keep_their_dots(path, name, tmp_path):
    from napari_stofm.io.slices import slice_name
    from napari_stofm.review.session import SliceSession

    assert slice_name(path) == name
    assert SliceSession(make_sample_slice(20, seed=0), path, autosave_dir=tmp_path).name == name
