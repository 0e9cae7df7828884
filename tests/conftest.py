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
