"""LabelPrediction: the shared result type, its Categorical, and its obs/uns layout once it is an annotation."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.annotation import Annotation
from napari_stofm.heads.prediction import LabelPrediction, encode_labels
from napari_stofm.palette import default_colors


def _prediction():
    codes = np.array([0, 1, 2, -1, 1])
    conf = np.array([0.9, 0.5, 1.0, 0.3, 0.7])
    proba = np.array([[0.9, 0.1, 0], [0.3, 0.5, 0.2], [0, 0, 1], [0, 0, 0], [0.1, 0.7, 0.2]])
    return LabelPrediction(["a", "b", "c"], codes, conf, proba)


def test_types_and_defaults():
    pred = _prediction()
    assert pred.codes.dtype == np.int32 and pred.confidence.dtype == np.float32
    assert pred.probabilities.dtype == np.float32
    assert pred.confidence[3] == 0.0  # no class, no confidence
    assert pred.colors == default_colors(3)
    assert pred.counts() == {"a": 1, "b": 2, "c": 1}


def test_to_categorical_maps_minus_one_to_nan():
    cat = _prediction().to_categorical()
    assert list(cat.categories) == ["a", "b", "c"]
    assert pd.isna(cat[3]) and cat[1] == "b"


def test_write_obs_round_trip(tmp_path):
    """A prediction is written through its annotation (the one writer of every path)."""
    adata = ad.AnnData(np.zeros((5, 2), dtype=np.float32))
    pred = _prediction()
    ann = Annotation.from_prediction("stofm_region", pred)
    ann.curated[:] = [True, False, False, False, True]
    ann.to_obs(adata)
    assert isinstance(adata.obs["stofm_region"].dtype, pd.CategoricalDtype)
    assert adata.obs["stofm_region_confidence"].dtype == np.float32
    assert adata.obs["stofm_region_curated"].tolist() == [True, False, False, False, True]
    assert list(adata.uns["stofm_region_colors"]) == pred.colors
    adata.write_h5ad(tmp_path / "s.h5ad")
    back = Annotation.from_obs(ad.read_h5ad(tmp_path / "s.h5ad"), "stofm_region")
    assert back.categories == pred.categories and back.colors == pred.colors
    np.testing.assert_array_equal(back.codes, pred.codes)
    np.testing.assert_allclose(back.confidence, pred.confidence)


def test_write_obs_refuses_another_slice():
    with pytest.raises(StofmInputError, match="another slice"):
        Annotation.from_prediction("stofm_region", _prediction()).to_obs(ad.AnnData(np.zeros((4, 2))))


def test_validation():
    with pytest.raises(StofmInputError, match="codes must lie"):
        LabelPrediction(["a"], [0, 1], [1, 1])
    with pytest.raises(StofmInputError, match=r"\[0, 1\]"):
        LabelPrediction(["a", "b"], [0, 1], [1.5, 1])
    with pytest.raises(StofmInputError, match="twice"):
        LabelPrediction(["a", "a"], [0, 1], [1, 1])
    with pytest.raises(StofmInputError, match="one per category"):
        LabelPrediction(["a", "b"], [0, 1], [1, 1], colors=["#000000"])
    with pytest.raises(StofmInputError, match="probabilities"):
        LabelPrediction(["a", "b"], [0, 1], [1, 1], np.ones((2, 3)))


def test_encode_labels():
    codes, cats = encode_labels(np.array(["b", None, "a", np.nan, ""], dtype=object))
    assert cats == ["a", "b"] and codes.tolist() == [1, -1, 0, -1, -1]
    codes, cats = encode_labels(pd.Categorical(["x", "y", None], categories=["y", "x"]))
    assert cats == ["y", "x"] and codes.tolist() == [1, 0, -1]
    codes, cats = encode_labels(pd.Series(["x", "z"]), categories=["z", "x", "w"])
    assert codes.tolist() == [1, 0] and cats == ["z", "x", "w"]
    with pytest.raises(StofmInputError, match="not among the categories"):
        encode_labels(["x", "q"], categories=["x"])
