"""CurationStore: the autosave of a slice's annotations (round trip, stale files, atomicity, fallback)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from builders import example_annotation

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.annotation import Annotation
from napari_stofm.io.autosave import CurationStore


def test_autosave_round_trip(tmp_path):
    slice_path = tmp_path / "slice.h5ad"
    slice_path.write_bytes(b"x")
    obs_names = [f"c{i}" for i in range(12)]
    region = example_annotation()
    region.assign([1, 2], 0)
    cell_type = Annotation.from_prediction("stofm_cell_type", ["A", "B", "C"], np.arange(12) % 3, np.linspace(0, 1, 12))
    store = CurationStore(slice_path)
    assert store.load(obs_names) == {}
    written = store.save([region, cell_type], obs_names)
    assert written == tmp_path / "slice.h5ad.stofm-curation.npz"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    loaded = CurationStore(slice_path).load(obs_names)
    assert set(loaded) == {"stofm_region", "stofm_cell_type"}
    assert loaded["stofm_region"].equals(region)
    assert loaded["stofm_cell_type"].equals(cell_type)
    # a later save replaces the earlier one
    region.assign([7], 3)
    store.save({"stofm_region": region}, obs_names)
    assert set(store.load(obs_names)) == {"stofm_region"}
    assert store.load(obs_names)["stofm_region"].equals(region)
    store.discard()
    assert not store.exists()


def test_stale_autosave_refused(tmp_path):
    slice_path = tmp_path / "slice.h5ad"
    obs_names = [f"c{i}" for i in range(12)]
    store = CurationStore(slice_path)
    store.save([example_annotation()], obs_names)
    for other in (obs_names[::-1], obs_names[:11] + ["new"], obs_names[:11]):
        with pytest.raises(StofmInputError, match="another set of cells.*Delete or rename"):
            store.load(other)
    assert store.exists()  # never deleted on refusal


def test_autosave_interrupted_keeps_previous(tmp_path, monkeypatch):
    slice_path = tmp_path / "slice.h5ad"
    obs_names = [f"c{i}" for i in range(12)]
    store = CurationStore(slice_path)
    ann = example_annotation()
    store.save([ann], obs_names)

    def broken_replace(src, dst):
        raise OSError("disk full")

    edited = ann.copy()
    edited.assign([0, 1], 2)
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save([edited], obs_names)
    monkeypatch.undo()
    assert store.load(obs_names)["stofm_region"].equals(ann)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice.h5ad.stofm-curation.npz"]


def test_autosave_falls_back_when_folder_is_read_only(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(data) else real_access(p, mode))
    store = CurationStore(data / "slice.h5ad")
    obs_names = [f"c{i}" for i in range(12)]
    ann = example_annotation()
    path = store.save([ann], obs_names)
    assert str(path).startswith(str(tmp_path / "cache"))
    assert list(data.iterdir()) == []
    assert CurationStore(data / "slice.h5ad").load(obs_names)["stofm_region"].equals(ann)


def test_autosave_mode_follows_the_umask(tmp_path):
    import stat

    slice_path = tmp_path / "slice.h5ad"
    old = os.umask(0o002)
    try:
        written = CurationStore(slice_path).save([example_annotation()], [f"c{i}" for i in range(12)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o664  # not mkstemp's 0600
