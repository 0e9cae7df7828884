"""Supervised label head: partial labels, reference transfer, refine from corrections."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.classifier import LabelHead, complete_labels, refine_from_corrections, transfer_labels

REGIONS = np.array(["L1", "L2", "L3", "L4"])
TYPES = np.array(["Astro", "Exc", "Inh", "Micro", "Oligo"])


def layered_slice(n=2000, dim=32, n_regions=4, n_types=5, region_sep=0.3, seed=0):
    """Wavy horizontal layers; embedding = region mean + cell-type mean + noise."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, size=(n, 2))
    depth = xy[:, 1] + 40 * np.sin(xy[:, 0] / 150)
    edges = np.quantile(depth, np.linspace(0, 1, n_regions + 1)[1:-1])
    region = np.searchsorted(edges, depth)
    gen = np.random.default_rng(1234)  # the same tissue (composition, means) for every slice seed
    composition = gen.dirichlet(np.full(n_types, 0.7), size=n_regions)
    cum = composition.cumsum(axis=1)[region]
    cell_type = (rng.random(n)[:, None] > cum).sum(axis=1).clip(max=n_types - 1)
    emb = (
        gen.normal(0, region_sep, size=(n_regions, dim))[region]
        + gen.normal(0, 1.0, size=(n_types, dim))[cell_type]
        + rng.normal(0, 1.0, size=(n, dim))
    )
    return emb.astype(np.float32), xy, region, cell_type


@pytest.fixture(scope="module")
def planted():
    return layered_slice()


@pytest.fixture(scope="module")
def labelled(planted):
    """20 % of the cells labelled with their region, the rest NaN."""
    _, _, region, _ = planted
    known = np.random.default_rng(1).random(region.size) < 0.2
    return pd.Categorical(np.where(known, REGIONS[region], None), categories=list(REGIONS)), known


def test_partial_labels_predict_the_rest(planted, labelled):
    emb, xy, region, _ = planted
    labels, known = labelled
    pred = complete_labels(emb, labels, xy)
    assert pred.categories == list(REGIONS)
    f1 = f1_score(region[~known], pred.codes[~known], average="macro")
    assert f1 > 0.85  # chance is ~0.25
    np.testing.assert_array_equal(pred.codes[known], region[known])
    assert np.all(pred.confidence[known] == 1.0)


def test_spatial_context_helps_regions(planted, labelled):
    emb, xy, region, _ = planted
    labels, known = labelled
    with_ctx = LabelHead().fit(emb, labels, xy).predict(emb, xy)
    without = LabelHead().fit(emb, labels).predict(emb)
    f1 = lambda p: f1_score(region[~known], p.codes[~known], average="macro")  # noqa: E731
    assert f1(with_ctx) > f1(without)


def test_cell_types_from_partial_labels(planted):
    emb, _, _, cell_type = planted
    known = np.random.default_rng(2).random(cell_type.size) < 0.2
    labels = TYPES[cell_type].astype(object)
    labels[~known] = np.nan
    pred = LabelHead(spatial_context=False).fit(emb, labels).predict(emb)
    assert pred.categories == sorted(TYPES)  # plain strings: sorted, like pandas
    truth = np.searchsorted(sorted(TYPES), TYPES[cell_type])
    assert f1_score(truth[~known], pred.codes[~known], average="macro") > 0.9


def test_probabilities_and_confidence(planted, labelled):
    emb, xy, _, _ = planted
    labels, _ = labelled
    pred = LabelHead().fit(emb, labels, xy).predict(emb, xy)
    assert pred.probabilities.shape == (emb.shape[0], 4)
    np.testing.assert_allclose(pred.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert pred.confidence.min() >= 0 and pred.confidence.max() <= 1
    np.testing.assert_array_equal(pred.codes, pred.probabilities.argmax(axis=1))


def test_category_order_follows_training_labels(planted, labelled):
    emb, xy, region, _ = planted
    labels, known = labelled
    reordered = labels.reorder_categories(["L3", "L1", "L4", "L2"])
    pred = complete_labels(emb, reordered, xy)
    assert pred.categories == ["L3", "L1", "L4", "L2"]
    names = np.asarray(pred.categories)[pred.codes]
    assert (names[~known] == REGIONS[region][~known]).mean() > 0.85


def test_transfer_from_a_reference_slice(planted):
    ref_emb, ref_xy, ref_region, _ = planted
    q_emb, q_xy, q_region, _ = layered_slice(n=1200, seed=5)
    pred = transfer_labels(ref_emb, REGIONS[ref_region], q_emb, ref_xy=ref_xy, query_xy=q_xy)
    assert pred.n_cells == 1200
    assert f1_score(q_region, pred.codes, average="macro") > 0.85


def test_deterministic(planted, labelled):
    emb, xy, _, _ = planted
    labels, _ = labelled
    a = LabelHead(seed=3, max_train_cells=200).fit(emb, labels, xy).predict(emb, xy)
    b = LabelHead(seed=3, max_train_cells=200).fit(emb, labels, xy).predict(emb, xy)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


def test_fewer_than_two_classes_is_an_error(planted):
    emb, _, _, _ = planted
    labels = np.full(emb.shape[0], None, dtype=object)
    labels[:50] = "L1"
    with pytest.raises(StofmInputError, match="at least two classes"):
        LabelHead().fit(emb, labels)
    with pytest.raises(StofmInputError, match="at least two classes"):
        LabelHead().fit(emb, np.full(emb.shape[0], None, dtype=object))


def test_rare_and_empty_classes_are_kept_with_a_warning(planted):
    emb, _, region, _ = planted
    labels = np.full(emb.shape[0], None, dtype=object)
    labels[:300] = REGIONS[region[:300]]
    labels[300] = "Rare"
    cats = list(REGIONS) + ["Rare", "Unused"]
    with pytest.warns(UserWarning) as record:
        head = LabelHead(spatial_context=False).fit(emb, labels, categories=cats)
    text = " ".join(str(w.message) for w in record)
    assert "Rare" in text and "Unused" in text
    pred = head.predict(emb)
    assert pred.categories == cats
    assert np.all(pred.probabilities[:, cats.index("Unused")] == 0)


def test_input_errors_name_the_fix(planted, labelled):
    emb, xy, _, _ = planted
    labels, _ = labelled
    head = LabelHead().fit(emb, labels, xy)
    with pytest.raises(StofmInputError, match="pass xy="):
        head.predict(emb)
    with pytest.raises(StofmInputError, match="same model"):
        head.predict(emb[:, :10], xy)
    with pytest.raises(StofmInputError, match="not trained"):
        LabelHead().predict(emb)
    with pytest.raises(StofmInputError, match="one label"):
        LabelHead().fit(emb, labels[:-1])
    with pytest.raises(StofmInputError, match="sample_weight"):
        LabelHead().fit(emb, labels, sample_weight=-np.ones(emb.shape[0]))


def test_sample_weight_lets_curated_cells_count_more(planted):
    emb, _, region, _ = planted
    labels = REGIONS[region].astype(object)
    wrong = labels.copy()
    flip = np.flatnonzero(region == 0)[:40]
    wrong[flip] = "L2"  # a few curated cells disagree with the bulk of their class
    weight = np.ones(emb.shape[0])
    light = LabelHead(spatial_context=False).fit(emb, wrong, sample_weight=weight).predict(emb)
    weight[flip] = 50.0
    heavy = LabelHead(spatial_context=False).fit(emb, wrong, sample_weight=weight).predict(emb)
    l2 = list(REGIONS).index("L2")
    assert (heavy.codes[flip] == l2).mean() > (light.codes[flip] == l2).mean()


# ----------------------------------------------------------------------------- refine


def _merged_prediction(region):
    """A prediction that wrongly merged layer L4 into L3 (confidence 0.9 everywhere)."""
    codes = region.astype(np.int32).copy()
    codes[codes == 3] = 2
    return codes, np.full(region.size, 0.9, dtype=np.float32)


def test_refine_keeps_curated_cells_exactly_and_spreads_the_correction(planted):
    emb, xy, region, _ = planted
    codes, conf = _merged_prediction(region)
    corrected = np.random.default_rng(0).choice(np.flatnonzero(region == 3), 50, replace=False)
    erased = np.flatnonzero(region == 0)[:5]
    curated = np.zeros(region.size, dtype=bool)
    curated[corrected] = curated[erased] = True
    codes[corrected] = 3
    codes[erased] = -1  # the user erased these: "no class"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about here
        new = refine_from_corrections(emb, xy, codes, curated, list(REGIONS), conf)
    np.testing.assert_array_equal(new.codes[curated], codes[curated])
    assert np.all(new.confidence[corrected] == 1.0) and np.all(new.confidence[erased] == 0.0)
    before = (codes[~curated] == region[~curated]).mean()
    after = (new.codes[~curated] == region[~curated]).mean()
    assert after > before + 0.1
    untouched = ~curated & (region < 2)
    assert (new.codes[untouched] == region[untouched]).mean() > 0.97


def test_refine_with_a_handful_of_corrections_does_not_collapse_the_rest(planted):
    emb, xy, region, _ = planted
    codes = region.astype(np.int32).copy()
    conf = np.full(region.size, 0.95, dtype=np.float32)
    few = np.flatnonzero(region == 1)[:3]
    curated = np.zeros(region.size, dtype=bool)
    curated[few] = True
    codes[few] = 0  # three (arguably wrong) corrections to L1
    new = refine_from_corrections(emb, xy, codes, curated, list(REGIONS), conf)
    np.testing.assert_array_equal(new.codes[few], 0)
    counts = np.bincount(new.codes, minlength=4)
    assert (counts > 0.15 * region.size).all()
    assert (new.codes[~curated] == region[~curated]).mean() > 0.9


def test_refine_is_deterministic_and_checks_input(planted):
    emb, xy, region, _ = planted
    codes, conf = _merged_prediction(region)
    curated = np.zeros(region.size, dtype=bool)
    curated[np.flatnonzero(region == 3)[:10]] = True
    codes[curated] = 3
    a = refine_from_corrections(emb, xy, codes, curated, list(REGIONS), conf, seed=1)
    b = refine_from_corrections(emb, xy, codes, curated, list(REGIONS), conf, seed=1)
    np.testing.assert_array_equal(a.codes, b.codes)
    with pytest.raises(StofmInputError, match="no curated cells"):
        refine_from_corrections(emb, xy, codes, np.zeros_like(curated), list(REGIONS), conf)
    with pytest.raises(StofmInputError, match="categories"):
        refine_from_corrections(emb, xy, codes, curated, ["L1", "L2"], conf)
