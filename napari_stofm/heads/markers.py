"""Marker genes of a labelling's classes: what makes each region / cell type itself.

:func:`markers` ranks the genes of every class against all other labelled cells with
scanpy's Wilcoxon test (``sc.tl.rank_genes_groups(method='wilcoxon', pts=True)``) on
log-normalised expression, and returns one row per (class, gene)::

    class, gene, score, logfoldchange, pval_adj, pct_in, pct_out

The work is done on a small copy (labelled cells only); counts are normalised
(``normalize_total`` + ``log1p``) first, while log-normalised slices (``uns['log1p']``, or
what :func:`~napari_stofm.genes.expression.infer_values_kind` detects) are used as they
are. Classes with fewer than :data:`MIN_CELLS` cells are skipped (a note in
``table.attrs['notes']``); unlabelled cells are left out.

A result is identified by a hash of the labelling (codes + class names) and the expression
fingerprint. It is reused from ``cache`` (a dict the caller keeps) or from
``adata.uns['stofm_markers'][key]`` when the hash matches; ``store=True`` writes it there
in an h5ad-safe form (a dict of column arrays, see :func:`to_uns`). Nothing else of
``adata`` is changed.
"""
from __future__ import annotations

import hashlib
import logging
from typing import MutableMapping, Optional

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError

log = logging.getLogger(__name__)

COLUMNS = ("class", "gene", "score", "logfoldchange", "pval_adj", "pct_in", "pct_out")
_FLOAT_COLUMNS = COLUMNS[2:]
#: classes with fewer cells than this are skipped
MIN_CELLS = 2
_GROUP = "_stofm_class"


# ----------------------------------------------------------------------------- labels + hash


def _labels(adata, key: str, annotation=None):
    """``(codes int64, categories list)`` of the labelling (-1 = unlabelled)."""
    import pandas as pd

    if annotation is not None:
        codes = np.asarray(annotation.codes, dtype=np.int64)
        categories = [str(c) for c in annotation.categories]
    else:
        if key not in adata.obs:
            raise StofmInputError(f"adata.obs has no column '{key}' (its columns: {list(adata.obs.columns)}).")
        column = adata.obs[key]
        cat = column.array if isinstance(column.dtype, pd.CategoricalDtype) else pd.Categorical(column)
        codes = np.asarray(cat.codes, dtype=np.int64)
        categories = [str(c) for c in cat.categories]
    if codes.shape != (adata.n_obs,):
        raise StofmInputError(f"labelling '{key}' has {codes.size} cells but the slice has {adata.n_obs}.")
    return codes, categories


def labelling_hash(adata, codes: np.ndarray, categories, layer: Optional[str] = None) -> str:
    """Identifies a marker result: the label codes, class names and the expression fingerprint."""
    from napari_stofm.genes.expression import expression_fingerprint

    h = hashlib.sha1()
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update("\0".join(categories).encode())
    h.update(f"{layer}:{expression_fingerprint(adata, layer)}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- h5ad-safe form


def empty_table():
    import pandas as pd

    table = pd.DataFrame({c: pd.Series(dtype=object if c in ("class", "gene") else np.float64) for c in COLUMNS})
    table.attrs["notes"] = []
    return table


def to_uns(table, digest: str = "", n_genes: int = 0) -> dict:
    """An h5ad / zarr-safe dict: ``hash``, ``n_genes``, ``notes`` (one string) and ``table``
    (column name -> array)."""
    columns = {}
    for c in COLUMNS:
        values = table[c].to_numpy() if c in table else np.array([])
        if c in ("class", "gene"):
            columns[c] = np.asarray([str(v) for v in values], dtype=str)
        else:
            columns[c] = np.asarray(values, dtype=np.float64)
    return {"hash": str(digest), "n_genes": int(n_genes), "notes": "\n".join(table.attrs.get("notes", [])),
            "table": columns}


def from_uns(entry):
    """The DataFrame stored by :func:`to_uns` (None when ``entry`` is not such a record)."""
    import pandas as pd

    if not isinstance(entry, dict) or not isinstance(entry.get("table"), dict):
        return None
    cols = entry["table"]
    if any(c not in cols for c in COLUMNS):
        return None
    data = {}
    for c in COLUMNS:
        values = np.asarray(cols[c])
        data[c] = values.astype(object) if c in ("class", "gene") else values.astype(np.float64)
    table = pd.DataFrame(data)
    for c in ("class", "gene"):
        table[c] = table[c].map(str)
    notes = str(entry.get("notes", "") or "")
    table.attrs["notes"] = [n for n in notes.split("\n") if n]
    table.attrs["hash"] = str(entry.get("hash", ""))
    return table


def stored_markers(adata, key: str):
    """The marker table stored in ``adata.uns['stofm_markers'][key]`` (None when there is none)."""
    entry = (adata.uns.get(keys.MARKERS) or {}).get(key)
    return from_uns(entry)


def _trim(table, n_genes: int):
    out = table.groupby("class", sort=False, group_keys=False).head(n_genes).reset_index(drop=True)
    out.attrs = dict(table.attrs)
    return out


# ----------------------------------------------------------------------------- compute


def _matrix(adata, layer: Optional[str] = None):
    """``(X as float64 CSR, whether it is log-normalised already)``."""
    from napari_stofm.genes.expression import as_csr, infer_values_kind

    if layer is not None and layer not in adata.layers:
        raise StofmInputError(f"adata.layers has no '{layer}' (its layers: {list(adata.layers)}).")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise StofmInputError("the slice has no expression matrix (X is empty).")
    kind, _ = infer_values_kind(adata, X) if layer is None else infer_values_kind(None, X)
    if layer is None and "log1p" in adata.uns:
        kind = "log_normalized"
    return as_csr(X).astype(np.float64), kind == "log_normalized"


def log_normalized(adata, layer: Optional[str] = None):
    """``(X, already)``: the expression as log-normalised CSR (``normalize_total`` to the median
    total, then ``log1p``, as scanpy does), and whether it already was."""
    import scipy.sparse as sp

    M, already = _matrix(adata, layer)
    if already:
        return M, True
    totals = np.asarray(M.sum(axis=1)).ravel()
    scale = np.zeros_like(totals)
    np.divide(np.median(totals[totals > 0]) if (totals > 0).any() else 1.0, totals, out=scale, where=totals > 0)
    M = sp.csr_matrix(M.multiply(scale[:, None]))
    np.log1p(M.data, out=M.data)
    return M, False


def _compute(adata, codes, categories, n_genes: int, layer: Optional[str]):
    import anndata as ad
    import pandas as pd

    notes = []
    counts = np.bincount(codes[codes >= 0], minlength=len(categories))
    kept = [c for c in range(len(categories)) if counts[c] >= MIN_CELLS]
    for c in range(len(categories)):
        if counts[c] < MIN_CELLS:
            notes.append(f"'{categories[c]}' skipped: {counts[c]} cell{'s' if counts[c] != 1 else ''} "
                         f"(needs at least {MIN_CELLS})")
    table = empty_table()
    if len(kept) < 2:
        notes.append("no marker genes: fewer than two classes with enough cells to compare")
        table.attrs["notes"] = notes
        return table
    cells = np.flatnonzero(np.isin(codes, kept))
    X, already = _matrix(adata, layer)
    names = [categories[c] for c in kept]
    group = pd.Categorical.from_codes(np.searchsorted(kept, codes[cells]), categories=[str(i) for i in kept])
    small = ad.AnnData(X=X[cells], obs=pd.DataFrame({_GROUP: group}, index=np.asarray(adata.obs_names[cells])),
                       var=pd.DataFrame(index=np.asarray(adata.var_names, dtype=str)))
    import scanpy as sc

    if not already:  # counts (or a linear scale): normalise the copy first
        sc.pp.normalize_total(small)
        sc.pp.log1p(small)
    else:
        small.uns["log1p"] = {"base": None}

    sc.tl.rank_genes_groups(small, _GROUP, method="wilcoxon", pts=True, n_genes=min(n_genes, small.n_vars),
                            use_raw=False)
    result = sc.get.rank_genes_groups_df(small, group=None)
    if "group" not in result:  # a single group comes back without its column
        result.insert(0, "group", str(kept[0]))
    label = {str(c): categories[c] for c in kept}
    table = pd.DataFrame({
        "class": result["group"].astype(str).map(label).astype(object).to_numpy(),
        "gene": result["names"].astype(str).to_numpy(dtype=object),
        "score": result["scores"].to_numpy(np.float64),
        "logfoldchange": result["logfoldchanges"].to_numpy(np.float64),
        "pval_adj": result["pvals_adj"].to_numpy(np.float64),
        "pct_in": result["pct_nz_group"].to_numpy(np.float64),
        "pct_out": result["pct_nz_reference"].to_numpy(np.float64),
    })
    order = {n: i for i, n in enumerate(names)}
    table = table.iloc[np.argsort(table["class"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
    table.attrs["notes"] = notes
    return table


def markers(adata, key: str, n_genes: int = 10, *, annotation=None, layer: Optional[str] = None,
            store: bool = False, cache: Optional[MutableMapping] = None):
    """The top ``n_genes`` marker genes of every class of labelling ``key``.

    Returns a DataFrame with one row per (class, gene) in class order, best gene first:
    ``class``, ``gene``, ``score`` (Wilcoxon z), ``logfoldchange`` (log2), ``pval_adj``
    (Benjamini-Hochberg), ``pct_in`` / ``pct_out`` (fraction of the class's / the other
    labelled cells expressing the gene). ``table.attrs``: ``notes`` (skipped classes),
    ``hash`` (the labelling + expression it was computed for), ``cached`` (reused?).

    ``annotation``: an :class:`~napari_stofm.heads.annotation.Annotation` to take the labels
    from instead of ``adata.obs[key]``. ``cache``: a dict the caller keeps between calls.
    ``store=True``: also write the result to ``adata.uns['stofm_markers'][key]``.
    """
    n_genes = int(n_genes)
    if n_genes < 1:
        raise StofmInputError(f"n_genes must be at least 1, got {n_genes}.")
    codes, categories = _labels(adata, key, annotation)
    digest = labelling_hash(adata, codes, categories, layer)
    table, computed_n = _cached(adata, key, digest, n_genes, cache)
    cached = table is not None
    if table is None:
        table = _compute(adata, codes, categories, n_genes, layer)
        table.attrs["hash"] = digest
        computed_n = n_genes
    if cache is not None:
        cache[key] = (digest, computed_n, table)
    if store:
        records = dict(adata.uns.get(keys.MARKERS) or {})
        records[key] = to_uns(table, digest, computed_n)
        adata.uns[keys.MARKERS] = records
    out = _trim(table, n_genes)
    out.attrs["hash"] = digest
    out.attrs["cached"] = cached
    return out


def _cached(adata, key: str, digest: str, n_genes: int, cache):
    """``(table, n_genes it holds)`` of a cached result for ``digest`` (``(None, 0)`` if none)."""
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit[0] == digest and hit[1] >= n_genes:
        return hit[2], int(hit[1])
    entry = (adata.uns.get(keys.MARKERS) or {}).get(key)
    if isinstance(entry, dict) and str(entry.get("hash", "")) == digest and int(entry.get("n_genes", 0)) >= n_genes:
        table = from_uns(entry)
        if table is not None:
            return table, int(entry["n_genes"])
    return None, 0


# ----------------------------------------------------------------------------- display helpers


def top_genes(table, class_name: str, n: int = 5) -> list:
    """The best ``n`` genes of one class of a marker table."""
    return [str(g) for g in table.loc[table["class"] == str(class_name), "gene"].head(n)]


def format_markers(table, n: int = 10) -> str:
    """A compact text table: one line per class with its top ``n`` genes."""
    lines = []
    classes = list(dict.fromkeys(table["class"]))
    width = max((len(str(c)) for c in classes), default=5)
    lines.append(f"{'class':<{width}}  top genes (Wilcoxon, best first)")
    for c in classes:
        lines.append(f"{str(c):<{width}}  {', '.join(top_genes(table, c, n))}")
    lines.extend(f"note: {n_}" for n_ in table.attrs.get("notes", []))
    return "\n".join(lines)


def gene_expression(adata, gene: str, layer: Optional[str] = None) -> np.ndarray:
    """Log-normalised expression of one gene in every cell (float64, length n_obs)."""
    names = np.asarray(adata.var_names, dtype=str)
    hits = np.flatnonzero(names == str(gene))
    if hits.size == 0:
        raise StofmInputError(f"the slice has no gene '{gene}'.")
    X, _ = log_normalized(adata, layer)
    return np.asarray(X[:, int(hits[0])].toarray()).ravel()
