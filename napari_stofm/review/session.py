"""The review-and-correct loop on one slice, as a Python object (no napari, no Qt).

:class:`SliceSession` ties together what the napari widgets show and edit, so that every
step of the GUI is also a plain library call::

    from napari_stofm.review.session import SliceSession
    s = SliceSession.open("slice.h5ad")         # read + autosave restored if any
    s.run(n_regions=7, reference="ref.h5ad", label_key="cell_type")   # as predict()
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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import AutosaveLocked, AutosaveRefused, StofmInputError
from napari_stofm.heads.annotation import Annotation, PreviousState
from napari_stofm.io.autosave import CurationStore, cache_dir, file_signature, host_name
from napari_stofm.io.slices import slice_name
from napari_stofm.keys import display_name
from napari_stofm.pipeline.predict import RunResult
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report, staged

REGION_KEY = keys.REGION
CELL_TYPE_KEY = keys.CELL_TYPE
#: obs columns shown as editable label layers when a slice is opened (key, display name).
KNOWN_COLUMNS = (
    (REGION_KEY, display_name(REGION_KEY)),
    (CELL_TYPE_KEY, display_name(CELL_TYPE_KEY)),
    ("region", "region"),
    ("cell_type", "cell_type"),
)
EMBEDDING_SUFFIX = ".stofm-embedding.npz"
#: the run's last progress stage when the slice has no territories yet (and its weight, as in
#: :data:`napari_stofm.pipeline.predict.SECONDS_PER_1000_CELLS`)
STAGE_TERRITORIES = "Cell territories"
TERRITORY_SECONDS_PER_1000_CELLS = 0.15


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
class RefinementPreview:
    """What refining would do, before it is applied (:meth:`SliceSession.preview_refinement`).

    ``changed`` are the uncurated cells whose class would change, ``before`` / ``after``
    their codes now and after refining; ``counts`` is ``{class name: {"gained": n,
    "lost": n}}`` over those cells (classes with no change left out).
    """

    key: str
    prediction: object  # the refined LabelPrediction (what apply_refinement installs)
    changed: np.ndarray
    before: np.ndarray
    after: np.ndarray
    counts: Dict[str, Dict[str, int]]

    @property
    def n_changed(self) -> int:
        return int(self.changed.size)

    def describe(self, limit: int = 4) -> str:
        """``"N cells would change class (+a X, -b Y, ...)"``."""
        text = f"{self.n_changed} uncorrected cell{'s' if self.n_changed != 1 else ''} would change class"
        parts = sorted(self.counts.items(), key=lambda kv: -(kv[1]["gained"] + kv[1]["lost"]))
        bits = [f"+{c['gained']} {name}" for name, c in parts if c["gained"]][:limit]
        return f"{text} ({', '.join(bits)})" if bits else text


@dataclass
class AnnotationState:
    """Everything of one annotation that a refine / merge / re-cluster can change."""

    categories: List[str]
    colors: List[str]
    codes: np.ndarray
    predicted_codes: np.ndarray
    confidence: np.ndarray
    curated: np.ndarray
    provenance: dict

    @classmethod
    def of(cls, ann: Annotation) -> "AnnotationState":
        import copy

        return cls(list(ann.categories), list(ann.colors), ann.codes.copy(), ann.predicted_codes.copy(),
                   ann.confidence.copy(), ann.curated.copy(), copy.deepcopy(ann.provenance))

    def put(self, ann: Annotation) -> None:
        """Set ``ann`` (in place) to this state."""
        import copy

        ann.categories, ann.colors = list(self.categories), list(self.colors)
        ann.codes, ann.predicted_codes = self.codes.copy(), self.predicted_codes.copy()
        ann.confidence, ann.curated = self.confidence.copy(), self.curated.copy()
        ann.provenance = copy.deepcopy(self.provenance)


@dataclass
class ChangeRecord:
    """One undoable step that is not a paint edit (refine, merge, re-cluster).

    ``before`` / ``after``: the whole annotation ``key`` around the step. Undo puts
    ``before`` back; undoing is last-first (as napari's own history), so a state restored
    is always the one the step started from.
    """

    key: str
    label: str  # 'refine', 'merge', 'recluster'
    before: AnnotationState
    after: AnnotationState
    applied: bool = True

    @property
    def classes_changed(self) -> bool:
        return self.before.categories != self.after.categories or self.before.colors != self.after.colors


@dataclass
class AutosaveSnapshot:
    """Copies of a session's annotations at one moment (:meth:`SliceSession.autosave_snapshot`),
    numbered in the order they were taken."""

    number: int
    annotations: Dict[str, Annotation]


class SliceSession:
    """One slice under review: the AnnData, its territories, its annotations, autosave."""

    def __init__(self, adata, path=None, *, name: Optional[str] = None, spatial_key: str = keys.SPATIAL,
                 autosave_dir=None):
        self.adata = adata
        if path is None:
            src = adata.uns.get(keys.SOURCE, {}) if hasattr(adata, "uns") else {}
            path = src.get("path") if isinstance(src, dict) else None
        self.path: Optional[Path] = Path(path) if path else None
        self.name = name or (slice_name(self.path) if self.path else "slice")
        self.spatial_key = spatial_key
        self.annotations: Dict[str, Annotation] = {}
        self._territories = None
        self._territory_lock = threading.Lock()
        self.clusterer = None
        self.seed = 0  # seeds the region clustering and the label head, as predict() does
        self._listeners: list = []  # weak references to callbacks
        if autosave_dir is not None:
            self.store: Optional[CurationStore] = CurationStore(self.path or self.name, directory=autosave_dir)
        elif self.path is not None:
            self.store = CurationStore(self.path)
        else:
            self.store = CurationStore(f"{self.name}.h5ad", directory=cache_dir() / "curation")
        self.restored_from: Optional[Path] = None
        #: why the autosave was not restored (and where it was kept), None when it was / there was none
        self.restore_error: Optional[str] = None
        #: set when this session cannot autosave into the slice's autosave (another session holds
        #: it): says who holds it and where this session autosaves instead
        self.autosave_error: Optional[str] = None
        #: autosave files this session moved aside (kept, never deleted) instead of overwriting them
        self.kept_aside: List[Path] = []
        #: obs columns that looked like labels but could not be read: {column: reason}
        self.skipped_columns: Dict[str, str] = {}
        self._lock = None  # SessionLock of the autosave this session writes
        self._lock_store = None  # the store the lock was claimed for
        self._lock_finalizer = None
        self._autosave_store: Optional[CurationStore] = None  # where autosaves go (store or a sibling)
        #: (path, signature) of the autosave file this session last read or wrote
        self._known_autosave = None
        # autosaves may be written from a worker thread (a GUI's): one writes at a time, and
        # a snapshot older than one already written is not written over it
        self._autosave_mutex = threading.Lock()
        self._snapshot_lock = threading.Lock()  # numbers snapshots without waiting for a write
        self._snapshots_taken = 0
        self._snapshot_written = 0
        self._fingerprint = None  # (obs_names, obs_fingerprint(obs_names)), see _obs_fingerprint
        #: undoable non-paint steps (refine, merge, re-cluster), oldest first; see :meth:`undo_change`
        self.changes: List[ChangeRecord] = []
        #: the step being announced to listeners (set only during that notification), so a
        #: napari binding can put it into the layer's own undo history
        self.current_change: Optional[ChangeRecord] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path, *, restore: bool = True, **kwargs) -> "SliceSession":
        """Read a slice (``.h5ad`` / SpatialData ``.zarr``), pick up its labels and autosave."""
        from napari_stofm.io.slices import read_slice

        adata = read_slice(path)
        session = cls(adata, path, **kwargs)
        session.load_existing_labels(restore=restore)
        session.load_embedding_cache()
        return session

    def load_existing_labels(self, *, restore: bool = True) -> List[str]:
        """Annotations from the slice's obs columns, then the autosave on top (when it fits).

        Returns the keys loaded. A label column that cannot be read is skipped (the reason in
        ``self.skipped_columns`` and a warning); ``""`` in a label column means unlabelled (as
        everywhere, see :meth:`Annotation.from_obs`).

        The session takes the lock of the slice's autosave (see :meth:`autosave`). An autosave
        that is not restored is never overwritten: one made for other cells (``kind
        'refused'``) or unreadable (``'corrupt'``) is renamed to
        ``<name>.refused-YYYYmmdd-HHMMSS.npz`` / ``.corrupt-...`` and ``self.restore_error``
        says why and where it went.
        """
        import warnings

        self.restore_error = None
        for key, _name in KNOWN_COLUMNS:
            if key in self.adata.obs and key not in self.annotations:
                try:
                    self.annotations[key] = Annotation.from_obs(self.adata, key)
                except StofmInputError as err:
                    self.skipped_columns[key] = str(err)
                    warnings.warn(f"obs['{key}'] is not shown as labels: {err}", UserWarning, stacklevel=2)
                    continue
        # a column of ground truth next to a prediction of the same kind stays a column
        if self.store is None:
            return list(self.annotations)
        target = self._claim_autosave()
        if restore and self.store.exists():
            path = self.store.path
            before = file_signature(path)
            try:
                saved = self.store.load(self.adata.obs_names, fingerprint=self._obs_fingerprint())
            except AutosaveRefused as err:
                self.restore_error = self._keep_refused(err, mine=target is self.store)
                saved = {}
            except StofmInputError as err:
                self.restore_error = str(err)
                saved = {}
            if saved:
                self.annotations.update(saved)
                self.restored_from = path
                if target is self.store:
                    self._known_autosave = (str(path), before)
        return list(self.annotations)

    def _keep_refused(self, err: "AutosaveRefused", *, mine: bool) -> str:
        """Move a refused / unreadable autosave aside (kept) and say where it went."""
        path = Path(err.path) if err.path is not None else self.store.path
        if not mine:
            return (f"{err} It is the autosave of the other session that holds it ({self.autosave_error}); "
                    "it was left as it is.")
        try:
            aside = self.store.set_aside(err.kind, path)
        except OSError as move_err:
            return (f"{err} It could not be moved aside ({move_err}); it is not overwritten: autosaving stops "
                    "until it is moved away.")
        if aside is None:
            return str(err)
        self.kept_aside.append(aside)
        return (f"{err} It was kept as {aside} (renamed, so no new autosave overwrites it); rename it back to "
                f"{path.name} to load it again.")

    # ------------------------------------------------------------------ autosave lock
    def _claim_autosave(self) -> Optional[CurationStore]:
        """The store this session autosaves to, after taking its lock.

        The slice's autosave when no other live session holds it; otherwise a file of this
        session's own, ``<slice>.stofm-curation.session-<host>-<pid>.npz`` (said in
        ``self.autosave_error`` and as a warning), so that neither session overwrites the
        other's curation.
        """
        import warnings

        store = self.store
        if store is None:
            return None
        if self._lock_store is store and self._autosave_store is not None and (self._lock is None or self._lock.held):
            return self._autosave_store  # still ours (a lock file deleted or taken by someone else is claimed again)
        # (re)claiming: what this session knows of a file stays keyed by its path, so that a
        # session closed and locking again (a late autosave after its layers were removed)
        # still knows the file it wrote itself, and anything written there since is kept aside
        self._release_lock()
        self._lock_store = store
        owner = f"napari-stofm session of {self.name}"
        try:
            lock, target = store.acquire_lock(owner=owner), store
            self.autosave_error = None
        except AutosaveLocked as err:
            lock, target = None, None
            host = re.sub(r"[^A-Za-z0-9_-]+", "_", host_name())[:32]
            for i in range(1, 50):
                candidate = store.sibling(f"session-{host}-{os.getpid()}" + (f"-{i}" if i > 1 else ""))
                try:
                    lock, target = candidate.acquire_lock(owner=owner), candidate
                    break
                except AutosaveLocked:
                    continue
            if target is None:
                self.autosave_error = f"{err} This session does not autosave."
            else:
                self.autosave_error = (
                    f"{err} So that neither session overwrites the other's curation, this session autosaves to "
                    f"{target.path} instead; to continue from it later, close the other session and rename it to "
                    f"{store.path.name}.")
            warnings.warn(self.autosave_error, UserWarning, stacklevel=3)
        self._lock = lock
        if lock is not None:
            self._lock_finalizer = weakref.finalize(self, lock.release)  # also at interpreter exit
        self._autosave_store = target
        return target

    def _release_lock(self) -> None:
        if self._lock_finalizer is not None:
            self._lock_finalizer()
        self._lock = self._lock_finalizer = self._lock_store = self._autosave_store = None

    @property
    def autosave_path(self) -> Optional[Path]:
        """Where this session autosaves (None before its first autosave / open)."""
        return self._autosave_store.path if self._autosave_store is not None else None

    def close(self) -> None:
        """Release the autosave lock (also done when the session is garbage-collected or
        Python exits), after an autosave being written finishes; the session can still be
        used, and locks again on its next autosave."""
        with self._autosave_mutex:
            self._release_lock()
            # a snapshot taken before closing and not yet written is not written after it (it
            # would lock the autosave again); whoever closes writes the latest state first
            with self._snapshot_lock:
                self._snapshot_written = self._snapshots_taken + 1

    def __enter__(self) -> "SliceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ observers
    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        """``callback(key, what)`` after an annotation changes; ``what`` is one of
        ``'replaced'`` (new annotation object), ``'codes'`` (cells changed class),
        ``'classes'`` (renamed / recoloured / added) or ``'merged'`` (codes renumbered).
        During the notification of an undoable step (refine, merge, re-cluster, which also
        come as ``'codes'`` / ``'merged'`` / ``'replaced'``) ``self.current_change`` is its
        :class:`ChangeRecord`."""
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
                from napari_stofm.review.raster import territories_for_slice

                self._territories = territories_for_slice(self.adata, spatial_key=self.spatial_key)
            return self._territories

    @territories.setter
    def territories(self, value) -> None:
        with self._territory_lock:
            self._territories = value

    def class_image(self, key: str) -> np.ndarray:
        return self.territories.class_image(self.annotations[key].codes)

    # ------------------------------------------------------------------ running the model
    def compute(self, *, model=None, weights=None, n_regions: Optional[int] = None, resolution=None,
                reference=None, label_key: Optional[str] = None, label_source=None, device=None,
                progress: Optional[ProgressCallback] = None, cancel: CancelToken = None,
                **embed_kwargs) -> RunResult:
        """Embed the slice (unless a cached embedding of the same weights exists), find tissue
        regions (``n_regions``, else ``resolution``, else 7) and, with ``label_key``, cell
        types (from ``reference``, else the slice's own partial labels in that column).

        The keywords are those of :func:`napari_stofm.predict`, which runs the same core
        (:func:`~napari_stofm.pipeline.predict.run_annotations`). ``label_source`` is a
        shorthand: ``('reference', path_or_adata, label_key)`` or ``('column', obs_key)``.
        Nothing of the session (AnnData, clusterer, territories) changes: a GUI runs this in
        a worker thread and :meth:`apply` s the returned result on its own thread.
        """
        from napari_stofm.pipeline.predict import run_annotations

        reference, label_key = _label_arguments(label_source, reference, label_key)
        overall, owned = staged(progress)
        with self._territory_lock:
            need_territories = self._territories is None
        if overall is not None and need_territories:  # the last stage of the run's one progress bar
            overall.add(STAGE_TERRITORIES, TERRITORY_SECONDS_PER_1000_CELLS * self.adata.n_obs / 1000, final=True)
        result = run_annotations(
            self.adata, model, n_regions=n_regions, resolution=resolution, reference=reference,
            label_key=label_key, regions=True, weights=weights, spatial_key=self.spatial_key, device=device,
            seed=self.seed, progress=overall, cancel=cancel, **embed_kwargs)
        check_cancelled(cancel)
        if need_territories:
            from napari_stofm.review.raster import territories_for_slice

            if overall is not None:
                overall.begin(STAGE_TERRITORIES)
            result.territories = territories_for_slice(self.adata, spatial_key=self.spatial_key)
        check_cancelled(cancel)
        if owned:
            overall.finish("done")
        return result

    def apply(self, result: RunResult, *, save_cache: bool = True, autosave: bool = True) -> None:
        """Install a run's result (replacing earlier predictions) and autosave.

        ``save_cache``: also write the embedding cache (:meth:`save_embedding_cache`) now; a
        GUI passes False and writes it from a worker thread (the file is large).
        ``autosave``: write the autosave now; a GUI passes False and writes
        :meth:`autosave_snapshot` from a worker thread."""
        if result.territories is not None:
            self.territories = result.territories
        if result.clusterer is not None:
            self.clusterer = result.clusterer
        result.write(self.adata)
        if save_cache and not result.embedding_reused:
            try:
                self.save_embedding_cache()
            except OSError as err:  # a cache is a convenience: never fail a run over it
                result.messages.append(f"the embedding was not cached ({err})")
        for key, ann in result.annotations.items():
            self.annotations[key] = ann
            self._notify(key, "replaced")
        if autosave:
            self.autosave()

    def run(self, **kwargs) -> RunResult:
        """:meth:`compute` then :meth:`apply` (the headless path)."""
        result = self.compute(**kwargs)
        self.apply(result)
        return result

    def _provenance(self, **params) -> dict:
        from napari_stofm.pipeline.predict import model_provenance

        meta = self.adata.uns.get(keys.UNS, {}) if hasattr(self.adata, "uns") else {}
        prov = model_provenance(meta if isinstance(meta, dict) else {})
        prov.update({k: v for k, v in params.items() if v is not None})
        return prov

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

        from napari_stofm.io.autosave import atomic_write_bytes

        path = self.embedding_cache_path
        meta = self.adata.uns.get(keys.UNS, {})
        if path is None or keys.EMBEDDING not in self.adata.obsm or not isinstance(meta, dict):
            return None
        keep = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
        arrays = {keys.EMBEDDING: np.asarray(self.adata.obsm[keys.EMBEDDING], dtype=np.float32),
                  "meta": np.frombuffer(json.dumps(keep).encode("utf-8"), dtype=np.uint8)}
        if keys.CELL_EMBEDDING in self.adata.obsm:
            arrays[keys.CELL_EMBEDDING] = np.asarray(self.adata.obsm[keys.CELL_EMBEDDING], dtype=np.float32)
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
        if path is None or not path.is_file() or keys.EMBEDDING in self.adata.obsm:
            return False
        from napari_stofm.io.autosave import read_npz_checked

        n = self.adata.n_obs
        try:  # headers and sizes are checked before anything is inflated (a cache is never trusted)
            arrays = read_npz_checked(path, {"meta": ((None,), "u"), keys.EMBEDDING: ((n, None), "f")},
                                      max_bytes=n * 4 * 4096 + (1 << 24))
            meta = json.loads(bytes(arrays.pop("meta")).decode("utf-8"))
            try:
                arrays.update(read_npz_checked(path, {keys.CELL_EMBEDDING: ((n, None), "f")},
                                               max_bytes=n * 4 * 4096))
            except ValueError:
                pass  # an older cache without the gene-scale embedding
        except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
            return False  # a cache is a convenience: a broken one is simply not used
        if not isinstance(meta, dict):
            return False
        from napari_stofm.genes.expression import expression_fingerprint

        parts = str(meta.get("gene_scale_key", "")).split(":")
        if (arrays[keys.EMBEDDING].shape[0] != self.adata.n_obs or len(parts) < 2
                or parts[1] != expression_fingerprint(self.adata)):
            return False
        for key in (keys.EMBEDDING, keys.CELL_EMBEDDING):
            if key in arrays:
                self.adata.obsm[key] = arrays[key]
        stofm = dict(self.adata.uns.get(keys.UNS, {}) or {})
        stofm.update(meta)
        self.adata.uns[keys.UNS] = stofm
        return True

    # ------------------------------------------------------------------ regions
    def recluster(self, n_regions: Optional[int] = None, resolution: Optional[float] = None, *,
                  discard_curated: bool = False) -> Annotation:
        """New tissue regions from the cached clusterer (no model run); replaces ``stofm_region``."""
        self.check_recluster(discard_curated=discard_curated)
        ann = self.compute_regions(n_regions, resolution)
        old = self.annotations.get(REGION_KEY)
        if old is None or old.n_cells != ann.n_cells:
            self.install(REGION_KEY, ann)
            return ann
        # re-clustering is one undoable step: the new regions go into the existing annotation
        before = AnnotationState.of(old)
        AnnotationState.of(ann).put(old)
        old.to_obs(self.adata)
        self._record(REGION_KEY, "recluster", before, what="replaced")
        self.autosave()
        return old

    def check_recluster(self, *, discard_curated: bool = False) -> None:
        """Raise when re-clustering would throw away hand-corrected region labels."""
        old = self.annotations.get(REGION_KEY)
        if old is not None and old.curated.any() and not discard_curated:
            raise StofmInputError(
                f"{int(old.curated.sum())} region labels were corrected by hand; re-clustering replaces "
                "them. Export them first, or pass discard_curated=True."
            )

    def compute_regions(self, n_regions: Optional[int] = None, resolution: Optional[float] = None) -> Annotation:
        """Regions at another count / resolution from the cached clusterer; the session is not
        changed (without a cached clusterer one is fitted on ``obsm['X_stofm']`` for this call)."""
        clusterer = self.clusterer
        if clusterer is None:
            from napari_stofm.heads.regions import RegionClusterer

            if keys.EMBEDDING not in self.adata.obsm:
                raise StofmInputError("run SToFM first: there is no embedding to cluster.")
            clusterer = RegionClusterer(np.asarray(self.adata.obsm[keys.EMBEDDING]), self.xy, seed=self.seed)
        pred = clusterer.regions(n_regions=n_regions, resolution=resolution if n_regions is None else None)
        return Annotation.from_prediction(REGION_KEY, pred,
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
        (:meth:`napari_stofm.review.raster.Territories.cells_touched`).
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
        previous, after = self._curate(key, ann, cells, codes)
        return EditResult(key, cells, codes, touched, tcodes, previous, after)

    def _curate(self, key: str, ann, cells: np.ndarray, codes: np.ndarray):
        """Give ``cells`` the classes ``codes``, mark them curated and notify; returns the
        (before, after) states of those cells."""
        previous = PreviousState(cells.copy(), ann.codes[cells].copy(), ann.curated[cells].copy())
        if cells.size:
            ann.codes[cells] = codes
            ann.curated[cells] = True
            ann._touch()
            self._notify(key, "codes")
        return previous, PreviousState(cells.copy(), ann.codes[cells].copy(), ann.curated[cells].copy())

    def assign(self, key: str, cells, code: int) -> PreviousState:
        previous = self._annotation(key).assign(cells, code)
        self._notify(key, "codes")
        return previous

    def relabel(self, key: str, cells, code: Optional[int] = None) -> EditResult:
        """Give ``cells`` the class ``code`` (-1 = unassigned; None: each keeps its class, i.e.
        *accept* the prediction) and mark them curated, as an edit (``restore(key,
        result.previous)`` undoes it; the napari binding makes it one undo step of the layer).

        ``result.cells`` are the cells whose class or curated flag changed."""
        ann = self._annotation(key)
        cells = np.unique(ann._indices(cells))
        new_codes = ann.codes[cells].copy() if code is None else np.full(cells.size, ann._check_code(
            code, allow_unassigned=True), dtype=np.int32)
        changed = (new_codes != ann.codes[cells]) | ~ann.curated[cells]
        which, codes = cells[changed], new_codes[changed]
        previous, after = self._curate(key, ann, which, codes)
        return EditResult(key, which, codes, cells, ann.codes[cells].copy(), previous, after)

    def accept(self, key: str, cells) -> EditResult:
        """Mark ``cells`` curated without changing their class (see :meth:`relabel`)."""
        return self.relabel(key, cells, None)

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
        """Merge class ``src`` into ``dst`` (one undoable step, see :meth:`undo_change`)."""
        ann = self._annotation(key)
        before = AnnotationState.of(ann)
        mapping = ann.merge(src, dst)
        self._record(key, "merge", before, what="merged")
        return mapping

    # ------------------------------------------------------------------ undo of non-paint steps
    def _record(self, key: str, label: str, before: AnnotationState, *, what: str) -> ChangeRecord:
        """Keep a step on the undo list and announce it (``self.current_change`` meanwhile)."""
        record = ChangeRecord(key, label, before, AnnotationState.of(self.annotations[key]))
        self.changes = [r for r in self.changes if r.applied]  # a new step drops what was undone
        self.changes.append(record)
        self.current_change = record
        try:
            self._notify(key, what)
        finally:
            self.current_change = None
        return record

    def _put_state(self, record: ChangeRecord, state: AnnotationState, applied: bool, autosave: bool) -> None:
        ann = self._annotation(record.key)
        state.put(ann)
        if record.label == "recluster":  # re-clustering writes the obs columns; so does its undo
            ann.to_obs(self.adata)
        record.applied = applied
        self._notify(record.key, "merged" if record.classes_changed else "codes")
        if autosave:
            self.autosave()

    def revert(self, record: ChangeRecord, *, autosave: bool = True) -> None:
        """Put the annotation back as it was before ``record`` (the undo of that step)."""
        self._put_state(record, record.before, False, autosave)

    def reapply(self, record: ChangeRecord, *, autosave: bool = True) -> None:
        """Put the annotation as ``record`` left it (the redo of that step)."""
        self._put_state(record, record.after, True, autosave)

    def undo_change(self, key: Optional[str] = None) -> Optional[ChangeRecord]:
        """Undo the latest refine / merge / re-cluster still applied (of ``key`` when given);
        returns it, None when there is none. In napari, ``layer.undo()`` does this in turn
        with the brush strokes; this call is for scripts."""
        applied = [r for r in self.changes if r.applied and (key is None or r.key == key)]
        if not applied:
            return None
        self.revert(applied[-1])
        return applied[-1]

    def redo_change(self, key: Optional[str] = None) -> Optional[ChangeRecord]:
        """Redo the step :meth:`undo_change` undid last; None when there is none."""
        undone = [r for r in self.changes if not r.applied and (key is None or r.key == key)]
        if not undone:
            return None
        self.reapply(undone[0])
        return undone[0]

    def refine(self, key: str, *, progress: Optional[ProgressCallback] = None,
               cancel: CancelToken = None) -> np.ndarray:
        """Retrain the label head on the curated cells; update only the cells nobody corrected.

        Returns the indices of the cells whose class changed.
        """
        pred = self.compute_refinement(key, progress=progress, cancel=cancel)
        return self.apply_refinement(key, pred)

    def preview_refinement(self, key: str, prediction=None, *, progress=None, cancel=None) -> RefinementPreview:
        """What :meth:`refine` would change, without changing anything: the cells whose class
        would change and per-class counts. ``prediction``: a result of
        :meth:`compute_refinement` (computed here when None). Pass the preview to
        :meth:`apply_refinement` to apply it."""
        if prediction is None:
            prediction = self.compute_refinement(key, progress=progress, cancel=cancel)
        ann = self._annotation(key)
        codes = self._refined_codes(ann, prediction)
        changed = np.flatnonzero(~ann.curated & (codes != ann.codes))
        before, after = ann.codes[changed].copy(), codes[changed].copy()
        names = list(ann.categories)
        counts: Dict[str, Dict[str, int]] = {}
        for side, values in (("gained", after), ("lost", before)):
            for code, n in zip(*np.unique(values, return_counts=True), strict=True):
                name = names[code] if code >= 0 else "unassigned"
                counts.setdefault(name, {"gained": 0, "lost": 0})[side] = int(n)
        return RefinementPreview(key, prediction, changed, before, after, counts)

    @staticmethod
    def _refined_codes(ann: Annotation, pred) -> np.ndarray:
        codes = np.asarray(pred.codes, dtype=np.int32)
        if codes.shape != ann.codes.shape:
            raise StofmInputError("the refined prediction does not cover every cell of the slice.")
        if codes.max(initial=-1) >= ann.n_classes:
            raise StofmInputError("the refined prediction uses classes this annotation does not have.")
        return codes

    def compute_refinement(self, key: str, *, progress=None, cancel=None):
        from napari_stofm.heads.classifier import refine_from_corrections

        ann = self._annotation(key)
        if not ann.curated.any():
            raise StofmInputError(
                f"no cell of '{display_name(key)}' has been corrected yet: paint, fill or erase some cells first."
            )
        if keys.EMBEDDING not in self.adata.obsm:
            raise StofmInputError("refining needs the SToFM embedding of the slice: run SToFM first.")
        check_cancelled(cancel)
        n = int(ann.curated.sum())
        report(progress, 0, 1, f"retraining the head on {n} corrected cell{'s' if n != 1 else ''}")
        conf = np.nan_to_num(ann.confidence, nan=0.0)
        # spatial context as predict() uses for its label head
        pred = refine_from_corrections(np.asarray(self.adata.obsm[keys.EMBEDDING]), self.xy, ann.codes.copy(),
                                       ann.curated.copy(), list(ann.categories), conf, seed=self.seed)
        check_cancelled(cancel)  # a refinement cancelled while the head trained is dropped
        report(progress, 1, 1, "refined")
        return pred

    def apply_refinement(self, key: str, pred) -> np.ndarray:
        """Install a refined prediction (or a :class:`RefinementPreview`) on the uncurated
        cells, as one undoable step (:meth:`undo_change`, or ``layer.undo()`` in napari).
        Returns the indices of the cells whose class changed."""
        if isinstance(pred, RefinementPreview):
            pred = pred.prediction
        ann = self._annotation(key)
        free = ~ann.curated
        codes = self._refined_codes(ann, pred)
        before = AnnotationState.of(ann)
        changed = np.flatnonzero(free & (codes != ann.codes))
        ann.codes[free] = codes[free]
        ann.predicted_codes[free] = codes[free]
        ann.confidence[free] = np.asarray(pred.confidence, dtype=np.float32)[free]
        ann.provenance["n_refinements"] = int(ann.provenance.get("n_refinements", 0)) + 1
        ann._touch()
        self._record(key, "refine", before, what="codes")
        self.autosave()
        return changed

    def _annotation(self, key: str) -> Annotation:
        if key not in self.annotations:
            raise StofmInputError(f"no labels '{display_name(key)}' on this slice yet: run SToFM first.")
        return self.annotations[key]

    # ------------------------------------------------------------------ saving
    def autosave_snapshot(self) -> "AutosaveSnapshot":
        """The annotations as they are now, copied, for :meth:`autosave` to write later (from
        a worker thread while the user goes on editing). Cheap: a copy of each labelling's
        arrays."""
        with self._snapshot_lock:
            self._snapshots_taken += 1
            number = self._snapshots_taken
        return AutosaveSnapshot(number, {k: a.copy() for k, a in self.annotations.items()})

    def _obs_fingerprint(self) -> str:
        """The autosave fingerprint of the cell ids, computed once per set of ids (a pandas
        Index never changes in place; a new one is a new object)."""
        from napari_stofm.io.autosave import obs_fingerprint

        names = self.adata.obs_names
        cached = self._fingerprint
        if cached is None or cached[0] is not names:
            cached = self._fingerprint = (names, obs_fingerprint(names))
        return cached[1]

    def autosave(self, snapshot: Optional["AutosaveSnapshot"] = None) -> Optional[Path]:
        """Write every annotation to the autosave file; returns it (None without annotations).

        The file is the slice's ``<slice>.stofm-curation.npz`` unless another live session
        holds it (then this session's own file, see ``self.autosave_error``). A file there
        that this session neither restored nor wrote (another writer's, or one left
        unrestored with ``restore=False``) is first renamed to
        ``<name>.previous-YYYYmmdd-HHMMSS.npz`` (kept, listed in ``self.kept_aside``).

        ``snapshot`` (from :meth:`autosave_snapshot`): write those annotations instead of the
        current ones. This call may run in a worker thread: autosaves are written one at a
        time, and a snapshot older than one already written is skipped (returns None), so a
        late worker never puts back labels the user has since changed.
        """
        if snapshot is None:
            snapshot = self.autosave_snapshot()
        with self._autosave_mutex:
            if snapshot.number < self._snapshot_written:
                return None  # a newer state is already on disk
            written = self._write_autosave(snapshot.annotations)
            if written is not None:
                self._snapshot_written = snapshot.number
            return written

    def _write_autosave(self, annotations: Dict[str, Annotation]) -> Optional[Path]:
        import warnings

        if self.store is None or not annotations:
            return None
        target = self._claim_autosave()
        if target is None:
            raise AutosaveLocked(self.autosave_error or "this session has no autosave file.")
        path = target.path
        current = file_signature(path)
        if current is not None and self._known_autosave != (str(path), current):
            aside = target.set_aside("previous", path)
            if aside is not None:
                self.kept_aside.append(aside)
                warnings.warn(f"the autosave {path} held labels this session had not loaded; it was kept as {aside} "
                              "before this session's autosave was written.", UserWarning, stacklevel=3)
        written = target.save(annotations, self.adata.obs_names, fingerprint=self._obs_fingerprint())
        self._known_autosave = (str(written), file_signature(written))
        return written

    def export(self, path, *, fmt: Optional[str] = None, overwrite: bool = False,
               keys: Optional[Sequence[str]] = None, progress: Optional[ProgressCallback] = None,
               cancel: CancelToken = None) -> Path:
        """Export the annotations as ``.h5ad``, ``.csv`` or SpatialData ``.zarr`` (by suffix or ``fmt``).

        ``progress`` / ``cancel``: see :mod:`napari_stofm.progress`; a cancelled export writes
        nothing. The annotations are copied first, so a GUI may run this in a worker while
        the user goes on editing (the export holds the labels as they were when it began)."""
        from napari_stofm.io import export as export_module

        if not self.annotations:
            raise StofmInputError("there are no labels to export yet: run SToFM or open labelled data first.")
        anns = {k: a.copy() for k, a in self.annotations.items() if keys is None or k in keys}
        fmt = fmt or export_format_of(path)
        if fmt not in ("h5ad", "csv", "spatialdata"):
            raise StofmInputError(f"unknown export format {fmt!r}: use h5ad, csv or spatialdata (.zarr).")
        export_module.check_export_target(path, overwrite=overwrite, fmt=fmt)  # refuse before any work
        if fmt == "h5ad":
            return export_module.export_h5ad(self.adata, anns, path, overwrite=overwrite, progress=progress,
                                             cancel=cancel)
        if fmt == "csv":
            return export_module.export_csv(self.adata, anns, path, overwrite=overwrite, progress=progress,
                                            cancel=cancel)
        overall, owned = staged(progress)
        with self._territory_lock:
            need_territories = self._territories is None
        if overall is not None and need_territories:
            overall.add(STAGE_TERRITORIES, TERRITORY_SECONDS_PER_1000_CELLS * self.adata.n_obs / 1000)
            overall.begin(STAGE_TERRITORIES)
        labels = self.territories.as_spatialdata_labels()
        check_cancelled(cancel)
        written = export_module.export_spatialdata(self.adata, anns, path, overwrite=overwrite, labels=labels,
                                                   progress=overall, cancel=cancel)
        if owned:
            overall.finish(f"exported to {written.name}")
        return written


def export_format_of(path) -> str:
    suffix = Path(str(path).rstrip("/")).suffix.lower()
    formats = {".h5ad": "h5ad", ".csv": "csv", ".zarr": "spatialdata"}
    if suffix not in formats:
        raise StofmInputError(
            f"cannot tell the export format of '{Path(str(path)).name}': end the name in .h5ad, .csv or .zarr."
        )
    return formats[suffix]


def _label_arguments(label_source, reference, label_key):
    """``(reference, label_key)`` from the ``label_source`` shorthand (or as given)."""
    if label_source is None:
        return reference, label_key
    if reference is not None or label_key is not None:
        raise StofmInputError("give label_source or reference= / label_key=, not both.")
    kind = label_source[0] if isinstance(label_source, (tuple, list)) and label_source else None
    if kind == "reference" and len(label_source) == 3:
        return label_source[1], label_source[2]
    if kind == "column" and len(label_source) == 2:
        return None, label_source[1]
    raise StofmInputError(f"unknown cell-type source {label_source!r}: "
                          "use ('reference', path, key) or ('column', key).")
