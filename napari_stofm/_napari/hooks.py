"""Reader, writer and sample data named by ``napari.yaml``.

* Reader: an ``.h5ad`` file or a SpatialData / AnnData ``.zarr`` folder becomes a Points
  layer of the cells (obs columns as features) plus one Labels layer per annotation the
  slice already carries (``stofm_region`` / ``stofm_cell_type`` predictions, ``region`` /
  ``cell_type`` labels) over the cell territories; an autosave of curated labels beside
  the slice is restored on top.
* Writer: the curated labels of the selected SToFM layers to ``.h5ad`` or ``.csv``
  (atomically; see :mod:`napari_stofm.io.export`).
* Sample: the generated slice of :func:`napari_stofm.io.sample.make_sample_slice`.

Every layer carries the AnnData in ``metadata['adata']`` and the
:class:`~napari_stofm.review.session.SliceSession` in ``metadata['stofm_session']``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Union

from napari_stofm.errors import StofmError, StofmInputError

log = logging.getLogger(__name__)

PathOrPaths = Union[str, List[str]]


# ----------------------------------------------------------------------------- reader


def get_reader(path: PathOrPaths):
    """Return :func:`read_slice_layers` for a path napari-stofm can open, else None."""
    from napari_stofm.io.slices import is_slice_path

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    if path.lower().rstrip("/").endswith(".h5ad"):
        # any .h5ad is ours: a damaged one gets a clear message instead of "no reader"
        return read_slice_layers
    if Path(path).is_dir() and is_slice_path(path):
        return read_slice_layers
    return None


def read_slice_layers(path: PathOrPaths):
    """Layer data of a slice: its cells and the labels it already has (see module docs)."""
    from napari_stofm._napari.layers import slice_layer_data
    from napari_stofm.review.session import SliceSession

    if isinstance(path, (list, tuple)):
        path = path[0]
    session = SliceSession.open(path)  # raises StofmInputError with the fix
    placed = _place(session)
    _tell_restored(session, placed)
    _bind_when_added()
    return slice_layer_data(session)


def _current_viewer():
    try:
        import napari
    except ImportError:  # headless use of the reader
        return None
    return napari.current_viewer()


def _place(session):
    """Place a slice beside those the current viewer shows (a note saying so, or None)."""
    from napari_stofm._napari.layers import place_beside

    viewer = _current_viewer()
    return place_beside(viewer, session) if viewer is not None else None


def _bind_when_added() -> None:
    """Once napari has added the layers: map paint/fill/erase on them to cells even before
    any of the plugin's widgets is opened, and show the whole of every slice."""
    try:
        from qtpy.QtCore import QTimer

        from napari_stofm._napari.binding import bind_viewer
    except ImportError:  # headless use of the reader (qtpy's "no Qt binding" error is an ImportError too)
        return
    viewer = _current_viewer()
    if viewer is not None:
        def settle():
            bind_viewer(viewer)
            viewer.reset_view()

        QTimer.singleShot(0, settle)


def _tell_restored(session, placed=None) -> None:
    message = None
    if session.restored_from is not None:
        message = (f"Restored curated labels of {session.name} from the autosave {session.restored_from} "
                   "(delete that file to start from the predictions again).")
    elif getattr(session, "restore_error", None):
        message = session.restore_error
    notes = [getattr(session, "autosave_error", None), placed] + [
        f"obs column {key!r} was not opened as labels: {why}" for key, why in
        dict(getattr(session, "skipped_columns", None) or {}).items()]
    message = " ".join(m for m in [message, *notes] if m) or None
    if message:
        try:
            from napari.utils.notifications import show_info

            show_info(message)
        except Exception:  # pragma: no cover  # noqa: BLE001 - a note must never fail the open; falls back to the log
            log.debug("napari could not show the note", exc_info=True)
            log.info(message)


# ----------------------------------------------------------------------------- sample


def sample_slice(n_cells: int = 3000, seed: int = 0):
    """The generated sample slice (cortex-like layers + a lesion, 8 cell types)."""
    from napari_stofm import keys
    from napari_stofm._napari.layers import slice_layer_data
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.review.session import SliceSession

    adata = make_sample_slice(n_cells=n_cells, seed=seed)
    name = f"sample_seed{seed}_{n_cells}"
    adata.uns[keys.SOURCE] = {"format": "generated", "name": name}
    session = SliceSession(adata, name="SToFM sample")
    session.store = _sample_store(name)
    session.load_existing_labels()
    session.load_embedding_cache()
    placed = _place(session)
    _tell_restored(session, placed)
    _bind_when_added()
    return slice_layer_data(session)


def _sample_store(name: str):
    from napari_stofm.io.autosave import CurationStore, cache_dir

    return CurationStore(f"{name}.h5ad", directory=cache_dir() / "curation")


# ----------------------------------------------------------------------------- writer


def write_labels(path: str, layer_data) -> List[str]:
    """Export the curated labels of the given layers (``.h5ad`` or ``.csv``).

    ``layer_data`` is napari's list of ``(data, attributes, layer_type)``. All SToFM
    Labels layers among them must belong to one slice; with none (only the cells
    layer), every annotation of that slice is written. Pixels painted while no widget
    was watching are mapped to cells first. napari's save dialog has already asked
    before replacing a file, so an existing file is replaced (atomically).
    """
    from napari_stofm.review.session import export_format_of

    sessions = []
    keys = []
    for data, attrs, layer_type in layer_data:
        meta = (attrs or {}).get("metadata") or {}
        session = meta.get("stofm_session")
        if session is None and meta.get("adata") is not None:
            from napari_stofm.review.session import SliceSession

            session = SliceSession(meta["adata"])
        if session is None:
            continue
        if all(s is not session for s in sessions):
            sessions.append(session)
        key = meta.get("stofm_key")
        if layer_type == "labels" and key:
            _sync_from_pixels(session, key, data)
            keys.append(key)
    if not sessions:
        raise StofmInputError(
            "none of the selected layers comes from a SToFM slice: select the 'tissue regions' / "
            "'cell types' layers (or the cells layer) of an opened slice."
        )
    if len(sessions) > 1:
        raise StofmInputError("the selected layers come from different slices: export one slice at a time.")
    session = sessions[0]
    fmt = export_format_of(path)
    if fmt not in ("h5ad", "csv"):
        raise StofmInputError("this writer exports .h5ad or .csv; use the 'Export labels' widget for SpatialData.")
    written = session.export(path, fmt=fmt, overwrite=True, keys=keys or None)
    return [str(written)]


def _sync_from_pixels(session, key: str, data) -> None:
    """Map pixels that disagree with the annotation (painted while nothing was listening)."""
    import numpy as np

    if key not in session.annotations:
        return
    data = np.asarray(data)
    terr = session.territories
    if data.shape != terr.shape:
        return
    want = terr.class_image(session.annotations[key].codes)
    diff = want != data
    if diff.any():
        rows, cols = np.nonzero(diff)
        bbox = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        session.apply_edit(key, data, bbox)


__all__ = ["get_reader", "read_slice_layers", "sample_slice", "write_labels", "StofmError"]
