"""The SE(2) stage against vectors computed by the published SToFM code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_stofm.model import (
    build_subslice_inputs,
    collate,
    hypernodes_from_assignment,
    load_se2_transformer,
    normalize_coordinates,
    split_subslices,
    subslice_distances,
)


@pytest.fixture(scope="module")
def reference(parity_dir):
    ref = dict(np.load(parity_dir / "reference.npz"))
    ref["meta"] = json.loads((parity_dir / "meta.json").read_text())
    return ref


def test_normalisation_matches(reference):
    np.testing.assert_allclose(normalize_coordinates(reference["raw_xy"]), reference["normalized_xy"],
                               rtol=0, atol=1e-10)


def test_subslices_match_published_order(reference):
    subs = split_subslices(reference["normalized_xy"], reference["meta"]["split_num"], mode="published")
    assert [len(s) for s in subs] == reference["meta"]["subslice_sizes"]
    for i, cells in enumerate(subs):
        np.testing.assert_array_equal(cells, reference[f"subslice_{i}_cells"])


def test_spatial_split_mode_covers_every_cell_once(reference):
    subs = split_subslices(reference["normalized_xy"], 100, mode="spatial")
    allcells = np.concatenate(subs)
    assert np.array_equal(np.sort(allcells), np.arange(len(reference["normalized_xy"])))
    assert max(len(s) for s in subs) < 2 * 100


def test_distance_matrices_and_batch_match(reference):
    xy = reference["normalized_xy"]
    hyper = hypernodes_from_assignment(xy, reference["cell_embeddings"], reference["hyper_assignment"])
    np.testing.assert_allclose(hyper.xy, reference["hyper_xy"], atol=1e-10)
    np.testing.assert_allclose(hyper.embeddings, reference["hyper_embeddings"], atol=1e-10)
    subs = [reference[f"subslice_{i}_cells"] for i in range(reference["meta"]["n_subslices"])]
    items = list(build_subslice_inputs(xy, reference["cell_embeddings"], hyper, subs))
    batch = collate(items, pad_to=reference["batch_token_types"].shape[1])
    np.testing.assert_array_equal(batch["token_types"].numpy(), reference["batch_token_types"])
    np.testing.assert_array_equal(batch["indices"].numpy(), reference["batch_indices"])
    np.testing.assert_allclose(batch["spatial"].numpy(), reference["batch_spatial"], atol=1e-6)
    np.testing.assert_allclose(batch["token_embeddings"].numpy(), reference["batch_token_embeddings"], atol=1e-7)
    np.testing.assert_allclose(batch["attn_bias"].numpy(), reference["batch_attn_bias"], rtol=1e-6, atol=1e-5)
    # the public single-sub-slice function gives the same matrix
    item = items[0]
    np.testing.assert_allclose(subslice_distances(item.spatial, item.token_types), item.attn_bias, atol=1e-5)


def test_transformer_outputs_match(reference, parity_dir):
    model = load_se2_transformer(parity_dir)
    with torch.no_grad():
        out = model(
            torch.from_numpy(reference["batch_token_embeddings"]),
            torch.from_numpy(reference["batch_attn_bias"]),
            torch.from_numpy(reference["batch_token_types"]),
        )
    np.testing.assert_allclose(out["last_hidden_state"].numpy(), reference["last_hidden_state"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["pair_rep"].numpy(), reference["pair_rep"], rtol=1e-4, atol=1e-5)


def test_pretraining_wrapper_prefix_loads(parity_dir, tmp_path):
    import shutil

    state = torch.load(parity_dir / "se2transformer.pth", weights_only=True)
    heads = {"lm_head.0.weight": torch.zeros(64, 64), "pair_head.2.bias": torch.zeros(1)}
    wrapped = {f"model.{k}": v for k, v in state.items()} | heads
    shutil.copy(parity_dir / "config.json", tmp_path / "config.json")
    torch.save(wrapped, tmp_path / "se2transformer.pth")
    model, got_heads = load_se2_transformer(tmp_path, return_heads=True)
    assert set(got_heads) == set(heads)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
