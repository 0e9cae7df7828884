"""Agreement of a labelling with another labelling of the same cells (no napari)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_stofm.heads.annotation import Annotation
from napari_stofm.review.agreement import agreement, truth_columns


def test_confusion_ari_and_best_matches():
    truth = pd.Categorical(["L1"] * 4 + ["L2"] * 4 + [None] * 2, categories=["L1", "L2", "WM"])
    codes = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 1])
    pred = Annotation.from_prediction("stofm_region", ["Region 1", "Region 2"], codes)
    result = agreement(pred, pd.Series(truth), truth_key="region")
    assert result.n_cells == 8  # the two unlabelled cells are left out
    assert result.confusion.loc["Region 1", "L1"] == 3 and result.confusion.loc["Region 2", "L2"] == 4
    assert list(result.confusion.columns) == ["L1", "L2", "WM"]  # every class, in its order
    row = result.per_class.loc["Region 2"]
    assert row["best_match"] == "L2" and row["precision"] == pytest.approx(0.8) and row["recall"] == 1.0
    assert row["jaccard"] == pytest.approx(4 / 5)
    assert 0 < result.ari < 1 and result.accuracy is None  # no class name in common
    assert result.describe().startswith("ARI ")


def test_same_class_names_give_an_accuracy_and_an_annotation_can_be_the_truth():
    truth = Annotation.from_prediction("cell_type", ["Astro", "Neuron"], np.array([0, 0, 1, 1, -1]))
    pred = Annotation.from_prediction("stofm_cell_type", ["Neuron", "Astro"], np.array([1, 0, 0, 0, 0]))
    result = agreement(pred, truth, truth_key="cell_type")
    assert result.n_cells == 4
    assert result.accuracy == pytest.approx(3 / 4)
    perfect = agreement(pred, Annotation.from_prediction("x", ["Neuron", "Astro"], pred.codes.copy()))
    assert perfect.ari == pytest.approx(1.0) and perfect.accuracy == 1.0


def test_truth_columns_put_the_likely_ground_truth_first():
    from napari_stofm.io.sample import make_sample_slice

    adata = make_sample_slice(200, seed=1)
    adata.obs["batch"] = pd.Categorical(["a", "b"] * 100)
    adata.obs["stofm_region"] = pd.Categorical(["Region 1"] * 200)
    adata.obs["cell_id_text"] = [f"c{i}" for i in range(200)]  # 200 classes: not labels
    assert truth_columns(adata, "stofm_region") == ["region", "cell_type", "batch"]
    assert truth_columns(adata, "stofm_cell_type")[0] == "cell_type"


def test_scores_match_scikit_learn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from napari_stofm.review.agreement import contingency_scores

    rng = np.random.default_rng(0)
    for k1, k2 in ((2, 3), (5, 5), (7, 1), (1, 1)):
        a, b = rng.integers(0, k1, 300), rng.integers(0, k2, 300)
        b[:150] = a[:150] % k2
        table = np.zeros((k1, k2))
        np.add.at(table, (a, b), 1)
        ari, nmi = contingency_scores(table)
        assert ari == pytest.approx(adjusted_rand_score(a, b))
        assert nmi == pytest.approx(normalized_mutual_info_score(a, b))
