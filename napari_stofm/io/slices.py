"""Reading and checking one tissue slice (``.h5ad`` or SpatialData ``.zarr``).

``read_slice`` returns an :class:`anndata.AnnData` with cell positions (x, y) in
``obsm['spatial']`` and a record of where it came from in ``uns['stofm_source']``::

    {'path': ..., 'format': 'h5ad' | 'anndata_zarr' | 'spatialdata',
     'table': ..., 'labels_element': ..., 'instance_key': ..., 'region': ..., ...}

(keys whose value is unknown are left out, so the record always writes to ``.h5ad``).
The display uses ``labels_element`` to paint real cell masks when the SpatialData store
has them.

``validate_slice`` checks what the model needs and raises
:class:`~napari_stofm.errors.StofmInputError` with a message that names the problem and
the fix; it warns (and reports) about cells without any counts.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SPATIALDATA_ELEMENT_GROUPS = ("images", "labels", "points", "shapes", "tables")
_N_SHOWN = 5  # how many offending cell ids an error message lists


# ----------------------------------------------------------------------------- paths


MAX_METADATA_BYTES = 64 * 1024 * 1024  #: a zarr metadata file larger than this is not read
_MAX_WALK = 200_000  #: metadata files / HDF5 objects visited when sizing a store


def _read_json(path: Path):
    """A JSON metadata file, read only when of a sane size (None when unreadable)."""
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _zarr_attrs(directory: Path) -> Optional[dict]:
    """Root attributes of a zarr group (v3 ``zarr.json`` or v2 ``.zattrs``), None if not a group."""
    v3 = directory / "zarr.json"
    if v3.is_file():
        meta = _read_json(v3)
        if not isinstance(meta, dict):
            return {}
        if meta.get("node_type", "group") != "group":
            return None
        attrs = meta.get("attributes", {}) or {}
        return attrs if isinstance(attrs, dict) else {}
    if (directory / ".zgroup").is_file():
        attrs = _read_json(directory / ".zattrs")
        return attrs if isinstance(attrs, dict) else {}
    return None


def _is_zarr_group(directory: Path) -> bool:
    return (directory / "zarr.json").is_file() or (directory / ".zgroup").is_file()


def _zarr_kind(directory: Path) -> Optional[str]:
    """'spatialdata', 'anndata_zarr' or None for a directory."""
    attrs = _zarr_attrs(directory)
    if attrs is None:
        return None
    if attrs.get("encoding-type") == "anndata":
        return "anndata_zarr"
    if "spatialdata_attrs" in attrs:
        return "spatialdata"
    if any(_is_zarr_group(directory / name) for name in SPATIALDATA_ELEMENT_GROUPS):
        return "spatialdata"
    return None


#: file-name endings of a slice that are not part of its name (longest first)
SLICE_SUFFIXES = (".anndata.zarr", ".ome.zarr", ".h5ad", ".zarr", ".h5")


def slice_name(path: PathLike) -> str:
    """A slice's name from its path: the file name without the format's ending, dots kept
    (``animal1_bregma-0.29.h5ad`` -> ``animal1_bregma-0.29``, ``sample.zarr/`` -> ``sample``)."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in SLICE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or "slice"


def is_slice_path(path: PathLike) -> bool:
    """True for an ``.h5ad`` file or a zarr directory that holds SpatialData (or an AnnData)."""
    try:
        p = Path(path).expanduser()
    except TypeError:
        return False
    if p.is_file():
        return p.suffix.lower() == ".h5ad"
    if p.is_dir():
        return _zarr_kind(p) is not None
    return False


# ----------------------------------------------------------------------------- reading


def read_slice(
    path: PathLike,
    *,
    table: Optional[str] = None,
    spatial_key: str = keys.SPATIAL,
    validate: bool = True,
    backed: bool = False,
):
    """Read one slice from an ``.h5ad`` file or a SpatialData ``.zarr`` directory.

    Parameters
    ----------
    path
        ``.h5ad`` file, SpatialData ``.zarr`` directory (or an AnnData ``.zarr``).
    table
        Name of the SpatialData table to use; needed only when the store has several.
    spatial_key
        ``obsm`` key of the (x, y) positions. For SpatialData without it, positions are
        the centroids of the shapes / points / labels element the table annotates.
    validate
        Run :func:`validate_slice` (errors then name the file).
    backed
        ``.h5ad`` only: leave the expression matrix on disk (``anndata.read_h5ad(path,
        backed='r')``); validation and :func:`~napari_stofm.pipeline.embed.embed` read it in
        blocks of rows, so a slice larger than memory can be embedded. Positions, ``obs`` and
        the embeddings are held in memory.
    """
    p = Path(path).expanduser()
    if not p.exists():
        backup = _interrupted_export_backup(p)
        if backup is not None:
            raise StofmInputError(
                f"{p} does not exist, but {backup.name} beside it is its previous version, moved aside by an export "
                f"that was interrupted: exporting to {p.name} again puts it back, or rename it to {p.name} yourself."
            )
        raise StofmInputError(f"{p} does not exist: check the path (and the working directory).")
    if p.is_dir():
        kind = _zarr_kind(p)
        if kind == "spatialdata":
            adata = _read_spatialdata(p, table=table, spatial_key=spatial_key)
        elif kind == "anndata_zarr":
            adata = _read_anndata_zarr(p)
        else:
            raise StofmInputError(
                f"{p} is a directory but not a SpatialData .zarr store (no zarr group with "
                f"{', '.join(SPATIALDATA_ELEMENT_GROUPS)}): open an .h5ad file or a SpatialData "
                "store written by spatialdata / spatialdata-io."
            )
    elif p.suffix.lower() == ".h5ad":
        adata = _read_h5ad(p, backed=backed)
    else:
        raise StofmInputError(
            f"{p} is not a slice: expected an .h5ad file or a SpatialData .zarr directory "
            f"(got a '{p.suffix or 'no extension'}' file). Convert it with anndata / "
            "spatialdata-io first."
        )
    if validate:
        try:
            validate_slice(adata, spatial_key=spatial_key)
        except StofmInputError as err:
            raise StofmInputError(f"{p}: {err}") from None
    return adata


def _interrupted_export_backup(path: Path) -> Optional[Path]:
    """``<name>.bak-...``: a store napari-stofm moved aside during an export that was killed."""
    try:
        found = sorted(path.parent.glob(glob.escape(path.name) + ".bak-*"))
    except OSError:
        return None
    found = [f for f in found if f.is_dir()]
    return found[-1] if found else None


def _memory_bytes() -> Optional[int]:
    """Physical memory of this computer (None when unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _check_declared_size(path: Path, declared: int) -> None:
    """Refuse a file whose arrays declare more bytes than this computer has memory: the
    sizes come from the file, so they are checked before anything is allocated for them."""
    memory = _memory_bytes()
    if memory is not None and declared > memory:
        raise StofmInputError(
            f"{path} declares {declared / 2**30:.1f} GiB of arrays (uncompressed), more than the memory of this "
            f"computer ({memory / 2**30:.1f} GiB), so it cannot be opened whole (or the file is damaged). Open a "
            "subset of its cells (e.g. anndata.read_h5ad(path, backed='r')[cells].to_memory()) or use a computer "
            "with more memory."
        )


def _h5_declared_bytes(path: Path) -> int:
    """Sum of the declared sizes of the datasets of an HDF5 file (nothing is read)."""
    import h5py

    total, count = 0, 0

    def visit(_name, obj):
        nonlocal total, count
        count += 1
        if count > _MAX_WALK:
            return True  # stop
        if isinstance(obj, h5py.Dataset) and obj.shape is not None:
            n = 1
            for d in obj.shape:
                n *= int(d)
            total += n * max(int(obj.dtype.itemsize), 1)
        return None

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return total


def _zarr_declared_bytes(directory: Path) -> int:
    """Sum of the declared sizes of the arrays below a zarr folder, from their metadata."""
    total, count = 0, 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name not in ("zarr.json", ".zarray"):
                continue
            count += 1
            if count > _MAX_WALK:
                return total
            meta = _read_json(Path(root) / name)
            if not isinstance(meta, dict) or (name == "zarr.json" and meta.get("node_type") != "array"):
                continue
            shape = meta.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise StofmInputError(f"{Path(root)} declares the array shape {shape!r}: "
                                      "the store is damaged; re-write it.")
            n = 1
            for d in shape:
                n *= d
            total += n * _zarr_itemsize(meta.get("data_type", meta.get("dtype")))
    return total


def _zarr_itemsize(dtype) -> int:
    try:
        return max(int(np.dtype(dtype).itemsize), 1) if isinstance(dtype, str) else 16
    except TypeError:
        return 16  # strings and other variable-length values: a reference each


def _read_h5ad(path: Path, backed: bool = False):
    import anndata as ad
    import h5py

    size = path.stat().st_size
    if size == 0:
        raise StofmInputError(f"{path} is empty (0 bytes): the file was not written completely; "
                              "re-export or re-download it.")
    if not h5py.is_hdf5(path):
        raise StofmInputError(
            f"{path} is not an HDF5 file, so it cannot be an .h5ad (it may be truncated, "
            "still downloading, or another format renamed to .h5ad): re-export it with "
            "adata.write_h5ad(...) or re-download it."
        )
    try:
        declared = _h5_declared_bytes(path)
    except Exception:  # noqa: BLE001 - advisory size check of a maybe-damaged file; the read below reports it
        log.debug("cannot size the datasets of %s", path, exc_info=True)
        declared = 0
    if not backed:
        _check_declared_size(path, declared)
    try:
        adata = ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for damaged files
        raise StofmInputError(
            f"could not read {path} as an .h5ad file ({_short(err)}). The file is probably "
            "truncated or corrupt (an interrupted copy or download): re-export or re-download it."
        ) from err
    adata.uns[keys.SOURCE] = {"path": str(path), "format": "h5ad"}
    return adata


def _read_anndata_zarr(path: Path):
    import anndata as ad

    _check_declared_size(path, _zarr_declared_bytes(path))
    try:
        adata = ad.read_zarr(path)
    except Exception as err:
        raise StofmInputError(
            f"could not read {path} as an AnnData .zarr store ({_short(err)}); re-export it."
        ) from err
    adata.uns[keys.SOURCE] = {"path": str(path), "format": "anndata_zarr"}
    return adata


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_spatialdata(path: Path, *, table: Optional[str], spatial_key: str):
    try:
        import spatialdata as sd
    except ImportError as err:  # optional dependency
        raise StofmInputError(
            f"{path} is a SpatialData store but the 'spatialdata' package is not installed: "
            "pip install 'napari-stofm[spatialdata]'."
        ) from err
    if (path / "tables").is_dir():  # tables are read whole (images and labels stay on disk)
        _check_declared_size(path, _zarr_declared_bytes(path / "tables"))
    try:
        sdata = sd.read_zarr(path)
    except Exception as err:
        raise StofmInputError(
            f"could not read the SpatialData store {path} ({_short(err)}); it may be incomplete "
            "or written by an incompatible spatialdata version: re-write it with spatialdata."
        ) from err
    name = _pick_table(sdata, table, path)
    adata = sdata.tables[name]
    attrs = dict(adata.uns.get("spatialdata_attrs", {}) or {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else [str(r) for r in (region if region is not None else [])]
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")

    source = {"path": str(path), "format": "spatialdata", "table": name}
    if spatial_key not in adata.obsm:
        if not regions or instance_key is None:
            raise StofmInputError(
                f"table '{name}' of {path} has no obsm['{spatial_key}'] and annotates no element "
                "(uns['spatialdata_attrs'] has no region/instance_key), so cell positions are "
                "unknown: link it with spatialdata.models.TableModel.parse(table, region=..., "
                "region_key=..., instance_key=...) or set table.obsm['spatial']."
            )
        xy, cs = _centroids_of_annotated(sdata, adata, regions, region_key, instance_key, name)
        adata.obsm[spatial_key] = xy
        source["coordinate_system"] = cs
        source["positions_from"] = "centroids"
    else:
        source["positions_from"] = f"obsm['{spatial_key}']"

    labels_element, annotated = _pick_labels_element(sdata, regions)
    source.update(
        {
            "labels_element": labels_element,
            "labels_annotated": annotated if labels_element is not None else None,
            "instance_key": instance_key,
            "region_key": region_key,
            "region": region if isinstance(region, str) else (regions or None),
        }
    )
    adata.uns[keys.SOURCE] = {k: v for k, v in source.items() if v is not None}
    return adata


def _pick_table(sdata, table: Optional[str], path: Path) -> str:
    names = list(sdata.tables.keys())
    if table is not None:
        if table not in names:
            raise StofmInputError(f"{path} has no table '{table}'; its tables are {names or 'none'}: "
                                  "pass one of them as table=.")
        return table
    if not names:
        raise StofmInputError(
            f"{path} holds no table (cells x genes), only {_element_summary(sdata)}: SToFM needs "
            "a table of gene expression; aggregate transcripts per cell first (spatialdata.aggregate)."
        )
    if len(names) > 1:
        raise StofmInputError(f"{path} has several tables {names}: pass the one to use as table='...'.")
    return names[0]


def _element_summary(sdata) -> str:
    parts = []
    for group in ("images", "labels", "points", "shapes"):
        names = list(getattr(sdata, group).keys())
        if names:
            parts.append(f"{group} {names}")
    return ", ".join(parts) or "no elements"


def _element_kind(sdata, name: str) -> Optional[str]:
    for group in ("labels", "shapes", "points", "images"):
        if name in getattr(sdata, group):
            return group
    return None


def _coordinate_system(element) -> str:
    from spatialdata.transformations import get_transformation

    systems = list(get_transformation(element, get_all=True).keys())
    return "global" if "global" in systems or not systems else systems[0]


def _centroids_of_annotated(sdata, adata, regions, region_key, instance_key, table_name):
    """(n, 2) x, y of each table row: centroid of its instance in the annotated element(s)."""
    import pandas as pd
    import spatialdata as sd

    if instance_key not in adata.obs:
        raise StofmInputError(
            f"table '{table_name}' names instance_key '{instance_key}' but has no such obs column; "
            "re-link it with spatialdata.models.TableModel.parse(..., overwrite_metadata=True)."
        )
    xy = np.full((adata.n_obs, 2), np.nan)
    cs_used = "global"
    for region in regions:
        kind = _element_kind(sdata, region)
        if kind not in ("labels", "shapes", "points"):
            raise StofmInputError(
                f"table '{table_name}' annotates '{region}', which is not a labels/shapes/points "
                f"element of the store ({_element_summary(sdata)}); fix uns['spatialdata_attrs'] or "
                "add obsm['spatial'] to the table."
            )
        element = sdata[region]
        cs_used = _coordinate_system(element)
        centroids = sd.get_centroids(element, coordinate_system=cs_used)
        if hasattr(centroids, "compute"):
            centroids = centroids.compute()
        rows = np.arange(adata.n_obs)
        if region_key is not None and region_key in adata.obs and len(regions) > 1:
            rows = np.flatnonzero(adata.obs[region_key].astype(str).to_numpy() == region)
        ids = pd.Index(adata.obs[instance_key].to_numpy()[rows])
        index = pd.Index(centroids.index)
        where = index.get_indexer(ids)
        if (where < 0).all() and len(ids):
            where = index.astype(str).get_indexer(ids.astype(str))
        found = where >= 0
        xy[rows[found]] = centroids[["x", "y"]].to_numpy(dtype=float)[where[found]]
        if not found.all():
            warnings.warn(
                f"{int((~found).sum())} rows of table '{table_name}' name {instance_key} values that "
                f"element '{region}' does not have ({_show_ids(ids[~found])}); their positions are unknown.",
                UserWarning, stacklevel=3,
            )
    return xy, cs_used


def _pick_labels_element(sdata, regions: Sequence[str]):
    """(name, annotated): the cell-mask labels element and whether the table annotates it."""
    labels = list(sdata.labels.keys())
    for region in regions:
        if region in labels:
            return region, True
    if len(labels) == 1:
        return labels[0], False
    cells = [n for n in labels if "cell" in n.lower() and "nucle" not in n.lower()]
    if cells:
        return cells[0], False
    return None, False


# ----------------------------------------------------------------------------- validation


@dataclass
class SliceReport:
    """What :func:`validate_slice` found (the slice is usable when it returns one)."""

    n_cells: int
    n_genes: int
    spatial_key: str
    extent: tuple  # (x_min, x_max, y_min, y_max)
    values: str  # 'counts' (non-negative integers) or 'non_negative' (e.g. normalised)
    empty_cells: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    empty_cell_ids: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return True

    def __str__(self) -> str:
        x0, x1, y0, y1 = self.extent
        text = (
            f"{self.n_cells} cells x {self.n_genes} genes, {self.values} values, "
            f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
        )
        for message in self.warnings:
            text += f"\nwarning: {message}"
        return text


def _show_ids(ids: Sequence, n: int = _N_SHOWN) -> str:
    ids = [str(i) for i in ids]
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def validate_slice(adata, spatial_key: str = keys.SPATIAL) -> SliceReport:
    """Check that ``adata`` is a slice SToFM can use; raise StofmInputError saying how to fix it."""
    n_cells, n_genes = adata.n_obs, adata.n_vars
    if n_cells == 0:
        raise StofmInputError("the slice has zero cells: check the file, or a filter that removed every cell.")
    if n_genes == 0:
        raise StofmInputError("the slice has zero genes (adata.n_vars == 0): "
                              "SToFM needs an expression matrix in adata.X.")
    _check_obs_names(adata)
    xy = _check_positions(adata, spatial_key)
    values, empty = _check_expression(adata)

    report = SliceReport(
        n_cells=n_cells,
        n_genes=n_genes,
        spatial_key=spatial_key,
        extent=(float(xy[:, 0].min()), float(xy[:, 0].max()), float(xy[:, 1].min()), float(xy[:, 1].max())),
        values=values,
        empty_cells=empty,
        empty_cell_ids=[str(i) for i in adata.obs_names[empty]],
    )
    if len(empty):
        message = (
            f"{len(empty)} of {n_cells} cells have no counts at all ({_show_ids(report.empty_cell_ids)}); "
            "they give the cell encoder nothing to read. To drop them: "
            "adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()"
        )
        report.warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return report


def _check_obs_names(adata) -> None:
    names = adata.obs_names
    if names.is_unique:
        return
    dup = names[names.duplicated()].unique()
    raise StofmInputError(
        f"{len(dup)} cell ids (obs_names) occur more than once ({_show_ids(dup)}); every cell "
        "needs its own id to map labels back. Fix: adata.obs_names_make_unique()"
    )


def _position_hint(adata) -> str:
    """Suggest obs columns that look like coordinates."""
    cols = {c.lower(): c for c in map(str, adata.obs.columns)}
    pairs = [("x", "y"), ("x_centroid", "y_centroid"), ("center_x", "center_y"), ("centroid_x", "centroid_y"),
             ("x_location", "y_location"), ("array_col", "array_row"), ("imagecol", "imagerow")]
    for x, y in pairs:
        if x in cols and y in cols:
            return (f" obs has columns '{cols[x]}' and '{cols[y]}': adata.obsm['spatial'] = "
                    f"adata.obs[['{cols[x]}', '{cols[y]}']].to_numpy(dtype=float)")
    return " Put the (x, y) position of every cell into adata.obsm['spatial'] as an (n_cells, 2) float array."


def _check_positions(adata, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        keys = list(adata.obsm.keys())
        raise StofmInputError(
            f"no cell positions: adata.obsm has no '{spatial_key}' (its keys: {keys or 'none'})."
            + (f" If the positions are under another key, pass spatial_key=... (one of {keys})." if keys else "")
            + _position_hint(adata)
        )
    raw = adata.obsm[spatial_key]
    raw = raw.to_numpy() if hasattr(raw, "to_numpy") else np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] != 2:
        fix = (f" Keep x and y only: adata.obsm['{spatial_key}'] = adata.obsm['{spatial_key}'][:, :2]"
               if raw.ndim == 2 and raw.shape[1] > 2 else
               f" Store one (x, y) row per cell in adata.obsm['{spatial_key}'].")
        raise StofmInputError(
            f"adata.obsm['{spatial_key}'] has shape {raw.shape}; expected (n_cells, 2) = ({adata.n_obs}, 2) "
            "columns x, y." + fix
        )
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        try:
            raw = raw.astype(float)
        except (TypeError, ValueError):
            raise StofmInputError(
                f"adata.obsm['{spatial_key}'] holds {raw.dtype} values, not numbers: convert it with "
                f"adata.obsm['{spatial_key}'] = adata.obsm['{spatial_key}'].astype(float)."
            ) from None
    xy = raw.astype(np.float64, copy=False)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        ids = adata.obs_names[bad]
        raise StofmInputError(
            f"{int(bad.sum())} of {adata.n_obs} cells have non-finite (NaN or inf) coordinates in "
            f"obsm['{spatial_key}'] ({_show_ids(ids)}). Drop them with: adata = "
            f"adata[np.isfinite(adata.obsm['{spatial_key}']).all(1)].copy()"
        )
    if adata.n_obs > 1 and np.ptp(xy, axis=0).max() == 0:
        raise StofmInputError(
            f"all {adata.n_obs} cells sit at the same position {tuple(xy[0])} in obsm['{spatial_key}']; "
            "the coordinates were probably not filled in: store each cell's own (x, y)."
        )
    return xy


def _check_expression(adata):
    """('counts' | 'non_negative', indices of all-zero cells); raise on negative / non-finite values."""
    import scipy.sparse as sp

    from napari_stofm.genes.expression import is_backed

    X = adata.X
    if X is None:
        raise StofmInputError(
            "the slice has no expression matrix (adata.X is None): put counts in adata.X, "
            "e.g. adata.X = adata.layers['counts']."
        )
    backed = is_backed(X)
    n = int(X.shape[0])
    step = _CHECK_ROWS if backed else max(n, 1)  # a backed matrix is read block by block
    kinds, empties = [], []
    for start in range(0, n, step):
        block = X if not backed and start == 0 else X[start:start + step]
        if sp.issparse(block):
            csr = sp.csr_matrix(block)
            rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
            kind, empty = _check_values(adata, csr.data, rows, csr, start)
        else:
            dense = np.asarray(block)
            kind, empty = _check_values(adata, dense.ravel(), None, dense, start)
        kinds.append(kind)
        empties.append(empty + start)
    kind = "counts" if all(k == "counts" for k in kinds) else "non_negative"
    return kind, (np.concatenate(empties) if empties else np.zeros(0, dtype=np.int64))


#: rows of a backed expression matrix checked at a time
_CHECK_ROWS = 65_536


def _rows(flat_bad: np.ndarray, row_of, n_vars: int, offset: int = 0) -> np.ndarray:
    where = np.flatnonzero(flat_bad)
    rows = row_of[where] if row_of is not None else where // max(n_vars, 1)
    return np.unique(rows) + offset


def _check_values(adata, values: np.ndarray, row_of, X, offset: int = 0):
    """Checks of one block of rows (``offset``: the block's first row)."""
    import scipy.sparse as sp

    if not np.issubdtype(values.dtype, np.number):
        raise StofmInputError(f"adata.X holds {values.dtype} values, not numbers: "
                              "convert it, e.g. adata.X = adata.X.astype('float32').")
    finite = np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)
    if not finite.all():
        rows = _rows(~finite, row_of, adata.n_vars, offset)
        raise StofmInputError(
            f"adata.X has {int((~finite).sum())} non-finite (NaN or inf) values in {len(rows)} cells "
            f"({_show_ids(adata.obs_names[rows])}). Replace them with 0 (dense: adata.X = "
            "np.nan_to_num(adata.X, nan=0, posinf=0, neginf=0); sparse: adata.X.data[~np.isfinite("
            "adata.X.data)] = 0) or drop those cells."
        )
    negative = values < 0
    if negative.any():
        rows = _rows(negative, row_of, adata.n_vars, offset)
        raise StofmInputError(
            f"adata.X has {int(negative.sum())} negative values in {len(rows)} cells "
            f"({_show_ids(adata.obs_names[rows])}), so it looks scaled or centred (z-scores). "
            "SToFM needs raw counts (or non-negative normalised values): put them in adata.X, "
            "e.g. adata.X = adata.layers['counts'] or adata.X = adata.raw.X, before sc.pp.scale."
        )
    is_counts = bool(np.all(values == np.round(values))) if values.dtype.kind == "f" else True
    sums = np.asarray(X.sum(axis=1)).ravel() if sp.issparse(X) else np.asarray(X).sum(axis=1)
    empty = np.flatnonzero(sums == 0)
    return ("counts" if is_counts else "non_negative"), empty
