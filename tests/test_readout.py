"""``readout: context``: X_stofm read through the SE(2) stage's own cell and niche heads."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from builders import TINY_PRETRAIN

from napari_stofm.errors import CheckpointError, StofmInputError
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.training.config import PretrainConfig
from napari_stofm.training.trainer import pretrain

TINY = {**TINY_PRETRAIN, "warmup_steps": 1}


@pytest.fixture(scope="module")
def slices():
    return [("generated/a", make_sample_slice(n_cells=300, seed=1)),
            ("generated/b", make_sample_slice(n_cells=300, seed=2))]


@pytest.fixture(scope="module")
def context_run(slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("readout") / "weights"
    cfg = PretrainConfig(stage1_steps=2, stage2_steps=3, niche_weight=2.0, self_weight=1.0, readout="context", **TINY)
    pretrain([], out, cfg, adatas=slices, show_progress=False)
    return out


def test_context_weights_read_x_stofm_through_their_heads(context_run, slices):
    from napari_stofm.model.forward import forward_slice
    from napari_stofm.model.readout import finish_context
    from napari_stofm.model.stofm import SToFM, load_model
    from napari_stofm.pipeline.embed import embed

    model = load_model(context_run)
    assert model.settings.readout == "context" and model.readout is not None
    assert model.readout.scales == 2 and model.representation_dim == 3 * model.cell_encoder.embedding_dim
    adata = embed(slices[0][1].copy(), model)
    x = adata.obsm["X_stofm"]
    d = model.cell_encoder.embedding_dim
    assert x.shape == (300, 3 * d) and np.isfinite(x).all()
    parts = x.reshape(300, 3, d)
    np.testing.assert_allclose(np.linalg.norm(parts, axis=2), 1.0, atol=1e-5)  # every part weighs the same
    # the same numbers by hand: the hidden state, then the heads, then centring and normalising
    hidden_model = SToFM(model.se2, model.cell_encoder, model.vocabulary, replace(model.settings, readout="hidden"))
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    s = model.settings
    hidden = forward_slice(hidden_model, xy, adata.obsm["X_stofm_cell"], split_num=s.split_num,
                           split_mode=s.split_mode).representations
    with torch.inference_mode():
        raw = model.readout(torch.from_numpy(hidden)).numpy()
    np.testing.assert_allclose(x, finish_context(raw.copy()), atol=2e-5)
    # the niche parts are centred on the slice before they are normalised: not all alike
    assert abs(float(raw[:, 1:].mean())) > 0 and parts[:, 1:].mean(axis=0).std() < parts[:, 1:].std()


def test_the_readout_survives_save_and_load_and_keys_the_cache(context_run, slices, tmp_path):
    from napari_stofm.model.stofm import load_model
    from napari_stofm.pipeline.embed import compute_embedding, embed

    model = load_model(context_run)
    again = load_model(model.save(tmp_path / "copy"))
    assert again.readout is not None
    adata = slices[1][1].copy()
    a = compute_embedding(adata, model).representations
    np.testing.assert_allclose(compute_embedding(adata, again).representations, a, atol=1e-6)
    # the same weights read through the hidden state: a different X_stofm, not the cached one
    settings = json.loads((context_run / "stofm.json").read_text())
    hidden_dir = tmp_path / "hidden"
    shutil.copytree(context_run, hidden_dir)
    (hidden_dir / "stofm.json").write_text(json.dumps({**settings, "readout": "hidden"}))
    embed(adata, model)
    embed(adata, load_model(hidden_dir))
    assert adata.obsm["X_stofm"].shape == (300, model.se2.config.embedding_dim)


def test_adapting_a_context_model_reads_through_the_adapted_heads(context_run, slices):
    from napari_stofm.model.stofm import load_model
    from napari_stofm.pipeline.embed import compute_embedding

    model = load_model(context_run)
    adata = slices[0][1].copy()
    plain = compute_embedding(adata, model).representations
    adapted = compute_embedding(adata, model, adapt=1.0).representations
    assert adapted.shape == plain.shape and np.isfinite(adapted).all() and not np.allclose(adapted, plain)


def test_context_readout_without_its_heads_is_refused_with_the_fix(tiny_checkpoint, tmp_path):
    from napari_stofm.model.stofm import load_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    settings = json.loads((ckpt / "stofm.json").read_text())
    (ckpt / "stofm.json").write_text(json.dumps({**settings, "readout": "context"}))
    with pytest.raises(CheckpointError, match="niche_head.*readout.*hidden"):
        load_model(ckpt)
    (ckpt / "stofm.json").write_text(json.dumps({**settings, "readout": "average"}))
    with pytest.raises(CheckpointError, match="readout='average' is not one of hidden, context"):
        load_model(ckpt)


def test_a_context_run_needs_the_niche_term(slices, tmp_path):
    cfg = PretrainConfig(stage1_steps=1, stage2_steps=1, niche_weight=0.0, readout="context", **TINY)
    with pytest.raises(StofmInputError, match="niche"):
        pretrain([], tmp_path / "out", cfg, adatas=slices, show_progress=False)
    assert not (tmp_path / "out" / "se2transformer.safetensors").exists()


def test_a_random_model_of_a_context_model_has_random_heads_of_its_size(context_run, slices):
    """The untrained baseline of a context checkpoint (benchmarks/evaluate.py) reads the same way."""
    from napari_stofm.model.stofm import build_model, load_model
    from napari_stofm.pipeline.embed import compute_embedding

    model = load_model(context_run)
    random = build_model(model.vocabulary, settings=model.settings, seed=0, readout_scales=model.readout.scales,
                         se2_config=dict(num_hidden_layers=2, embedding_dim=32, ffn_embedding_dim=64,
                                         num_attention_heads=4, gaussian_hidden_dim=16),
                         encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64))
    assert random.representation_dim == model.representation_dim
    x = compute_embedding(slices[0][1].copy(), random).representations
    assert x.shape == (300, model.representation_dim) and np.isfinite(x).all()
