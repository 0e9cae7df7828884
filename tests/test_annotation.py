"""Annotation edits (with undo), merge renumbering, obs round trip."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from builders import example_annotation

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.annotation import Annotation
from napari_stofm.palette import default_colors, to_hex


def _adata(n=12):
    return ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))


def test_from_prediction_defaults():
    ann = example_annotation()
    assert ann.colors == default_colors(4)
    assert all(c.startswith("#") and len(c) == 7 for c in ann.colors)
    assert ann.codes.dtype == np.int32 and ann.confidence.dtype == np.float32
    assert np.array_equal(ann.codes, ann.predicted_codes) and not ann.curated.any()
    assert "created_at" in ann.provenance and ann.provenance["parameters"]["n_regions"] == 4
    with pytest.raises(StofmInputError, match="0..1"):
        Annotation.from_prediction("k", ["a", "b"], [0, 2], [0.5, 0.5])
    with pytest.raises(StofmInputError, match="unique"):
        Annotation.from_prediction("k", ["a", "a"], [0, 1])


def test_assign_and_restore_undo_exactly():
    ann = example_annotation()
    before = ann.copy()
    first = ann.assign([2, 3, 4], 1)
    assert (ann.codes[[2, 3, 4]] == 1).all() and ann.curated[[2, 3, 4]].all()
    second = ann.assign(np.isin(np.arange(12), [4, 5]), -1)  # erase (boolean mask)
    assert ann.codes[4] == -1 and ann.codes[5] == -1 and ann.curated[5]
    ann.restore(*second)
    ann.restore(*first)
    assert np.array_equal(ann.codes, before.codes)
    assert np.array_equal(ann.curated, before.curated)
    assert np.array_equal(ann.predicted_codes, before.predicted_codes)
    with pytest.raises(StofmInputError, match="does not exist"):
        ann.assign([0], 4)
    with pytest.raises(StofmInputError, match="cell indices"):
        ann.assign([12], 0)


def test_rename_recolor_add_class():
    ann = example_annotation()
    ann.rename(2, "reactive lesion")
    assert ann.categories[2] == "reactive lesion"
    with pytest.raises(StofmInputError, match="already exists"):
        ann.rename(0, "white matter")
    ann.rename(0, "cortex")  # its own name is fine
    ann.recolor(1, "#ABC")
    assert ann.colors[1] == "#aabbcc"
    ann.recolor(1, (1.0, 0.0, 0.5, 1.0))
    assert ann.colors[1] == "#ff0080"
    ann.recolor(1, [0, 128, 255])
    assert ann.colors[1] == "#0080ff"
    with pytest.raises(StofmInputError, match="not a colour"):
        ann.recolor(1, "#12345")
    code = ann.add_class("tumour")
    assert code == 4 and ann.categories[4] == "tumour"
    assert ann.colors[4] not in ann.colors[:4]
    ann.assign([0], code)
    assert ann.summary().loc[4, "n_cells"] == 1
    with pytest.raises(StofmInputError, match="unique"):
        ann.add_class("cortex")
    assert to_hex("#1F77B4FF") == "#1f77b4"


def test_merge_renumbers_consistently():
    ann = example_annotation(n=40, seed=3)
    ann.assign([5, 6], 3)
    names_before = ann.names()
    predicted_names_before = np.array(ann.categories + [None], dtype=object)[ann.predicted_codes]
    colors_before = dict(zip(ann.categories, ann.colors, strict=True))
    mapping = ann.merge(1, 3)  # 'white matter' into 'meninges'
    assert mapping == {-1: -1, 0: 0, 1: 2, 2: 1, 3: 2}
    assert ann.categories == ["cortex", "lesion", "meninges"]
    assert ann.colors == [colors_before[c] for c in ann.categories]
    expected = np.where(names_before == "white matter", "meninges", names_before)
    assert list(ann.names()) == list(expected)
    predicted_expected = np.where(predicted_names_before == "white matter", "meninges", predicted_names_before)
    assert list(np.array(ann.categories + [None], dtype=object)[ann.predicted_codes]) == list(predicted_expected)
    assert ann.codes.min() >= -1 and ann.codes.max() <= 2
    # merging into a lower code
    mapping = ann.merge(2, 0)
    assert mapping == {-1: -1, 0: 0, 1: 1, 2: 0}
    assert ann.categories == ["cortex", "lesion"]
    with pytest.raises(StofmInputError, match="itself"):
        ann.merge(0, 0)


def test_summary_and_least_confident():
    codes = np.array([0, 0, 1, 1, 1, -1], np.int32)
    conf = np.array([0.9, 0.5, np.nan, 0.2, 0.4, 0.1], np.float32)
    ann = Annotation.from_prediction("stofm_cell_type", ["A", "B"], codes, conf)
    ann.assign([3], 1)
    table = ann.summary()
    assert list(table.columns) == ["name", "color", "n_cells", "mean_confidence", "n_curated"]
    assert list(table["n_cells"]) == [2, 3]
    assert table.loc[0, "mean_confidence"] == pytest.approx(0.7)
    assert table.loc[1, "mean_confidence"] == pytest.approx(0.3)
    assert list(table["n_curated"]) == [0, 1]
    assert list(ann.least_confident(3)) == [5, 4, 1]
    assert list(ann.least_confident(10)) == [5, 4, 1, 0, 2]  # curated 3 left out, NaN last
    assert list(ann.least_confident(2, exclude_curated=False)) == [5, 3]


def test_obs_round_trip_identical(tmp_path):
    ann = example_annotation()
    ann.assign([3, 4], 2)
    ann.add_class("unused")
    adata = _adata()
    ann.to_obs(adata)
    assert isinstance(adata.obs["stofm_region"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["stofm_region"].cat.categories) == ann.categories
    assert pd.isna(adata.obs["stofm_region"].iloc[0])
    assert adata.obs["stofm_region_confidence"].dtype == np.float32
    assert adata.obs["stofm_region_curated"].dtype == bool
    assert adata.uns["stofm_region_colors"] == ann.colors
    assert adata.uns["stofm"]["provenance"]["stofm_region"]["model"] == "SToFM"
    assert Annotation.from_obs(adata, "stofm_region").equals(ann)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    assert Annotation.from_obs(ad.read_h5ad(path), "stofm_region").equals(ann)
    with pytest.raises(StofmInputError, match="slice has 13"):
        ann.to_obs(_adata(13))


def test_companion_columns_only_for_predictions():
    adata = _adata(4)
    adata.obs["cell_type"] = pd.Categorical(["T", "B", None, "T"])
    truth = Annotation.from_obs(adata, "cell_type")
    assert not truth.is_prediction
    truth.assign([2], 0)  # curated on the canvas: the column changes, no companions appear
    truth.to_obs(adata)
    assert [c for c in adata.obs.columns if c.startswith("cell_type_")] == []
    assert list(adata.obs["cell_type"].astype(str)) == ["T", "B", "B", "T"]
    # a prediction gets them, whatever its key (a model made it)
    predicted = Annotation.from_prediction("my_labels", ["a", "b"], np.array([0, 1, 1, 0]),
                                           provenance={"model": "SToFM"})
    predicted.to_obs(adata)
    assert {"my_labels_confidence", "my_labels_curated", "my_labels_predicted"} <= set(adata.obs.columns)
    # a column that already had them (an earlier export) keeps them in step
    adata.obs["region"] = pd.Categorical(["x", "y", "x", "y"])
    adata.obs["region_curated"] = False
    region = Annotation.from_obs(adata, "region")
    region.assign([0], 1)
    region.to_obs(adata)
    assert list(adata.obs["region_curated"]) == [True, False, False, False]


def test_from_obs_of_plain_categorical():
    adata = _adata(4)
    adata.obs["cell_type"] = pd.Categorical(["T", "B", None, "T"])
    ann = Annotation.from_obs(adata, "cell_type")
    assert ann.categories == ["B", "T"] and list(ann.codes) == [1, 0, -1, 1]
    assert np.isnan(ann.confidence).all() and not ann.curated.any()
