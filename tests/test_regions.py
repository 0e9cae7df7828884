"""Unsupervised tissue regions: planted structure, fast re-clustering, confidence."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from napari_stofm.errors import Cancelled, StofmInputError
from napari_stofm.heads.regions import RegionClusterer, cluster_regions, spatial_neighbors


def layered_slice(n=2000, dim=32, n_regions=4, n_types=5, region_sep=0.5, seed=0):
    """Cells in a square cut into wavy horizontal layers; embedding = region + cell type + noise.

    Cell types are shared between layers in different proportions and vary more than the
    regions do, as in real tissue.
    """
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, size=(n, 2))
    depth = xy[:, 1] + 40 * np.sin(xy[:, 0] / 150)
    edges = np.quantile(depth, np.linspace(0, 1, n_regions + 1)[1:-1])
    region = np.searchsorted(edges, depth)
    composition = rng.dirichlet(np.full(n_types, 0.7), size=n_regions)
    cum = composition.cumsum(axis=1)[region]
    cell_type = (rng.random(n)[:, None] > cum).sum(axis=1).clip(max=n_types - 1)
    emb = (
        rng.normal(0, region_sep, size=(n_regions, dim))[region]
        + rng.normal(0, 1.0, size=(n_types, dim))[cell_type]
        + rng.normal(0, 1.0, size=(n, dim))
    )
    return emb.astype(np.float32), xy, region


@pytest.fixture(scope="module")
def planted():
    return layered_slice()


@pytest.fixture(scope="module")
def clusterer(planted):
    emb, xy, _ = planted
    return RegionClusterer(emb, xy, seed=0)


def _neighbour_agreement(codes, xy, k=8):
    nbrs = spatial_neighbors(xy, k)
    return float((codes[nbrs] == codes[:, None]).mean())


def test_recovers_planted_regions(planted, clusterer):
    _, _, truth = planted
    pred = clusterer.regions(n_regions=4)
    assert pred.categories == ["Region 1", "Region 2", "Region 3", "Region 4"]
    assert adjusted_rand_score(truth, pred.codes) > 0.8


def test_regions_are_spatially_smooth(planted, clusterer):
    _, xy, truth = planted
    pred = clusterer.regions(n_regions=4)
    # close to the planted layers' own agreement, far from salt-and-pepper (~0.25)
    assert _neighbour_agreement(pred.codes, xy) > 0.9
    assert _neighbour_agreement(pred.codes, xy) > _neighbour_agreement(truth, xy) - 0.05


def test_without_spatial_smoothing_regions_are_worse(planted):
    emb, xy, truth = planted
    plain = cluster_regions(emb, xy, n_regions=4, spatial_weight=0.0, smoothing_iterations=0)
    smoothed = cluster_regions(emb, xy, n_regions=4)
    assert adjusted_rand_score(truth, smoothed.codes) > adjusted_rand_score(truth, plain.codes) + 0.1


@pytest.mark.parametrize("k", [2, 3, 6, 9])
def test_recluster_gives_exactly_k_regions(clusterer, k):
    pred = clusterer.regions(n_regions=k)
    assert pred.categories == [f"Region {i + 1}" for i in range(k)]
    assert len(pred.colors) == k
    sizes = np.bincount(pred.codes, minlength=k)
    assert (sizes > 0).all()
    assert (np.diff(sizes) <= 0).all(), "regions are named by decreasing size"


def test_regions_are_nested_across_counts(clusterer):
    coarse = clusterer.regions(n_regions=3).codes
    fine = clusterer.regions(n_regions=6).codes
    for r in range(6):
        parents = np.bincount(coarse[fine == r], minlength=3)
        assert parents.max() / parents.sum() > 0.9


def test_resolution_controls_the_count(planted, clusterer):
    _, _, truth = planted
    default = clusterer.regions()
    assert adjusted_rand_score(truth, default.codes) > 0.8
    low = len(clusterer.regions(resolution=0.2).categories)
    high = len(clusterer.regions(resolution=3.0).categories)
    assert 1 <= low < high


def test_confidence_is_a_probability_and_lower_at_borders(planted, clusterer):
    _, xy, truth = planted
    pred = clusterer.regions(n_regions=4)
    assert pred.confidence.dtype == np.float32
    assert pred.confidence.min() >= 0.0 and pred.confidence.max() <= 1.0
    np.testing.assert_allclose(pred.probabilities.sum(axis=1), 1.0, atol=1e-5)
    nbrs = spatial_neighbors(xy, 15)
    border = (truth[nbrs] != truth[:, None]).any(axis=1)
    assert 0.05 < border.mean() < 0.6
    assert pred.confidence[border].mean() < pred.confidence[~border].mean() - 0.05


def test_same_seed_same_result(planted, clusterer):
    emb, xy, _ = planted
    again = RegionClusterer(emb, xy, seed=0)
    for k in (4, 7):
        a, b = clusterer.regions(n_regions=k), again.regions(n_regions=k)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.confidence, b.confidence)
    np.testing.assert_array_equal(clusterer.regions(resolution=1.0).codes, again.regions(resolution=1.0).codes)


def test_cluster_regions_matches_the_clusterer(planted, clusterer):
    emb, xy, _ = planted
    np.testing.assert_array_equal(cluster_regions(emb, xy, n_regions=5).codes, clusterer.regions(n_regions=5).codes)


def test_bad_requests_name_the_fix(planted, clusterer):
    emb, xy, _ = planted
    with pytest.raises(StofmInputError, match="not both"):
        clusterer.regions(n_regions=3, resolution=1.0)
    with pytest.raises(StofmInputError, match="between 1 and"):
        clusterer.regions(n_regions=clusterer.max_regions + 1)
    with pytest.raises(StofmInputError, match="positive"):
        clusterer.regions(resolution=0)
    with pytest.raises(StofmInputError, match="same cells"):
        RegionClusterer(emb[:-1], xy)
    with pytest.raises(StofmInputError, match=r"\(cells, 2\)"):
        RegionClusterer(emb, np.c_[xy, xy[:, 0]])
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(StofmInputError, match="NaN"):
        RegionClusterer(bad, xy)


def test_progress_and_cancel():
    emb, xy, _ = layered_slice(n=300)
    seen = []
    RegionClusterer(emb, xy, progress=lambda done, total, msg: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and len(seen) > 2
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        RegionClusterer(emb, xy, cancel=cancel)


def test_tiny_slice_works():
    emb, xy, _ = layered_slice(n=40)
    pred = cluster_regions(emb, xy, n_regions=3)
    assert pred.n_cells == 40 and len(pred.categories) == 3


def test_min_region_size_merges_specks_into_their_neighbour():
    """A handful of odd cells form their own leaf of the tree; at the requested count they
    are merged into the region around them and the count is made of real regions."""
    from napari_stofm.heads.regions import RegionClusterer

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(1200, 2))
    left = xy[:, 0] < 50
    emb = np.where(left[:, None], 1.0, -1.0) * np.array([1.0, 0, 0, 0]) + rng.normal(0, 0.3, (1200, 4))
    speck = np.flatnonzero(np.linalg.norm(xy - [75, 50], axis=1) < 4)[:6]
    emb[speck] = [0, 0, 0, 25.0]  # 6 cells unlike anything else
    kept = RegionClusterer(emb, xy, seed=0, min_region_size=0).regions(n_regions=3)
    sizes = np.bincount(kept.codes)
    assert sizes.min() < 100  # without the rule one of the 3 "regions" is the speck and its rim
    speck_region = np.bincount(kept.codes[speck]).argmax()
    assert sizes[speck_region] == sizes.min()
    merged = RegionClusterer(emb, xy, seed=0, min_region_size=150).regions(n_regions=3)
    sizes = np.bincount(merged.codes)
    assert sizes.size == 3 and sizes.min() >= 100  # three real regions: one half is split instead
    assert adjusted_rand_score(left[~np.isin(np.arange(1200), speck)],
                               merged.codes[~np.isin(np.arange(1200), speck)]) > 0.5
    assert RegionClusterer(emb, xy, seed=0).min_region_size == 12  # default: 1 % of the cells
    with pytest.raises(StofmInputError, match="min_region_size"):
        RegionClusterer(emb, xy, min_region_size=-1)


def test_in_place_pca_gives_the_straightforward_numbers_and_leaves_the_embeddings():
    """The memory-lean z-score + PCA (one scratch copy, PCA in place) is the textbook one."""
    from sklearn.decomposition import PCA

    from napari_stofm.heads.regions import _standardised_pca

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6000, 48)).astype(np.float32)
    emb[:, 5] = 2.0  # a constant dimension: z-score 0
    before = emb.copy()
    std = emb.std(axis=0)
    z = (emb - emb.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
    expected = PCA(n_components=30, svd_solver="randomized", random_state=3).fit_transform(z)
    np.testing.assert_allclose(_standardised_pca(emb, 30, 3), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(emb, before)


def test_large_slice_regions_pca_is_the_exact_z_scored_pca(monkeypatch):
    """Above LARGE_SLICE cells the regions' PCA comes from the covariance matrix (no copy of
    the embeddings): the exact PCA of the z-scores, signed as scikit-learn signs it."""
    from sklearn.decomposition import PCA

    from napari_stofm import pca
    from napari_stofm.heads.regions import _standardised_pca

    rng = np.random.default_rng(1)
    latent = rng.normal(size=(3000, 6)) * np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # a clear spectrum
    emb = (latent @ rng.normal(size=(6, 20)) + 0.1 * rng.normal(size=(3000, 20))).astype(np.float32)
    emb[:, 7] = -1.0  # a constant column
    std = emb.std(axis=0)
    z = (emb - emb.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
    expected = PCA(n_components=6, svd_solver="full").fit_transform(z.astype(np.float64))
    monkeypatch.setattr(pca, "LARGE_SLICE", 1000)
    np.testing.assert_allclose(_standardised_pca(emb, 6, 0), expected, rtol=1e-4, atol=1e-4)


def test_blockwise_neighbours_votes_means_and_posterior_are_the_straightforward_ones(monkeypatch):
    """The memory-lean forms (neighbour query, cluster means and posterior by blocks of rows,
    vote counts one neighbour column at a time) give the dense formulas' numbers."""
    from scipy.spatial import cKDTree

    from napari_stofm.heads import regions

    rng = np.random.default_rng(2)
    n, k, p = 3000, 5, 12
    xy = rng.uniform(0, 100, size=(n, 2))
    xy[10] = xy[11]  # a duplicate position: self must still be the one removed
    features = rng.normal(size=(n, p)).astype(np.float32)
    labels = rng.integers(0, k, n)
    monkeypatch.setattr(regions, "_ROW_BLOCK", 700)  # several blocks, the last one partial

    nbrs = regions.spatial_neighbors(xy, 8)
    _, idx = cKDTree(xy).query(xy, k=9)
    assert nbrs.shape == (n, 8) and not (nbrs == np.arange(n)[:, None]).any()
    rows_ok = (idx == np.arange(n)[:, None]).any(axis=1)
    np.testing.assert_array_equal(np.sort(nbrs[rows_ok], axis=1),
                                  np.sort(idx[rows_ok][idx[rows_ok] != np.arange(n)[rows_ok, None]].reshape(-1, 8),
                                          axis=1))

    votes = regions._vote_counts(labels, nbrs, k)
    expected_votes = np.zeros((n, k))
    np.add.at(expected_votes, (np.repeat(np.arange(n), 8), labels[nbrs].ravel()), 1.0)
    np.testing.assert_array_equal(votes, expected_votes)

    means, sizes = regions._cluster_means(features, labels, k)
    f64 = features.astype(np.float64)
    np.testing.assert_array_equal(sizes, np.bincount(labels, minlength=k))
    np.testing.assert_allclose(means, [f64[labels == c].mean(axis=0) for c in range(k)], rtol=1e-12, atol=1e-12)

    d2 = ((f64[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    var = d2[np.arange(n), labels].mean() / p
    logit = np.log(sizes / n)[None, :] - d2 / (2 * var)
    post = np.exp(logit - logit.max(axis=1, keepdims=True))
    np.testing.assert_allclose(regions._gaussian_posterior(features, labels, k), post / post.sum(axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
