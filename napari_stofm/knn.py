"""Each cell's nearest other cells by position: the one k-nearest-neighbour query that the
region clustering, the neighbour-context features and the pretraining batches share. Numpy
and scipy only (a training node without the scverse stack imports it too)."""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: rows queried at a time: no (n, k + 1) distances of a 1M-cell slice held at once
ROW_BLOCK = 65536


def spatial_neighbors(xy: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(n, k) indices of each cell's k nearest other cells (self removed even among duplicates).

    ``rows``: only these cells' neighbours (one row each, in that order), still among all of ``xy``.
    """
    n = xy.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    tree = cKDTree(xy)
    out = np.empty((rows.size, k), dtype=np.int32 if n < np.iinfo(np.int32).max else np.int64)
    for start in range(0, rows.size, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, rows.size)
        block = rows[start:stop]
        _, idx = tree.query(xy[block], k=k + 1)
        idx = idx.reshape(stop - start, k + 1)
        is_self = idx == block[:, None]
        no_self = ~is_self.any(axis=1)
        is_self[no_self, -1] = True  # self lost among duplicates: drop the farthest instead
        out[start:stop] = idx[~is_self].reshape(stop - start, k)
    return out
