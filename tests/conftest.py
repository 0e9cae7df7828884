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


def pytest_sessionstart(session):
    """Work around a PySide6 reference-count bug in the test process (Python < 3.12 only).

    With PySide6 6.12 on Python 3.11, every napari viewer opened and closed drops about 7,000
    references to ``None`` that it never took. After enough viewers the count reaches zero
    and the interpreter aborts at exit ("Fatal Python error: none_dealloc") although every
    test passed. Python 3.12 made ``None`` immortal; on older versions we give ``None`` a
    large number of extra references once, which is harmless (``None`` is never freed).
    Test results are unaffected: this only keeps the exit from crashing.
    """
    import ctypes
    import sys

    if sys.version_info < (3, 12) and sys.implementation.name == "cpython":
        ctypes.c_ssize_t.from_address(id(None)).value += 1 << 40


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


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """The user cache (embedding caches, folder-less autosaves) of the whole run, fixtures of
    every scope included, is a temporary folder: no test writes to or reads from ``~/.cache``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("session_cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own, empty user cache folder (outside its ``tmp_path``, whose listing
    some tests check): no test finds another's autosave or embedding."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The one test checkpoint: a small randomly initialised SToFM (our safetensors layout)
    whose vocabulary covers the generated sample slice's genes (every seed and size of
    ``make_sample_slice`` measures the same panel). Read-only: load it, never write into it."""
    from napari_stofm.genes.vocabulary import build_vocabulary
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.model.stofm import build_model

    vocab = build_vocabulary([make_sample_slice(n_cells=500, seed=11)])
    model = build_model(
        vocab, se2_config=dict(num_hidden_layers=2, embedding_dim=32, ffn_embedding_dim=64, num_attention_heads=4,
                               gaussian_hidden_dim=8),
        encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        seed=0,
    )
    return model.save(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory) -> Path:
    """A generated 800-cell sample slice written to an .h5ad (read it; never write over it)."""
    from napari_stofm.io.sample import make_sample_slice

    path = tmp_path_factory.mktemp("slice") / "slice.h5ad"
    make_sample_slice(n_cells=800, seed=3).write_h5ad(path)
    return path
