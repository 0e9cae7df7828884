"""Rank-value tokenizer on hand-made matrices."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stofm.errors import StofmInputError
from napari_stofm.genes.matching import resolve_genes
from napari_stofm.genes.tokenizer import empty_cells, normalize_expression, require_nonempty, tokenize, tokenize_adata
from napari_stofm.genes.vocabulary import GeneVocabulary

# tokens: <pad>=0 <mask>=1 A=2 B=3 C=4 D=5 <cls>=6
VOCAB = GeneVocabulary.from_genes(["A", "B", "C", "D"], [1.0, 2.0, 0.5, 4.0])
CLS = VOCAB.cls_id


def _adata(X, names, values="raw_counts"):
    a = ad.AnnData(X=sp.csr_matrix(np.asarray(X, dtype=np.float32)), var=pd.DataFrame(index=names))
    a.uns["source"] = {"species": "human", "values": values}
    return a


def _ids(tok):
    return [tok.cell(i).tolist() for i in range(tok.n_cells)]


def test_ranking_by_normalised_expression():
    # columns: D, A, X (not in vocabulary, but part of the cell total), C, B
    X = [[4, 1, 5, 1, 0],    # D 4/4=1, A 1/1=1 (tie -> lower token id A first), C 1/0.5=2
         [0, 3, 0, 0, 4],    # A 3, B 4/2=2
         [0, 0, 7, 0, 0]]    # nothing from the vocabulary
    a = _adata(X, ["D", "A", "X", "C", "B"])
    tok, m = tokenize_adata(a, VOCAB)
    assert m.n_matched == 4
    assert _ids(tok) == [[CLS, 4, 2, 5], [CLS, 2, 3], [CLS]]
    assert tok.lengths.tolist() == [4, 3, 1]
    assert empty_cells(tok).tolist() == [False, False, True]


def test_normalisation_uses_the_cell_total_over_all_genes():
    # X is not in the vocabulary but counts in the total; the order is value / total / factor
    X = [[10, 2, 88, 0],    # A 10/100*1e4/1 = 1000, B 2/100*1e4/2 = 100, C 0
         [1, 0, 0, 19]]     # A 1/20*1e4 = 500, D 19/20*1e4/4 = 2375
    tok, _ = tokenize_adata(_adata(X, ["A", "B", "X", "D"]), VOCAB)
    assert _ids(tok) == [[CLS, 2, 3], [CLS, 5, 2]]


def test_truncation_keeps_the_top_genes():
    X = [[1, 2, 3, 4]]      # A 1, B 1, C 6, D 1 -> C, then A, B, D by token id
    tok = tokenize(sp.csr_matrix(np.array(X, float)), resolve_genes(["A", "B", "C", "D"], VOCAB), VOCAB,
                   max_genes=2)
    assert _ids(tok) == [[CLS, 4, 2]]


def test_duplicate_columns_are_summed_and_controls_left_out_of_totals():
    # two versions of the TP53 Ensembl ID (1 + 2) tie with TSPAN6 (3) once summed
    a = _adata([[1, 2, 3, 100]], ["ENSG00000141510", "ENSG00000141510.2", "TSPAN6", "Blank_1"])
    v = GeneVocabulary.from_genes(["TP53", "TSPAN6"], [1.0, 1.0])
    tok, m = tokenize_adata(a, v)
    assert m.control_index.tolist() == [3]
    assert _ids(tok) == [[v.cls_id, 2, 3]]  # tie: lower token id first
    a2 = _adata([[1, 2, 3, 100]], ["ENSG00000141510", "OTHER", "TSPAN6", "Blank_1"])
    tok2, _ = tokenize_adata(a2, v)
    assert _ids(tok2) == [[v.cls_id, 3, 2]]
    # the blank probe is not part of the cell total
    M = normalize_expression(a.X, exclude=m.control_index)
    assert M[:, :3].sum() == pytest.approx(1e4)


def test_log_normalised_input_is_expm1_first():
    counts = np.array([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 5.0]])
    tok_raw, _ = tokenize_adata(_adata(counts, ["A", "B", "C", "D"]), VOCAB)
    tok_log, m = tokenize_adata(_adata(np.log1p(counts), ["A", "B", "C", "D"], "log_normalized"), VOCAB)
    assert m.values == "log_normalized"
    assert _ids(tok_log) == _ids(tok_raw)


def test_all_empty_and_negative_values_raise():
    a = _adata([[0, 0, 5], [0, 0, 1]], ["A", "B", "X"])
    tok, m = tokenize_adata(a, VOCAB)
    assert tok.empty.all()
    with pytest.raises(StofmInputError, match="none of the 2 cells"):
        require_nonempty(tok, m)
    with pytest.raises(StofmInputError, match="negative"):
        tokenize_adata(_adata([[1, -1]], ["A", "B"]), VOCAB)


def test_padded_batches():
    X = [[1, 2, 3, 4], [1, 0, 0, 0], [0, 0, 0, 0]]
    tok, _ = tokenize_adata(_adata(X, ["A", "B", "C", "D"]), VOCAB)
    batches = list(tok.batches(2))
    assert len(batches) == 2
    ids, mask = batches[0]
    assert ids.dtype.is_floating_point is False and ids.shape == (2, 5)
    assert ids[1].tolist() == [CLS, 2, 0, 0, 0] and mask[1].tolist() == [1, 1, 0, 0, 0]
    assert batches[1][0].tolist() == [[CLS]]


def test_large_panel_is_fast():
    import time

    rng = np.random.default_rng(0)
    n, g = 20_000, 500
    X = sp.random(n, g, density=0.2, format="csr", random_state=1, data_rvs=lambda k: rng.integers(1, 20, k))
    genes = [f"G{i}" for i in range(g)]
    v = GeneVocabulary.from_genes(genes, rng.uniform(0.5, 5, g))
    m = resolve_genes(genes, v)
    t = time.perf_counter()
    tok = tokenize(X, m, v)
    assert time.perf_counter() - t < 10  # about 1 s here; catches a non-vectorised regression
    # spot-check one cell against a direct computation
    row = X[123].toarray().ravel()
    val = row / row.sum() * 1e4 / v.norm_factors[m.token_ids]
    nz = np.flatnonzero(val)
    expect = m.token_ids[nz[np.lexsort((m.token_ids[nz], -val[nz]))]]
    assert tok.cell(123)[1:].tolist() == expect.tolist()


def test_interleaved_windows_thin_long_cells_and_keep_short_ones():
    from napari_stofm.genes.tokenizer import TokenizedCells

    ids = np.array([1, 10, 11, 12, 13, 14, 1, 20, 21, 1])
    cells = TokenizedCells(ids, np.array([0, 6, 9, 10]), np.array([False, False, True]), cls_id=1)
    windows, owner = cells.interleaved(2)
    assert owner.tolist() == [0, 0, 0, 1, 2]
    # 5 genes in windows of 2: ranks (0, 3), (1, 4), (2); rank order kept, <cls> first
    assert [windows.cell(i).tolist() for i in range(windows.n_cells)] == [[1, 10, 13], [1, 11, 14], [1, 12],
                                                                          [1, 20, 21], [1]]
    assert windows.empty.tolist() == [False, False, False, False, True]
    same, owner = cells.interleaved(10)
    assert owner.tolist() == [0, 1, 2] and np.array_equal(same.input_ids, ids)
