"""Shared fixtures.

Real-data tests use the public slices and parity vectors that CI lays beside the checkout
in ``../shared`` (or wherever ``STOFM_SHARED_DIR`` points). A user's clone has no such
folder: those tests then skip, saying why.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("STOFM_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


SHARED_DIR = _shared_dir()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` (real public slices); skips when absent."""
    path = SHARED_DIR / "data"
    if not path.is_dir():
        pytest.skip(f"real-data slices not available ({path} is absent; set STOFM_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """``../shared/parity/official_small`` (published-checkpoint parity vectors); skips when absent."""
    path = SHARED_DIR / "parity" / "official_small"
    if not path.is_dir():
        pytest.skip(f"parity vectors not available ({path} is absent; set STOFM_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small randomly initialised SToFM (our safetensors layout) whose vocabulary covers
    the generated sample slice's genes."""
    from napari_stofm.model.stofm import build_model
    from napari_stofm.genes.vocabulary import build_vocabulary
    from napari_stofm.io.sample import make_sample_slice

    vocab = build_vocabulary([make_sample_slice(n_cells=500, seed=11)])
    model = build_model(
        vocab, se2_config=dict(num_hidden_layers=2, embedding_dim=32, ffn_embedding_dim=64, num_attention_heads=4,
                               gaussian_hidden_dim=8),
        encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        seed=0,
    )
    return model.save(tmp_path_factory.mktemp("tiny_checkpoint"))
