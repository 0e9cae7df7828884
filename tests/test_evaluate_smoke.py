"""The evaluation harness's splits, metrics, baselines and card writing on a generated slice."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_stofm.io.sample import make_sample_slice

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate.py"


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("stofm_evaluate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def sample(ev, tmp_path_factory):
    adata = make_sample_slice(n_cells=500, seed=3)
    path = tmp_path_factory.mktemp("data") / "sample.h5ad"
    return ev.Slice("generated", "sample", path, adata.n_obs, adata)


def test_split_is_seeded_disjoint_and_skips_unlabelled(ev):
    labels = np.array(["a", None, "b"] * 100, dtype=object)
    train, test = ev.split_8_2(labels)
    train2, test2 = ev.split_8_2(labels)
    assert np.array_equal(train, train2) and np.array_equal(test, test2)
    assert not (train & test).any()
    assert (train | test).sum() == 200 and test.sum() == 40
    assert not (train | test)[1::3].any()


def test_metrics(ev):
    y = ["a", "a", "b", "b"]
    assert ev.classification_scores(y, y) == {"accuracy": 1.0, "macro_f1": 1.0}
    s = ev.classification_scores(y, ["a", "a", "a", "c"])
    assert s["accuracy"] == 0.5 and 0 < s["macro_f1"] < 1
    assert ev.clustering_scores(y, [1, 1, 0, 0])["ari"] == pytest.approx(1.0)


def test_baselines_recover_planted_regions(ev, sample, monkeypatch):
    monkeypatch.setattr(ev, "CACHE", sample.path.parent / "cache")
    monkeypatch.setattr(ev, "_BACKEND", "own")  # pybanksy is optional
    regions, types = sample.labels("region"), sample.labels("cell_type")
    banksy = ev.expression_embeddings("banksy", [sample], [sample], use_cache=True)[sample.key]
    assert banksy.shape[0] == sample.n_obs and np.isfinite(banksy).all()
    emb = ev.expression_embeddings("pca", [sample], [sample], use_cache=True)[sample.key]
    assert emb.shape[0] == sample.n_obs and np.isfinite(emb).all()
    unsup = ev.unsupervised_regions(emb, sample.xy, regions)
    sup = ev.within_slice(ev.region_features(emb, sample.xy), regions)
    assert unsup["ari"] > 0.3, unsup
    assert sup["macro_f1"] > 0.5, sup
    types_scores = ev.within_slice(emb, types)
    assert types_scores["accuracy"] > 1.0 / len(set(types))


def test_means_and_card_section(ev, sample, tmp_path):
    res = ev.Results()
    for method, ari in [("stofm", 0.5), ("pca", 0.4)]:
        res.add("regions-unsup", method, sample, {"ari": ari, "nmi": ari})
    res.failed("regions-unsup", "banksy", sample, RuntimeError("boom"))
    summary = ev.means(res.rows, ["stofm", "pca"])
    assert summary["regions-unsup:ari"]["means"] == {"stofm": 0.5, "pca": 0.4}
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Card\n\n## Evaluation\n\nintro\n\n## Known limits\n\nnone\n")
    ev.write_section(card, "first")
    ev.write_section(card, "second")
    text = card.read_text()
    assert text.count(ev.START) == 1 and "second" in text and "first" not in text and text.startswith("# Card")
    assert text.index("intro") < text.index(ev.START) < text.index("## Known limits")


def test_diagnostic_readings_of_the_stofm_embeddings(ev, sample, monkeypatch):
    """``stofm+gene`` is ``[X_stofm, X_stofm_cell]`` cell by cell; ``stofm+nbr`` is X_stofm beside
    its mean over the NBR_K nearest cells; neither is in the default methods (the card's tables)."""
    rng = np.random.default_rng(0)
    final = rng.normal(size=(sample.n_obs, 3)).astype(np.float32)
    cell = rng.normal(size=(sample.n_obs, 5)).astype(np.float32)
    monkeypatch.setattr(ev, "stofm_embeddings", lambda model, s, use_cache, genes=None: {"final": final, "cell": cell})
    emb = ev.Embeddings(models=ev.Models(trained=None, random=None, note=""), use_cache=False)
    np.testing.assert_array_equal(emb.get("stofm+gene", sample), np.hstack([final, cell]))
    with_nbr = emb.get("stofm+nbr", sample)
    from napari_stofm.knn import spatial_neighbors

    nearest = spatial_neighbors(sample.xy, ev.NBR_K)
    np.testing.assert_array_equal(with_nbr[:, :3], final)
    np.testing.assert_allclose(with_nbr[:, 3:], final[nearest].mean(axis=1), rtol=1e-5, atol=1e-6)
    assert not set(ev.DIAGNOSTICS) & set(ev.METHODS)
