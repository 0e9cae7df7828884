"""Exports to .h5ad, CSV and SpatialData: exact round trips, overwrite rules, atomicity."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.annotation import Annotation
from napari_stofm.io import export as export_module
from napari_stofm.io.export import build_spatialdata, export_csv, export_h5ad, export_spatialdata
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.io.slices import read_slice

KEYS = ("stofm_region", "stofm_cell_type")


@pytest.fixture
def slice_and_annotations():
    adata = make_sample_slice(300, seed=4)
    rng = np.random.default_rng(0)
    out = {}
    for key, truth in zip(KEYS, ("region", "cell_type"), strict=True):
        categories = list(adata.obs[truth].cat.categories)
        codes = adata.obs[truth].cat.codes.to_numpy().copy()
        confidence = rng.random(adata.n_obs).astype(np.float32)
        confidence[:3] = np.nan
        ann = Annotation.from_prediction(key, categories, codes, confidence,
                                         provenance={"model": "SToFM", "weights_fingerprint": "sha256:0123",
                                                     "parameters": {"n_regions": len(categories)}})
        ann.assign(rng.choice(adata.n_obs, 25, replace=False), 1)
        ann.assign([10, 11], -1)
        ann.rename(0, ann.categories[0] + " (edited)")
        ann.add_class("never used")
        out[key] = ann
    return adata, out


def _assert_same(adata_read, annotations):
    for key, ann in annotations.items():
        back = Annotation.from_obs(adata_read, key)
        assert back.equals(ann), key


def test_h5ad_round_trip(tmp_path, slice_and_annotations):
    adata, annotations = slice_and_annotations
    path = tmp_path / "curated.h5ad"
    assert export_h5ad(adata, annotations, path) == path
    back = ad.read_h5ad(path)
    _assert_same(back, annotations)
    assert "stofm_region" not in adata.obs  # the caller's AnnData is not modified
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    assert (back.X != adata.X).nnz == 0
    stofm = back.uns["stofm"]
    assert stofm["package"] == "napari-stofm" and stofm["package_version"]
    assert stofm["export_format"] == "h5ad" and stofm["exported_at"]
    assert stofm["provenance"]["stofm_region"]["weights_fingerprint"] == "sha256:0123"
    for key, ann in annotations.items():
        assert stofm["n_curated"][key] == int(ann.curated.sum())
        assert sorted(stofm["curated_cells"][key]) == sorted(adata.obs_names[ann.curated])
    # the exported file is itself a readable slice
    assert read_slice(path).n_obs == adata.n_obs


def test_csv_round_trip(tmp_path, slice_and_annotations):
    adata, annotations = slice_and_annotations
    path = tmp_path / "curated.csv"
    export_csv(adata, annotations, path)
    table = pd.read_csv(path, float_precision="round_trip", keep_default_na=False, na_values=[""])
    expected = ["cell_id", "x", "y"]
    for key in annotations:
        expected += [key, f"{key}_confidence", f"{key}_curated", f"{key}_predicted"]
    assert list(table.columns) == expected
    assert list(table["cell_id"]) == list(adata.obs_names)
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), adata.obsm["spatial"])
    for key, ann in annotations.items():
        names = table[key].astype(object).where(table[key].notna(), None).to_numpy()
        assert list(names) == list(ann.names())
        predicted = np.array(ann.categories + [None], dtype=object)[ann.predicted_codes]
        column = table[f"{key}_predicted"]
        assert list(column.astype(object).where(column.notna(), None)) == list(predicted)
        np.testing.assert_array_equal(table[f"{key}_confidence"].to_numpy(np.float32), ann.confidence)
        np.testing.assert_array_equal(table[f"{key}_curated"].to_numpy(bool), ann.curated)


def test_spatialdata_round_trip_with_circles(tmp_path, slice_and_annotations):
    import spatialdata as sd

    adata, annotations = slice_and_annotations
    assert "region" in adata.obs  # the ground truth column must survive the spatialdata link column
    path = tmp_path / "curated.zarr"
    export_spatialdata(adata, annotations, path)
    sdata = sd.read_zarr(path)
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cell_circles"
    assert attrs["region_key"] != "region"
    assert list(table.obs["region"]) == list(adata.obs["region"])
    circles = sdata.shapes["cell_circles"]
    ids = table.obs[attrs["instance_key"]].to_numpy()
    np.testing.assert_array_equal(ids, np.arange(1, adata.n_obs + 1))
    np.testing.assert_allclose(np.c_[circles.loc[ids].geometry.x, circles.loc[ids].geometry.y], adata.obsm["spatial"])
    _assert_same(table, annotations)
    # and through our own reader (positions in the table, source recorded)
    back = read_slice(path)
    _assert_same(back, annotations)
    assert back.uns["stofm_source"]["region"] == "cell_circles"


def test_spatialdata_with_territory_labels(tmp_path, slice_and_annotations):
    import spatialdata as sd

    from napari_stofm.review.raster import rasterize_territories

    adata, annotations = slice_and_annotations
    territories = rasterize_territories(adata.obsm["spatial"])
    path = tmp_path / "labels.zarr"
    export_spatialdata(adata, annotations, path, labels=territories)
    sdata = sd.read_zarr(path)
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == "cell_territories"
    np.testing.assert_array_equal(np.asarray(sdata.labels["cell_territories"]), territories.instance_map)
    _assert_same(sdata.tables["table"], annotations)
    # pixel (row, col) sits where the napari layer shows it: translate + index * scale
    rows, cols = np.nonzero(territories.instance_map)
    pick = territories.instance_map[rows[0], cols[0]]
    centroids = sd.get_centroids(sdata.labels["cell_territories"], coordinate_system="global").compute()
    mask = territories.instance_map == pick
    r, c = np.nonzero(mask)
    expected_y = territories.translate[0] + r.mean() * territories.scale[0]
    expected_x = territories.translate[1] + c.mean() * territories.scale[1]
    np.testing.assert_allclose(centroids.loc[pick, ["x", "y"]].to_numpy(float), [expected_x, expected_y])
    # read back: labels element recorded for the display
    back = read_slice(path)
    assert back.uns["stofm_source"]["labels_element"] == "cell_territories"
    # the tuple form places the raster the same way; a bad raster is refused before writing
    from spatialdata.transformations import get_transformation

    as_tuple = build_spatialdata(adata, annotations,
                                 labels=(territories.instance_map, territories.scale, territories.translate))
    assert (get_transformation(as_tuple.labels["cell_territories"]).to_affine_matrix(("x", "y"), ("x", "y")).tolist()
            == get_transformation(sdata.labels["cell_territories"]).to_affine_matrix(("x", "y"), ("x", "y")).tolist())
    with pytest.raises(StofmInputError, match="values must be 0.."):
        export_spatialdata(adata, annotations, tmp_path / "bad.zarr",
                           labels=(territories.instance_map + adata.n_obs, 1.0))
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize("kind", ["h5ad", "csv", "zarr"])
def test_no_overwrite_without_flag(tmp_path, slice_and_annotations, kind):
    adata, annotations = slice_and_annotations
    writer = {"h5ad": export_h5ad, "csv": export_csv, "zarr": export_spatialdata}[kind]
    path = tmp_path / f"out.{kind}"
    writer(adata, annotations, path)
    before = _snapshot(path)
    edited = {k: a.copy() for k, a in annotations.items()}
    edited["stofm_region"].assign(np.arange(50), 2)
    with pytest.raises(StofmInputError, match="overwrite=True") as info:
        writer(adata, edited, path)
    assert isinstance(info.value, FileExistsError)
    assert _snapshot(path) == before
    writer(adata, edited, path, overwrite=True)
    assert _snapshot(path) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == _expected(path, kind)  # no temp or backup left


@pytest.mark.parametrize("kind", ["h5ad", "csv", "zarr"])
def test_interrupted_export_keeps_original(tmp_path, slice_and_annotations, monkeypatch, kind):
    adata, annotations = slice_and_annotations
    writer, inner = {"h5ad": (export_h5ad, "_write_h5ad"), "csv": (export_csv, "_write_csv"),
                     "zarr": (export_spatialdata, "_write_spatialdata")}[kind]
    path = tmp_path / f"out.{kind}"
    writer(adata, annotations, path)
    before = _snapshot(path)
    real = getattr(export_module, inner)

    def write_half_then_fail(obj, tmp):
        real(obj, tmp)  # the temporary output is complete ...
        raise RuntimeError("power cut")  # ... but the process dies before the swap

    monkeypatch.setattr(export_module, inner, write_half_then_fail)
    edited = {k: a.copy() for k, a in annotations.items()}
    edited["stofm_cell_type"].assign(np.arange(30), 0)
    with pytest.raises(RuntimeError, match="power cut"):
        writer(adata, edited, path, overwrite=True)
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == _expected(path, kind)


def _expected(path, kind):
    """What an export leaves in its folder: the target (and, for CSV, its marker table beside it)."""
    return sorted([path.name] + ([export_module.markers_csv_path(path).name] if kind == "csv" else []))


def test_interrupted_directory_swap_restores_original(tmp_path, slice_and_annotations, monkeypatch):
    import os

    adata, annotations = slice_and_annotations
    path = tmp_path / "out.zarr"
    export_spatialdata(adata, annotations, path)
    before = _snapshot(path)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((str(src), str(dst)))
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        export_spatialdata(adata, annotations, path, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_size_mismatch_and_missing_folder(tmp_path, slice_and_annotations):
    adata, annotations = slice_and_annotations
    with pytest.raises(StofmInputError, match="slice has 299"):
        export_h5ad(adata[:299].copy(), annotations, tmp_path / "x.h5ad")
    with pytest.raises(StofmInputError, match="does not exist"):
        export_csv(adata, annotations, tmp_path / "missing" / "x.csv")
    assert list(tmp_path.iterdir()) == []


def _snapshot(path):
    """Bytes of a file, or {relative path: bytes} of a folder."""
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def umask_027():
    import os

    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.mark.parametrize("kind", ["h5ad", "csv", "zarr"])
def test_export_file_mode_follows_the_umask(tmp_path, slice_and_annotations, umask_027, kind):
    import stat

    adata, annotations = slice_and_annotations
    writer = {"h5ad": export_h5ad, "csv": export_csv, "zarr": export_spatialdata}[kind]
    path = writer(adata, annotations, tmp_path / f"out.{kind}")
    files = [p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    if kind == "csv":
        files.append(export_module.markers_csv_path(path))
    assert files
    for file in files:  # what any new file of the user's gets (mkstemp alone gives 0600)
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask_027, file


@pytest.mark.parametrize("kind", ["h5ad", "csv", "zarr"])
def test_cancelled_export_writes_nothing_and_reports_one_progress(tmp_path, slice_and_annotations, kind):
    import threading

    from napari_stofm.errors import Cancelled
    from napari_stofm.progress import OVERALL_TOTAL

    adata, annotations = slice_and_annotations
    writer = {"h5ad": export_h5ad, "csv": export_csv, "zarr": export_spatialdata}[kind]
    path = tmp_path / f"out.{kind}"
    cancel = threading.Event()
    seen = []

    def progress(done, total, message):
        seen.append((done, total, message))
        if message.startswith("Writing"):
            cancel.set()  # Cancel pressed while the file is written

    with pytest.raises(Cancelled):
        writer(adata, annotations, path, progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []  # no target, no marker table, no temporary file
    assert seen and all(total == OVERALL_TOTAL for _, total, _ in seen)
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert any(m.startswith("Marker genes") for _, _, m in seen)
    seen.clear()
    writer(adata, annotations, path, progress=lambda d, t, m: seen.append((d, t, m)))
    assert seen[-1] == (OVERALL_TOTAL, OVERALL_TOTAL, f"exported to {path.name}")
