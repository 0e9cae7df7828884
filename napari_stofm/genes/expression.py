"""Expression matrices as the gene scale reads them: CSR, per-cell normalised."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from napari_stofm.errors import StofmInputError

TARGET_SUM = 10_000.0

#: values kinds understood in ``adata.uns['source']['values']``
VALUE_KINDS = ("raw_counts", "volume_normalized", "log_normalized")


#: largest value a log1p-normalised matrix plausibly holds (log1p(1e6) = 13.8: even counts
#: per million stay below it), and the share of non-integer values above which a matrix
#: with no larger value is read as log-normalised
LOG_MAX = 20.0
LOG_NONINTEGER_FRACTION = 0.5
#: rows looked at to tell what X holds (evenly spaced; keeps the check fast on huge slices)
_SAMPLE_ROWS = 20_000

LINEAR_KINDS = ("raw_counts", "volume_normalized")


def check_values_kind(values, what: str = "values") -> str:
    """``values`` if it is one of :data:`VALUE_KINDS`, else :class:`StofmInputError`."""
    if not isinstance(values, str) or values not in VALUE_KINDS:
        raise StofmInputError(
            f"{what}={values!r} is not one of {', '.join(VALUE_KINDS)}: say whether X holds counts, "
            "volume-normalised or log-normalised values")
    return values


def infer_values_kind(adata=None, X=None, values: Optional[str] = None) -> Tuple[str, str]:
    """``(kind, basis)``: what the expression matrix holds and how that was decided.

    In order: ``values`` when given (basis ``'values='``); ``uns['source']['values']``;
    ``'log_normalized'`` when scanpy's ``uns['log1p']`` is present; else it is read off the
    values of ``X`` (default ``adata.X``; basis ``'detected: ...'``): whole numbers are
    ``'raw_counts'``; non-integer values none of which exceeds :data:`LOG_MAX` (mostly
    non-integers) are ``'log_normalized'`` (scanpy / Seurat log1p data that lost its
    ``uns['log1p']``, e.g. written by another tool); other non-integer values are a linear
    scale (``'volume_normalized'``, which the tokenizer reads like counts).
    """
    if values is not None:
        return check_values_kind(values), "values="
    uns = getattr(adata, "uns", None) or {}
    source = uns.get("source")
    if isinstance(source, dict) and source.get("values") is not None:
        kind = str(source["values"])
        if kind not in VALUE_KINDS:
            raise StofmInputError(
                f"uns['source']['values'] is {kind!r}; expected one of {', '.join(VALUE_KINDS)} "
                f"(set it to say whether X holds counts, volume-normalised or log-normalised values)"
            )
        return kind, "uns['source']['values']"
    if "log1p" in uns:
        return "log_normalized", "uns['log1p']"
    if X is None:
        X = getattr(adata, "X", None)
    if X is None:
        return "raw_counts", "default (no expression matrix to look at)"
    return _detect_values_kind(X)


def _detect_values_kind(X) -> Tuple[str, str]:
    if is_backed(X):  # read only the sampled rows from disk
        n = int(X.shape[0])
        rows = np.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).astype(np.int64)
        X = X[np.unique(rows)]
    if sp.issparse(X):
        M = as_csr(X)
        if M.shape[0] > _SAMPLE_ROWS:
            M = M[np.linspace(0, M.shape[0] - 1, _SAMPLE_ROWS).astype(np.int64)]
        data = M.data
    else:
        arr = np.asarray(X)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            return "raw_counts", "default (the expression matrix is not a 2-D numeric array)"
        if arr.shape[0] > _SAMPLE_ROWS:
            arr = arr[np.linspace(0, arr.shape[0] - 1, _SAMPLE_ROWS).astype(np.int64)]
        data = arr.ravel()
    if not np.issubdtype(np.asarray(data).dtype, np.number):
        return "raw_counts", "default (the expression matrix does not hold numbers)"
    data = np.asarray(data, dtype=np.float64)
    data = data[np.isfinite(data) & (data != 0)]
    if data.size == 0:
        return "raw_counts", "default (no non-zero value)"
    nonint = float(np.mean(np.abs(data - np.round(data)) > 1e-6 * np.maximum(1.0, np.abs(data))))
    vmax = float(data.max())
    if nonint == 0.0:
        return "raw_counts", "detected: whole numbers"
    if vmax <= LOG_MAX and nonint >= LOG_NONINTEGER_FRACTION:
        return "log_normalized", (f"detected: {100 * nonint:.0f} % non-integer values, none above {vmax:.3g} "
                                  f"(log1p-like range <= {LOG_MAX:g})")
    return "volume_normalized", (f"detected: {100 * nonint:.0f} % non-integer values up to {vmax:.3g} "
                                 "(a linear scale)")


def expression_values_kind(adata, X=None) -> str:
    """What ``X`` holds (one of :data:`VALUE_KINDS`); see :func:`infer_values_kind`."""
    return infer_values_kind(adata, X)[0]


def as_csr(X) -> sp.csr_matrix:
    """``X`` (scipy sparse, dense array, or a backed AnnData matrix) as a CSR matrix."""
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    if sp.issparse(X):
        return X if isinstance(X, sp.csr_matrix) else sp.csr_matrix(X)
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise StofmInputError(f"the expression matrix must be 2-D (cells x genes); got shape {arr.shape}")
    return sp.csr_matrix(arr)


def normalize_expression(X, values: str = "raw_counts", exclude: Optional[Sequence[int]] = None,
                         target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Expression / cell total * ``target_sum`` as float64 CSR.

    ``values='log_normalized'`` applies ``expm1`` first (log1p-normalised data back to a
    linear scale). ``exclude``: columns (control probes) left out of the totals.
    Raises :class:`StofmInputError` on negative or non-finite values.
    """
    if values not in VALUE_KINDS:
        raise StofmInputError(f"values={values!r} is not one of {', '.join(VALUE_KINDS)}")
    X = as_csr(X)
    data = X.data.astype(np.float64, copy=True)
    if values == "log_normalized":
        np.expm1(data, out=data)
    if data.size:
        if not np.isfinite(data).all():
            raise StofmInputError(
                "the expression matrix holds NaN or infinite values: fill or drop them before running the model")
        if data.min() < 0:
            raise StofmInputError(
                "the expression matrix holds negative values (scaled or centred data?): pass raw counts or "
                "normalised expression instead (e.g. adata.raw, or a counts layer)")
    M = sp.csr_matrix((data, X.indices.copy(), X.indptr.copy()), shape=X.shape)
    totals = np.asarray(M.sum(axis=1), dtype=np.float64).ravel()
    if exclude is not None and len(exclude):
        totals -= np.asarray(M[:, np.asarray(exclude)].sum(axis=1), dtype=np.float64).ravel()
    scale = np.zeros_like(totals)
    np.divide(target_sum, totals, out=scale, where=totals > 0)
    M.data *= np.repeat(scale, np.diff(M.indptr))
    return M


#: rows hashed at a time by :func:`expression_fingerprint` (a backed matrix is read block by block)
_HASH_ROWS = 65_536


def is_backed(X) -> bool:
    """A matrix still on disk: anndata's backed sparse dataset or an h5py dataset."""
    return hasattr(X, "to_memory") or type(X).__module__.startswith("h5py")


def expression_fingerprint(adata, layer: Optional[str] = None) -> str:
    """A content hash of the expression matrix, gene names and cell names.

    Read in blocks of rows, so that a backed matrix hashes without being loaded and gives
    the hash of the same matrix in memory (sparse: row lengths, column indices and values
    in CSR order; dense: the values)."""
    X = adata.X if layer is None else adata.layers[layer]
    h = hashlib.sha1()
    h.update(str(tuple(int(d) for d in X.shape)).encode())
    h.update("\0".join(map(str, adata.var_names)).encode())
    h.update("\0".join(map(str, adata.obs_names)).encode())
    sparse = sp.issparse(X) or hasattr(X, "to_memory")
    if sp.issparse(X) and not isinstance(X, sp.csr_matrix):
        X = X.tocsr()
    for start in range(0, int(X.shape[0]), _HASH_ROWS):
        block = X[start:start + _HASH_ROWS]
        if sparse:
            block = sp.csr_matrix(block)
            for part in (np.diff(block.indptr).astype(np.int64), block.indices.astype(np.int64), block.data):
                h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(block)).tobytes())
    return h.hexdigest()[:16]
