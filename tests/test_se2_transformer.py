"""Behaviour of the SE(2) transformer that needs no reference vectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stofm.errors import CheckpointError
from napari_stofm.model import (
    SE2Transformer,
    SToFMConfig,
    build_subslice_inputs,
    collate,
    hypernodes_from_assignment,
    load_se2_transformer,
    normalize_coordinates,
    save_se2_transformer,
    split_subslices,
)


def small_config(**kw):
    base = dict(num_hidden_layers=2, input_dim=16, embedding_dim=32, ffn_embedding_dim=64,
                num_attention_heads=4, gaussian_hidden_dim=8)
    base.update(kw)
    return SToFMConfig(**base)


def random_slice(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, size=(n, 2))
    emb = rng.normal(size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    groups = (xy[:, 0] // 250).astype(int) * 4 + (xy[:, 1] // 250).astype(int)
    return xy, emb, groups


def batch_for(xy, emb, groups, split_num=150):
    nxy = normalize_coordinates(xy)
    hyper = hypernodes_from_assignment(nxy, emb, groups)
    subs = split_subslices(nxy, split_num)
    return collate(list(build_subslice_inputs(nxy, emb, hyper, subs)))


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_dense_and_distinct_distance_kernels_agree(pre_layernorm):
    torch.manual_seed(0)
    model = SE2Transformer(small_config(pre_layernorm=pre_layernorm)).init_weights(seed=1).eval()
    batch = batch_for(*random_slice())
    dist = batch["attn_bias"]
    with torch.no_grad():
        sparse = model.gaussian(dist)
        dense = model.gaussian.dense_forward(dist)
        assert sparse.shape == dense.shape == (dist.shape[0], 4, dist.shape[1], dist.shape[2])
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
        assert torch.all(sparse[dist.unsqueeze(1).expand_as(sparse) == 0] == 0)
        a = model(batch["token_embeddings"], dist, batch["token_types"])
        b = model(batch["token_embeddings"], dist, batch["token_types"], dense_kernel=True)
    torch.testing.assert_close(a["last_hidden_state"], b["last_hidden_state"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["pair_rep"], b["pair_rep"], rtol=1e-5, atol=1e-5)


def test_output_invariant_to_rotation_and_translation():
    """Rotate and translate every token (CLS included): same distances, same outputs."""
    from dataclasses import replace

    from napari_stofm.model import subslice_distances

    model = SE2Transformer(small_config()).init_weights(seed=2).eval()
    xy, emb, groups = random_slice(seed=3)
    nxy = normalize_coordinates(xy)
    hyper = hypernodes_from_assignment(nxy, emb, groups)
    items = list(build_subslice_inputs(nxy, emb, hyper, split_subslices(nxy, 150)))
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = []
    for it in items:
        pos = it.spatial.astype(np.float64) @ rot.T + np.array([13.0, -42.0])
        moved.append(replace(it, spatial=pos.astype(np.float32), attn_bias=subslice_distances(pos, it.token_types)))
        np.testing.assert_allclose(moved[-1].attn_bias, it.attn_bias, atol=1e-4)
    with torch.no_grad():
        ba, bb = collate(items), collate(moved)
        oa = model(ba["token_embeddings"], ba["attn_bias"], ba["token_types"])
        ob = model(bb["token_embeddings"], bb["attn_bias"], bb["token_types"])
    torch.testing.assert_close(oa["last_hidden_state"], ob["last_hidden_state"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(oa["pair_rep"], ob["pair_rep"], rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_real_tokens():
    model = SE2Transformer(small_config()).init_weights(seed=4).eval()
    xy, emb, groups = random_slice(n=200)
    nxy = normalize_coordinates(xy)
    hyper = hypernodes_from_assignment(nxy, emb, groups)
    items = list(build_subslice_inputs(nxy, emb, hyper, [np.arange(200)]))
    with torch.no_grad():
        tight = collate(items)
        padded = collate(items, pad_to=len(items[0]) + 37)
        a = model(tight["token_embeddings"], tight["attn_bias"], tight["token_types"])["last_hidden_state"]
        b = model(padded["token_embeddings"], padded["attn_bias"], padded["token_types"])["last_hidden_state"]
    torch.testing.assert_close(a, b[:, : a.shape[1]], rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_config_keys_preserved(tmp_path):
    cfg = small_config()
    cfg.extra["transformers_version"] = "4.57.6"
    model = SE2Transformer(cfg).init_weights(seed=5)
    save_se2_transformer(model, tmp_path)
    loaded = load_se2_transformer(tmp_path)
    assert loaded.config.extra["transformers_version"] == "4.57.6"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_wrong_checkpoint_shapes_name_the_tensor(tmp_path):
    model = SE2Transformer(small_config()).init_weights(seed=6)
    torch.save(model.state_dict(), tmp_path / "se2transformer.pth")
    small_config(embedding_dim=64).to_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"embedding_layer\.weight.*\(32, 16\).*\(64, 16\)"):
        load_se2_transformer(tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    small_config().to_json(tmp_path / "config.json")
    (tmp_path / "se2transformer.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_se2_transformer(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_se2_transformer(tmp_path / "nope")


def test_kernel_far_from_every_distance_matches_the_dense_formula():
    """Gaussians so narrow and far that exp underflows: the kernel's clamped exponent (which
    keeps subnormal floats out of the hot loop) gives the dense formula's numbers."""
    model = SE2Transformer(small_config()).init_weights(seed=7).eval()
    batch = batch_for(*random_slice(seed=8))
    with torch.no_grad():
        model.gaussian.means.weight[0, :4] = torch.tensor([-5.0, 40.0, 99.0, 400.0])
        model.gaussian.stds.weight[0, :4] = 0.05
        dist = batch["attn_bias"]
        torch.testing.assert_close(model.gaussian(dist), model.gaussian.dense_forward(dist), rtol=1e-5, atol=1e-6)
        d = torch.tensor([0.5, 3.0, 100.0, 1e4])
        exponent = ((model.gaussian.linear(d[:, None]) - model.gaussian.means.weight) / 0.05) ** 2 * -0.5
        assert float(exponent.min()) < -1e3  # far below where float32 exp leaves the normal range
        assert torch.isfinite(model.gaussian.basis(d)).all()


@pytest.mark.parametrize("suffix", [True, False])
def test_padded_key_fill_equals_masked_fill(suffix):
    from napari_stofm.model.se2_transformer import fill_padded_keys

    lengths = torch.tensor([7, 4, 10])
    mask = torch.arange(10)[None, :] >= lengths[:, None]
    if not suffix:
        mask[0, 2] = True  # a hole: not a suffix of the row
    scores = torch.randn(3, 2, 10, 10)
    expected = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(fill_padded_keys(scores.clone(), mask, float("-inf")), expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_virtual_cell_blocks_give_the_dense_kernel(symmetric):
    """The virtual cells' rows and columns evaluated as blocks (columns mirrored when the
    distances are symmetric, evaluated on their own when not) give the dense formula."""
    model = SE2Transformer(small_config()).init_weights(seed=9).eval()
    batch = batch_for(*random_slice(seed=10))
    types = batch["token_types"]
    span = model._virtual_cell_positions(types)
    n_virtual = int(types[0].eq(model.config.hyper_type_id).sum())
    assert span == slice(1, 1 + n_virtual) and n_virtual > 1
    dist = batch["attn_bias"].clone()
    if not symmetric:
        dist[:, 3, 1 + n_virtual] += 0.25  # one virtual cell -> cell pair differs from its mirror
    with torch.no_grad():
        torch.testing.assert_close(model.gaussian(dist, block_span=span), model.gaussian.dense_forward(dist),
                                   rtol=1e-5, atol=1e-6)
    mixed = types.clone()
    mixed[0, 1] = model.config.norm_type_id  # virtual cells not at the same place in every row
    assert model._virtual_cell_positions(mixed) is None


def _one_layer_outputs(scope, emb_change=None):
    model = SE2Transformer(small_config(num_hidden_layers=1, attention_scope=scope)).init_weights(seed=7).eval()
    xy, emb, groups = random_slice(n=300, seed=8)
    nxy = normalize_coordinates(xy)
    hyper = hypernodes_from_assignment(nxy, emb, groups)
    batch = collate(list(build_subslice_inputs(nxy, emb, hyper, [np.arange(300)])))
    if emb_change is not None:
        batch["token_embeddings"][0, emb_change] += 5.0
    with torch.no_grad():
        out = model(batch["token_embeddings"], batch["attn_bias"], batch["token_types"])
    return out, batch


@pytest.mark.parametrize("scope", ["all", "neighbours"])
def test_neighbours_scope_reads_only_the_tokens_a_cell_has_a_distance_to(scope):
    """One layer: with the ``neighbours`` scope a cell's output ignores a cell it has no
    distance to (no neighbour: the far distance) and follows one of its neighbours; with the
    published ``all`` scope it follows both."""
    from napari_stofm.model.se2_transformer import FAR

    base, batch = _one_layer_outputs(scope)
    dist = batch["attn_bias"][0]
    cells = torch.nonzero(batch["token_types"][0] == 0).view(-1)
    i = int(cells[0])
    far = int(cells[torch.nonzero(dist[i, cells] == FAR).view(-1)[0]])
    near = int(cells[torch.nonzero((dist[i, cells] != FAR) & (dist[i, cells] > 0)).view(-1)[0]])
    moved_far, _ = _one_layer_outputs(scope, emb_change=far)
    moved_near, _ = _one_layer_outputs(scope, emb_change=near)
    h = base["last_hidden_state"][0, i]
    change_far = float((moved_far["last_hidden_state"][0, i] - h).abs().max())
    change_near = float((moved_near["last_hidden_state"][0, i] - h).abs().max())
    assert change_near > 1e-4
    if scope == "neighbours":
        assert change_far == 0.0
    else:
        assert change_far > 1e-4
    # the scope changes which keys are attended, not the logits (the next layer's bias and
    # the pair representation): in one layer they are those of the published rule
    torch.testing.assert_close(base["pair_rep"], _one_layer_outputs("all")[0]["pair_rep"])


def test_neighbours_scope_matches_a_masked_softmax_and_ignores_padding():
    """The scoped attention is softmax over the allowed keys only (a straightforward
    reference), and padding a batch changes no real token."""
    import torch.nn.functional as F

    model = SE2Transformer(small_config(num_hidden_layers=1, attention_scope="neighbours")).init_weights(seed=9).eval()
    xy, emb, groups = random_slice(n=200, seed=10)
    nxy = normalize_coordinates(xy)
    hyper = hypernodes_from_assignment(nxy, emb, groups)
    items = list(build_subslice_inputs(nxy, emb, hyper, [np.arange(200)]))
    tight, padded = collate(items), collate(items, pad_to=len(items[0]) + 29)
    with torch.no_grad():
        a = model(tight["token_embeddings"], tight["attn_bias"], tight["token_types"])["last_hidden_state"]
        b = model(padded["token_embeddings"], padded["attn_bias"], padded["token_types"])["last_hidden_state"]
        # reference: the layer by hand, keys outside the scope dropped from each row's softmax
        layer, att = model.encoder.layers[0], model.encoder.layers[0].self_attn
        dist = tight["attn_bias"]
        x = model.embedding_layer(tight["token_embeddings"]) + model.token_type_embeddings(tight["token_types"])
        bias = model.gaussian.dense_forward(dist)
        l, h, d = x.shape[1], att.num_heads, att.head_dim
        q = (att.q_proj(x) * att.scaling).view(1, l, h, d).transpose(1, 2)
        k = att.k_proj(x).view(1, l, h, d).transpose(1, 2)
        v = att.v_proj(x).view(1, l, h, d).transpose(1, 2)
        scores = bias + q @ k.transpose(-1, -2)
        allowed = (dist != 100.0).unsqueeze(1)
        probs = torch.where(allowed, scores, torch.full_like(scores, -1e30)).softmax(-1)
        y = att.out_proj((probs @ v).transpose(1, 2).reshape(1, l, h * d))
        y = layer.self_attn_layer_norm(x + y)
        y = layer.final_layer_norm(y + layer.fc2(F.gelu(layer.fc1(y))))
    torch.testing.assert_close(a, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, b[:, : a.shape[1]], rtol=1e-5, atol=1e-5)


def test_neighbours_scope_inference_path_gives_the_training_path_outputs():
    """Without the pair representation (what ``embed`` asks for) the scope is applied once to
    the first bias and carried by the logits; the outputs are those of the per-layer mask."""
    model = SE2Transformer(small_config(num_hidden_layers=3, attention_scope="neighbours")).init_weights(seed=12).eval()
    xy, emb, groups = random_slice(n=400, seed=13)
    batch = batch_for(xy, emb, groups, split_num=120)
    args = (batch["token_embeddings"], batch["attn_bias"], batch["token_types"])
    with torch.no_grad():
        per_layer = model(*args, return_pair_rep=True)["last_hidden_state"]
    with torch.inference_mode():
        carried = model(*args, return_pair_rep=False)["last_hidden_state"]
    assert bool((batch["token_types"] == 3).any())  # the batch is padded
    torch.testing.assert_close(carried, per_layer, rtol=1e-5, atol=1e-5)


def test_attention_scope_round_trips_and_published_files_stay_unchanged(tmp_path):
    published = small_config()
    assert "attention_scope" not in published.to_dict()  # a published config.json is written as it was read
    save_se2_transformer(SE2Transformer(small_config(attention_scope="neighbours")).init_weights(seed=11), tmp_path)
    assert load_se2_transformer(tmp_path).config.attention_scope == "neighbours"
    with pytest.raises(CheckpointError, match="attention_scope"):
        small_config(attention_scope="local")
