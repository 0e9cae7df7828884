"""GeneVocabulary: TSV round trip, Geneformer dictionaries, safe unpickling, gene medians."""
from __future__ import annotations

import json
import os
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stofm.errors import CheckpointError, StofmInputError
from napari_stofm.genes.vocabulary import GeneVocabulary, build_vocabulary, restricted_load


def test_special_tokens_and_lookup():
    v = GeneVocabulary.from_genes(["GAD2", "SST", "VIP"], [1.5, 2.0, 0.5], [10, 20, 30])
    assert (v.pad_id, v.mask_id, v.cls_id) == (0, 1, 5)
    assert len(v) == 6 and v.n_genes == 3 and v.genes == ["GAD2", "SST", "VIP"]
    assert v.lookup(["SST", "NOPE", "<cls>", "VIP"]).tolist() == [3, -1, -1, 4]
    assert np.isnan(v.norm_factors[[0, 1, 5]]).all()


def test_tsv_round_trip(tmp_path):
    v = GeneVocabulary.from_genes(["GAD2", "SST", "ENSG00000000001", "NA"], [1 / 3, 2e-7, 1234.5678, 7.0],
                                  [10, 20, 30, 1])
    path = v.save(tmp_path)
    assert path.name == "vocabulary.tsv"
    lines = path.read_text().splitlines()
    assert lines[0] == "token_id\tgene\tnorm_factor\tn_cells_seen"
    w = GeneVocabulary.load(tmp_path)
    assert w == v and w.cls_id == v.cls_id
    assert w.norm_factors[2] == 1 / 3  # exact float round trip
    assert w.token_id("NA") == 5  # a gene called NA is not a missing value


def test_tsv_with_bad_ids_is_refused(tmp_path):
    p = tmp_path / "vocabulary.tsv"
    p.write_text("token_id\tgene\tnorm_factor\tn_cells_seen\n0\t<pad>\t\t0\n2\t<mask>\t\t0\n")
    with pytest.raises(CheckpointError, match="token ids"):
        GeneVocabulary.load(p)
    with pytest.raises(CheckpointError, match="missing"):
        GeneVocabulary.load(tmp_path / "absent.tsv")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "token_dictionary.pkl"
    p.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "x": _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        with open(p, "rb") as fh:
            restricted_load(fh)
    with pytest.raises(CheckpointError, match="refusing"):
        GeneVocabulary.from_geneformer(p, {"x": 1.0})


def test_geneformer_dictionaries_json_and_pickle(tmp_path):
    tokens = {"<pad>": 0, "<mask>": 1, "ENSG00000141510": 2, "ENSG00000000003": 3, "ENSG99999999999": 4}
    # medians pickled as numpy floats, as produced by numpy-based pipelines
    medians = {"ENSG00000141510": np.float64(2.5), "ENSG00000000003": np.float32(0.75)}
    (tmp_path / "tok.json").write_text(json.dumps(tokens))
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "med.pkl").write_bytes(pickle.dumps(medians, protocol=protocol))
        v = GeneVocabulary.from_geneformer(tmp_path / "tok.json", tmp_path / "med.pkl")
        assert v.tokens.tolist() == ["<pad>", "<mask>", "TP53", "TSPAN6", "ENSG99999999999", "<cls>"]
        assert v.cls_id == 5 and v.token_id("TP53") == 2
        assert v.norm_factors[2] == 2.5 and v.norm_factors[3] == pytest.approx(0.75)
        assert v.token_id("ENSG99999999999") == -1  # no median: never matched


def _corpus():
    # 4 cells x 3 genes (+ a blank probe that must not count in the totals)
    X = np.array([[1, 3, 0, 5],
                  [2, 0, 0, 0],
                  [0, 1, 4, 0],
                  [1, 1, 1, 0]], dtype=np.float32)
    var = pd.DataFrame(index=["Gad2", "Sst", "Vip", "Blank_1"])
    a = ad.AnnData(X=sp.csr_matrix(X), var=var)
    a.uns["source"] = {"species": "Mus musculus", "values": "raw_counts"}
    return a, X[:, :3].astype(float)


def test_build_vocabulary_gene_medians():
    a, X = _corpus()
    v = build_vocabulary([a], min_cells=1)
    assert v.genes == ["GAD2", "SST", "VIP"]
    norm = X / X.sum(1, keepdims=True) * 1e4
    for j, g in enumerate(v.genes):
        col = norm[:, j]
        assert v.norm_factors[v.token_id(g)] == pytest.approx(np.median(col[col > 0]))
        assert v.n_cells_seen[v.token_id(g)] == int((col > 0).sum())
    assert build_vocabulary([a], min_cells=3).genes == ["GAD2", "SST"]
    with pytest.raises(StofmInputError, match="min_cells"):
        build_vocabulary([a], min_cells=100)


def test_build_vocabulary_undoes_log1p():
    a, _ = _corpus()
    b = a.copy()
    b.X = sp.csr_matrix(np.log1p(a.X.toarray()))
    b.uns["source"] = {"species": "Mus musculus", "values": "log_normalized"}
    va, vb = build_vocabulary([a], min_cells=1), build_vocabulary([b], min_cells=1)
    assert np.allclose(va.norm_factors[2:-1], vb.norm_factors[2:-1], rtol=1e-5)
    both = build_vocabulary([a, b], min_cells=1)
    assert both.n_cells_seen[both.token_id("GAD2")] == 2 * va.n_cells_seen[va.token_id("GAD2")]
