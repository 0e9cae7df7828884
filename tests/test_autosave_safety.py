"""The autosave never loses curation: one writer per slice (lock file), refused or damaged
autosaves are kept aside, and a crafted autosave cannot make the reader allocate much
(generated data only)."""
from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from napari_stofm.errors import AutosaveLocked, AutosaveRefused, StofmInputError
from napari_stofm.heads.annotation import Annotation
from napari_stofm.io.autosave import (
    CurationStore,
    host_name,
    obs_fingerprint,
    read_lock,
)
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.review.session import SliceSession

REPO = Path(__file__).resolve().parents[1]
KEY = "stofm_region"


@pytest.fixture
def slice_path(tmp_path):
    adata = make_sample_slice(n_cells=300, seed=7)
    path = tmp_path / "slice.h5ad"
    adata.write_h5ad(path)
    return path


def _curate(session, cells, code=1):
    if KEY not in session.annotations:
        n = session.adata.n_obs
        session.annotations[KEY] = Annotation.from_prediction(KEY, ["a", "b", "c"], np.arange(n) % 3,
                                                              np.full(n, 0.5))
    session.assign(KEY, cells, code)
    return session.autosave()


def _child(code: str, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_HOLD = """
    import sys, warnings
    warnings.filterwarnings("ignore")
    from napari_stofm.review.session import SliceSession
    s = SliceSession.open(sys.argv[1])
    print(s.autosave_path, flush=True)
    sys.stdin.readline()  # hold the session until told
    {end}
"""


# ----------------------------------------------------------------------------- 2: two sessions


def test_second_session_in_this_process_writes_its_own_file(slice_path):
    first = SliceSession.open(slice_path)
    main = first.store.path
    lock = main.with_name(main.name + ".lock")
    info = read_lock(lock)
    assert info["pid"] == os.getpid() and info["host"] == host_name() and info["started_at"]
    _curate(first, np.arange(10), 1)

    with pytest.warns(UserWarning, match="in use by another napari-stofm session"):
        second = SliceSession.open(slice_path)
    assert second.restored_from == main  # it may read the first one's autosave ...
    assert "in this same program" in second.autosave_error and str(lock) in second.autosave_error
    written = _curate(second, np.arange(200, 250), 2)
    assert written != main and ".session-" in written.name  # ... but never writes it
    assert str(written) in second.autosave_error
    _curate(first, np.arange(10, 20), 0)

    a = CurationStore(slice_path).load(first.adata.obs_names)[KEY]
    assert (a.codes[:10] == 1).all() and (a.codes[10:20] == 0).all() and not a.curated[200:250].any()
    b = np.load(written)  # the second session's file holds the second session's work
    assert "meta" in b.files

    first.close()
    assert not lock.exists()
    del second
    gc.collect()  # a dropped session releases its lock (weakref finalizer)
    assert sorted(p.name for p in slice_path.parent.iterdir() if p.name.endswith(".lock")) == []
    third = SliceSession.open(slice_path)  # the slice's autosave is free again
    assert third.autosave_error is None and third.autosave_path == main
    third.close()


def test_lock_of_another_process_and_stale_takeover(slice_path):
    child = _child(_HOLD.format(end=""), slice_path)
    try:
        held = Path(child.stdout.readline().strip())
        assert held == CurationStore(slice_path).path
        with pytest.warns(UserWarning, match=rf"process {child.pid} on host"):
            session = SliceSession.open(slice_path)
        assert f"process {child.pid}" in session.autosave_error
        assert _curate(session, [1, 2, 3]) != held
        session.close()
    finally:
        child.kill()  # SIGKILL: no chance to release the lock
        child.wait()
    lock = held.with_name(held.name + ".lock")
    assert read_lock(lock)["pid"] == child.pid  # left behind by the killed process
    session = SliceSession.open(slice_path)  # a dead holder's lock is taken over
    assert session.autosave_error is None and read_lock(lock)["pid"] == os.getpid()
    assert _curate(session, [4, 5]) == held
    session.close()


def test_lock_released_at_interpreter_exit(slice_path):
    child = _child(_HOLD.format(end="print('bye')"), slice_path)
    held = Path(child.stdout.readline().strip())
    lock = held.with_name(held.name + ".lock")
    assert lock.exists()
    _out, err = child.communicate("\n", timeout=60)
    assert child.returncode == 0, err
    assert not lock.exists()


def test_lock_of_another_host_is_respected(slice_path):
    store = CurationStore(slice_path)
    lock = store.lock_path
    lock.write_text(json.dumps({"pid": 1, "host": "microscope-pc", "started_at": "2024-05-01T10:00:00+00:00",
                                "token": "x"}))
    with pytest.raises(AutosaveLocked, match="host microscope-pc.*delete the lock file"):
        store.acquire_lock()
    with pytest.warns(UserWarning, match="microscope-pc"):
        session = SliceSession.open(slice_path)
    assert _curate(session, [0]) != store.path
    session.close()
    assert lock.exists()  # not ours to remove


# ----------------------------------------------------------------------------- 3, 7: refused autosaves are kept


def test_refused_autosave_is_kept_aside(slice_path):
    session = SliceSession.open(slice_path)
    _curate(session, np.arange(200), 2)
    obs_names = list(session.adata.obs_names)
    main = session.store.path
    session.close()

    import anndata as ad

    changed = ad.read_h5ad(slice_path)[1:].copy()  # one cell fewer
    changed.write_h5ad(slice_path)
    again = SliceSession.open(slice_path)
    assert again.restored_from is None and KEY not in again.annotations
    assert "another set of cells" in again.restore_error
    kept = again.kept_aside[0]
    assert kept.name.startswith("slice.h5ad.stofm-curation.refused-") and kept.suffix == ".npz"
    assert str(kept) in again.restore_error and not main.exists()
    _curate(again, [0, 1], 0)  # the next edit's autosave ...
    assert main.exists()
    # ... leaves the 200 curated cells where they were kept
    variant = kept.name.split(".stofm-curation.")[1][: -len(".npz")]
    saved = CurationStore(slice_path, directory=kept.parent, variant=variant)
    assert saved.path == kept and int(saved.load(obs_names)[KEY].curated.sum()) == 200
    assert CurationStore(slice_path).load(again.adata.obs_names)[KEY].curated.sum() == 2
    again.close()


def test_corrupt_and_unrestored_autosaves_are_kept(slice_path):
    main = CurationStore(slice_path).path
    main.write_bytes(b"PK\x03\x04 not really a zip")
    session = SliceSession.open(slice_path)
    assert "cannot be read" in session.restore_error and ".corrupt-" in session.restore_error
    assert session.kept_aside[0].read_bytes() == b"PK\x03\x04 not really a zip"
    _curate(session, [3])
    session.close()

    # restore=False starts from the predictions, but the autosave it did not load is kept
    before = main.read_bytes()
    fresh = SliceSession.open(slice_path, restore=False)
    with pytest.warns(UserWarning, match="had not loaded"):
        _curate(fresh, [4])
    assert fresh.kept_aside[0].name.startswith("slice.h5ad.stofm-curation.previous-")
    assert fresh.kept_aside[0].read_bytes() == before
    _curate(fresh, [5])  # its own file is simply replaced afterwards
    assert len(fresh.kept_aside) == 1
    fresh.close()


def _write_autosave(path: Path, obs_names, *, drop=(), replace=None, extra=None):
    """An autosave as CurationStore writes it, with members dropped / replaced (raw bytes)."""
    n = len(obs_names)
    meta = {"version": 1, "saved_at": "now", "slice": "slice.h5ad", "n_cells": n,
            "obs_fingerprint": obs_fingerprint(obs_names),
            "annotations": {KEY: {"index": 0, "categories": ["a", "b"], "colors": ["#ff0000", "#00ff00"],
                                  "provenance": {}}}}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
              "a0_codes": np.zeros(n, np.int32), "a0_predicted": np.zeros(n, np.int32),
              "a0_confidence": np.full(n, 0.5, np.float32), "a0_curated": np.ones(n, bool)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, arr in arrays.items():
            if name in drop:
                continue
            if replace and name in replace:
                replace[name](archive, name + ".npy")
                continue
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, arr)
            archive.writestr(name + ".npy", buffer.getvalue())
        for name, writer in (extra or {}).items():
            writer(archive, name)


def test_autosave_missing_an_array_is_a_clear_error(slice_path):
    import anndata as ad

    obs_names = list(ad.read_h5ad(slice_path).obs_names)
    main = CurationStore(slice_path).path
    _write_autosave(main, obs_names)
    assert CurationStore(slice_path).load(obs_names)[KEY].curated.all()  # the helper writes a valid one
    _write_autosave(main, obs_names, drop=("a0_curated",))
    with pytest.raises(AutosaveRefused, match="array 'a0_curated' is missing") as info:
        CurationStore(slice_path).load(obs_names)
    assert info.value.kind == "corrupt" and isinstance(info.value, StofmInputError)
    session = SliceSession.open(slice_path)
    assert "a0_curated" in session.restore_error and ".corrupt-" in session.restore_error
    assert session.kept_aside and not main.exists()
    session.close()


# ----------------------------------------------------------------------------- 8: bounded reading


def _bomb(shape, dtype="<i4", n_bytes=64 * 2**20):
    """A member whose header declares ``shape`` followed by ``n_bytes`` of zeros (compresses ~1000x)."""
    def write(archive, name):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
        with archive.open(name, "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk = bytes(2**20)
            for _ in range(n_bytes // 2**20):
                member.write(chunk)
    return write


def test_crafted_autosave_is_refused_before_inflating(tmp_path):
    n = 100
    obs_names = [f"c{i}" for i in range(n)]
    store = CurationStore(tmp_path / "slice.h5ad")
    cases = {
        "declares shape": {"replace": {"a0_codes": _bomb((16 * 2**20,))}},  # 64 MiB behind a header for 16 Mi cells
        r"declares \d+ bytes for 400 bytes": {"replace": {"a0_codes": _bomb((n,))}},  # right shape, 64 MiB of data
        "'meta' record declares": {"replace": {"meta": _bomb((64 * 2**20,), "|u1")}},
        "does not write": {"extra": {"a1_codes.npy": _bomb((n,), n_bytes=2**20)}},
    }
    for message, kwargs in cases.items():
        path = store.path
        _write_autosave(path, obs_names, **kwargs)
        assert path.stat().st_size < 2**20  # a small file ...
        tracemalloc.start()
        try:
            with pytest.raises(AutosaveRefused, match=message) as info:
                store.load(obs_names)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.kind == "corrupt"
        assert peak < 4 * 2**20, (message, peak)  # ... is refused without inflating it

    # the fingerprint is checked before any array: an autosave of other cells is refused as such
    _write_autosave(store.path, obs_names, replace={"a0_codes": _bomb((16 * 2**20,))})
    with pytest.raises(AutosaveRefused, match="another set of cells") as info:
        store.load(obs_names[:-1])
    assert info.value.kind == "refused"

    # object arrays are never unpickled; values outside the classes are refused
    def pickled(archive, name):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.array([{"x": 1}] * n, dtype=object), allow_pickle=True)
        archive.writestr(name, buffer.getvalue())

    def bad_codes(archive, name):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.full(n, 7, np.int32))
        archive.writestr(name, buffer.getvalue())

    for writer, message in ((pickled, "objects are never loaded"), (bad_codes, "codes must be -1")):
        _write_autosave(store.path, obs_names, replace={"a0_codes": writer})
        with pytest.raises(AutosaveRefused, match=message):
            store.load(obs_names)


def test_autosave_confidence_outside_unit_interval_is_clipped(tmp_path):
    n = 20
    obs_names = [f"c{i}" for i in range(n)]
    store = CurationStore(tmp_path / "slice.h5ad")

    def wild(archive, name):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.linspace(-3, 3, n).astype(np.float32))
        archive.writestr(name, buffer.getvalue())

    _write_autosave(store.path, obs_names, replace={"a0_confidence": wild})
    with pytest.warns(UserWarning, match="clipped"):
        ann = store.load(obs_names)[KEY]
    assert ann.confidence.min() == 0 and ann.confidence.max() == 1


def test_a_late_autosave_after_close_keeps_the_sessions_own_file(slice_path, recwarn):
    """Closing a session (its layers removed from napari) and autosaving once more (a timer
    that fires late) is the same writer: nothing is kept aside, no warning."""
    session = SliceSession.open(slice_path)
    session.annotations[KEY] = Annotation.from_prediction(KEY, ["a", "b"], np.arange(300) % 2)
    first = session.autosave()
    session.close()
    assert session.autosave() == first
    assert session.kept_aside == [] and not [w for w in recwarn if "had not loaded" in str(w.message)]
    session.close()
    # ... but a file someone else wrote meanwhile is still kept aside
    other = SliceSession.open(slice_path)
    other.annotations[KEY].assign([0], 1)
    other.autosave()
    other.close()
    with pytest.warns(UserWarning, match="had not loaded"):
        session.autosave()
    assert len(session.kept_aside) == 1
    session.close()


def test_obs_fingerprint_is_the_per_cell_digest():
    """The one-shot fingerprint hashes the bytes the per-cell form did, so autosaves written
    before still match their slice."""
    import hashlib

    import pandas as pd

    for names in ([], ["a"], ["cell-1", "ç2", "3"], [f"t{i}_c{i * 7}" for i in range(5000)]):
        digest = hashlib.sha256()
        digest.update(str(len(names)).encode())
        for name in names:
            digest.update(b"\0" + str(name).encode("utf-8"))
        assert obs_fingerprint(names) == digest.hexdigest()
        assert obs_fingerprint(pd.Index(names)) == digest.hexdigest()


# ------------------------------------------------------------- autosaves written by a worker


def test_autosave_from_a_worker_never_puts_back_older_labels(slice_path):
    """A GUI copies the labels on its UI thread and writes them from a worker: a snapshot
    older than one already written is skipped, and closing the session makes a snapshot
    still in flight stale (it would otherwise lock the autosave again)."""
    import threading

    session = SliceSession.open(slice_path)
    _curate(session, [0, 1], code=1)
    old = session.autosave_snapshot()
    session.assign(KEY, [2, 3], 2)
    new = session.autosave_snapshot()
    done = []
    worker = threading.Thread(target=lambda: done.append(session.autosave(new)))
    worker.start()
    worker.join()
    assert done == [session.autosave_path]
    assert session.autosave(old) is None  # late: the newer labels stay on disk
    on_disk = CurationStore(slice_path).load(session.adata.obs_names)[KEY]
    assert on_disk.codes[2] == 2 and on_disk.codes[3] == 2 and on_disk.curated[[0, 1, 2, 3]].all()
    # the session's own later edits are still written, and reopen cleanly (no file set aside)
    session.assign(KEY, [4], 0)
    session.autosave()
    in_flight = session.autosave_snapshot()
    session.close()
    assert read_lock(session.store.lock_path) is None
    assert session.autosave(in_flight) is None and read_lock(session.store.lock_path) is None
    again = SliceSession.open(slice_path)
    assert again.kept_aside == [] and again.annotations[KEY].curated[4]
    assert again.annotations[KEY].equals(session.annotations[KEY])
    again.close()


def test_autosave_fingerprint_computed_once_per_set_of_cell_ids(slice_path, monkeypatch):
    import napari_stofm.io.autosave as autosave_module

    calls = []
    real = autosave_module.obs_fingerprint
    monkeypatch.setattr(autosave_module, "obs_fingerprint", lambda names: calls.append(1) or real(names))
    CurationStore(slice_path).save({KEY: Annotation.from_prediction(KEY, ["a", "b", "c"], np.arange(300) % 3,
                                                                   np.full(300, 0.5))},
                                   make_sample_slice(n_cells=300, seed=7).obs_names)
    calls.clear()
    session = SliceSession.open(slice_path)  # restores that autosave (its fingerprint checked)
    assert session.restored_from is not None
    _curate(session, [0], code=1)
    _curate(session, [1], code=2)
    assert len(calls) == 1  # opened and two autosaves, one fingerprint
    session.adata.obs_names = [f"other{i}" for i in range(session.adata.n_obs)]
    session.autosave()
    assert len(calls) == 2  # new cell ids: fingerprinted again
    meta = json.loads(bytes(np.load(session.autosave_path)["meta"]).decode())
    assert meta["obs_fingerprint"] == real(session.adata.obs_names)
    session.close()
