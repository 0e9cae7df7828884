"""Unsupervised tissue regions over cell embeddings, re-clusterable in milliseconds.

How regions are found
---------------------
1. **Reduce.** Embeddings are standardised per dimension and projected on their first
   principal components (``n_pcs``).
2. **Smooth in space.** Each cell's reduced embedding is mixed with the mean over its
   ``n_neighbors`` spatial neighbours (cKDTree):
   ``z_s = (1 - spatial_weight) * z + spatial_weight * mean(z[neighbours])``. A tissue
   region is a neighbourhood with a typical composition, not a single cell state, so the
   clustering sees neighbourhoods; this is what makes the regions spatially contiguous
   rather than a map of cell types.
3. **Over-cluster once.** MiniBatchKMeans splits the smoothed cells into a few hundred
   micro-clusters (``n_micro``).
4. **One tree for every K.** The micro-clusters are joined in a graph whose edge weights
   are the cells' fuzzy co-membership (how many cells sit between two micro-clusters: the
   cell graph aggregated onto the micro-clusters). One greedy-modularity agglomeration
   (Clauset-Newman-Moore) of that graph is built at fit time; cutting it at any
   ``n_regions`` replays at most ``n_micro`` merges, so changing the number of regions
   never re-runs anything expensive, and regions are *nested*: going from K to K+1 splits
   one region in two instead of reshuffling all of them, which keeps a user's mental map
   stable. We chose this over a Ward tree on the micro-cluster centroids because Ward
   follows centroid distances and, where cell types vary more than regions, cuts along
   cell types; the graph follows where cells actually form a continuum (on a planted
   4-region slice with weak region signal: ARI 0.92-0.94 against 0.76-0.85 for Ward).
   With ``resolution`` instead of ``n_regions``, Leiden (RB-configuration / modularity at
   that resolution) runs on the same small graph: a data-chosen number of regions in
   milliseconds. The default resolution is 0.5 because modularity at 1.0 over-splits
   smooth tissue gradients.
5. **No specks.** A region smaller than ``min_region_size`` cells does not count toward
   ``n_regions``: the cut undoes only merges that joined two parts of at least that size,
   so a small leaf of the tree stays with the region it was merged into (its most
   connected neighbour) and the ``n_regions`` regions are all real ones. With
   ``resolution``, regions under the size are merged into their most connected neighbour.
6. **Clean up.** Cell labels are smoothed by a majority vote over spatial neighbours
   (``smoothing_iterations`` rounds; a cell keeps its label on ties) so regions are not
   salt-and-pepper. A region the vote would erase entirely keeps its original cells.

Confidence
----------
``probabilities`` is the mean of (a) the posterior of a spherical Gaussian mixture whose
components are the final regions (centroids and shared variance in the smoothed space,
priors = region sizes) and (b) the fraction of a cell's spatial neighbours in each region.
``confidence`` is the probability of the cell's own region. Both terms drop at region
borders and for cells whose neighbourhood looks like two regions at once.

Names are ``Region 1``, ``Region 2``, ... by decreasing size (ties by mean y, then x), never
by a random cluster id. Everything is seeded: the same input and seed give the same result.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.prediction import LabelPrediction
from napari_stofm.knn import spatial_neighbors
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report

DEFAULT_SPATIAL_WEIGHT = 0.8
DEFAULT_RESOLUTION = 0.5
#: default smallest region: this share of the slice's cells (at least MIN_REGION_CELLS)
MIN_REGION_SHARE = 0.01
MIN_REGION_CELLS = 5


class RegionClusterer:
    """Fit once on (embeddings, xy); then :meth:`regions` at any count or resolution.

    Parameters
    ----------
    embeddings
        (n, d) cell embeddings, e.g. ``obsm['X_stofm']``.
    xy
        (n, 2) cell positions, e.g. ``obsm['spatial']``.
    n_neighbors
        Spatial neighbours used for smoothing, the label vote and the confidence.
    spatial_weight
        In [0, 1]: how much of a cell's representation comes from its neighbours' mean
        (0 = the cell alone, 1 = its neighbourhood alone).
    seed
        Seeds PCA and the micro-clustering.
    n_pcs, n_micro
        Principal components kept; micro-clusters built (the largest ``n_regions`` allowed).
    smoothing_iterations
        Rounds of majority vote over spatial neighbours applied to the final labels.
    min_region_size
        Smallest region, in cells, that counts toward ``n_regions``; smaller ones are merged
        into their most connected neighbour. None: ``MIN_REGION_SHARE`` of the cells (at
        least ``MIN_REGION_CELLS``); 0 or 1 keeps every leaf of the tree.
    progress, cancel
        See :mod:`napari_stofm.progress`.
    """

    def __init__(
        self,
        embeddings,
        xy,
        *,
        n_neighbors: int = 15,
        spatial_weight: float = DEFAULT_SPATIAL_WEIGHT,
        seed: int = 0,
        n_pcs: int = 30,
        n_micro: int = 300,
        smoothing_iterations: int = 2,
        min_region_size: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: CancelToken = None,
    ):
        from napari_stofm.checks import integer, number

        emb, xy = _validated(embeddings, xy)
        spatial_weight = number(spatial_weight, "spatial_weight", minimum=0.0, maximum=1.0)
        n_neighbors = integer(n_neighbors, "n_neighbors", minimum=1)
        n_pcs = integer(n_pcs, "n_pcs", minimum=1)
        n_micro = integer(n_micro, "n_micro", minimum=1)
        seed = integer(seed, "seed", minimum=0, maximum=2**32 - 1)
        smoothing_iterations = integer(smoothing_iterations, "smoothing_iterations", minimum=0, maximum=1000)
        self.n_cells = emb.shape[0]
        if min_region_size is None:
            min_region_size = max(MIN_REGION_CELLS, int(round(MIN_REGION_SHARE * self.n_cells)))
        self.min_region_size = integer(min_region_size, "min_region_size", minimum=0,
                                       fix="the smallest region in cells, e.g. 20 (0 keeps every region)")
        self.xy = xy
        self.seed = seed
        self.smoothing_iterations = smoothing_iterations
        steps = 5
        report(progress, 0, steps, "reducing embeddings")
        reduced = _standardised_pca(emb, n_pcs, self.seed)
        check_cancelled(cancel)
        report(progress, 1, steps, "spatial neighbours")
        self.neighbors = spatial_neighbors(xy, min(n_neighbors, self.n_cells - 1))
        check_cancelled(cancel)
        report(progress, 2, steps, "spatial smoothing")
        self.features = _smooth(reduced, self.neighbors, spatial_weight)
        check_cancelled(cancel)
        report(progress, 3, steps, "micro-clusters")
        n_micro = min(int(n_micro), self.n_cells, max(50, self.n_cells // 20))
        self.micro_labels, centroids = _micro_clusters(self.features, n_micro, self.seed)
        self.n_micro = centroids.shape[0]
        self._micro_sizes = np.bincount(self.micro_labels, minlength=self.n_micro)
        check_cancelled(cancel)
        report(progress, 4, steps, "region tree")
        self._micro_graph = _co_membership_graph(self.features, centroids)
        self._merges = _modularity_merges(self._micro_graph)
        report(progress, steps, steps, "regions ready")

    @property
    def max_regions(self) -> int:
        """The largest ``n_regions`` :meth:`regions` accepts (the number of micro-clusters)."""
        return self.n_micro

    def regions(self, n_regions: Optional[int] = None, resolution: Optional[float] = None) -> LabelPrediction:
        """Tissue regions at ``n_regions`` (tree cut) or ``resolution`` (Leiden).

        Give one of the two; with neither, Leiden at resolution 0.5 picks the count
        (higher resolutions give more, smaller regions).
        """
        micro_to_region = self._micro_partition(n_regions, resolution)
        labels = micro_to_region[self.micro_labels]
        n_found = int(labels.max()) + 1
        labels = _majority_smooth(labels, self.neighbors, n_found, self.smoothing_iterations, self.min_region_size)
        labels = _order_by_size(labels, self.xy)
        return self._prediction(labels)

    def _micro_partition(self, n_regions, resolution) -> np.ndarray:
        if n_regions is not None and resolution is not None:
            raise StofmInputError("give n_regions or resolution, not both")
        if n_regions is not None:
            n_regions = check_n_regions(n_regions)
            if not 1 <= n_regions <= self.n_micro:
                raise StofmInputError(
                    f"n_regions must be between 1 and {self.n_micro} for this slice, got {n_regions}; "
                    "use fewer regions (or a larger n_micro for very fine partitions)"
                )
            return _cut_without_specks(self._merges, self._micro_sizes, n_regions,
                                       self.min_region_size)
        resolution = DEFAULT_RESOLUTION if resolution is None else check_resolution(resolution)
        part = _leiden(self._micro_graph, resolution, self.seed)
        return _merge_small(part, self._micro_graph, self._micro_sizes, self.min_region_size)

    def _prediction(self, labels: np.ndarray) -> LabelPrediction:
        k = int(labels.max()) + 1
        probabilities = 0.5 * _gaussian_posterior(self.features, labels, k) + 0.5 * _neighbor_votes(
            labels, self.neighbors, k
        )
        confidence = probabilities[np.arange(self.n_cells), labels]
        names = [f"Region {i + 1}" for i in range(k)]
        return LabelPrediction(names, labels.astype(np.int32), confidence, probabilities.astype(np.float32, copy=False))


def cluster_regions(
    embeddings,
    xy,
    n_regions: Optional[int] = None,
    resolution: Optional[float] = None,
    seed: int = 0,
    **kwargs,
) -> LabelPrediction:
    """One-shot :class:`RegionClusterer` (``kwargs`` go to its constructor) then ``.regions``."""
    return RegionClusterer(embeddings, xy, seed=seed, **kwargs).regions(n_regions=n_regions, resolution=resolution)


def check_n_regions(n_regions) -> int:
    """``n_regions`` as an int >= 1: ints, numpy ints and whole floats (``4.0``) pass; ``3.7``,
    ``True`` or ``'4'`` are a :class:`StofmInputError` (never silently cut to 3)."""
    from napari_stofm.checks import integer

    return integer(n_regions, "n_regions", minimum=1, fix="the number of tissue regions, e.g. 7")


def check_resolution(resolution) -> float:
    """``resolution`` as a finite float > 0, else a :class:`StofmInputError`."""
    from napari_stofm.checks import number

    return number(resolution, "resolution", minimum=0.0, exclusive_minimum=True,
                  fix="a Leiden resolution such as 0.5 (larger = more regions)")


# ----------------------------------------------------------------------------- fit steps


def _validated(embeddings, xy) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings, dtype=np.float32)
    pos = np.asarray(xy, dtype=np.float64)
    if emb.ndim != 2:
        raise StofmInputError(f"embeddings must be a (cells, dims) array, got shape {emb.shape}")
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise StofmInputError(f"xy must be a (cells, 2) array of positions, got shape {pos.shape}")
    if emb.shape[0] != pos.shape[0]:
        raise StofmInputError(
            f"{emb.shape[0]} embeddings but {pos.shape[0]} positions; pass the same cells in the same order"
        )
    if emb.shape[0] < 3:
        raise StofmInputError(f"need at least 3 cells to find regions, got {emb.shape[0]}")
    if not np.all(np.isfinite(emb)):
        raise StofmInputError("embeddings contain NaN or infinite values; re-run the embedding step")
    if not np.all(np.isfinite(pos)):
        raise StofmInputError("xy contains NaN or infinite positions; drop or fix those cells")
    return emb, pos


def _standardised_pca(emb: np.ndarray, n_pcs: int, seed: int) -> np.ndarray:
    """Per-dimension z-score (constant dimensions become 0), then PCA to ``n_pcs``.

    One scratch array of the embeddings' size: the z-scores are formed in place and PCA
    works on them in place (``copy=False``); above :data:`~napari_stofm.pca.LARGE_SLICE`
    cells none (the exact PCA from the covariance matrix, :func:`~napari_stofm.pca.covariance_pca`).
    """
    from sklearn.decomposition import PCA

    from napari_stofm.pca import LARGE_SLICE, covariance_pca

    n_comp = min(int(n_pcs), emb.shape[1], emb.shape[0] - 1)
    if emb.shape[0] > LARGE_SLICE and n_comp < emb.shape[1]:  # no full-size scratch array at all
        return covariance_pca(emb, n_comp, standardize=True).astype(np.float32)
    mean = emb.mean(axis=0)
    std = emb.std(axis=0)
    z = emb - mean
    z /= np.where(std > 1e-8, std, 1.0)
    if n_comp >= z.shape[1]:
        return z.astype(np.float32, copy=False)
    solver = "randomized" if z.shape[0] > 5000 else "full"
    pca = PCA(n_components=n_comp, svd_solver=solver, random_state=seed, copy=False)
    return pca.fit_transform(z).astype(np.float32)


def neighbor_mean_operator(neighbors: np.ndarray) -> sp.csr_matrix:
    """Sparse (n, n) matrix whose product with X averages X over each cell's neighbours."""
    n, k = neighbors.shape
    # built as CSR directly (rows in column order, as a COO conversion would sort them)
    indices = np.sort(neighbors, axis=1).ravel()
    indices = indices.astype(np.int32) if n < np.iinfo(np.int32).max else indices
    data = np.full(n * k, 1.0 / k, dtype=np.float32)
    return sp.csr_matrix((data, indices, np.arange(0, n * k + 1, k, dtype=indices.dtype)), shape=(n, n))


def _smooth(z: np.ndarray, neighbors: np.ndarray, weight: float) -> np.ndarray:
    if weight == 0.0:
        return z
    smoothed = np.asarray(neighbor_mean_operator(neighbors) @ z, dtype=np.float32)
    smoothed *= weight
    smoothed += (1.0 - weight) * z
    return smoothed


def _micro_clusters(features: np.ndarray, n_micro: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MiniBatchKMeans labels and centroids; empty clusters dropped, labels made contiguous."""
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(
        n_clusters=n_micro,
        random_state=seed,
        batch_size=min(features.shape[0], 4096),
        n_init=3,
        max_no_improvement=20,
    )
    labels = km.fit_predict(features)
    used, labels = np.unique(labels, return_inverse=True)
    centroids, _ = _cluster_means(features, labels, len(used))
    return labels.astype(np.int64), centroids


def _modularity_merges(graph: sp.coo_matrix) -> list[tuple[int, int]]:
    """Greedy modularity agglomeration (Clauset-Newman-Moore) of a weighted graph.

    Starting from singletons, repeatedly merges the pair of clusters whose union raises
    modularity most, ``dQ_ab = 2 (e_ab - a_a a_b)`` (``e`` = edge-weight fractions,
    ``a`` = strength fractions), until one cluster is left. Returns the merges
    (kept, retired) in order; a pair with no edge between them is merged last (negative dQ).
    """
    w = graph.toarray().astype(np.float64)
    w = 0.5 * (w + w.T)
    m = w.shape[0]
    e = w / max(w.sum(), 1e-300)
    a = e.sum(axis=1)
    gain = 2.0 * (e - np.outer(a, a))
    np.fill_diagonal(gain, -np.inf)
    active = np.ones(m, dtype=bool)
    merges = []
    for _ in range(m - 1):
        i, j = divmod(int(np.argmax(gain)), m)
        i, j = min(i, j), max(i, j)
        merges.append((i, j))
        e[i, :] += e[j, :]
        e[:, i] += e[:, j]
        a[i] += a[j]
        active[j] = False
        gain[j, :] = gain[:, j] = -np.inf
        row = np.where(active, 2.0 * (e[i, :] - a[i] * a), -np.inf)
        row[i] = -np.inf
        gain[i, :] = gain[:, i] = row
    return merges


def _cut_tree(merges: list[tuple[int, int]], m: int, k: int) -> np.ndarray:
    """Micro-cluster -> region (0..k-1) after replaying the first m - k merges."""
    return _replay(merges, m, set(range(m - k, len(merges))))


def _replay(merges: list[tuple[int, int]], m: int, undone: set) -> np.ndarray:
    """Micro-cluster -> region (0..r-1) after replaying every merge but those in ``undone``."""
    parent = np.arange(m)
    for t, (a, b) in enumerate(merges):
        if t not in undone:
            parent[b] = a
    root = parent.copy()
    while True:
        nxt = parent[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return np.unique(root, return_inverse=True)[1]


def _cut_without_specks(merges, micro_sizes: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """The tree cut into ``k`` regions where no region is a speck of under ``min_size`` cells.

    The plain cut undoes the last ``k - 1`` merges of the tree. This one undoes the last
    ``k - 1`` merges whose two sides both held at least ``min_size`` cells: a merge that only
    attached a small leaf to its neighbour stays done, so the leaf stays with the region it
    joined (the one it shares the most co-membership with, by the agglomeration's own rule),
    and every region is one side of an undone merge, hence at least ``min_size`` cells.
    Regions stay nested (``k + 1`` undoes one more merge). With fewer such merges than
    ``k - 1`` (a slice of fewer than ``k * min_size`` cells, say), the plain cut is used.
    """
    m = micro_sizes.size
    if min_size <= 1 or k <= 1:
        return _cut_tree(merges, m, k)
    size = micro_sizes.astype(np.float64).copy()
    smaller_side = np.empty(len(merges))
    for t, (a, b) in enumerate(merges):
        smaller_side[t] = min(size[a], size[b])
        size[a] += size[b]
    effective = np.flatnonzero(smaller_side >= min_size)
    if effective.size < k - 1:
        return _cut_tree(merges, m, k)
    return _replay(merges, m, set(effective[-(k - 1):].tolist()))


def _merge_small(part: np.ndarray, graph: sp.coo_matrix, micro_sizes: np.ndarray, min_size: int) -> np.ndarray:
    """Micro-cluster -> region with every region under ``min_size`` cells merged into the
    large region it shares the most co-membership weight with (the largest one when it
    shares none), renumbered 0..r-1. Unchanged when no region is large enough."""
    sizes = np.bincount(part, weights=micro_sizes)
    big = sizes >= min_size
    if min_size <= 1 or big.all() or not big.any():
        return part
    r = sizes.size
    onehot = sp.csr_matrix((np.ones(part.size), (np.arange(part.size), part)), shape=(part.size, r))
    between = (onehot.T @ sp.csr_matrix(graph) @ onehot).toarray()
    between = between + between.T
    target = np.arange(r)
    largest = int(np.argmax(sizes))
    for small in np.flatnonzero(~big):
        weights = np.where(big, between[small], 0.0)
        target[small] = int(np.argmax(weights)) if weights.max() > 0 else largest
    return np.unique(target[part], return_inverse=True)[1]


def _co_membership_graph(features: np.ndarray, centroids: np.ndarray, top: int = 10) -> sp.coo_matrix:
    """Symmetric (m, m) weights ``W = sum_i u_i u_i^T`` of the cells' fuzzy memberships ``u_i``.

    ``u_i`` spreads over the cell's ``top`` nearest micro-centroids with a per-cell
    bandwidth chosen as in UMAP (memberships ``exp(-(d - d_min) / sigma)`` summing to
    ``log2(top)`` before normalisation), so it adapts to local density. ``W_ab`` measures
    how many cells sit between micro-clusters a and b: the cell graph aggregated onto the
    micro-clusters.
    """
    n = features.shape[0]
    m = centroids.shape[0]
    top = min(top, m)
    c_sq = (centroids**2).sum(axis=1)
    weights = sp.csr_matrix((m, m))
    # W summed block by block: the (n, top) memberships are never held at once
    for start in range(0, n, _MEMBERSHIP_BLOCK):
        x = features[start : start + _MEMBERSHIP_BLOCK].astype(np.float64)
        d2 = np.maximum((x * x).sum(axis=1)[:, None] + c_sq[None, :] - 2.0 * x @ centroids.T, 0.0)
        idx = np.argpartition(d2, top - 1, axis=1)[:, :top]
        u = _fuzzy_memberships(np.sqrt(np.take_along_axis(d2, idx, axis=1)))
        memb = sp.csr_matrix((u.ravel(), idx.ravel(), np.arange(0, u.size + 1, top)), shape=(len(x), m))
        weights = weights + memb.T @ memb
    return weights.tocoo()


#: cells per block of :func:`_co_membership_graph`
_MEMBERSHIP_BLOCK = 20000
#: cells per block of the neighbour query, the cluster means and the posterior
_ROW_BLOCK = 65536


def _fuzzy_memberships(dist: np.ndarray) -> np.ndarray:
    """Rows of ``exp(-(d - d_min) / sigma)`` with sigma bisected to sum to log2(k); normalised."""
    k = dist.shape[1]
    if k == 1:
        return np.ones_like(dist)
    excess = dist - dist.min(axis=1, keepdims=True)
    target = np.log2(k)
    lo = np.full((dist.shape[0], 1), 1e-12)
    hi = np.maximum(excess.max(axis=1, keepdims=True), 1e-12) * 1e3
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        too_wide = np.exp(-excess / mid).sum(axis=1, keepdims=True) > target
        hi = np.where(too_wide, mid, hi)
        lo = np.where(too_wide, lo, mid)
    u = np.exp(-excess / (0.5 * (lo + hi)))
    return u / u.sum(axis=1, keepdims=True)


def _leiden(graph: sp.coo_matrix, resolution: float, seed: int) -> np.ndarray:
    import igraph as ig
    import leidenalg

    upper = graph.row <= graph.col
    rows, cols, weights = graph.row[upper], graph.col[upper], graph.data[upper].astype(float)
    # igraph counts a self-loop twice in a vertex's strength; halve it to match the matrix.
    weights = np.where(rows == cols, weights / 2.0, weights)
    g = ig.Graph(n=graph.shape[0], edges=list(zip(rows.tolist(), cols.tolist(), strict=True)), directed=False)
    g.es["weight"] = weights.tolist()
    part = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=resolution,
        seed=seed,
        n_iterations=-1,
    )
    return np.unique(np.asarray(part.membership), return_inverse=True)[1]


# --------------------------------------------------------------- per-request steps (fast)


def _vote_counts(labels: np.ndarray, neighbors: np.ndarray, k: int) -> np.ndarray:
    """(n, k) number of each cell's spatial neighbours carrying each label."""
    n = neighbors.shape[0]
    votes = np.zeros(n * k, dtype=np.float32)
    base = np.arange(n, dtype=np.intp) * k
    # one neighbour column at a time: each row occurs once per column, so the indexed += counts
    # every vote (and no (n, n_neighbors) index array is made)
    for j in range(neighbors.shape[1]):
        votes[base + labels[neighbors[:, j]]] += 1.0
    return votes.reshape(n, k)


def _majority_smooth(labels: np.ndarray, neighbors: np.ndarray, k: int, iterations: int,
                     min_size: int = 1) -> np.ndarray:
    """Majority vote over each cell and its neighbours; ties keep the cell's own label.

    A region that a vote would erase completely, or shrink below ``min_size`` cells (when it
    had at least that many), keeps its original cells.
    """
    n = labels.shape[0]
    rows = np.arange(n)
    floor = max(1, int(min_size))
    for _ in range(iterations):
        votes = _vote_counts(labels, neighbors, k)
        votes[rows, labels] += 1.5  # the cell itself, plus a tie-break in its favour
        new = votes.argmax(axis=1)
        before = np.bincount(labels, minlength=k)
        after = np.bincount(new, minlength=k)
        lost = np.flatnonzero(((after < floor) & (before >= floor)) | ((after == 0) & (before > 0)))
        if lost.size:
            keep = np.isin(labels, lost)
            new[keep] = labels[keep]
        labels = new
    return labels


def _order_by_size(labels: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Renumber regions by decreasing size, ties broken by mean y then mean x."""
    present, labels = np.unique(labels, return_inverse=True)
    k = present.size
    sizes = np.bincount(labels, minlength=k)
    mean_x = np.bincount(labels, weights=xy[:, 0], minlength=k) / sizes
    mean_y = np.bincount(labels, weights=xy[:, 1], minlength=k) / sizes
    order = np.lexsort((mean_x, mean_y, -sizes))
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels]


def _cluster_means(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, p) float64 mean of the features in each cluster and (k,) cluster sizes."""
    n, p = features.shape
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros((k, p), dtype=np.float64)
    for start in range(0, n, _ROW_BLOCK):  # summed in float64 by blocks: no float64 copy of the features
        block = labels[start : start + _ROW_BLOCK]
        onehot = sp.csr_matrix((np.ones(block.size), (np.arange(block.size), block)), shape=(block.size, k))
        sums += onehot.T @ features[start : start + _ROW_BLOCK].astype(np.float64)
    return sums / np.maximum(sizes, 1.0)[:, None], sizes


def _gaussian_posterior(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(n, k) float32 posterior of a spherical Gaussian mixture with one component per region."""
    n, p = features.shape
    centroids, sizes = _cluster_means(features, labels, k)
    c_sq = (centroids**2).sum(axis=1)
    blocks = [slice(start, min(start + _ROW_BLOCK, n)) for start in range(0, n, _ROW_BLOCK)]

    def sq_distances(rows: slice) -> np.ndarray:  # (rows, k) float64, without a float64 copy of the features
        f = features[rows]
        f_sq = np.einsum("ij,ij->i", f, f, dtype=np.float64)
        return np.maximum(f_sq[:, None] + c_sq[None, :] - 2.0 * (f @ centroids.T), 0.0)

    own = sum(float(np.take_along_axis(sq_distances(b), labels[b, None], axis=1).sum()) for b in blocks)
    var = max(own / n / p, 1e-12)
    log_prior = np.log(np.maximum(sizes, 1.0) / n)[None, :]
    post = np.empty((n, k), dtype=np.float32)
    for b in blocks:
        logit = log_prior - sq_distances(b) / (2.0 * var)
        logit -= logit.max(axis=1, keepdims=True)
        e = np.exp(logit)
        post[b] = e / e.sum(axis=1, keepdims=True)
    return post


def _neighbor_votes(labels: np.ndarray, neighbors: np.ndarray, k: int) -> np.ndarray:
    return _vote_counts(labels, neighbors, k) / neighbors.shape[1]
