"""Rank-value tokenization of an expression matrix (Geneformer's encoding).

For each cell: the expression of every matched gene divided by the cell's total (over all
of the cell's genes, control probes excluded; Geneformer's ``n_counts``) times 10,000,
divided by the gene's normalisation factor; the non-zero genes sorted by that value,
largest first (ties: lower token id first), truncated to ``max_genes`` and prefixed by
``<cls>``. Log-normalised input is ``expm1``-ed first. Works on CSR rows in chunks; the
matrix is never densified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from napari_stofm.errors import StofmInputError
from napari_stofm.genes.expression import (  # noqa: F401 - re-exported
    TARGET_SUM,
    VALUE_KINDS,
    as_csr,
    check_values_kind,
    infer_values_kind,
    normalize_expression,
)
from napari_stofm.genes.matching import GeneMatch, resolve_genes

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_stofm.genes.vocabulary import GeneVocabulary

DEFAULT_MAX_GENES = 2047
_CHUNK_ROWS = 16_384  # also keeps row numbers within uint16 for the sort




@dataclass
class TokenizedCells:
    """Token sequences of many cells, stored flat like a CSR matrix.

    Cell ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``: ``<cls>`` then its genes by
    rank. ``empty[i]`` is ``True`` when no vocabulary gene is expressed in cell ``i`` (its
    sequence is ``<cls>`` alone; the encoder gives it a zero embedding).
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    empty: np.ndarray
    cls_id: int
    pad_id: int = 0
    max_genes: int = DEFAULT_MAX_GENES

    @property
    def n_cells(self) -> int:
        return int(self.offsets.size - 1)

    def __len__(self) -> int:
        return self.n_cells

    @property
    def lengths(self) -> np.ndarray:
        """Sequence length of each cell, ``<cls>`` included."""
        return np.diff(self.offsets)

    def cell(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i]:self.offsets[i + 1]]

    def padded(self, indices: Sequence[int]) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """``(input_ids, attention_mask)`` int64 tensors of shape (len(indices), longest)."""
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        lens = self.lengths[idx]
        width = int(lens.max()) if idx.size else 0
        cols = np.arange(width, dtype=np.int64)
        mask = cols[None, :] < lens[:, None]
        ids = np.full((idx.size, width), self.pad_id, dtype=np.int64)
        ids[mask] = self.input_ids[(self.offsets[idx][:, None] + cols[None, :])[mask]]
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

    def interleaved(self, width: int) -> Tuple["TokenizedCells", np.ndarray]:
        """Each cell split into rank-interleaved windows of at most ``width`` genes.

        A cell with ``g`` genes gets ``w = ceil(g / width)`` windows; window ``j`` holds the
        genes of rank ``j, j + w, j + 2w, ...`` (``<cls>`` first, rank order kept), so every
        window is a thinned copy of the cell's whole profile, the view of a cell the encoder
        learns from when genes are dropped, and a cell with at most ``width`` genes is one
        window, unchanged. Returns the windows and the cell each one belongs to.
        """
        from napari_stofm.checks import integer

        width = integer(width, "width", minimum=1)
        genes = np.maximum(self.lengths - 1, 0)
        n_win = np.maximum(1, -(-genes // width))
        first = np.zeros(self.n_cells + 1, dtype=np.int64)
        np.cumsum(n_win, out=first[1:])
        owner = np.repeat(np.arange(self.n_cells, dtype=np.int64), n_win)
        # every gene token: its cell, its rank, its window
        cell_of = np.repeat(np.arange(self.n_cells, dtype=np.int64), genes)
        rank = np.arange(cell_of.size, dtype=np.int64) - np.repeat(np.cumsum(genes) - genes, genes)
        src = self.offsets[cell_of] + 1 + rank
        window = first[cell_of] + rank % n_win[cell_of]
        order = np.argsort(window, kind="stable")  # rank order kept within a window
        per_window = np.bincount(window, minlength=owner.size)
        lengths = per_window + 1
        offsets = np.zeros(owner.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int64)
        ids[offsets[:-1]] = self.cls_id
        win_sorted = window[order]
        pos = np.arange(order.size, dtype=np.int64) - np.repeat(np.cumsum(per_window) - per_window, per_window)
        ids[offsets[win_sorted] + 1 + pos] = self.input_ids[src[order]]
        out = TokenizedCells(input_ids=ids, offsets=offsets, empty=lengths <= 1, cls_id=self.cls_id,
                             pad_id=self.pad_id, max_genes=int(min(width, self.max_genes)))
        return out, owner

    def batches(self, batch_size: int, indices: Optional[Sequence[int]] = None
                ) -> Iterator[Tuple["torch.Tensor", "torch.Tensor"]]:
        """Padded ``(input_ids, attention_mask)`` batches over ``indices`` (default: all cells, in order)."""
        from napari_stofm.checks import integer

        batch_size = integer(batch_size, "batch_size", minimum=1)
        idx = np.arange(self.n_cells) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, idx.size, batch_size):
            yield self.padded(idx[start:start + batch_size])


def empty_cells(tokenized: TokenizedCells) -> np.ndarray:
    """Bool mask of the cells that express no vocabulary gene (callers should warn about them)."""
    return np.asarray(tokenized.empty, dtype=bool).copy()


def require_nonempty(tokenized, gene_match: Optional[GeneMatch] = None) -> None:
    """Raise :class:`StofmInputError` when every cell is empty (nothing to embed).

    ``tokenized``: :class:`TokenizedCells`, or the boolean ``empty`` mask of every cell."""
    empty = np.asarray(tokenized.empty if isinstance(tokenized, TokenizedCells) else tokenized, dtype=bool)
    if empty.size == 0:
        raise StofmInputError("the slice has no cells: load a slice with at least one cell")
    if bool(np.all(empty)):
        genes = f"the {gene_match.n_matched} matched genes" if gene_match is not None else "the matched genes"
        raise StofmInputError(
            f"none of the {empty.size} cells expresses any of {genes}: check that X holds "
            f"expression values (not all zeros) and that the panel overlaps the model's gene vocabulary")


def tokenize(X_csr, gene_match: GeneMatch, vocabulary: "GeneVocabulary", max_genes: int = DEFAULT_MAX_GENES,
             values: Optional[str] = None) -> TokenizedCells:
    """Rank-value tokens of every cell (row) of ``X_csr``; see the module docstring.

    ``gene_match`` comes from :func:`resolve_genes` on the same slice and vocabulary.
    ``values`` overrides ``gene_match.values`` ('raw_counts', 'volume_normalized',
    'log_normalized'). Columns sharing a token are summed.
    """
    from napari_stofm.checks import integer

    max_genes = integer(max_genes, "max_genes", minimum=1, fix="the number of genes kept per cell")
    X = as_csr(X_csr)
    n_cells, n_var = X.shape
    if n_var != gene_match.n_total:
        raise StofmInputError(
            f"the expression matrix has {n_var} genes but the gene match was made for {gene_match.n_total}: "
            f"call resolve_genes on the same slice")
    tok = np.asarray(gene_match.token_ids, dtype=np.int64)
    if tok.size and (tok.min() < 0 or tok.max() >= len(vocabulary)):
        raise StofmInputError("the gene match was made with another vocabulary: call resolve_genes again")
    var_index = np.asarray(gene_match.var_index, dtype=np.int64)
    # columns ordered by token id, so that sorted CSR indices give the tie-break order
    uniq, inv = np.unique(tok, return_inverse=True)
    merge = None
    if uniq.size < tok.size:
        merge = sp.csr_matrix((np.ones(tok.size), (np.arange(tok.size), inv)), shape=(tok.size, uniq.size))
        col_tokens = uniq
    else:
        perm = np.argsort(tok, kind="stable")
        var_index, col_tokens = var_index[perm], tok[perm]
    inv_norm = 1.0 / np.asarray(vocabulary.norm_factors, dtype=np.float64)[col_tokens]
    if not np.all(np.isfinite(inv_norm)) or np.any(inv_norm <= 0):
        raise StofmInputError("the gene match holds genes without a normalisation factor: call resolve_genes again")
    values = check_values_kind(values or gene_match.values)

    id_parts, len_parts = [], []
    for start in range(0, n_cells, _CHUNK_ROWS):
        M = normalize_expression(X[start:start + _CHUNK_ROWS], values, gene_match.control_index)
        M = M[:, var_index]
        if merge is not None:
            M = M @ merge
        M = sp.csr_matrix(M)
        M.sort_indices()
        M.data *= inv_norm[M.indices]
        M.data[~(M.data > 0)] = 0.0
        M.eliminate_zeros()
        ids, lens = _rank_rows(M, col_tokens, max_genes, vocabulary.cls_id)
        id_parts.append(ids)
        len_parts.append(lens)
    lengths = np.concatenate(len_parts) if len_parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    input_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
    return TokenizedCells(input_ids=input_ids, offsets=offsets, empty=lengths <= 1,
                          cls_id=int(vocabulary.cls_id), pad_id=int(vocabulary.pad_id), max_genes=int(max_genes))


def _rank_rows(M: sp.csr_matrix, col_tokens: np.ndarray, max_genes: int, cls_id: int):
    n = M.shape[0]
    counts = np.diff(M.indptr).astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    toks = col_tokens[M.indices]  # ascending within each row (sorted indices)
    # by row, then value descending, then token id: two stable sorts (rows fit uint16 per chunk)
    order = np.argsort(-M.data, kind="stable")
    order = order[np.argsort(rows.astype(np.uint16 if n <= 65536 else np.int64)[order], kind="stable")]
    toks = toks[order]
    pos = np.arange(toks.size, dtype=np.int64) - M.indptr[rows]
    keep = pos < max_genes
    lengths = np.minimum(counts, max_genes) + 1
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int64)
    ids[offsets[:-1]] = cls_id
    ids[offsets[rows[keep]] + 1 + pos[keep]] = toks[keep]
    return ids, lengths


def tokenize_adata(adata, vocabulary: "GeneVocabulary", gene_key: Optional[str] = None,
                   species: Optional[str] = None, max_genes: int = DEFAULT_MAX_GENES, layer: Optional[str] = None,
                   values: Optional[str] = None) -> Tuple[TokenizedCells, GeneMatch]:
    """:func:`resolve_genes` then :func:`tokenize` on ``adata.X`` (or ``adata.layers[layer]``).

    ``values`` says what the matrix holds (one of ``VALUE_KINDS``); by default it is read
    from ``uns`` or from the matrix itself (:func:`~napari_stofm.genes.expression.infer_values_kind`);
    ``match.values`` / ``match.values_basis`` record what was used and why.
    """
    X, match = prepare_tokenization(adata, vocabulary, gene_key=gene_key, species=species, layer=layer, values=values)
    return tokenize(X, match, vocabulary, max_genes=max_genes), match


def prepare_tokenization(adata, vocabulary: "GeneVocabulary", gene_key: Optional[str] = None,
                         species: Optional[str] = None, layer: Optional[str] = None,
                         values: Optional[str] = None) -> Tuple[object, GeneMatch]:
    """The matrix to tokenize (``adata.X`` or ``adata.layers[layer]``, a backed one left on
    disk) and its :class:`GeneMatch`: what :func:`tokenize` needs, for all cells at once or
    for row blocks ``X[start:stop]`` one after another (the rows' tokens are the same)."""
    if values is not None:
        check_values_kind(values)
    match = resolve_genes(adata, vocabulary, gene_key=gene_key, species=species)
    if layer is not None and layer not in adata.layers:
        raise StofmInputError(f"layer {layer!r} is not in adata.layers ({', '.join(adata.layers) or 'none'})")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise StofmInputError("adata.X is empty: load the expression matrix, or pass layer=")
    if values is not None or layer is not None:  # decided on the matrix that is tokenized
        match.values, match.values_basis = infer_values_kind(adata, X, values)
    return X, match
