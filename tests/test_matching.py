"""Matching a slice's genes to a vocabulary: symbols, var columns, Ensembl ids, species, no overlap."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from builders import gene_adata

from napari_stofm.errors import StofmInputError
from napari_stofm.genes.matching import resolve_genes
from napari_stofm.genes.vocabulary import GeneVocabulary, build_vocabulary


def _vocab(genes):
    return GeneVocabulary.from_genes(genes, np.arange(1, len(genes) + 1, dtype=float))


def test_resolve_mouse_panel_against_human_vocabulary():
    vocab = _vocab(["GAD2", "SST", "VIP", "PVALB"])
    a = gene_adata(["Vip", "Gad2", "Blank_1", "Xyz9"], var={"blank_probe": [False, False, True, False]},
               species="Mus musculus")
    m = resolve_genes(a, vocab)
    assert m.species == "mouse" and m.id_kind == "symbol" and m.source == "var_names"
    assert m.var_index.tolist() == [0, 1]
    assert [vocab.tokens[t] for t in m.token_ids] == ["VIP", "GAD2"]
    assert np.allclose(m.norm_factors, vocab.norm_factors[m.token_ids])
    assert (m.n_matched, m.n_total) == (2, 4)
    assert m.control_index.tolist() == [2]


def test_resolve_finds_symbols_in_a_var_column():
    vocab = _vocab(["GAD2", "SST", "VIP"])
    a = gene_adata(["id1", "id2", "id3"], var={"feature_name": ["Sst", "Vip", "Foo"], "other": ["a", "b", "c"]})
    m = resolve_genes(a, vocab)
    assert m.source == "feature_name" and m.n_matched == 2
    with pytest.raises(StofmInputError, match="not a var column"):
        resolve_genes(a, vocab, gene_key="nope")
    assert resolve_genes(a, vocab, gene_key="feature_name").n_matched == 2


def test_resolve_ensembl_ids_against_symbol_vocabulary():
    vocab = _vocab(["TP53", "TSPAN6"])
    m = resolve_genes(["ENSG00000141510.16", "ENSG00000000003", "ENSG99999999999"], vocab)
    assert m.id_kind == "ensembl" and m.n_matched == 2
    assert list(m.gene_ids) == ["TP53", "TSPAN6"]


def test_no_overlap_error_names_problem_and_fix():
    vocab = _vocab(["GAD2", "SST"])
    names = [f"gene{i}" for i in range(300)]
    with pytest.raises(StofmInputError) as err:
        resolve_genes(gene_adata(names), vocab)
    msg = str(err.value)
    assert "none of the 300 genes in var_names" in msg
    assert "'gene0'" in msg and "vocabulary of 2 genes" in msg
    assert "gene_key=" in msg and "checkpoint" in msg


@pytest.mark.realdata
def test_real_slices_resolve_against_vocabulary_from_another_slice(shared_data_dir):
    her2 = ad.read_h5ad(shared_data_dir / "st_human_her2st" / "A1.h5ad")  # human symbols
    vocab = build_vocabulary([her2], min_cells=3)
    assert vocab.n_genes > 5000

    dlpfc = ad.read_h5ad(shared_data_dir / "visium_human_dlpfc" / "151673.h5ad", backed="r")
    m = resolve_genes(dlpfc, vocab)  # Ensembl IDs only: mapped through the bundled table
    assert m.species == "human" and m.id_kind == "ensembl"
    assert m.n_matched > 0.4 * m.n_total, m.summary()
    assert all(not g.startswith("ENSG") for g in m.gene_ids)

    merfish = ad.read_h5ad(shared_data_dir / "merfish_mouse_hypothalamus" / "animal1_bregma0.26.h5ad", backed="r")
    m = resolve_genes(merfish, vocab)  # mouse symbols, upper-cased
    assert m.species == "mouse" and m.id_kind == "symbol"
    assert m.n_matched > 30, m.summary()
    blanks = np.flatnonzero(merfish.var["blank_probe"].to_numpy(dtype=bool))
    assert set(blanks) <= set(m.control_index) and not set(blanks) & set(m.var_index)
