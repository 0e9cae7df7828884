"""Bad input and hostile filesystems for reading and exporting slices (generated data only).

Overwrite never deletes a folder napari-stofm did not write; an interrupted store swap is
recovered; stale temporary files are cleaned; obs label columns are parsed the same way by
the session and the CLI (strings, blanks, out-of-range confidences); write failures are
StofmErrors naming the target and the fix.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stofm.errors import (
    ExportError,
    ExportPermissionError,
    ExportTargetNotOurs,
    StofmError,
    StofmInputError,
)
from napari_stofm.heads.annotation import Annotation
from napari_stofm.io import export as export_module
from napari_stofm.io.export import export_csv, export_h5ad, export_spatialdata
from napari_stofm.io.sample import make_sample_slice

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def labelled():
    adata = make_sample_slice(n_cells=120, seed=5)
    cats = list(adata.obs["region"].cat.categories)
    ann = Annotation.from_prediction("stofm_region", cats, adata.obs["region"].cat.codes.to_numpy(),
                                     np.linspace(0, 1, adata.n_obs))
    ann.assign([0, 1, 2], 1)
    return adata, {"stofm_region": ann}


def _snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _run(code: str, *args, timeout=120, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode not in (0, -9):
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 1: overwrite


def test_overwrite_never_replaces_a_folder_it_did_not_write(tmp_path, labelled):
    adata, anns = labelled
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "intro.tex").write_text("years of work")
    (thesis / "main.tex").write_text("\\documentclass{book}")
    before = _snapshot(thesis)
    with pytest.raises(ExportTargetNotOurs, match="not a SpatialData store written by napari-stofm.*move or delete"):
        export_spatialdata(adata, anns, thesis, overwrite=True)
    assert _snapshot(thesis) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temp, no backup

    # a SpatialData store written by someone else is not ours either
    import spatialdata as sd
    from spatialdata.models import TableModel

    foreign = tmp_path / "raw.zarr"
    sd.SpatialData(tables={"table": TableModel.parse(adata.copy())}).write(foreign)
    before = _snapshot(foreign)
    with pytest.raises(ExportTargetNotOurs, match="no record of being written by napari-stofm"):
        export_spatialdata(adata, anns, foreign, overwrite=True)
    assert _snapshot(foreign) == before

    # our own store is replaced; once someone adds their own element to it, it is not
    ours = tmp_path / "ours.zarr"
    export_spatialdata(adata, anns, ours)
    assert (ours / export_module.STORE_MARKER).is_file()
    export_spatialdata(adata, anns, ours, overwrite=True)
    (ours / "images").mkdir()
    (ours / "images" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(ExportTargetNotOurs, match="images"):
        export_spatialdata(adata, anns, ours, overwrite=True)
    assert (ours / "images" / "zarr.json").exists()

    # a store exported before the marker existed is recognised by its table's provenance
    legacy = tmp_path / "legacy.zarr"
    export_spatialdata(adata, anns, legacy)
    (legacy / export_module.STORE_MARKER).unlink()
    export_spatialdata(adata, anns, legacy, overwrite=True)
    # an empty folder holds nothing to lose
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    export_spatialdata(adata, anns, empty, overwrite=True)
    assert (empty / export_module.STORE_MARKER).is_file()


def test_file_exports_never_replace_a_folder(tmp_path, labelled):
    adata, anns = labelled
    for name, writer in (("out.h5ad", export_h5ad), ("out.csv", export_csv)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "keep.txt").write_text("x")
        with pytest.raises(StofmInputError, match="is a folder"):
            writer(adata, anns, folder, overwrite=True)
        assert (folder / "keep.txt").read_text() == "x"


def test_cli_export_overwrite_refuses_foreign_folder(tmp_path, labelled, capsys):
    from napari_stofm.cli.app import main

    adata, anns = labelled
    source = tmp_path / "curated.h5ad"
    export_h5ad(adata, anns, source)
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    (mydir / "results.xlsx").write_bytes(b"precious")
    rc = main(["export", str(source), "--zarr", str(mydir), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "not a SpatialData store written by napari-stofm" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (mydir / "results.xlsx").read_bytes() == b"precious"


def test_killed_swap_is_recovered_from_its_backup(tmp_path, labelled):
    adata, anns = labelled
    source = tmp_path / "curated.h5ad"
    export_h5ad(adata, anns, source)
    target = tmp_path / "labels.zarr"
    export_spatialdata(adata, anns, target)
    before = _snapshot(target)
    # a real process killed (SIGKILL-like os._exit) between the two renames of the swap
    proc = _run("""
        import os, sys, warnings
        warnings.filterwarnings("ignore")
        import anndata as ad
        from napari_stofm.heads.annotation import Annotation
        from napari_stofm.io.export import export_spatialdata
        adata = ad.read_h5ad(sys.argv[1])
        ann = Annotation.from_obs(adata, "stofm_region")
        ann.assign([5, 6, 7], 0)
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if ".bak-" in str(dst):
                os._exit(9)  # killed: old store moved aside, new one not yet in place
        os.rename = rename
        export_spatialdata(adata, {"stofm_region": ann}, sys.argv[2], overwrite=True)
    """, source, target, check=False)
    assert proc.returncode == 9, proc.stderr
    assert not target.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(".bak-stofm-" in n for n in left) and any(".tmp-stofm-" in n for n in left)

    from napari_stofm.io.slices import read_slice

    with pytest.raises(StofmInputError, match="previous version.*interrupted"):
        read_slice(target)
    # the next run puts the old store back (and refuses to replace it without overwrite)
    with pytest.warns(UserWarning, match="interrupted export"), \
            pytest.raises(StofmInputError, match="restored from .*bak-"):
        export_spatialdata(adata, anns, target)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated.h5ad", "labels.zarr"]
    assert read_slice(target).n_obs == adata.n_obs


def test_legacy_backup_is_recovered(tmp_path, labelled):
    adata, anns = labelled
    target = tmp_path / "labels.zarr"
    export_spatialdata(adata, anns, target)
    before = _snapshot(target)
    os.rename(target, tmp_path / "labels.zarr.bak-0123abcd")  # as the previous version named it
    with pytest.warns(UserWarning, match="interrupted export"):
        export_spatialdata(adata, anns, target, overwrite=True)
    assert _snapshot(target) != before  # restored, then replaced as asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr"]


# ----------------------------------------------------------------------------- 6: read-only folders


def test_export_into_read_only_folder_names_the_folder(tmp_path, labelled, monkeypatch):
    adata, anns = labelled
    folder = tmp_path / "share"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(folder) else real_access(p, mode))
    for name, writer in (("a.h5ad", export_h5ad), ("a.csv", export_csv), ("a.zarr", export_spatialdata)):
        with pytest.raises(ExportPermissionError) as info:
            writer(adata, anns, folder / name)
        message = str(info.value)
        assert f"{folder / name}" in message and "write access" in message and ".tmp" not in message
        assert isinstance(info.value, StofmError) and isinstance(info.value, PermissionError)
    monkeypatch.undo()
    assert list(folder.iterdir()) == []

    # the folder looks writable but the file system says no (root squash, ACLs, read-only mount)
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder / ".a.h5ad.stofm-xyz.tmp.h5ad"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(ExportPermissionError, match="permission denied in the folder") as info:
        export_h5ad(adata, anns, folder / "a.h5ad")
    assert ".stofm-xyz" not in str(info.value)
    monkeypatch.undo()

    def disk_full(obj, tmp):
        Path(tmp).mkdir()
        (Path(tmp) / "zarr.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_write_spatialdata", disk_full)
    with pytest.raises(ExportError, match="No space left on device.*another folder"):
        export_spatialdata(adata, anns, folder / "a.zarr")
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_export_into_really_read_only_folder(tmp_path, labelled):
    adata, anns = labelled
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ExportPermissionError, match=str(folder)):
            export_h5ad(adata, anns, folder / "x.h5ad")
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- 9: stale temporary files


def test_killed_h5ad_export_leaves_no_lasting_debris(tmp_path, labelled):
    from napari_stofm.io.autosave import STALE_TEMP_SECONDS, host_tag

    adata, anns = labelled
    source = tmp_path / "curated.h5ad"
    export_h5ad(adata, anns, source)
    proc = _run("""
        import os, signal, sys, warnings
        warnings.filterwarnings("ignore")
        import anndata as ad
        from napari_stofm.io import export
        adata = ad.read_h5ad(sys.argv[1])
        def killed(obj, tmp):
            print(os.getpid(), flush=True)
            open(tmp, "wb").write(b"half an h5ad")
            os.kill(os.getpid(), signal.SIGKILL)
        export._write_h5ad = killed
        export.export_h5ad(adata, None, sys.argv[2])
    """, source, tmp_path / "out.h5ad", check=False)
    assert proc.returncode == -9
    debris = [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5ad.")]
    assert len(debris) == 1 and f"stofm-{host_tag()}-{proc.stdout.split()[0]}-" in debris[0].name

    # other hidden files: a live writer's temp, a young and an old one of the old naming, the user's
    live = tmp_path / f".other.h5ad.stofm-{host_tag()}-{os.getppid()}-abcdefgh.tmp.h5ad"
    young_legacy = tmp_path / ".young.h5ad.k3j4h5g6.tmp.h5ad"
    old_legacy = tmp_path / ".old.csv.k3j4h5g6.tmp.csv"
    mine = tmp_path / ".my-notes.tmp"
    for p in (live, young_legacy, old_legacy, mine):
        p.write_bytes(b"x")
    past = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(old_legacy, (past, past))
    os.utime(mine, (past, past))
    dead = tmp_path / f".gone.csv.stofm-{host_tag()}-{_dead_pid()}-zzzzzzzz.tmp.csv"
    dead.write_bytes(b"x")

    export_csv(adata, anns, tmp_path / "next.csv")  # the next export to the folder tidies it
    left = sorted(p.name for p in tmp_path.iterdir())
    # the CSV export also writes its marker table beside it (next.markers.csv)
    assert left == sorted(["curated.h5ad", "next.csv", "next.markers.csv", live.name, young_legacy.name, mine.name])


# ----------------------------------------------------------------------------- 4, 5, 10: obs columns


def _obs_slice(n=60, seed=2):
    adata = make_sample_slice(n_cells=n, seed=seed)
    adata.obs["stofm_region"] = adata.obs["region"].astype(str)
    return adata


def test_confidence_outside_unit_interval_is_clipped(tmp_path):
    adata = _obs_slice()
    conf = np.linspace(0, 1, adata.n_obs)
    conf[:4] = [1.5, -0.25, np.inf, np.nan]
    adata.obs["stofm_region_confidence"] = conf
    with pytest.warns(UserWarning, match=r"obs\['stofm_region_confidence'\]: 2 confidences outside \[0, 1\] "
                                         r"were clipped.*1 infinite"):
        ann = Annotation.from_obs(adata, "stofm_region")
    assert ann.confidence[0] == 1.0 and ann.confidence[1] == 0.0
    assert np.isnan(ann.confidence[2]) and np.isnan(ann.confidence[3])
    finite = ann.confidence[np.isfinite(ann.confidence)]
    assert finite.min() >= 0 and finite.max() <= 1
    out = export_h5ad(adata, {"stofm_region": ann}, tmp_path / "x.h5ad")
    exported = ad.read_h5ad(out).obs["stofm_region_confidence"].to_numpy()
    assert np.nanmax(exported) <= 1 and np.nanmin(exported) >= 0

    adata.obs["stofm_region_confidence"] = ["high"] + ["0.5"] * (adata.n_obs - 1)
    with pytest.raises(StofmInputError,
                       match=r"obs\['stofm_region_confidence'\] holds values that are not numbers \('high'\)"):
        Annotation.from_obs(adata, "stofm_region")


def test_string_curated_and_confidence_columns_open(tmp_path):
    from napari_stofm.review.session import SliceSession

    adata = _obs_slice()
    n = adata.n_obs
    curated = np.arange(n) % 3 == 0
    adata.obs["stofm_region_curated"] = np.where(curated, "True", "False")
    adata.obs["stofm_region_confidence"] = [f"{v:.3f}" for v in np.linspace(0, 1, n)]
    adata.obs.loc[adata.obs_names[5], "stofm_region_confidence"] = ""
    path = tmp_path / "strings.h5ad"
    adata.write_h5ad(path)  # strings become categoricals in the file
    session = SliceSession.open(path, autosave_dir=tmp_path / "autosave")
    ann = session.annotations["stofm_region"]
    np.testing.assert_array_equal(ann.curated, curated)
    np.testing.assert_allclose(np.delete(ann.confidence, 5), np.delete(np.round(np.linspace(0, 1, n), 3), 5), atol=1e-6)
    assert np.isnan(ann.confidence[5])
    session.close()

    for values, ok in ((["yes", "no"], True), ([1, 0], True), ([1.0, np.nan], True), (["TRUE", "false"], True),
                       (["maybe", "no"], False), ([2, 0], False)):
        adata.obs["stofm_region_curated"] = pd.Series((values * n)[:n], index=adata.obs_names, dtype=object)
        if ok:
            Annotation.from_obs(adata, "stofm_region")
        else:
            with pytest.raises(StofmInputError, match=r"obs\['stofm_region_curated'\] must hold True/False"):
                Annotation.from_obs(adata, "stofm_region")

    # the session skips such a column, saying why (the CLI refuses it with the same message)
    adata.obs["stofm_region_curated"] = ["maybe"] * n
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.warns(UserWarning, match="stofm_region_curated"):
        session = SliceSession.open(path, autosave_dir=tmp_path / "autosave")
    assert "stofm_region" not in session.annotations
    assert "must hold True/False" in session.skipped_columns["stofm_region"]
    session.close()


def test_cli_reports_bad_curated_column_in_one_line(tmp_path, capsys):
    from napari_stofm.cli.app import main

    adata = _obs_slice()
    adata.obs["stofm_region_curated"] = (["maybe"] * adata.n_obs)
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    rc = main(["export", str(path), "--csv", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and "obs['stofm_region_curated']" in err and "Traceback" not in err


def test_blank_labels_are_unlabelled_in_session_and_cli(tmp_path, capsys):
    from napari_stofm.cli.app import main
    from napari_stofm.review.session import SliceSession

    adata = _obs_slice()
    labels = adata.obs["region"].astype(str).to_numpy().copy()
    labels[:5] = ""
    labels[5] = "   "
    adata.obs["stofm_region"] = labels
    adata.obs["stofm_region_predicted"] = labels
    path = tmp_path / "blank.h5ad"
    adata.write_h5ad(path)

    ann = Annotation.from_obs(ad.read_h5ad(path), "stofm_region")
    assert "" not in ann.categories and all(c.strip() for c in ann.categories)
    assert (ann.codes[:6] == -1).all() and (ann.predicted_codes[:6] == -1).all() and (ann.codes[6:] >= 0).all()

    session = SliceSession.open(path, autosave_dir=tmp_path / "autosave")
    assert session.annotations["stofm_region"].equals(ann)  # shown, not dropped
    session.close()

    rc = main(["export", str(path), "--csv", str(tmp_path / "x.csv")])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "x.csv", keep_default_na=False, na_values=[""])
    assert table["stofm_region"][:6].isna().all() and table["stofm_region"][6:].notna().all()


def test_colours_that_do_not_fit_fall_back_to_defaults():
    adata = _obs_slice()
    adata.obs["stofm_region"] = adata.obs["stofm_region"].astype("category")
    n = len(adata.obs["stofm_region"].cat.categories)
    adata.uns["stofm_region_colors"] = ["not a colour"] * n
    with pytest.warns(UserWarning, match="default colours"):
        ann = Annotation.from_obs(adata, "stofm_region")
    assert len(ann.colors) == n and all(c.startswith("#") for c in ann.colors)
    adata.uns["stofm"] = {"provenance": "garbage"}
    del adata.uns["stofm_region_colors"]
    assert Annotation.from_obs(adata, "stofm_region").provenance == {}


# ----------------------------------------------------------------------------- sizes read from files


def test_declared_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    from napari_stofm.io import slices

    adata = make_sample_slice(n_cells=50, seed=1)
    path = tmp_path / "s.h5ad"
    adata.write_h5ad(path)
    assert slices.read_slice(path).n_obs == 50
    monkeypatch.setattr(slices, "_memory_bytes", lambda: 1000)
    with pytest.raises(StofmInputError, match="declares .* GiB of arrays .* more than the memory"):
        slices.read_slice(path)
    monkeypatch.undo()

    # a store whose table declares an absurd array is refused before spatialdata allocates it
    store = tmp_path / "s.zarr"
    ann = Annotation.from_prediction("stofm_region", ["a", "b"], np.zeros(50, np.int32))
    export_spatialdata(adata, {"stofm_region": ann}, store)
    meta_path = store / "tables" / "table" / "obsm" / "spatial" / "zarr.json"
    import json

    meta = json.loads(meta_path.read_text())
    meta["shape"] = [2**40, 2]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StofmInputError, match="declares .* GiB of arrays"):
        slices.read_slice(store)
    meta["shape"] = [-1, 2]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StofmInputError, match="declares the array shape"):
        slices.read_slice(store)


def test_session_export_refuses_before_building_anything(tmp_path, sample_file, monkeypatch):
    from napari_stofm.io.export import check_export_target
    from napari_stofm.review.session import SliceSession

    session = SliceSession.open(sample_file, autosave_dir=tmp_path / "autosave")
    assert session.annotations  # the sample slice carries region / cell type labels
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "notes.md").write_text("keep")
    monkeypatch.setattr(SliceSession, "territories", property(lambda self: pytest.fail("built territories")))
    with pytest.raises(ExportTargetNotOurs):
        session.export(thesis, fmt="spatialdata", overwrite=True)
    with pytest.raises(ExportTargetNotOurs):
        check_export_target(thesis, overwrite=True, fmt="spatialdata")
    assert check_export_target(tmp_path / "new.zarr") == tmp_path / "new.zarr"
    assert (thesis / "notes.md").read_text() == "keep"
    session.close()
