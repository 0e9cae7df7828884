"""The review-and-correct loop on one slice, as a Python object (no napari, no Qt).

:class:`SliceSession` ties together what the napari widgets show and edit, so that every
step of the GUI is also a plain library call::

    from napari_stofm.session import SliceSession
    s = SliceSession.open("slice.h5ad")         # read + autosave restored if any
    s.run(n_regions=7, label_source=("reference", "ref.h5ad", "cell_type"))
    s.recluster(9)                                # new region count, no model re-run
    terr = s.territories                          # pixel territories of the cells
    s.apply_edit("stofm_region", edited_image, bbox)   # a brush stroke -> curated cells
    s.refine("stofm_cell_type")                   # retrain the head on the corrections
    s.export("curated.h5ad")

Long steps take ``progress=`` / ``cancel=`` (see :mod:`napari_stofm.progress`). The
computing part of a run (:meth:`SliceSession.compute`) does not change the session, so a
GUI can run it in a worker thread and :meth:`SliceSession.apply` the result on its own
thread.
"""
from __future__ import annotations

import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .curation import Annotation, CurationStore, PreviousState
from .errors import StofmInputError
from .progress import CancelToken, ProgressCallback, check_cancelled, report

REGION_KEY = "stofm_region"
CELL_TYPE_KEY = "stofm_cell_type"
#: obs columns shown as editable label layers when a slice is opened (key, display name).
KNOWN_COLUMNS = (
    (REGION_KEY, "tissue regions"),
    (CELL_TYPE_KEY, "cell types"),
    ("region", "region"),
    ("cell_type", "cell_type"),
)
DISPLAY_NAMES = {REGION_KEY: "tissue regions", CELL_TYPE_KEY: "cell types"}
EMBEDDING_SUFFIX = ".stofm-embedding.npz"


def display_name(key: str) -> str:
    return DISPLAY_NAMES.get(key, key)


def cache_dir() -> Path:
    """The per-user cache folder of napari-stofm (autosaves of slices that have no folder)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-stofm"


@dataclass
class EditResult:
    """What one edit of a class image did to an annotation."""

    key: str
    cells: np.ndarray  # cells whose class changed
    codes: np.ndarray  # their new codes
    touched: np.ndarray  # every cell with an edited pixel
    touched_codes: np.ndarray  # class of every touched cell after the edit
    previous: PreviousState  # codes and curated flags of ``cells`` before the edit
    after: PreviousState  # the same cells after the edit (for redo)

    @property
    def changed(self) -> bool:
        return self.cells.size > 0


@dataclass
class RunResult:
    """Output of :meth:`SliceSession.compute`: annotations and the reusable region clusterer."""

    annotations: Dict[str, Annotation] = field(default_factory=dict)
    clusterer: object = None
    embedding_reused: bool = False
    messages: List[str] = field(default_factory=list)


class SliceSession:
    """One slice under review: the AnnData, its territories, its annotations, autosave."""

    def __init__(self, adata, path=None, *, name: Optional[str] = None, spatial_key: str = "spatial",
                 autosave_dir=None):
        self.adata = adata
        if path is None:
            src = adata.uns.get("stofm_source", {}) if hasattr(adata, "uns") else {}
            path = src.get("path") if isinstance(src, dict) else None
        self.path: Optional[Path] = Path(path) if path else None
        self.name = name or (self.path.name.split(".")[0] if self.path else "slice")
        self.spatial_key = spatial_key
        self.annotations: Dict[str, Annotation] = {}
        self._territories = None
        self._territory_lock = threading.Lock()
        self.clusterer = None
        self.run_params: dict = {}
        self.seed = 0  # seeds the region clustering and the label head, as predict() does
        self._listeners: list = []  # weak references to callbacks
        if autosave_dir is not None:
            self.store: Optional[CurationStore] = CurationStore(self.path or self.name, directory=autosave_dir)
        elif self.path is not None:
            self.store = CurationStore(self.path)
        else:
            self.store = CurationStore(f"{self.name}.h5ad", directory=cache_dir() / "curation")
        self.restored_from: Optional[Path] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path, *, restore: bool = True, **kwargs) -> "SliceSession":
        """Read a slice (``.h5ad`` / SpatialData ``.zarr``), pick up its labels and autosave."""
        from .slice_io import read_slice

        adata = read_slice(path)
        session = cls(adata, path, **kwargs)
        session.load_existing_labels(restore=restore)
        session.load_embedding_cache()
        return session

    def load_existing_labels(self, *, restore: bool = True) -> List[str]:
        """Annotations from the slice's obs columns, then the autosave on top (when it fits).

        Returns the keys loaded. An autosave made for other cells is ignored (and the
        reason recorded in ``self.restore_error``).
        """
        self.restore_error = None
        for key, _name in KNOWN_COLUMNS:
            if key in self.adata.obs and key not in self.annotations:
                try:
                    self.annotations[key] = Annotation.from_obs(self.adata, key)
                except StofmInputError:
                    continue
        # a column of ground truth next to a prediction of the same kind stays a column
        if restore and self.store is not None and self.store.exists():
            try:
                saved = self.store.load(self.adata.obs_names)
            except StofmInputError as err:
                self.restore_error = str(err)
                saved = {}
            if saved:
                self.annotations.update(saved)
                self.restored_from = self.store.path
        return list(self.annotations)

    # ------------------------------------------------------------------ observers
    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        """``callback(key, what)`` after an annotation changes; ``what`` is one of
        ``'replaced'`` (new annotation object), ``'codes'`` (cells changed class),
        ``'classes'`` (renamed / recoloured / added) or ``'merged'`` (codes renumbered)."""
        ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda cb=callback: cb)
        if callback not in self._callbacks():
            self._listeners.append(ref)

    def unsubscribe(self, callback) -> None:
        self._listeners = [r for r in self._listeners if r() is not None and r() != callback]

    def _callbacks(self) -> list:
        return [cb for cb in (r() for r in self._listeners) if cb is not None]

    def _notify(self, key: str, what: str) -> None:
        """Tell listeners (held weakly when they are methods, so a closed widget drops out)."""
        for callback in self._callbacks():
            try:
                callback(key, what)
            except RuntimeError as err:  # a Qt widget deleted while its Python object lives on
                if "deleted" not in str(err):
                    raise
                self.unsubscribe(callback)

    # ------------------------------------------------------------------ geometry
    @property
    def xy(self) -> np.ndarray:
        return np.asarray(self.adata.obsm[self.spatial_key], dtype=np.float64)

    @property
    def territories(self):
        """Pixel territories of the cells (built on first use, then cached)."""
        with self._territory_lock:
            if self._territories is None:
                from .raster import territories_for_slice

                self._territories = territories_for_slice(self.adata, spatial_key=self.spatial_key)
            return self._territories

    @territories.setter
    def territories(self, value) -> None:
        with self._territory_lock:
            self._territories = value

    def class_image(self, key: str) -> np.ndarray:
        return self.territories.class_image(self.annotations[key].codes)

    # ------------------------------------------------------------------ running the model
    def compute(self, *, model=None, weights=None, n_regions: Optional[int] = 7, resolution=None,
                label_source=None, device=None, progress: Optional[ProgressCallback] = None,
                cancel: CancelToken = None) -> RunResult:
        """Embed the slice (unless a cached embedding of the same weights exists), find
        tissue regions and, with ``label_source``, cell types. Leaves the session unchanged
        except for the embedding cache in ``adata.obsm``.

        ``label_source`` is ``None``, ``('reference', path_or_adata, label_key)`` or
        ``('column', obs_key)`` (the slice's own partial labels).
        """
        from .regions import RegionClusterer

        result = RunResult()
        check_cancelled(cancel)
        embeddings, reused = self._ensure_embedding(model=model, weights=weights, device=device,
                                                    progress=progress, cancel=cancel)
        result.embedding_reused = reused
        check_cancelled(cancel)
        report(progress, 0, 1, "tissue regions")
        clusterer = RegionClusterer(embeddings, self.xy, seed=self.seed, progress=_stage(progress, "regions: "),
                                    cancel=cancel)
        pred = clusterer.regions(n_regions=n_regions, resolution=resolution if n_regions is None else None)
        result.clusterer = clusterer
        result.annotations[REGION_KEY] = Annotation.from_prediction(
            REGION_KEY, pred.categories, pred.codes, pred.confidence, pred.colors,
            provenance=self._provenance(n_regions=n_regions, resolution=resolution),
        )
        if label_source is not None:
            check_cancelled(cancel)
            report(progress, 0, 1, "cell types")
            pred = self._transfer(label_source, embeddings, model=model, weights=weights, device=device,
                                  progress=progress, cancel=cancel)
            result.annotations[CELL_TYPE_KEY] = Annotation.from_prediction(
                CELL_TYPE_KEY, pred.categories, pred.codes, pred.confidence, pred.colors,
                provenance=self._provenance(label_source=_describe_source(label_source)),
            )
        check_cancelled(cancel)
        report(progress, 0, 1, "cell territories")
        _ = self.territories  # rasterised here, off the caller's (GUI) thread
        report(progress, 1, 1, "done")
        return result

    def apply(self, result: RunResult) -> None:
        """Install the annotations of a run (replacing earlier predictions) and autosave."""
        if result.clusterer is not None:
            self.clusterer = result.clusterer
        if not result.embedding_reused:
            try:
                self.save_embedding_cache()
            except OSError as err:  # a cache is a convenience: never fail a run over it
                result.messages.append(f"the embedding was not cached ({err})")
        for key, ann in result.annotations.items():
            self.annotations[key] = ann
            ann.to_obs(self.adata)
            self._notify(key, "replaced")
        self.autosave()

    def run(self, **kwargs) -> RunResult:
        """:meth:`compute` then :meth:`apply` (the headless path)."""
        result = self.compute(**kwargs)
        self.apply(result)
        return result

    def _provenance(self, **params) -> dict:
        prov = {"model": "SToFM", **{k: v for k, v in params.items() if v is not None}}
        meta = self.adata.uns.get("stofm", {}) if hasattr(self.adata, "uns") else {}
        if isinstance(meta, dict):
            for k in ("model", "weights", "fingerprint", "split_num", "split_mode", "seed"):
                if isinstance(meta.get(k), (str, int, float, bool)):
                    prov[k if k != "fingerprint" else "weights_fingerprint"] = meta[k]
        return prov

    def _ensure_embedding(self, *, model, weights, device, progress, cancel) -> Tuple[np.ndarray, bool]:
        """``obsm['X_stofm']`` from :func:`napari_stofm.embedding.embed`, which reuses it when
        the same weights, expression data, positions and settings made it; returns whether
        it was reused."""
        from .embedding import STOFM_KEY, UNS_KEY, embed

        if model is None:
            from . import load_model

            report(progress, 0, 1, "loading weights")
            model = load_model(weights)
        check_cancelled(cancel)
        had = STOFM_KEY in self.adata.obsm
        key_before = (self.adata.uns.get(UNS_KEY) or {}).get("run_key")
        embed(self.adata, model, device=device, spatial_key=self.spatial_key, progress=progress, cancel=cancel)
        reused = had and key_before is not None and self.adata.uns[UNS_KEY].get("run_key") == key_before
        return np.asarray(self.adata.obsm[STOFM_KEY]), reused

    def _transfer(self, label_source, embeddings, *, model, weights, device, progress, cancel):
        from .classifier import complete_labels, transfer_labels

        kind = label_source[0]
        if kind == "column":
            key = label_source[1]
            if key not in self.adata.obs:
                raise StofmInputError(f"the slice has no obs column '{key}' to learn cell types from.")
            # the same head and inputs as napari_stofm.predict.predict (GUI == CLI)
            return complete_labels(embeddings, self.adata.obs[key], self.xy, seed=self.seed)
        if kind == "reference":
            ref = label_source[1]
            label_key = label_source[2]
            if isinstance(ref, (str, os.PathLike)):
                from .slice_io import read_slice

                ref = read_slice(ref)
            if label_key not in ref.obs:
                cols = [str(c) for c in ref.obs.columns]
                raise StofmInputError(f"the reference slice has no obs column '{label_key}' (its columns: {cols[:12]}).")
            if model is None:
                from . import load_model

                model = load_model(weights)
            ref_session = SliceSession(ref, name="reference")
            ref_emb, _ = ref_session._ensure_embedding(model=model, weights=weights, device=device,
                                                       progress=_stage(progress, "reference: "), cancel=cancel)
            check_cancelled(cancel)
            return transfer_labels(ref_emb, ref.obs[label_key], embeddings, ref_xy=ref_session.xy,
                                   query_xy=self.xy, seed=self.seed)
        raise StofmInputError(f"unknown cell-type source {kind!r}: use ('reference', path, key) or ('column', key).")

    # ------------------------------------------------------------------ embedding cache
    @property
    def embedding_cache_path(self) -> Optional[Path]:
        """Where this slice's embedding is cached: the user cache folder (embeddings are
        large, so they stay out of the data folder), one file per slice path."""
        import hashlib

        if self.store is None:
            return None
        source = str(self.path.absolute()) if self.path is not None else str(self.store.slice_path)
        tag = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)
        return cache_dir() / "embeddings" / f"{tag}-{safe}{EMBEDDING_SUFFIX}"

    def save_embedding_cache(self) -> Optional[Path]:
        """Keep ``obsm['X_stofm']`` / ``['X_stofm_cell']`` beside the slice, so reopening it
        with the same weights does not run the model again."""
        import io
        import json

        from .curation import atomic_write_bytes

        path = self.embedding_cache_path
        meta = self.adata.uns.get("stofm", {})
        if path is None or "X_stofm" not in self.adata.obsm or not isinstance(meta, dict):
            return None
        keep = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
        arrays = {"X_stofm": np.asarray(self.adata.obsm["X_stofm"], dtype=np.float32),
                  "meta": np.frombuffer(json.dumps(keep).encode("utf-8"), dtype=np.uint8)}
        if "X_stofm_cell" in self.adata.obsm:
            arrays["X_stofm_cell"] = np.asarray(self.adata.obsm["X_stofm_cell"], dtype=np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def load_embedding_cache(self) -> bool:
        """Put a cached embedding back into the AnnData when it fits these cells and this
        expression data (which weights made it is checked when a run asks for it)."""
        import json

        path = self.embedding_cache_path
        if path is None or not path.is_file() or "X_stofm" in self.adata.obsm:
            return False
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                arrays = {k: data[k] for k in data.files if k != "meta"}
        except Exception:
            return False
        from .embedding import expression_fingerprint

        parts = str(meta.get("gene_scale_key", "")).split(":")
        if (arrays["X_stofm"].shape[0] != self.adata.n_obs or len(parts) < 2
                or parts[1] != expression_fingerprint(self.adata)):
            return False
        for key in ("X_stofm", "X_stofm_cell"):
            if key in arrays:
                self.adata.obsm[key] = arrays[key]
        stofm = dict(self.adata.uns.get("stofm", {}) or {})
        stofm.update(meta)
        self.adata.uns["stofm"] = stofm
        return True

    # ------------------------------------------------------------------ regions
    def recluster(self, n_regions: Optional[int] = None, resolution: Optional[float] = None, *,
                  discard_curated: bool = False) -> Annotation:
        """New tissue regions from the cached clusterer (no model run); replaces ``stofm_region``."""
        self.check_recluster(discard_curated=discard_curated)
        ann = self.compute_regions(n_regions, resolution)
        self.install(REGION_KEY, ann)
        return ann

    def check_recluster(self, *, discard_curated: bool = False) -> None:
        """Raise when re-clustering would throw away hand-corrected region labels."""
        old = self.annotations.get(REGION_KEY)
        if old is not None and old.curated.any() and not discard_curated:
            raise StofmInputError(
                f"{int(old.curated.sum())} region labels were corrected by hand; re-clustering replaces "
                "them. Export them first, or pass discard_curated=True."
            )

    def compute_regions(self, n_regions: Optional[int] = None, resolution: Optional[float] = None) -> Annotation:
        """Regions at another count / resolution from the cached clusterer (session unchanged
        unless the clusterer has to be built from ``obsm['X_stofm']``)."""
        if self.clusterer is None:
            from .regions import RegionClusterer

            if "X_stofm" not in self.adata.obsm:
                raise StofmInputError("run SToFM first: there is no embedding to cluster.")
            self.clusterer = RegionClusterer(np.asarray(self.adata.obsm["X_stofm"]), self.xy, seed=self.seed)
        pred = self.clusterer.regions(n_regions=n_regions, resolution=resolution if n_regions is None else None)
        return Annotation.from_prediction(REGION_KEY, pred.categories, pred.codes, pred.confidence, pred.colors,
                                          provenance=self._provenance(n_regions=n_regions, resolution=resolution))

    def install(self, key: str, annotation: Annotation) -> None:
        """Make ``annotation`` the labels ``key`` (obs columns too), tell listeners, autosave."""
        self.annotations[key] = annotation
        annotation.to_obs(self.adata)
        self._notify(key, "replaced")
        self.autosave()

    # ------------------------------------------------------------------ editing
    def apply_edit(self, key: str, new_image: np.ndarray, bbox=None) -> EditResult:
        """Map an edited class image (values ``code + 1``) back to cells and mark them curated.

        Each cell with an edited pixel takes the class covering most of its territory
        (:meth:`napari_stofm.raster.Territories.cells_touched`).
        """
        ann = self._annotation(key)
        touched, tcodes = self.territories.cells_touched(ann.codes, new_image, bbox)
        if touched.size and tcodes.max(initial=-1) >= ann.n_classes:
            bad = int(tcodes.max()) + 1
            raise StofmInputError(
                f"label value {bad} is not a class of '{display_name(key)}' (it has {ann.n_classes}); "
                "add a class first or pick one of the existing labels."
            )
        changed = tcodes != ann.codes[touched]
        cells, codes = touched[changed], tcodes[changed]
        previous = PreviousState(cells.copy(), ann.codes[cells].copy(), ann.curated[cells].copy())
        if cells.size:
            ann.codes[cells] = codes
            ann.curated[cells] = True
            ann._touch()
            self._notify(key, "codes")
        after = PreviousState(cells.copy(), ann.codes[cells].copy(), ann.curated[cells].copy())
        return EditResult(key, cells, codes, touched, tcodes, previous, after)

    def assign(self, key: str, cells, code: int) -> PreviousState:
        previous = self._annotation(key).assign(cells, code)
        self._notify(key, "codes")
        return previous

    def restore(self, key: str, state: PreviousState) -> None:
        """Set cells back to a recorded state (undo / redo of an edit)."""
        if state.cell_indices.size:
            self._annotation(key).restore(*state)
            self._notify(key, "codes")

    def rename(self, key: str, code: int, name: str) -> None:
        self._annotation(key).rename(code, name)
        self._notify(key, "classes")

    def recolor(self, key: str, code: int, color) -> None:
        self._annotation(key).recolor(code, color)
        self._notify(key, "classes")

    def add_class(self, key: str, name: str, color=None) -> int:
        code = self._annotation(key).add_class(name, color)
        self._notify(key, "classes")
        return code

    def merge(self, key: str, src: int, dst: int) -> dict:
        mapping = self._annotation(key).merge(src, dst)
        self._notify(key, "merged")
        return mapping

    def refine(self, key: str, *, progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> np.ndarray:
        """Retrain the label head on the curated cells; update only the cells nobody corrected.

        Returns the indices of the cells whose class changed.
        """
        pred = self.compute_refinement(key, progress=progress, cancel=cancel)
        return self.apply_refinement(key, pred)

    def compute_refinement(self, key: str, *, progress=None, cancel=None):
        from .classifier import refine_from_corrections

        ann = self._annotation(key)
        if not ann.curated.any():
            raise StofmInputError(
                f"no cell of '{display_name(key)}' has been corrected yet: paint, fill or erase some cells first."
            )
        if "X_stofm" not in self.adata.obsm:
            raise StofmInputError("refining needs the SToFM embedding of the slice: run SToFM first.")
        check_cancelled(cancel)
        report(progress, 0, 1, "refining")
        conf = np.nan_to_num(ann.confidence, nan=0.0)
        # spatial context as predict() uses for its label head
        pred = refine_from_corrections(np.asarray(self.adata.obsm["X_stofm"]), self.xy, ann.codes.copy(),
                                       ann.curated.copy(), list(ann.categories), conf, seed=self.seed)
        report(progress, 1, 1, "refined")
        return pred

    def apply_refinement(self, key: str, pred) -> np.ndarray:
        ann = self._annotation(key)
        free = ~ann.curated
        codes = np.asarray(pred.codes, dtype=np.int32)
        if codes.shape != ann.codes.shape:
            raise StofmInputError("the refined prediction does not cover every cell of the slice.")
        if codes.max(initial=-1) >= ann.n_classes:
            raise StofmInputError("the refined prediction uses classes this annotation does not have.")
        changed = np.flatnonzero(free & (codes != ann.codes))
        ann.codes[free] = codes[free]
        ann.predicted_codes[free] = codes[free]
        ann.confidence[free] = np.asarray(pred.confidence, dtype=np.float32)[free]
        ann.provenance["n_refinements"] = int(ann.provenance.get("n_refinements", 0)) + 1
        ann._touch()
        self._notify(key, "codes")
        self.autosave()
        return changed

    def _annotation(self, key: str) -> Annotation:
        if key not in self.annotations:
            raise StofmInputError(f"no labels '{display_name(key)}' on this slice yet: run SToFM first.")
        return self.annotations[key]

    # ------------------------------------------------------------------ saving
    def autosave(self) -> Optional[Path]:
        """Write every annotation to the autosave file; returns it (None without annotations)."""
        if self.store is None or not self.annotations:
            return None
        return self.store.save(self.annotations, self.adata.obs_names)

    def export(self, path, *, fmt: Optional[str] = None, overwrite: bool = False, keys: Optional[Sequence[str]] = None) -> Path:
        """Export the annotations as ``.h5ad``, ``.csv`` or SpatialData ``.zarr`` (by suffix or ``fmt``)."""
        from . import export as export_module

        if not self.annotations:
            raise StofmInputError("there are no labels to export yet: run SToFM or open labelled data first.")
        anns = {k: a for k, a in self.annotations.items() if keys is None or k in keys}
        fmt = fmt or export_format_of(path)
        if fmt == "h5ad":
            return export_module.export_h5ad(self.adata, anns, path, overwrite=overwrite)
        if fmt == "csv":
            return export_module.export_csv(self.adata, anns, path, overwrite=overwrite)
        if fmt == "spatialdata":
            return export_module.export_spatialdata(self.adata, anns, path, overwrite=overwrite,
                                                    labels=self.territories.as_spatialdata_labels())
        raise StofmInputError(f"unknown export format {fmt!r}: use h5ad, csv or spatialdata (.zarr).")


def export_format_of(path) -> str:
    suffix = Path(str(path).rstrip("/")).suffix.lower()
    formats = {".h5ad": "h5ad", ".csv": "csv", ".zarr": "spatialdata"}
    if suffix not in formats:
        raise StofmInputError(
            f"cannot tell the export format of '{Path(str(path)).name}': end the name in .h5ad, .csv or .zarr."
        )
    return formats[suffix]


def _describe_source(label_source) -> str:
    if label_source is None:
        return "none"
    if label_source[0] == "reference":
        ref = label_source[1]
        return f"reference {ref if isinstance(ref, (str, os.PathLike)) else 'AnnData'}:{label_source[2]}"
    return f"column {label_source[1]}"


def _stage(progress: Optional[ProgressCallback], prefix: str) -> Optional[ProgressCallback]:
    if progress is None:
        return None
    return lambda done, total, message="": progress(done, total, prefix + (message or ""))
