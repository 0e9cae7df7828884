"""Atomic export of curated labels to ``.h5ad``, CSV and SpatialData ``.zarr``.

Every writer builds the whole output in a temporary file (or folder) beside the target
and only then moves it into place, so an interrupted export never damages an existing
file. An existing target is replaced only with ``overwrite=True``, and then only when it is
what this package writes there: a file for ``.h5ad`` / CSV (never a folder), and for
SpatialData an empty folder or a store napari-stofm wrote (marked by
:data:`STORE_MARKER`, or for older exports by its table's ``uns['stofm']['package']``) that
holds nothing else; any other folder is refused (:class:`~napari_stofm.errors.ExportTargetNotOurs`).
A store swap interrupted between its two renames is put back from its backup by the next
export to that target; temporary files of killed exports (``.<name>.stofm-<host>-<pid>-*.tmp*``)
are deleted by the next export into that folder. Write failures raise
:class:`~napari_stofm.errors.ExportError` (:class:`~napari_stofm.errors.ExportPermissionError`
for a read-only folder) naming the target, its folder and the fix.

What is written for each annotation (see :class:`~napari_stofm.heads.annotation.Annotation`):
obs column ``<key>`` (Categorical with every class) and, for a prediction,
``<key>_confidence``, ``<key>_curated`` and ``<key>_predicted``; colours in
``uns['<key>_colors']``; and in
``uns['stofm']``: package version, export time, the provenance of each annotation (model,
weights fingerprint, parameters, timestamps) and the ids of the curated cells.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import (
    ExportError,
    ExportPermissionError,
    ExportTargetNotOurs,
    StofmInputError,
)
from napari_stofm.heads.annotation import Annotation, as_annotation_dict
from napari_stofm.io.autosave import (
    STALE_TEMP_SECONDS,
    host_tag,
    make_temp,
    pid_alive,
    release_temp,
    remove_stale_temps,
)
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report, staged
from napari_stofm.provenance import canonical, now_iso

log = logging.getLogger(__name__)

LABELS_ELEMENT = "cell_territories"
SHAPES_ELEMENT = "cell_circles"
TABLE_NAME = "table"


#: marker genes per class written with an export
MARKER_GENES = 10


class ExportTargetExists(StofmInputError, FileExistsError):
    """The export target exists and ``overwrite=True`` was not given."""


#: the progress stages of an export
STAGE_MARKERS = "Marker genes"
STAGE_WRITING = "Writing"


class _ExportPlan:
    """The stages of one export on one overall progress bar (nothing without ``progress``).

    Weights: markers (a Wilcoxon test per labelling) take about as long as writing the
    slice; both grow with cells x genes."""

    def __init__(self, progress, adata, annotations, markers: bool, target: Path):
        self.overall, self.owned = staged(progress)
        self.target = target
        if self.overall is None:
            return
        size = max(adata.n_obs * max(adata.n_vars, 1) / 1e6, 0.05)
        if markers and annotations:
            self.overall.add(STAGE_MARKERS, size * len(annotations))
        self.overall.add(STAGE_WRITING, size)

    def callback(self, name: str) -> Optional[ProgressCallback]:
        return None if self.overall is None else self.overall.stage(name)

    def begin_writing(self) -> None:
        if self.overall is not None:
            self.overall.begin(STAGE_WRITING, self.target.name)

    def finish(self, written: Path) -> None:
        if self.overall is not None and self.owned:
            self.overall.finish(f"exported to {written.name}")


# ----------------------------------------------------------------------------- content


def annotated_copy(adata, annotations=None, *, export_format: str = "", markers: bool = False,
                   progress: Optional[ProgressCallback] = None, cancel: CancelToken = None):
    """A copy of ``adata`` with the annotations written into obs / uns, plus export provenance.

    ``markers=True``: also the marker genes of each annotation's classes in
    ``uns['stofm_markers'][key]`` (see :func:`add_markers`; ``progress`` / ``cancel`` are
    theirs)."""
    annotations = as_annotation_dict(annotations)
    return _annotate(adata.copy(), annotations, export_format, markers, progress, cancel)


def _annotate(out, annotations: Dict[str, Annotation], export_format: str, markers: bool, progress, cancel):
    for ann in annotations.values():
        ann.to_obs(out)
    if markers:
        add_markers(out, annotations, progress=progress, cancel=cancel)
    stofm = dict(out.uns.get(keys.UNS, {}) or {})
    stofm.update(_export_provenance(out, annotations, export_format))
    out.uns[keys.UNS] = stofm
    return out


def _export_provenance(adata, annotations: Dict[str, Annotation], export_format: str) -> dict:
    from napari_stofm import __version__

    curated = {}
    for key, ann in annotations.items():
        curated[key] = [str(c) for c in adata.obs_names[ann.curated]]
    record = {
        "package": "napari-stofm",
        "package_version": __version__,
        "exported_at": now_iso(),
        "export_format": export_format,
        "annotations": sorted(annotations),
        "n_cells": int(adata.n_obs),
        "n_curated": {key: int(ann.curated.sum()) for key, ann in annotations.items()},
        "curated_cells": curated,
    }
    source = adata.uns.get(keys.SOURCE)
    if isinstance(source, Mapping) and "path" in source:
        record["source_path"] = str(source["path"])
    return canonical(record)


def add_markers(adata, annotations: Dict[str, Annotation], n_genes: int = MARKER_GENES, *,
                progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> Dict[str, object]:
    """Write the marker table of every annotation into ``adata.uns['stofm_markers'][key]``
    (reused when one for the same labels and expression is there already); returns the tables.

    Never raises over markers (only :class:`~napari_stofm.errors.Cancelled` when
    ``cancel`` says so): a labelling whose markers cannot be computed is warned about and
    left out."""
    return marker_tables(adata, annotations, n_genes, store=True, progress=progress, cancel=cancel)


def marker_tables(adata, annotations: Dict[str, Annotation], n_genes: int = MARKER_GENES, *,
                  store: bool = False, progress: Optional[ProgressCallback] = None,
                  cancel: CancelToken = None) -> Dict[str, object]:
    """The marker table of every annotation (``store=True``: also kept in ``adata.uns``);
    a labelling whose markers cannot be computed is warned about and left out. ``progress``
    counts the labellings done; ``cancel`` is checked before each."""
    from napari_stofm.heads.markers import markers as compute_markers

    tables = {}
    for i, (key, ann) in enumerate(annotations.items()):
        check_cancelled(cancel)
        report(progress, i, len(annotations), f"marker genes of {key}")
        try:
            tables[key] = compute_markers(adata, key, n_genes, annotation=ann, store=store)
        except Exception as err:  # noqa: BLE001 - markers are an extra of the export: warn, never fail it
            log.debug("markers of %s failed", key, exc_info=True)
            warnings.warn(f"marker genes of '{key}' were not exported ({type(err).__name__}: {err}); "
                          "the labels are exported without them.", UserWarning, stacklevel=3)
    report(progress, len(annotations), len(annotations), "marker genes")
    return tables


def markers_csv_path(path) -> Path:
    """``labels.csv`` -> ``labels.markers.csv`` (the marker table written beside a CSV export)."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.markers{path.suffix or '.csv'}")


def marker_csv_table(tables: Mapping[str, object]):
    """One table of every annotation's markers: ``key`` then the marker columns."""
    import pandas as pd

    from napari_stofm.heads.markers import COLUMNS

    parts = []
    for key, table in tables.items():
        part = table.loc[:, list(COLUMNS)].copy()
        part.insert(0, "key", key)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["key", *COLUMNS])
    return pd.concat(parts, ignore_index=True)


def write_table_csv(table, path, *, overwrite: bool = False, cancel: CancelToken = None) -> Path:
    """Write a DataFrame to a CSV atomically (an existing file only with ``overwrite``)."""
    target = _target(path, overwrite)
    return _atomic_file(target, lambda tmp: _write_csv(table, tmp), cancel=cancel)


def _check_sizes(adata, annotations: Dict[str, Annotation]) -> None:
    for key, ann in annotations.items():
        if ann.n_cells != adata.n_obs:
            raise StofmInputError(
                f"annotation '{key}' labels {ann.n_cells} cells but the slice has {adata.n_obs}; "
                "export it with the slice it was made for."
            )


def _xy(adata, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        raise StofmInputError(f"adata.obsm has no '{spatial_key}' (its keys: {list(adata.obsm.keys())}); "
                              "pass spatial_key=...")
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise StofmInputError(f"adata.obsm['{spatial_key}'] has shape {xy.shape}; expected (n_cells, 2).")
    return xy[:, :2]


# ----------------------------------------------------------------------------- atomic writes

#: written into every SpatialData store this package exports: only such a store (or an empty
#: folder) is ever replaced by ``overwrite=True``.
STORE_MARKER = ".napari-stofm-export.json"
_ZARR_META = {"zarr.json", ".zgroup", ".zattrs", ".zmetadata", ".zarray"}
#: the folders of a store this package writes, and the elements in them
_OUR_ELEMENTS = {"tables": {TABLE_NAME}, "shapes": {SHAPES_ELEMENT}, "labels": {LABELS_ELEMENT}}


def _dir_tag() -> str:
    """``stofm-<host>-<pid>-<random>``: names the temporary and backup folders of one export."""
    return f"stofm-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _target(path, overwrite: bool, kind: str = "file") -> Path:
    """Check an export target before any work: folder exists and is writable, an existing
    target is replaced only with ``overwrite`` and (for a folder) only when this package wrote it.

    Also tidies the folder: temporary files of killed exports are deleted and a SpatialData
    store left missing by an interrupted swap is put back from its backup.
    """
    path = Path(path).expanduser()
    folder = path.parent
    if not folder.is_dir():
        raise StofmInputError(f"cannot write {path}: the folder {folder} does not exist; create it first.")
    remove_stale_temps(folder)
    restored = _recover_interrupted_swap(path) if kind == "dir" else None
    if path.exists() or path.is_symlink():
        if not overwrite:
            note = f" ({restored})" if restored else ""
            raise ExportTargetExists(f"{path} already exists{note}; pass overwrite=True to replace it "
                                     "(the old one is kept until the new one is complete).")
        if kind == "file" and path.is_dir():
            raise StofmInputError(f"{path} is a folder; choose a file name for the export "
                                  "(a folder is never replaced by a file).")
        if kind == "dir":
            if not path.is_dir():
                raise StofmInputError(f"{path} is a file; a SpatialData store is a folder: "
                                      "choose another name (e.g. ending in .zarr).")
            reason = _not_replaceable(path)
            if reason:
                raise ExportTargetNotOurs(
                    f"{path} exists and is not a SpatialData store written by napari-stofm ({reason}), so it is not "
                    "replaced, even with overwrite=True: choose another name, or move or delete that folder yourself."
                )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _permission_error(path)
    return path


def check_export_target(path, *, overwrite: bool = False, fmt: Optional[str] = None) -> Path:
    """Raise now (a StofmError naming the problem and the fix) if an export to ``path`` would be
    refused: missing or read-only folder, an existing target without ``overwrite``, a folder
    where a file goes, or a folder this package did not write. Call it before long work (or
    before writing several outputs, so none is written when one would be refused).
    ``fmt``: 'h5ad', 'csv' or 'spatialdata' (default: from the suffix; '.zarr' = spatialdata)."""
    if fmt is None:
        fmt = "spatialdata" if str(path).rstrip("/").lower().endswith(".zarr") else "file"
    return _target(path, overwrite, kind="dir" if fmt == "spatialdata" else "file")


def _permission_error(path: Path) -> ExportPermissionError:
    return ExportPermissionError(
        f"cannot write {path}: permission denied in the folder {path.parent} (it is read-only for you). Export into "
        f"a folder you can write to (e.g. in your home folder), or ask for write access to {path.parent}."
    )


def _write_error(path: Path, err: OSError) -> ExportError:
    if isinstance(err, ExportError):
        return err
    if isinstance(err, PermissionError):
        return _permission_error(path)
    detail = err.strerror or str(err) or type(err).__name__
    return ExportError(
        f"could not write {path} ({detail}); an existing {path.name} was not changed. Check the free space and "
        f"permissions of {path.parent}, or export into another folder."
    )


def _atomic_file(path: Path, write: Callable[[Path], None], *, cancel: CancelToken = None) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it in
    (``cancel`` is checked before the replace: a cancelled export leaves ``path`` as it was).
    The file gets the mode of any new file of the user's (``0o666`` less the umask, see
    :func:`~napari_stofm.io.autosave.make_temp`)."""
    if path.is_dir():
        raise StofmInputError(f"{path} is a folder; choose a file name for the export.")
    try:
        fd, tmp = make_temp(path, ".tmp" + path.suffix)
        os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        write(tmp)
        check_cancelled(cancel)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from err
    except BaseException:
        _remove(tmp)
        raise
    finally:
        release_temp(tmp)
    return path


def _atomic_dir(path: Path, write: Callable[[Path], None], *, cancel: CancelToken = None) -> Path:
    """Write a folder at ``path.tmp-<tag>``, then swap it in (the old one kept until the swap;
    ``cancel`` is checked before it, so a cancelled export leaves ``path`` as it was).

    The swap is two renames (old -> ``path.bak-<tag>``, new -> ``path``); when the process is
    killed between them, the next export to ``path`` puts the backup back
    (:func:`_recover_interrupted_swap`).
    """
    tag = _dir_tag()
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    try:
        write(tmp)
        _write_marker(tmp)
        check_cancelled(cancel)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from err
    except BaseException:
        _remove(tmp)
        raise
    if not path.exists() and not path.is_symlink():
        try:
            os.rename(tmp, path)
        except OSError as err:
            _remove(tmp)
            raise _write_error(path, err) from err
        return path
    backup = path.with_name(f"{path.name}.bak-{tag}")
    try:
        os.rename(path, backup)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from err
    try:
        os.rename(tmp, path)
    except BaseException as err:
        os.rename(backup, path)
        _remove(tmp)
        if isinstance(err, OSError):
            raise _write_error(path, err) from err
        raise
    _remove(backup)
    return path


def _write_marker(store: Path) -> None:
    from napari_stofm import __version__

    record = {"package": "napari-stofm", "package_version": __version__, "written_at": now_iso(),
              "format": "spatialdata"}
    (store / STORE_MARKER).write_text(json.dumps(record), encoding="utf-8")


_NO_RECORD = "it has no record of being written by napari-stofm"


def _names(folder: Path, limit: int = 10_000) -> Optional[set]:
    """Entry names of a folder (None when it cannot be listed or has more than ``limit``)."""
    try:
        with os.scandir(folder) as it:
            names = set()
            for entry in it:
                names.add(entry.name)
                if len(names) > limit:
                    return None
            return names
    except OSError:
        return None


def _not_replaceable(store: Path) -> Optional[str]:
    """Why ``store`` must not be replaced (None: an empty folder, or a store this package wrote
    and nobody added to)."""
    top = _names(store)
    if top is None:
        return "its contents cannot be listed"
    if not top:
        return None
    if not (top & {"zarr.json", ".zgroup"}):
        return "it is not a zarr store"
    extra = sorted(top - _ZARR_META - {STORE_MARKER} - set(_OUR_ELEMENTS))
    if extra:
        return f"it holds {', '.join(map(repr, extra[:3]))}, which napari-stofm does not write"
    for group, ours in _OUR_ELEMENTS.items():
        if group in top:
            inner = _names(store / group)
            if inner is None:
                return f"its {group} cannot be listed"
            others = sorted(inner - _ZARR_META - ours)
            if others:
                return f"it holds {group} {', '.join(map(repr, others[:3]))}, which napari-stofm does not write"
    if _has_marker(store) or _table_says_ours(store):
        return None
    return _NO_RECORD


def _has_marker(store: Path) -> bool:
    try:
        with open(store / STORE_MARKER, "rb") as handle:
            record = json.loads(handle.read(64 * 1024).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("package") == "napari-stofm"


def _table_says_ours(store: Path) -> bool:
    """A store exported before the marker existed: its table's ``uns['stofm']['package']``."""
    try:
        import zarr

        node = zarr.open_group(str(store / "tables" / TABLE_NAME / "uns" / keys.UNS), mode="r")["package"]
        if getattr(node, "shape", None) != ():
            return False
        return str(node[()]) == "napari-stofm"
    except Exception:  # noqa: BLE001 - probing a store on disk: any failure to read the record means "not ours"
        log.debug("cannot read uns/stofm/package of %s", store, exc_info=True)
        return False


def _recover_interrupted_swap(path: Path) -> Optional[str]:
    """Tidy what an interrupted SpatialData export left beside ``path``.

    * temporary folders ``<name>.tmp-stofm-<host>-<pid>-<x>`` of dead writers are deleted;
    * when ``path`` is missing but a backup ``<name>.bak-...`` (the old store, moved aside
      for the swap) is there, the backup is renamed back to ``path``;
    * backups left after a completed swap are deleted when their writer is dead and they
      are stores this package wrote.

    Returns a note when ``path`` was restored (None otherwise).
    """
    folder, name = path.parent, path.name
    pattern = re.compile(re.escape(name) + r"\.(?P<what>tmp|bak)-"
                         r"(?:stofm-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}"
                         r"|(?P<legacy>[0-9a-f]{8}))$")
    found = []
    for entry in sorted(_names(folder, limit=100_000) or ()):
        match = pattern.match(entry)
        candidate = folder / entry
        if match and candidate.is_dir() and not candidate.is_symlink():
            found.append((match, candidate))
    now = time.time()

    def gone(match, candidate) -> bool:
        if match.group("legacy"):
            try:
                return now - candidate.stat().st_mtime > STALE_TEMP_SECONDS
            except OSError:
                return False
        host, pid = match.group("host"), int(match.group("pid"))
        if host == host_tag():
            return pid != os.getpid() and not pid_alive(pid)
        try:
            return now - candidate.stat().st_mtime > STALE_TEMP_SECONDS
        except OSError:
            return False

    restored = None
    backups = [(m, c) for m, c in found if m.group("what") == "bak"]
    if not path.exists() and not path.is_symlink() and backups:
        # any backup of ours is a former target: the newest one is the store the swap moved away
        def age(item):
            try:
                return item[1].stat().st_mtime
            except OSError:
                return 0.0
        live = [(m, c) for m, c in backups if m.group("legacy") or gone(m, c)]
        if live:
            match, backup = max(live, key=age)
            try:
                os.rename(backup, path)
                restored = f"restored from {backup.name}, the backup left by an interrupted export"
                warnings.warn(f"{path} was missing after an interrupted export; it was {restored}.",
                              UserWarning, stacklevel=4)
            except OSError:
                pass
    for match, candidate in found:
        if not candidate.exists() or not gone(match, candidate):
            continue
        reason = _not_replaceable(candidate)
        if match.group("what") == "bak":
            ok = reason is None  # only a store of ours is deleted
        elif match.group("legacy"):
            ok = reason in (None, _NO_RECORD)  # a half-written store: it must look like one of ours
        else:
            ok = True  # named by this package, with a writer that is gone
        if ok:
            _remove(candidate)
    return restored


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


# ----------------------------------------------------------------------------- h5ad / CSV


def export_h5ad(adata, annotations=None, path=None, *, overwrite: bool = False, markers: bool = True,
                progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> Path:
    """Write ``adata`` with the annotations (obs, colours, provenance) to an ``.h5ad`` file.

    ``markers``: also each annotation's marker genes in ``uns['stofm_markers'][key]``
    (computed unless ``adata`` holds them for the same labels; a failure only warns).
    ``progress`` / ``cancel``: see :mod:`napari_stofm.progress`; a cancelled export writes
    nothing."""
    if path is None:
        raise StofmInputError("export_h5ad needs a target path.")
    annotations = as_annotation_dict(annotations)
    _check_sizes(adata, annotations)
    target = _target(path, overwrite)
    if getattr(adata, "isbacked", False):
        return _export_backed_h5ad(adata, annotations, target, cancel)
    plan = _ExportPlan(progress, adata, annotations, markers, target)
    out = annotated_copy(adata, annotations, export_format="h5ad", markers=markers,
                         progress=plan.callback(STAGE_MARKERS), cancel=cancel)
    plan.begin_writing()
    written = _atomic_file(target, lambda tmp: _write_h5ad(out, tmp), cancel=cancel)
    plan.finish(written)
    return written


def _export_backed_h5ad(adata, annotations: Dict[str, Annotation], target: Path, cancel: CancelToken) -> Path:
    """A backed slice (expression matrix on disk): anndata copies the file, the matrix block
    by block, into the temporary file, which is then annotated and moved into place. Marker
    genes need the matrix in memory and are left out (``stofm markers`` computes them)."""
    def write(tmp: Path) -> None:
        out = adata.copy(filename=tmp)
        try:
            _annotate(out, annotations, "h5ad", False, None, cancel)
            out.write()
        finally:
            out.file.close()

    return _atomic_file(target, write, cancel=cancel)


def _write_h5ad(adata, tmp: Path) -> None:
    adata.write_h5ad(tmp)


def export_csv(adata, annotations=None, path=None, *, overwrite: bool = False, spatial_key: str = keys.SPATIAL,
               markers: bool = True, progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> Path:
    """One row per cell: cell_id, x, y, then per annotation <key> and, for a prediction,
    <key>_confidence, <key>_curated, <key>_predicted (unassigned cells have an empty class).

    ``markers``: also write the annotations' marker genes beside it (``labels.csv`` ->
    ``labels.markers.csv``: key, class, gene, score, logfoldchange, pval_adj, pct_in,
    pct_out); reused from ``adata.uns['stofm_markers']`` when there for the same labels.
    A failure there only warns; the labels CSV is written either way. The markers are
    computed before anything is written, so a cancelled export (``cancel``) writes nothing."""
    if path is None:
        raise StofmInputError("export_csv needs a target path.")
    annotations = as_annotation_dict(annotations)
    _check_sizes(adata, annotations)
    target = _target(path, overwrite)
    plan = _ExportPlan(progress, adata, annotations, markers, target)
    tables = marker_tables(adata, annotations, progress=plan.callback(STAGE_MARKERS), cancel=cancel) \
        if markers and annotations else {}
    table = csv_table(adata, annotations, spatial_key=spatial_key)
    plan.begin_writing()
    written = _atomic_file(target, lambda tmp: _write_csv(table, tmp), cancel=cancel)
    if tables:
        _export_markers_csv(tables, markers_csv_path(target), overwrite)
    plan.finish(written)
    return written


def _export_markers_csv(tables, path: Path, overwrite: bool) -> Optional[Path]:
    try:
        return write_table_csv(marker_csv_table(tables), path, overwrite=overwrite)
    except (StofmInputError, ExportError) as err:
        warnings.warn(f"the marker genes were not written to {path}: {err}", UserWarning, stacklevel=3)
        return None


def csv_table(adata, annotations, *, spatial_key: str = keys.SPATIAL):
    """The table :func:`export_csv` writes, as a pandas DataFrame."""
    import pandas as pd

    xy = _xy(adata, spatial_key)
    columns = {"cell_id": np.asarray(adata.obs_names, dtype=object), "x": xy[:, 0], "y": xy[:, 1]}
    for key, ann in as_annotation_dict(annotations).items():
        columns[key] = ann.names()
        if not ann.writes_companions(adata):  # labels the slice came with: the classes only
            continue
        columns[keys.confidence_key(key)] = ann.confidence
        columns[keys.curated_key(key)] = ann.curated
        predicted = np.array(ann.categories + [None], dtype=object)[ann.predicted_codes]
        columns[keys.predicted_key(key)] = predicted
    return pd.DataFrame(columns)


def _write_csv(table, tmp: Path) -> None:
    table.to_csv(tmp, index=False)


# ----------------------------------------------------------------------------- SpatialData


def export_spatialdata(adata, annotations=None, path=None, *, labels=None, overwrite: bool = False,
                       spatial_key: str = keys.SPATIAL, markers: bool = True,
                       progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> Path:
    """Write a SpatialData ``.zarr`` whose table annotates the cells' territories.

    ``labels``: the cell territory raster, as a :class:`napari_stofm.review.raster.Territories`, as
    ``(image, scale)`` / ``(image, scale, translate)``, or as a mapping with those keys.
    ``image`` is a 2-D integer array with 0 = background and value ``i + 1`` = cell ``i``;
    ``scale`` is the pixel size ``(dy, dx)`` (or one number) in slice units and
    ``translate`` the ``(y0, x0)`` centre of pixel (0, 0), as for a napari layer (default
    (0, 0)). The table then annotates that labels element ('cell_territories'); without a
    raster it annotates circles at the cell positions ('cell_circles'). In both, instance
    id ``i + 1`` is cell ``i``.
    """
    if path is None:
        raise StofmInputError("export_spatialdata needs a target path.")
    try:
        import spatialdata  # noqa: F401
    except ImportError as err:
        raise StofmInputError(
            "SpatialData export needs the 'spatialdata' package: pip install 'napari-stofm[spatialdata]'."
        ) from err
    annotations = as_annotation_dict(annotations)
    _check_sizes(adata, annotations)
    target = _target(path, overwrite, kind="dir")
    plan = _ExportPlan(progress, adata, annotations, markers, target)
    sdata = build_spatialdata(adata, annotations, labels=labels, spatial_key=spatial_key, markers=markers,
                              progress=plan.callback(STAGE_MARKERS), cancel=cancel)
    plan.begin_writing()
    written = _atomic_dir(target, lambda tmp: _write_spatialdata(sdata, tmp), cancel=cancel)
    plan.finish(written)
    return written


def _write_spatialdata(sdata, tmp: Path) -> None:
    sdata.write(tmp)


def build_spatialdata(adata, annotations=None, *, labels=None, spatial_key: str = keys.SPATIAL,
                      markers: bool = False, progress: Optional[ProgressCallback] = None, cancel: CancelToken = None):
    """The in-memory :class:`spatialdata.SpatialData` that :func:`export_spatialdata` writes
    (``markers``: with ``uns['stofm_markers']`` in its table)."""
    import spatialdata as sd
    from spatialdata.models import TableModel

    table = annotated_copy(adata, annotations, export_format="spatialdata", markers=markers, progress=progress,
                           cancel=cancel)
    table = _drop_old_links(table)
    region_key = _free_column(table.obs, "region", "stofm_region_element")
    instance_key = _free_column(table.obs, "instance_id", "stofm_instance_id")
    ids = np.arange(1, table.n_obs + 1, dtype=np.int64)
    elements = {}
    if labels is not None:
        region = LABELS_ELEMENT
        elements["labels"] = {region: _labels_element(labels, table.n_obs)}
    else:
        region = SHAPES_ELEMENT
        elements["shapes"] = {region: _circles_element(_xy(table, spatial_key), ids)}
    import pandas as pd

    table.obs[region_key] = pd.Categorical([region] * table.n_obs)
    table.obs[instance_key] = ids
    table = TableModel.parse(table, region=region, region_key=region_key, instance_key=instance_key,
                             overwrite_metadata=True)
    return sd.SpatialData(**elements, tables={TABLE_NAME: table})


def _drop_old_links(table):
    """Forget links to elements of the store the slice was read from (they are not exported)."""
    attrs = table.uns.pop("spatialdata_attrs", None)
    if isinstance(attrs, Mapping):
        old_region_key = attrs.get("region_key")
        if old_region_key in table.obs:
            del table.obs[old_region_key]
    return table


def _free_column(obs, preferred: str, fallback: str) -> str:
    if preferred not in obs:
        return preferred
    name, i = fallback, 1
    while name in obs:
        i += 1
        name = f"{fallback}_{i}"
    return name


def _circles_element(xy: np.ndarray, ids: np.ndarray):
    from scipy.spatial import cKDTree
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    radius = 1.0
    if len(xy) > 1:
        dist, _ = cKDTree(xy).query(xy, k=2)
        spacing = np.median(dist[:, 1])
        radius = float(spacing / 2) if spacing > 0 else 1.0
    return ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), radius), index=ids,
                             transformations={"global": Identity()})


def _unpack_labels(labels):
    """(image, scale (dy, dx), translate (y0, x0)) from the accepted ``labels=`` forms."""
    if isinstance(labels, Mapping):
        image = labels.get("instance_map", labels.get("image"))
        return image, labels.get("scale", 1.0), labels.get("translate", (0.0, 0.0))
    if isinstance(labels, (tuple, list)):
        if len(labels) not in (2, 3):
            raise StofmInputError("labels must be (image, scale) or (image, scale, translate).")
        return labels[0], labels[1], (labels[2] if len(labels) == 3 else (0.0, 0.0))
    if isinstance(labels, np.ndarray):
        return labels, 1.0, (0.0, 0.0)
    if hasattr(labels, "instance_map"):  # raster.Territories
        return labels.instance_map, labels.scale, getattr(labels, "translate", (0.0, 0.0))
    raise StofmInputError(
        f"labels must be a raster.Territories, (image, scale[, translate]) or a mapping; got {type(labels).__name__}."
    )


def _pair(value, what: str):
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,))
    if not np.isfinite(arr).all():
        raise StofmInputError(f"the labels raster {what} must be finite numbers; got {value!r}.")
    return float(arr[0]), float(arr[1])


def _labels_element(labels, n_cells: int):
    """A Labels2DModel element placed like the napari layer (pixel centres at translate + index * scale)."""
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    image, scale, translate = _unpack_labels(labels)
    image = np.asarray(image)
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.integer):
        raise StofmInputError(
            "the labels raster must be a 2-D integer image (0 = background, i + 1 = cell i); "
            f"got {image.dtype} {image.shape}."
        )
    if image.size and (image.min() < 0 or image.max() > n_cells):
        raise StofmInputError(
            f"the labels raster has values {image.min()}..{image.max()} but the slice has {n_cells} cells "
            f"(values must be 0..{n_cells})."
        )
    (sy, sx), (ty, tx) = _pair(scale, "scale"), _pair(translate, "translate")
    if sy <= 0 or sx <= 0:
        raise StofmInputError(f"the labels raster scale must be positive; got {scale!r}.")
    # spatialdata puts the centre of pixel i at i + 0.5; napari (and raster.py) at i.
    corner = Translation([ty - 0.5 * sy, tx - 0.5 * sx], axes=("y", "x"))
    transform = Sequence([Scale([sy, sx], axes=("y", "x")), corner])
    return Labels2DModel.parse(image.astype(np.int32, copy=False), dims=("y", "x"),
                               transformations={"global": transform})
