"""Marker genes of a labelling: napari_stofm.markers, `stofm markers`, and exports carrying them."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import napari_stofm
from napari_stofm import keys
from napari_stofm.heads import markers as markers_module
from napari_stofm.heads.annotation import Annotation
from napari_stofm.heads.markers import COLUMNS, from_uns, markers, stored_markers
from napari_stofm.io.sample import MARKERS, REGION_PROGRAM, make_sample_slice


@pytest.fixture(scope="module")
def sample():
    return make_sample_slice(n_cells=1500, seed=2)


def _annotations(adata):
    out = {}
    for key, truth in ((keys.REGION, "region"), (keys.CELL_TYPE, "cell_type")):
        cat = adata.obs[truth]
        out[key] = Annotation.from_prediction(key, list(cat.cat.categories), cat.cat.codes.to_numpy().copy())
    return out


def test_markers_for_every_class_with_planted_markers_on_top(sample):
    before = sample.copy()
    table = napari_stofm.markers(sample, "cell_type", n_genes=5)
    assert list(table.columns) == list(COLUMNS)
    assert table["class"].dtype == object and table["gene"].dtype == object
    for c in COLUMNS[2:]:
        assert table[c].dtype == np.float64, c
    assert list(dict.fromkeys(table["class"])) == list(sample.obs["cell_type"].cat.categories)
    assert (table.groupby("class").size() == 5).all()
    for cell_type, genes in MARKERS.items():
        top = table.loc[table["class"] == cell_type, "gene"].tolist()
        assert top[0] in genes, (cell_type, top)
        assert sum(g in genes for g in top) >= 4, (cell_type, top)
    assert ((table["pct_in"] >= 0) & (table["pct_in"] <= 1) & (table["pct_out"] <= 1)).all()
    assert (table["logfoldchange"] > 0).all() and (table["pval_adj"] < 1e-3).all()
    regions = markers(sample, "region", n_genes=5)
    for region, program in REGION_PROGRAM.items():
        top = regions.loc[regions["class"] == region, "gene"].tolist()
        assert any(g in program for g in top), (region, top)
    # the caller's AnnData is untouched (store=False)
    assert set(sample.uns) == set(before.uns) and keys.MARKERS not in sample.uns
    assert (sample.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(sample.obs, before.obs)


def test_log_normalised_slice_is_used_as_is(sample, monkeypatch):
    import scanpy as sc

    logged = sample.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    del logged.uns["source"]  # no longer counts
    calls = []
    monkeypatch.setattr(sc.pp, "normalize_total", lambda *a, **k: calls.append("normalize"))
    table = markers(logged, "cell_type", n_genes=3)
    assert calls == []  # not normalised twice
    assert table.loc[table["class"] == "Oligodendrocyte", "gene"].iloc[0] in MARKERS["Oligodendrocyte"]


def test_small_and_unlabelled_classes(sample):
    adata = sample.copy()
    types = adata.obs["cell_type"].astype(object).to_numpy()
    types[:200] = None  # unlabelled: left out
    types[200] = "Lonely"  # one cell: skipped with a note
    adata.obs["partial"] = pd.Categorical(types, categories=list(sample.obs["cell_type"].cat.categories) + ["Lonely"])
    table = markers(adata, "partial", n_genes=3)
    assert "Lonely" not in set(table["class"])
    assert any("'Lonely' skipped" in n for n in table.attrs["notes"])
    assert table["class"].nunique() == 8


def test_second_call_is_cached(sample, monkeypatch):
    import scanpy as sc

    adata = sample.copy()
    first = markers(adata, "region", n_genes=4, store=True)
    assert first.attrs["cached"] is False
    entry = adata.uns[keys.MARKERS]["region"]
    assert entry["hash"] == first.attrs["hash"]

    def fail(*a, **k):
        raise AssertionError("rank_genes_groups ran again")

    monkeypatch.setattr(sc.tl, "rank_genes_groups", fail)
    again = markers(adata, "region", n_genes=3)  # from uns, fewer genes
    assert again.attrs["cached"] is True
    pd.testing.assert_frame_equal(again.reset_index(drop=True),
                                  first.groupby("class", sort=False).head(3).reset_index(drop=True))
    cache = {}
    fresh = sample.copy()
    monkeypatch.undo()
    markers(fresh, "cell_type", n_genes=3, cache=cache)
    assert keys.MARKERS not in fresh.uns  # a caller's cache, not the AnnData
    monkeypatch.setattr(sc.tl, "rank_genes_groups", fail)
    assert markers(fresh, "cell_type", n_genes=3, cache=cache).attrs["cached"] is True
    # other labels are another labelling: computed again
    edited = fresh.obs["cell_type"].copy()
    edited.iloc[:5] = edited.iloc[5]
    fresh.obs["cell_type"] = edited
    with pytest.raises(AssertionError, match="ran again"):
        markers(fresh, "cell_type", n_genes=3, cache=cache)


def test_cli_prints_and_writes_csv(tmp_path, sample, capsys):
    from napari_stofm.cli.app import main

    path = tmp_path / "slice.h5ad"
    sample.write_h5ad(path)
    assert main(["markers", str(path), "--key", "cell_type", "-n", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("class") and len(lines) == 1 + 8
    astro = next(line for line in lines if line.startswith("Astrocyte"))
    assert any(g in astro for g in MARKERS["Astrocyte"])
    csv = tmp_path / "markers.csv"
    assert main(["markers", str(path), "--key", "region", "--csv", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert list(table.columns) == list(COLUMNS)
    assert set(table["class"]) == set(sample.obs["region"].cat.categories) and len(table) == 6 * 10
    assert main(["markers", str(path), "--key", "region", "--csv", str(csv)]) == 1  # no silent overwrite
    assert main(["markers", str(path), "--key", "nope"]) == 1


def test_h5ad_export_round_trips_markers(tmp_path, sample):
    from napari_stofm.io.export import export_h5ad

    annotations = _annotations(sample)
    path = tmp_path / "labels.h5ad"
    export_h5ad(sample, annotations, path)
    assert keys.MARKERS not in sample.uns
    back = ad.read_h5ad(path)
    for key in annotations:
        table = stored_markers(back, key)
        assert table is not None and list(table.columns) == list(COLUMNS)
        assert set(table["class"]) == set(annotations[key].categories)
        expected = markers(sample, key, annotation=annotations[key])
        pd.testing.assert_frame_equal(table, expected, check_like=False)
    # reading it again reuses the stored table (same labels, same expression)
    assert markers(back, keys.CELL_TYPE).attrs["cached"] is True
    path2 = tmp_path / "nomarkers.h5ad"
    export_h5ad(sample, annotations, path2, markers=False)
    assert keys.MARKERS not in ad.read_h5ad(path2).uns


def test_csv_export_writes_markers_beside(tmp_path, sample):
    from napari_stofm.io.export import export_csv

    annotations = _annotations(sample)
    path = tmp_path / "labels.csv"
    export_csv(sample, annotations, path)
    beside = tmp_path / "labels.markers.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "labels.markers.csv"]
    table = pd.read_csv(beside)
    assert list(table.columns) == ["key", *COLUMNS]
    assert set(table["key"]) == set(annotations)
    ct = table[table["key"] == keys.CELL_TYPE]
    assert ct.loc[ct["class"] == "Microglia", "gene"].iloc[0] in MARKERS["Microglia"]
    export_csv(sample, annotations, tmp_path / "plain.csv", markers=False)
    assert not (tmp_path / "plain.markers.csv").exists()


def test_markers_never_fail_an_export(tmp_path, sample, monkeypatch):
    from napari_stofm.io.export import export_csv, export_h5ad

    def broken(*a, **k):
        raise RuntimeError("no scanpy today")

    monkeypatch.setattr(markers_module, "_compute", broken)
    annotations = _annotations(sample)
    with pytest.warns(UserWarning, match="no scanpy today"):
        export_h5ad(sample, annotations, tmp_path / "a.h5ad")
    assert keys.MARKERS not in ad.read_h5ad(tmp_path / "a.h5ad").uns
    with pytest.warns(UserWarning, match="not exported"):
        export_csv(sample, annotations, tmp_path / "a.csv")
    assert (tmp_path / "a.csv").is_file() and not (tmp_path / "a.markers.csv").exists()


def test_spatialdata_table_carries_markers(tmp_path, sample):
    pytest.importorskip("spatialdata")
    import spatialdata as sd

    from napari_stofm.io.export import TABLE_NAME, export_spatialdata

    annotations = _annotations(sample)
    path = tmp_path / "labels.zarr"
    export_spatialdata(sample, annotations, path)
    table = sd.read_zarr(path).tables[TABLE_NAME]
    back = from_uns(dict(table.uns[keys.MARKERS][keys.REGION]))
    assert back is not None and set(back["class"]) == set(annotations[keys.REGION].categories)
    assert len(back) == 6 * 10
