"""One slice of a cohort: the work a worker process (or this process) does for it.

Every function here runs wherever the slice runs and takes only picklable arguments. The
per-slice work is the single-slice pipeline itself: :func:`~napari_stofm.pipeline.embed.embed`
for ``stofm embed``, :func:`~napari_stofm.pipeline.predict.run_annotations` followed by
:meth:`RunResult.write` (that is, :func:`~napari_stofm.pipeline.predict.predict`) for
``stofm predict``, and :func:`~napari_stofm.io.export.export_h5ad` (temporary file +
``os.replace``) to write ``OUTDIR/<slice name>.h5ad``.

"Complete": an output is complete for a run when its ``uns['stofm']['cohort']['key']`` is
that run's key, a hash of the weights fingerprint, the settings and the input file's content
(and, for joint regions, ``joint_key``: the same for the whole cohort and the joint
settings). Outputs are only ever moved into place whole, so a file with the right key is a
finished one, and a rerun skips it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmError, StofmInputError

#: bump when what a cohort output holds changes: older outputs are then redone
COHORT_FORMAT = 1

EMBED = "embed"
PREDICT = "predict"

#: SliceResult.status values
WRITTEN, SKIPPED, FAILED, TODO, COMPLETE = "written", "skipped", "failed", "todo", "complete"


@dataclass
class SliceTask:
    """What to do with one slice (sent to the worker that runs it)."""

    name: str
    input: str
    output: str
    kind: str  # EMBED or PREDICT
    weights: str  # the model's fingerprint
    settings: dict  # keywords of embed() / run_annotations() (device included)
    overwrite: bool = False
    reference: Optional[str] = None  # how the provenance names the reference (its path)
    reference_fingerprint: Optional[str] = None
    joint: Optional[dict] = None  # joint-regions settings (n_regions, sample, seed), None without
    key: str = ""  # this run's key for the slice (set once its input is fingerprinted)
    joint_key: str = ""  # joint regions: the cohort's key for the slice

    @property
    def spatial_key(self) -> str:
        return self.settings.get("spatial_key") or keys.SPATIAL


@dataclass
class SliceResult:
    """What happened to one slice; :class:`~napari_stofm.cohort.runner.CohortReport` lists them."""

    name: str
    input: str
    output: str
    status: str = TODO  # written, skipped (complete already) or failed
    n_cells: int = 0
    seconds: float = 0.0  # time spent on this slice (reading, model, writing)
    error: str = ""
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)  # labelling -> class -> cells
    key: str = ""  # this run's key for the slice
    stored_key: str = ""  # the key of the output already there ('' when none)
    stored_joint_key: str = ""
    worker: str = ""
    sample: object = None  # joint regions: the RegionSample this slice gives the joint fit

    @property
    def ok(self) -> bool:
        return self.status in (WRITTEN, SKIPPED, COMPLETE)

    @property
    def cells_per_second(self) -> float:
        return self.n_cells / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- keys


def input_fingerprint(path) -> str:
    """A content hash of a slice file (or of every file of a ``.zarr`` folder)."""
    from napari_stofm.model.checkpoint import fingerprint_files

    p = Path(path)
    if p.is_dir():
        return fingerprint_files(sorted(f for f in p.rglob("*") if f.is_file()))
    return fingerprint_files([p])


def adata_fingerprint(adata, label_key: Optional[str] = None, spatial_key: str = keys.SPATIAL) -> str:
    """A content hash of an in-memory slice: expression, positions and (if given) a label column."""
    from napari_stofm.genes.expression import expression_fingerprint

    h = hashlib.sha256(expression_fingerprint(adata).encode())
    if spatial_key in adata.obsm:
        h.update(np.ascontiguousarray(np.asarray(adata.obsm[spatial_key], dtype=np.float64)).tobytes())
    if label_key is not None and label_key in adata.obs:
        h.update("\0".join(map(str, adata.obs[label_key].astype(object).tolist())).encode())
    return h.hexdigest()[:16]


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:20]


def settings_record(task: SliceTask) -> dict:
    """The settings that decide an output's content (the device does not)."""
    settings = {k: v for k, v in task.settings.items() if k != "device"}
    record = {"kind": task.kind, "settings": settings}
    if task.reference_fingerprint is not None:
        record["reference"] = task.reference_fingerprint
    if task.joint is not None:
        record["joint"] = "per cohort"  # the joint settings are in the joint key
    return record


def slice_key(task: SliceTask, input_fp: str) -> str:
    """This run's key for one slice: weights, settings and input."""
    return _digest({"format": COHORT_FORMAT, "weights": task.weights, "input": input_fp, **settings_record(task)})


def joint_key(slice_key_: str, joint: dict, cohort_keys) -> str:
    """The joint-regions key of one slice: its own key, the joint settings and every slice of the cohort."""
    return _digest({"slice": slice_key_, "joint": joint, "cohort": sorted(cohort_keys)})


def read_record(path) -> dict:
    """``uns['stofm']['cohort']`` of an output ``.h5ad`` (read alone, without the data); {} if none."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f.get(f"uns/{keys.UNS}/{keys.COHORT}")
            if group is None:
                return {}
            out = {}
            for name, item in group.items():
                if isinstance(item, h5py.Dataset):
                    value = item[()]
                    out[name] = value.decode() if isinstance(value, bytes) else (
                        value.item() if hasattr(value, "item") else value)
            return out
    except (OSError, KeyError, ValueError):
        return {}


def _output_counts(path) -> Dict[str, Dict[str, int]]:
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    try:
        return label_counts(adata.obs)
    finally:
        adata.file.close()


def label_counts(obs) -> Dict[str, Dict[str, int]]:
    """Cells per class of every predicted labelling in ``obs`` (every class, empty ones too)."""
    import pandas as pd

    out = {}
    for key in keys.PREDICTED_KEYS:
        if key in obs:
            column = obs[key]
            if not isinstance(column.dtype, pd.CategoricalDtype):
                column = column.astype("category")
            counts = column.value_counts(sort=False)
            out[key] = {str(c): int(counts[c]) for c in column.cat.categories}
    return out


# ----------------------------------------------------------------------------- check


def check_slice(task: SliceTask) -> SliceResult:
    """Fingerprint the input and look at the output already there (cheap: no model)."""
    t0 = time.perf_counter()
    result = SliceResult(task.name, task.input, task.output, worker=_where())
    inp = Path(task.input)
    if not inp.exists():
        return _failed(result, f"{task.input} does not exist: check the path (and the working directory)", t0)
    result.key = slice_key(task, input_fingerprint(inp))
    out = Path(task.output)
    if out.is_dir():
        return _failed(result, f"{out} is a folder; move it away (the output of this slice goes there)", t0)
    if out.exists():
        record = read_record(out)
        result.stored_key = str(record.get("key", ""))
        result.stored_joint_key = str(record.get("joint_key", ""))
        result.n_cells = int(record.get("n_cells", 0) or 0)
        if result.stored_key == result.key:
            result.status = COMPLETE
            if task.kind == PREDICT:
                result.counts = _output_counts(out)
        elif not task.overwrite:
            made = "with other weights, settings or input" if record else "by something else than a cohort run"
            return _failed(result, f"{out} exists, made {made}: pass --overwrite (overwrite=True) to replace it, "
                                   "or write to another folder", t0)
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- work


def run_slice(task: SliceTask, model, reference=None) -> SliceResult:
    """Embed (``stofm embed``) or predict (``stofm predict``) one slice and write its output.

    Errors about the slice itself (:class:`~napari_stofm.errors.StofmError`: unreadable file,
    no positions, too few genes, ...) come back as a failed result; anything else is raised,
    so that the scheduler can retry the slice.
    """
    t0 = time.perf_counter()
    result = SliceResult(task.name, task.input, task.output, key=task.key, worker=_where())
    try:
        from napari_stofm.io.slices import read_slice

        adata = read_slice(task.input, spatial_key=task.spatial_key)
        result.n_cells = int(adata.n_obs)
        if task.kind == EMBED:
            from napari_stofm.pipeline.embed import embed

            embed(adata, model, **task.settings)
        else:
            _predict(adata, model, task, reference)
            result.counts = label_counts(adata.obs)
        if task.joint is not None:
            from napari_stofm.cohort.joint import region_sample

            result.sample = region_sample(adata, task.joint, task.name, task.spatial_key)
        _write(adata, task, extra={"joint_key": ""} if task.joint is not None else None)
    except StofmError as err:
        return _failed(result, str(err), t0)
    result.status = WRITTEN
    result.seconds = time.perf_counter() - t0
    return result


def _predict(adata, model, task: SliceTask, reference) -> None:
    """What ``stofm predict`` runs on one slice (:func:`~napari_stofm.pipeline.predict.predict`:
    run_annotations + write), the reference given already embedded."""
    from napari_stofm.pipeline.predict import run_annotations

    settings = dict(task.settings)
    if task.joint is not None:
        settings["regions"] = False  # the regions come from the joint fit
    result = run_annotations(adata, model, reference=reference, **settings)
    if task.reference is not None:  # name the reference by its path, as the single-slice run does
        result.prediction["reference"] = task.reference
        for ann in result.annotations.values():
            if ann.provenance.get("label_source") == "reference":
                ann.provenance["reference"] = task.reference
    result.write(adata)


def sample_slice(task: SliceTask) -> SliceResult:
    """Joint regions: the cells a complete output gives the joint fit (read from the output)."""
    import anndata as ad

    from napari_stofm.cohort.joint import region_sample

    t0 = time.perf_counter()
    result = SliceResult(task.name, task.input, task.output, key=task.key, status=SKIPPED, worker=_where())
    try:
        adata = ad.read_h5ad(task.output)
        result.n_cells = int(adata.n_obs)
        result.counts = label_counts(adata.obs)
        result.sample = region_sample(adata, task.joint, task.name, task.spatial_key)
    except StofmError as err:
        return _failed(result, str(err), t0)
    result.seconds = time.perf_counter() - t0
    return result


def label_joint(task: SliceTask, regions) -> SliceResult:
    """Joint regions: give an output (already embedded) the cohort's regions and write it again."""
    import anndata as ad

    t0 = time.perf_counter()
    result = SliceResult(task.name, task.input, task.output, key=task.key, worker=_where())
    try:
        adata = ad.read_h5ad(task.output)
        result.n_cells = int(adata.n_obs)
        regions.write(adata, spatial_key=task.spatial_key)
        result.counts = label_counts(adata.obs)
        _write(adata, task, extra={"joint_key": task.joint_key})
    except StofmError as err:
        return _failed(result, str(err), t0)
    result.status = WRITTEN
    result.seconds = time.perf_counter() - t0
    return result


def _write(adata, task: SliceTask, extra: Optional[dict] = None) -> None:
    from napari_stofm import __version__
    from napari_stofm.io.export import export_h5ad
    from napari_stofm.provenance import canonical, now_iso

    record = {
        "key": task.key,
        "format": COHORT_FORMAT,
        "command": task.kind,
        "weights_fingerprint": task.weights,
        "settings": json.dumps(settings_record(task), sort_keys=True, default=str),
        "input": str(task.input),
        "n_cells": int(adata.n_obs),
        "package_version": __version__,
        "written_at": now_iso(),
        **(extra or {}),
    }
    meta = dict(adata.uns.get(keys.UNS, {}) or {})
    meta[keys.COHORT] = canonical(record)
    adata.uns[keys.UNS] = meta
    export_h5ad(adata, None, task.output, overwrite=True)


def _failed(result: SliceResult, message: str, t0: float) -> SliceResult:
    result.status = FAILED
    result.error = message
    result.seconds = time.perf_counter() - t0
    return result


def _where() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def check_output_folder(out_dir) -> Path:
    """``out_dir`` as a folder, created when missing (its parent must exist)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise StofmInputError(f"{out} is a file: with several slices, -o names a folder (OUTDIR/<slice name>.h5ad "
                              "is written for each); choose a folder name")
    if not out.exists():
        if not out.parent.is_dir():
            raise StofmInputError(f"cannot create the output folder {out}: the folder {out.parent} does not exist")
        out.mkdir()
    if not os.access(out, os.W_OK | os.X_OK):
        raise StofmInputError(f"cannot write into {out} (permission denied): choose a folder you can write to")
    return out
