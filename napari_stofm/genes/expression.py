"""Expression matrices as the gene scale reads them: CSR, per-cell normalised."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

from napari_stofm.errors import StofmInputError

TARGET_SUM = 10_000.0

#: values kinds understood in ``adata.uns['source']['values']``
VALUE_KINDS = ("raw_counts", "volume_normalized", "log_normalized")


def expression_values_kind(adata) -> str:
    """What ``X`` holds: ``uns['source']['values']`` if given, ``'log_normalized'`` when scanpy's
    ``uns['log1p']`` is present, else ``'raw_counts'`` (any linear scale works the same)."""
    uns = getattr(adata, "uns", None) or {}
    source = uns.get("source")
    if isinstance(source, dict) and source.get("values") is not None:
        kind = str(source["values"])
        if kind not in VALUE_KINDS:
            raise StofmInputError(
                f"uns['source']['values'] is {kind!r}; expected one of {', '.join(VALUE_KINDS)} "
                f"(set it to say whether X holds counts, volume-normalised or log-normalised values)"
            )
        return kind
    if "log1p" in uns:
        return "log_normalized"
    return "raw_counts"


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
