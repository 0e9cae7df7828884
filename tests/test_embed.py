"""End-to-end ``embed`` on a tiny checkpoint in the published layout, and bad input."""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pytest
import torch

from napari_stofm.cli.app import main as cli_main
from napari_stofm.errors import Cancelled, CheckpointError, StofmInputError
from napari_stofm.genes.identifiers import ensembl_to_symbol_table
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.model.cell_encoder import BertConfig, CellEncoder
from napari_stofm.model.config import SToFMConfig
from napari_stofm.model.se2_transformer import SE2Transformer
from napari_stofm.model.stofm import SToFM, load_model
from napari_stofm.pipeline.embed import embed


@pytest.fixture(scope="module")
def sample():
    return make_sample_slice(n_cells=600, seed=1)


@pytest.fixture(scope="module")
def published_checkpoint(tmp_path_factory, sample):
    """A random-weight checkpoint written exactly as the published code lays it out:
    torch.save state dicts, Hugging Face BERT folder, Geneformer dictionaries keyed by
    human Ensembl IDs."""
    root = tmp_path_factory.mktemp("published")
    symbol_to_ensembl = {}
    for ens, sym in ensembl_to_symbol_table().items():
        symbol_to_ensembl.setdefault(sym.upper(), ens)
    genes = [g for g in sample.var_names if g.upper() in symbol_to_ensembl]
    assert len(genes) > 100
    tokens = {"<pad>": 0, "<mask>": 1}
    for g in genes:
        tokens[symbol_to_ensembl[g.upper()]] = len(tokens)
    tokens["<cls>"] = len(tokens)
    rng = np.random.default_rng(0)
    medians = {symbol_to_ensembl[g.upper()]: float(rng.uniform(0.5, 3)) for g in genes}
    (root / "token_dictionary.json").write_text(json.dumps(tokens))
    (root / "gene_median_dictionary.json").write_text(json.dumps(medians))

    torch.manual_seed(0)
    bert_dir = root / "cell_encoder" / "cell_bert"
    bert_dir.mkdir(parents=True)
    bert_cfg = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=2048)
    encoder = CellEncoder(bert_cfg)
    bert_cfg.to_json(bert_dir / "config.json")
    torch.save(encoder.bert.state_dict(), bert_dir / "pytorch_model.bin")
    torch.save(encoder.cell_proj.state_dict(), root / "cell_encoder" / "cell_proj.bin")

    cfg = SToFMConfig(num_hidden_layers=2, input_dim=256, embedding_dim=32, ffn_embedding_dim=64,
                      num_attention_heads=4, gaussian_hidden_dim=8)
    cfg.to_json(root / "config.json")
    se2 = SE2Transformer(cfg).init_weights(seed=0)
    torch.save({f"model.{k}": v for k, v in se2.state_dict().items()}, root / "se2transformer.pth")
    return root


@pytest.fixture(scope="module")
def model(published_checkpoint):
    return load_model(published_checkpoint)


def test_published_layout_loads_with_published_settings(model):
    assert isinstance(model, SToFM)
    assert model.settings.split_mode == "published"
    assert model.settings.split_num == 1000
    assert model.vocabulary.n_genes > 100


def test_cli_embeds_end_to_end(published_checkpoint, sample, tmp_path):
    src, out = tmp_path / "slice.h5ad", tmp_path / "embedded.h5ad"
    sample.write_h5ad(src)
    argv = ["embed", str(src), "-o", str(out), "--checkpoint", str(published_checkpoint), "--split-num", "200", "-q"]
    assert cli_main(argv) == 0
    result = ad.read_h5ad(out)
    final, cell = result.obsm["X_stofm"], result.obsm["X_stofm_cell"]
    assert final.shape == (sample.n_obs, 32) and cell.shape == (sample.n_obs, 256)
    assert np.isfinite(final).all()
    np.testing.assert_allclose(np.linalg.norm(cell, axis=1), 1.0, atol=1e-5)
    assert result.uns["stofm"]["n_subslices"] >= 3
    assert (result.obs["stofm_virtual_cell"] >= 0).all()
    # a second export over the first is refused and leaves it intact
    before = out.read_bytes()
    assert cli_main(argv) == 1
    assert out.read_bytes() == before


def test_embedding_is_deterministic_and_cached(model, sample, monkeypatch):
    a, b = sample.copy(), sample.copy()
    embed(a, model, split_num=200)
    embed(b, model, split_num=200)
    np.testing.assert_array_equal(a.obsm["X_stofm"], b.obsm["X_stofm"])

    def boom(*args, **kwargs):
        raise AssertionError("the gene scale was recomputed")

    monkeypatch.setattr(model.cell_encoder, "encode", boom)
    embed(a, model, split_num=200)  # same data and weights: cache hit
    np.testing.assert_array_equal(a.obsm["X_stofm"], b.obsm["X_stofm"])
    a.X = a.X.copy() * 2  # changed data: the cache must not be used
    with pytest.raises(AssertionError, match="recomputed"):
        embed(a, model, split_num=200)


def test_cancel_leaves_slice_untouched(model, sample):
    import threading

    a = sample.copy()
    event = threading.Event()
    seen = []

    def progress(done, total, message):
        seen.append(message)
        if message.startswith("SE(2)"):
            event.set()

    with pytest.raises(Cancelled):
        embed(a, model, split_num=100, batch_size=1, progress=progress, cancel=event)
    assert "X_stofm" not in a.obsm
    assert any(m.startswith("SE(2)") for m in seen)


def test_missing_and_nonfinite_coordinates(model, sample):
    a = sample.copy()
    del a.obsm["spatial"]
    with pytest.raises(StofmInputError, match="spatial"):
        embed(a, model)
    b = sample.copy()
    b.obsm["spatial"] = b.obsm["spatial"].copy()
    b.obsm["spatial"][[3, 7]] = np.nan
    with pytest.raises(StofmInputError, match="non-finite|NaN|finite"):
        embed(b, model)


def test_empty_cells_are_flagged_not_nan(model, sample, caplog):
    a = sample.copy()
    X = a.X.toarray() if hasattr(a.X, "toarray") else np.array(a.X)
    X[[0, 5]] = 0
    a.X = X
    with caplog.at_level(logging.WARNING):
        embed(a, model, split_num=200)
    assert a.obs["stofm_empty"].iloc[[0, 5]].all() and a.obs["stofm_empty"].sum() == 2
    assert np.isfinite(a.obsm["X_stofm"]).all()
    assert np.all(a.obsm["X_stofm_cell"][[0, 5]] == 0)


def test_no_vocabulary_overlap_names_the_fix(model, sample):
    a = sample.copy()
    a.var_names = [f"probe_{i}" for i in range(a.n_vars)]
    with pytest.raises(StofmInputError, match="vocabulary"):
        embed(a, model)


def test_mismatched_cell_encoder_is_a_clear_error(published_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(published_checkpoint, bad)
    torch.save({"weight": torch.zeros(256, 48), "bias": torch.zeros(256)}, bad / "cell_encoder" / "cell_proj.bin")
    with pytest.raises(CheckpointError, match="cell_proj.weight"):
        load_model(bad)


def test_real_mouse_slice_embeds_through_the_human_vocabulary(shared_data_dir, tiny_checkpoint):
    """A real MERFISH mouse slice: mouse symbols meet the human-symbol vocabulary by the
    case rule, and every cell gets a finite representation."""
    from napari_stofm.io.slices import read_slice

    adata = read_slice(shared_data_dir / "merfish_mouse_poa" / "animal1_bregma-0.29.h5ad")[:1500].copy()
    model = load_model(tiny_checkpoint)
    embed(adata, model, split_num=500)
    assert adata.uns["stofm"]["species"] == "mouse"
    assert adata.uns["stofm"]["genes_matched"] >= 10
    assert np.isfinite(adata.obsm["X_stofm"]).all()
    assert adata.uns["stofm"]["n_subslices"] >= 3


def test_gene_windows_read_long_cells_whole_and_leave_short_ones_alone(tiny_checkpoint, sample):
    """With gene_windows, a cell with more genes than max_genes is read in rank-interleaved
    windows (all its genes count); a cell with at most max_genes genes embeds as before."""
    from dataclasses import replace

    from napari_stofm.pipeline.embed import compute_cell_embedding

    top = load_model(tiny_checkpoint)
    top.settings = replace(top.settings, max_genes=40)  # the sample's cells express ~40-100 genes
    windows = load_model(tiny_checkpoint)
    windows.settings = replace(windows.settings, max_genes=40, gene_windows=4)
    a = compute_cell_embedding(sample, top, use_cache=False).embeddings
    b = compute_cell_embedding(sample, windows, use_cache=False).embeddings
    n_genes = np.asarray((sample.X > 0).sum(1)).ravel()
    short, long = n_genes <= 40, n_genes > 40
    assert short.any() and long.any()
    np.testing.assert_allclose(a[short], b[short], atol=1e-6)
    # a long cell: the normalised mean of its windows (every window of <= 40 genes), not its top 40
    from napari_stofm.genes.tokenizer import tokenize_adata

    tokens, _ = tokenize_adata(sample, windows.vocabulary, max_genes=160)
    parts, owner = tokens.interleaved(40)
    assert parts.lengths.max() <= 41 and np.bincount(owner).max() >= 3  # a long cell: several windows
    per_window = windows.cell_encoder.encode(parts)
    i = int(np.flatnonzero(long)[0])
    expected = per_window[owner == i].mean(0)
    np.testing.assert_allclose(b[i], expected / np.linalg.norm(expected), atol=1e-5)
    assert np.abs(a[long] - b[long]).max() > 1e-4
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
