"""Atomic export of curated labels to ``.h5ad``, CSV and SpatialData ``.zarr``.

Every writer builds the whole output in a temporary file (or folder) beside the target
and only then moves it into place, so an interrupted export never damages an existing
file. An existing target is replaced only with ``overwrite=True``.

What is written for each annotation (see :class:`~napari_stofm.review.annotation.Annotation`):
obs columns ``<key>`` (Categorical with every class), ``<key>_confidence``,
``<key>_curated`` and ``<key>_predicted``; colours in ``uns['<key>_colors']``; and in
``uns['stofm']``: package version, export time, the provenance of each annotation (model,
weights fingerprint, parameters, timestamps) and the ids of the curated cells.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, Mapping

import numpy as np

from napari_stofm import keys
from napari_stofm.provenance import canonical, now_iso
from napari_stofm.review.annotation import Annotation, as_annotation_dict
from napari_stofm.errors import StofmInputError

LABELS_ELEMENT = "cell_territories"
SHAPES_ELEMENT = "cell_circles"
TABLE_NAME = "table"


class ExportTargetExists(StofmInputError, FileExistsError):
    """The export target exists and ``overwrite=True`` was not given."""


# ----------------------------------------------------------------------------- content


def annotated_copy(adata, annotations=None, *, export_format: str = ""):
    """A copy of ``adata`` with the annotations written into obs / uns, plus export provenance."""
    annotations = as_annotation_dict(annotations)
    out = adata.copy()
    for ann in annotations.values():
        ann.to_obs(out)
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


def _check_sizes(adata, annotations: Dict[str, Annotation]) -> None:
    for key, ann in annotations.items():
        if ann.n_cells != adata.n_obs:
            raise StofmInputError(
                f"annotation '{key}' labels {ann.n_cells} cells but the slice has {adata.n_obs}; "
                "export it with the slice it was made for."
            )


def _xy(adata, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        raise StofmInputError(f"adata.obsm has no '{spatial_key}' (its keys: {list(adata.obsm.keys())}); pass spatial_key=...")
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise StofmInputError(f"adata.obsm['{spatial_key}'] has shape {xy.shape}; expected (n_cells, 2).")
    return xy[:, :2]


# ----------------------------------------------------------------------------- atomic writes


def _target(path, overwrite: bool) -> Path:
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise StofmInputError(f"cannot write {path}: the folder {path.parent} does not exist; create it first.")
    if path.exists() and not overwrite:
        raise ExportTargetExists(f"{path} already exists; pass overwrite=True to replace it (the old one is kept until the new one is complete).")
    return path


def _atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it in."""
    if path.is_dir():
        raise StofmInputError(f"{path} is a folder; choose a file name for the export.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise
    return path


def _atomic_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder at ``path.tmp-XXXX``, then swap it in (the old one kept until the swap)."""
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    try:
        write(tmp)
    except BaseException:
        _remove(tmp)
        raise
    if not path.exists():
        os.rename(tmp, path)
        return path
    backup = path.with_name(f"{path.name}.bak-{tag}")
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        _remove(tmp)
        raise
    _remove(backup)
    return path


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


# ----------------------------------------------------------------------------- h5ad / CSV


def export_h5ad(adata, annotations=None, path=None, *, overwrite: bool = False) -> Path:
    """Write ``adata`` with the annotations (obs, colours, provenance) to an ``.h5ad`` file."""
    if path is None:
        raise StofmInputError("export_h5ad needs a target path.")
    annotations = as_annotation_dict(annotations)
    _check_sizes(adata, annotations)
    target = _target(path, overwrite)
    out = annotated_copy(adata, annotations, export_format="h5ad")
    return _atomic_file(target, lambda tmp: _write_h5ad(out, tmp))


def _write_h5ad(adata, tmp: Path) -> None:
    adata.write_h5ad(tmp)


def export_csv(adata, annotations=None, path=None, *, overwrite: bool = False, spatial_key: str = keys.SPATIAL) -> Path:
    """One row per cell: cell_id, x, y, then per annotation <key>, <key>_confidence,
    <key>_curated, <key>_predicted (unassigned cells have an empty class)."""
    if path is None:
        raise StofmInputError("export_csv needs a target path.")
    annotations = as_annotation_dict(annotations)
    _check_sizes(adata, annotations)
    target = _target(path, overwrite)
    table = csv_table(adata, annotations, spatial_key=spatial_key)
    return _atomic_file(target, lambda tmp: _write_csv(table, tmp))


def csv_table(adata, annotations, *, spatial_key: str = keys.SPATIAL):
    """The table :func:`export_csv` writes, as a pandas DataFrame."""
    import pandas as pd

    xy = _xy(adata, spatial_key)
    columns = {"cell_id": np.asarray(adata.obs_names, dtype=object), "x": xy[:, 0], "y": xy[:, 1]}
    for key, ann in as_annotation_dict(annotations).items():
        columns[key] = ann.names()
        columns[keys.confidence_key(key)] = ann.confidence
        columns[keys.curated_key(key)] = ann.curated
        predicted = np.array(ann.categories + [None], dtype=object)[ann.predicted_codes]
        columns[keys.predicted_key(key)] = predicted
    return pd.DataFrame(columns)


def _write_csv(table, tmp: Path) -> None:
    table.to_csv(tmp, index=False)


# ----------------------------------------------------------------------------- SpatialData


def export_spatialdata(adata, annotations=None, path=None, *, labels=None, overwrite: bool = False,
                       spatial_key: str = keys.SPATIAL) -> Path:
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
        raise StofmInputError("SpatialData export needs the 'spatialdata' package: pip install 'napari-stofm[spatialdata]'.") from err
    annotations = as_annotation_dict(annotations)
    _check_sizes(adata, annotations)
    target = _target(path, overwrite)
    if target.exists() and not target.is_dir():
        raise StofmInputError(f"{target} is a file; a SpatialData store is a folder: choose another name (e.g. ending in .zarr).")
    sdata = build_spatialdata(adata, annotations, labels=labels, spatial_key=spatial_key)
    return _atomic_dir(target, lambda tmp: _write_spatialdata(sdata, tmp))


def _write_spatialdata(sdata, tmp: Path) -> None:
    sdata.write(tmp)


def build_spatialdata(adata, annotations=None, *, labels=None, spatial_key: str = keys.SPATIAL):
    """The in-memory :class:`spatialdata.SpatialData` that :func:`export_spatialdata` writes."""
    import spatialdata as sd
    from spatialdata.models import TableModel

    table = annotated_copy(adata, annotations, export_format="spatialdata")
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
            f"the labels raster must be a 2-D integer image (0 = background, i + 1 = cell i); got {image.dtype} {image.shape}."
        )
    if image.size and (image.min() < 0 or image.max() > n_cells):
        raise StofmInputError(
            f"the labels raster has values {image.min()}..{image.max()} but the slice has {n_cells} cells (values must be 0..{n_cells})."
        )
    (sy, sx), (ty, tx) = _pair(scale, "scale"), _pair(translate, "translate")
    if sy <= 0 or sx <= 0:
        raise StofmInputError(f"the labels raster scale must be positive; got {scale!r}.")
    # spatialdata puts the centre of pixel i at i + 0.5; napari (and raster.py) at i.
    corner = Translation([ty - 0.5 * sy, tx - 0.5 * sx], axes=("y", "x"))
    transform = Sequence([Scale([sy, sx], axes=("y", "x")), corner])
    return Labels2DModel.parse(image.astype(np.int32, copy=False), dims=("y", "x"),
                               transformations={"global": transform})
