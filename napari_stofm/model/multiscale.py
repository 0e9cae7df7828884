"""Micro- and macro-scale extraction: from cells with positions to SE(2) transformer input.

* :func:`normalize_coordinates` centres positions on the bounding-box midpoint and scales
  the bounding-box diagonal to 100 units.
* :func:`split_subslices` cuts a slice into sub-slices of about ``split_num`` cells on a
  grid of equal squares (``mode='published'`` reproduces the published order exactly,
  including its index-order split of crowded squares; ``mode='spatial'`` splits crowded
  squares spatially instead).
* :func:`build_hypernodes` clusters cells into macro-scale virtual cells with Leiden.
* :func:`subslice_distances` is the per-sub-slice distance matrix by the published rules.
* :func:`build_subslice_inputs` / :func:`collate` assemble padded batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from napari_stofm.errors import StofmInputError
from napari_stofm.leiden import leiden_at_most
from napari_stofm.pca import LARGE_SLICE, covariance_pca

NORM_TYPE, CLS_TYPE, HYPER_TYPE, PAD_TYPE = 0, 1, 2, 3

#: distance given to token pairs that are not neighbours
FAR_DISTANCE = 100.0
#: neighbours per token in the distance matrix, the token itself counted (published: 50)
NEIGHBOURS = 50


def normalize_coordinates(xy: np.ndarray) -> np.ndarray:
    """Centre (x, y) on the bounding-box midpoint; the bounding-box diagonal becomes 100."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] == 0:
        raise StofmInputError(f"expected cell coordinates of shape (n_cells, 2), got {xy.shape}")
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        bad = int((~np.isfinite(xy)).any(axis=1).sum())
        raise StofmInputError(
            f"{bad} cells have missing or non-finite coordinates; drop them first, e.g. "
            "adata = adata[np.isfinite(adata.obsm['spatial']).all(1)].copy()"
        )
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    mid = (lo + hi) / 2
    diag = float(np.hypot(*(hi - lo)))
    if diag == 0.0:
        return np.zeros_like(xy)
    return (xy - mid) / diag * 100.0


def split_subslices(normalized_xy: np.ndarray, split_num: int = 1000, mode: str = "published") -> List[np.ndarray]:
    """Cell index arrays of the sub-slices, in the published order.

    The bounding box is covered by squares of side ``sqrt(area / (n // split_num + 1))``,
    visited column by column (x outer, y inner); empty squares are dropped. A square with
    at least ``2 * split_num`` cells is split further into ``count // split_num`` parts:
    by index order in ``'published'`` mode, by recursive halving along the longer axis in
    ``'spatial'`` mode.
    """
    from napari_stofm.checks import integer

    if mode not in ("published", "spatial"):
        raise StofmInputError(f"mode must be 'published' or 'spatial', not {mode!r}")
    split_num = integer(split_num, "split_num", minimum=1, fix="the number of cells per sub-slice, e.g. 1000")
    xy = np.asarray(normalized_xy, dtype=np.float64)
    n = xy.shape[0]
    if n <= split_num:
        return [np.arange(n)]
    min_x, min_y = xy[:, 0].min(), xy[:, 1].min()
    x_len = xy[:, 0].max() - min_x
    y_len = xy[:, 1].max() - min_y
    side = np.sqrt(x_len * y_len / (n // split_num + 1))
    if not np.isfinite(side) or side <= 0:
        # A degenerate (line-shaped) slice has no area: fall back to chunks along its extent.
        order = np.lexsort((xy[:, 1], xy[:, 0]))
        return [np.sort(c) for c in np.array_split(order, n // split_num + 1)]
    n_x = int(x_len / side) + 1
    n_y = int(y_len // side) + 1
    col = np.floor((xy[:, 0] - min_x) / side).astype(np.int64)
    row = np.floor((xy[:, 1] - min_y) / side).astype(np.int64)
    # Cells bucketed by the square their floored coordinates fall in (one sort, instead of
    # a scan of every cell per square); a square's candidates are its 3 x 3 block of buckets.
    n_rows = int(row.max()) + 3
    bucket = (col + 1) * n_rows + (row + 1)
    by_bucket = np.argsort(bucket, kind="stable")
    starts = np.searchsorted(bucket[by_bucket], np.arange((int(col.max()) + 3) * n_rows + 1))
    out: List[np.ndarray] = []
    for i in range(n_x):
        for j in range(n_y):
            # Same half-open bounds as the published mask, computed the published way so
            # that cells on a boundary land in the same square.
            x0, x1 = min_x + i * side, min_x + (i + 1) * side
            y0, y1 = min_y + j * side, min_y + (j + 1) * side
            candidates = _block_candidates(by_bucket, starts, i, j, n_rows)
            if candidates.size == 0:
                continue
            cx, cy = xy[candidates, 0], xy[candidates, 1]
            idx = candidates[(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)]
            if idx.size == 0:
                continue
            parts = idx.size // split_num
            if parts >= 2:
                if mode == "published":
                    out.extend(np.array_split(idx, parts))
                else:
                    out.extend(_spatial_split(xy, idx, parts))
            else:
                out.append(idx)
    covered = np.zeros(n, dtype=bool)
    for part in out:
        covered[part] = True
    if not covered.all():
        # Only float rounding at the far edge can leave a cell out; give it its own part
        # rather than lose it (the published code would drop it).
        out.append(np.flatnonzero(~covered))
    return out


def _block_candidates(by_bucket: np.ndarray, starts: np.ndarray, i: int, j: int, n_rows: int) -> np.ndarray:
    """Cells whose floored (column, row) is within one square of ``(i, j)``, in index order."""
    pieces = []
    for di in (-1, 0, 1):
        c = i + di + 1
        if c < 0:
            continue
        lo_b = c * n_rows + max(j - 1 + 1, 0)
        hi_b = c * n_rows + min(j + 1 + 1, n_rows - 1)
        if lo_b >= starts.size - 1:
            continue
        hi_b = min(hi_b, starts.size - 2)
        pieces.append(by_bucket[starts[lo_b]:starts[hi_b + 1]])
    if not pieces:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(pieces))


def _spatial_split(xy: np.ndarray, idx: np.ndarray, parts: int) -> List[np.ndarray]:
    """Split ``idx`` into ``parts`` spatially compact groups of near-equal size."""
    if parts <= 1:
        return [np.sort(idx)]
    pts = xy[idx]
    axis = int(np.ptp(pts[:, 1]) > np.ptp(pts[:, 0]))
    order = idx[np.argsort(pts[:, axis], kind="stable")]
    left_parts = parts // 2
    cut = int(round(idx.size * left_parts / parts))
    return _spatial_split(xy, order[:cut], left_parts) + _spatial_split(xy, order[cut:], parts - left_parts)


@dataclass
class Hypernodes:
    """Macro-scale virtual cells: mean position and mean embedding of each Leiden cluster."""

    xy: np.ndarray  # (h, 2) normalised coordinates
    embeddings: np.ndarray  # (h, d)
    assignment: np.ndarray  # (n,) cluster of each cell
    resolution: float


def hypernodes_from_assignment(normalized_xy: np.ndarray, embeddings: np.ndarray, assignment: np.ndarray) -> Hypernodes:
    """Virtual cells from a given grouping of cells (groups ordered by label)."""
    labels, inverse = np.unique(assignment, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)[:, None]
    xy = _group_sums(inverse, labels.size, normalized_xy)
    emb = _group_sums(inverse, labels.size, embeddings)
    return Hypernodes(xy / counts, emb / counts, inverse, float("nan"))


#: rows summed at once by :func:`_group_sums` (bounds the float64 copy of the rows)
_SUM_CHUNK = 65536


def _group_sums(groups: np.ndarray, n_groups: int, values: np.ndarray) -> np.ndarray:
    """Per-group float64 sums of the rows of ``values`` (a sparse one-hot product, in
    chunks of rows, so a float32 input is never copied whole to float64)."""
    import scipy.sparse as sp

    values = np.asarray(values)
    out = np.zeros((n_groups, values.shape[1]))
    for start in range(0, values.shape[0], _SUM_CHUNK):
        g = groups[start:start + _SUM_CHUNK]
        onehot = sp.csr_matrix((np.ones(g.size), (g, np.arange(g.size))), shape=(n_groups, g.size))
        out += onehot @ np.asarray(values[start:start + _SUM_CHUNK], dtype=np.float64)
    return out


def build_hypernodes(
    normalized_xy: np.ndarray,
    embeddings: np.ndarray,
    *,
    alpha: float = 0.2,
    resolution: float = 1.0,
    n_neighbors: int = 10,
    max_hypernodes: int = 200,
    seed: int = 0,
) -> Hypernodes:
    """Leiden clusters over ``alpha * position + (1 - alpha) * PCA-2 of embeddings``.

    Each part is divided by its largest row norm. As in the published code (scanpy's
    ``neighbors`` + ``leiden(flavor='igraph')``), the graph is the UMAP fuzzy union of the
    10-nearest-neighbour graph (the point itself counted) and Leiden optimises modularity
    with igraph, seeded. If more than ``max_hypernodes`` clusters come out the resolution
    is halved until they fit (as the published GPU path does), so a huge slice cannot blow
    up the sequence length.
    """
    from sklearn.decomposition import PCA

    from napari_stofm.checks import integer, number

    alpha = number(alpha, "alpha (hypernode_alpha)", minimum=0.0, maximum=1.0)
    resolution = number(resolution, "resolution (hypernode_resolution)", minimum=0.0, exclusive_minimum=True)
    n_neighbors = integer(n_neighbors, "n_neighbors", minimum=1)
    max_hypernodes = integer(max_hypernodes, "max_hypernodes", minimum=1)
    xy = np.asarray(normalized_xy, dtype=np.float64)
    emb = np.asarray(embeddings)
    n = xy.shape[0]
    if emb.ndim != 2 or emb.shape[0] != n:
        raise StofmInputError(f"{emb.shape[0] if emb.ndim else 0} embeddings for {n} positions: pass one "
                              "(cells, dims) embedding row per cell")
    if n < 3:
        return hypernodes_from_assignment(xy, emb, np.zeros(n, dtype=int))
    pos = xy / _max_row_norm(xy)
    if emb.shape[1] < 2 or not np.ptp(emb, axis=0).max() > 0:
        pca = np.zeros((n, 2))
    elif n > LARGE_SLICE:
        pca = covariance_pca(emb, 2)
    else:
        pca = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(emb, dtype=np.float64))
    pca = pca / _max_row_norm(pca)
    features = alpha * pos + (1 - alpha) * pca
    graph = umap_connectivities(features, min(n_neighbors, n - 1))
    labels, res = leiden_at_most(graph, max_hypernodes, resolution=float(resolution), seed=seed)
    hyper = hypernodes_from_assignment(xy, emb, labels)
    hyper.resolution = res
    return hyper


def umap_connectivities(features: np.ndarray, n_neighbors: int):
    """UMAP's fuzzy-union kNN graph (``n_neighbors`` counts the point itself), as scipy CSR."""
    import scipy.sparse as sp

    n = features.shape[0]
    k = max(2, min(n_neighbors, n))
    dist, idx = cKDTree(features).query(features, k=k)
    dist, idx = dist[:, 1:], idx[:, 1:]  # drop the point itself
    # smooth kNN distances: rho = nearest non-zero distance, sigma by bisection so that the
    # weights of each row sum to log2(k)
    rho = np.where(dist > 0, dist, np.inf).min(axis=1)
    rho[~np.isfinite(rho)] = 0.0
    target = np.log2(k)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    sigma = np.ones(n)
    gap = np.maximum(dist - rho[:, None], 0.0)
    for _ in range(64):
        total = np.exp(-gap / sigma[:, None]).sum(axis=1)
        too_big = total > target
        hi = np.where(too_big, sigma, hi)
        lo = np.where(too_big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    mean_dist = dist.mean()
    sigma = np.maximum(sigma, np.where(rho > 0, 1e-3 * rho, 1e-3 * mean_dist))
    weights = np.exp(-gap / sigma[:, None])
    a = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k - 1), idx.ravel())), shape=(n, n))
    at = a.T.tocsr()
    return (a + at - a.multiply(at)).tocsr()


def _max_row_norm(a: np.ndarray) -> float:
    norm = float(np.sqrt(np.max(np.sum(a**2, axis=1))))
    return norm if norm > 0 else 1.0


def subslice_distances(token_xy: np.ndarray, token_types: np.ndarray) -> np.ndarray:
    """The (L, L) distance matrix of one sub-slice, by the published rules.

    Tokens are ``[CLS at (0, 0)] + virtual cells + cells``. Each token's nearest other
    tokens (a query of ``min(50, L - 1)`` neighbours that counts the token itself, the CLS
    token included in the search) get their Euclidean distance; every pair involving a
    virtual cell gets its full distance; every other pair gets 100; a pair that is a
    neighbour in one direction takes that distance both ways; a distance of exactly 0
    between two different tokens becomes 100; the CLS row, CLS column and diagonal are 0.
    """
    xy = np.asarray(token_xy, dtype=np.float64)
    types = np.asarray(token_types)
    l = xy.shape[0]
    dist = np.zeros((l, l), dtype=np.float32)
    if l > 1:
        k = min(NEIGHBOURS, l - 1)
        d, j = cKDTree(xy).query(xy, k=k)
        d, j = d.reshape(l, k), j.reshape(l, k)
        i = np.repeat(np.arange(l), k)
        j, d = j.ravel(), d.ravel()
        keep = (i != j) & (i > 0) & (j > 0)
        dist[i[keep], j[keep]] = d[keep]
    hyper = np.flatnonzero(types == HYPER_TYPE)
    if hyper.size:
        full = cdist(xy[hyper], xy[1:]).astype(np.float32)
        dist[hyper, 1:] = full
        dist[1:, hyper] = full.T
    dist[dist == 0] = FAR_DISTANCE
    dist[:, 0] = 0.0
    dist[0, :] = 0.0
    one_way = (dist == FAR_DISTANCE) & (dist.T != FAR_DISTANCE)
    dist[one_way] = dist.T[one_way]
    np.fill_diagonal(dist, 0.0)
    return dist


@dataclass
class SubsliceInput:
    """One sub-slice as transformer tokens (unpadded)."""

    token_embeddings: np.ndarray  # (L, D) float32
    attn_bias: np.ndarray  # (L, L) float32 distances
    token_types: np.ndarray  # (L,) int32
    indices: np.ndarray  # (L,) int64, cell index or -1
    spatial: np.ndarray  # (L, 2) float32

    def __len__(self) -> int:
        return self.token_types.shape[0]


def build_subslice_inputs(
    normalized_xy: np.ndarray,
    embeddings: np.ndarray,
    hypernodes: Hypernodes,
    subslices: Sequence[np.ndarray],
) -> Iterable[SubsliceInput]:
    """Tokens ``[CLS (0, 0), zero embedding] + all virtual cells + the sub-slice's cells``."""
    h = hypernodes.xy.shape[0]
    d = embeddings.shape[1]
    for cells in subslices:
        cells = np.asarray(cells, dtype=np.int64)
        xy = np.concatenate([np.zeros((1, 2)), hypernodes.xy, normalized_xy[cells]])
        emb = np.concatenate([np.zeros((1, d)), hypernodes.embeddings, embeddings[cells]])
        types = np.full(xy.shape[0], NORM_TYPE, dtype=np.int32)
        types[0] = CLS_TYPE
        types[1 : h + 1] = HYPER_TYPE
        indices = np.concatenate([np.full(1 + h, -1, dtype=np.int64), cells])
        yield SubsliceInput(
            token_embeddings=emb.astype(np.float32),
            attn_bias=subslice_distances(xy, types),
            token_types=types,
            indices=indices,
            spatial=xy.astype(np.float32),
        )


def collate(items: Sequence[SubsliceInput], pad_to: Optional[int] = None) -> dict:
    """Pad sub-slices to one batch: zeros everywhere, token type 3, index -1."""
    l = max(pad_to or 0, max(len(it) for it in items))
    b, d = len(items), items[0].token_embeddings.shape[1]
    emb = torch.zeros(b, l, d)
    bias = torch.zeros(b, l, l)
    types = torch.full((b, l), PAD_TYPE, dtype=torch.long)
    indices = torch.full((b, l), -1, dtype=torch.long)
    spatial = torch.zeros(b, l, 2)
    for k, it in enumerate(items):
        m = len(it)
        emb[k, :m] = torch.from_numpy(it.token_embeddings)
        bias[k, :m, :m] = torch.from_numpy(it.attn_bias)
        types[k, :m] = torch.from_numpy(it.token_types.astype(np.int64))
        indices[k, :m] = torch.from_numpy(it.indices)
        spatial[k, :m] = torch.from_numpy(it.spatial)
    return {"token_embeddings": emb, "attn_bias": bias, "token_types": types, "indices": indices, "spatial": spatial}
