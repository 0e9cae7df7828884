"""Principal components of a large float32 matrix in bounded memory.

Above :data:`LARGE_SLICE` cells the virtual cells' PCA and the regions' PCA are computed
from the (d, d) covariance matrix accumulated over blocks of rows in float64, then the rows
are projected block by block: no full-size copy of the matrix (a 1M x 256 float32 matrix is
1 GB; scikit-learn's PCA holds a centred copy of it and its randomized solver several
(n, k) scratch arrays). The result is the exact PCA (what ``PCA(k, svd_solver='full')``
gives, to float rounding), signed as scikit-learn signs it (each component's largest
loading positive). Smaller slices keep scikit-learn's solvers and their numbers.
"""
from __future__ import annotations

import numpy as np

#: above this many cells, PCA goes through :func:`covariance_pca`
LARGE_SLICE = 200_000
#: rows read at once (bounds the float64 copy of a block)
BLOCK_ROWS = 65536


def covariance_pca(x: np.ndarray, n_components: int, *, standardize: bool = False) -> np.ndarray:
    """The ``(n, n_components)`` float64 PCA projection of ``x``; ``standardize``: of its
    per-column z-scores (population standard deviation; constant columns become 0),
    without forming them."""
    n, d = x.shape
    total = np.zeros(d)
    for start in range(0, n, BLOCK_ROWS):
        total += np.asarray(x[start:start + BLOCK_ROWS], dtype=np.float64).sum(axis=0)
    mean = total / n
    cov = np.zeros((d, d))
    for start in range(0, n, BLOCK_ROWS):
        block = np.asarray(x[start:start + BLOCK_ROWS], dtype=np.float64) - mean
        cov += block.T @ block
    divisor = np.ones(d)
    if standardize:
        std = np.sqrt(np.diag(cov) / n)
        divisor = np.where(std > 1e-8, std, 1.0)
        cov = cov / np.outer(divisor, divisor)
    _values, vectors = np.linalg.eigh(cov)
    top = vectors[:, ::-1][:, :n_components]
    top = top * np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(top.shape[1])])
    out = np.empty((n, top.shape[1]))
    for start in range(0, n, BLOCK_ROWS):
        block = (np.asarray(x[start:start + BLOCK_ROWS], dtype=np.float64) - mean) / divisor
        out[start:start + BLOCK_ROWS] = block @ top
    return out
