"""Autosave of a slice's annotations: one atomic ``.npz`` beside the slice (or in the user cache).

:class:`CurationStore` writes every annotation of a slice into one file, atomically, so
nothing curated is lost when the application stops unexpectedly; it records a fingerprint
of the cell ids, so an autosave made for other cells is refused on load.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

from napari_stofm.errors import StofmInputError
from napari_stofm.provenance import now_iso
from napari_stofm.review.annotation import Annotation, as_annotation_dict


def obs_fingerprint(obs_names) -> str:
    """sha256 of the cell ids in order: an autosave only fits a slice with the same cells."""
    digest = hashlib.sha256()
    digest.update(str(len(obs_names)).encode())
    for name in obs_names:
        digest.update(b"\0" + str(name).encode("utf-8"))
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cache_dir() -> Path:
    """The per-user cache folder of napari-stofm (``$XDG_CACHE_HOME/napari-stofm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-stofm"


class CurationStore:
    """Autosave of every annotation of one slice, in ``<slice>.stofm-curation.npz``.

    The file sits next to the slice; when that folder is not writable (a read-only data
    share) it goes to the user cache (``~/.cache/napari-stofm/curation``) instead.
    It records a fingerprint of the cell ids, so an autosave of other cells is refused.
    """

    SUFFIX = ".stofm-curation.npz"
    VERSION = 1

    def __init__(self, slice_path, *, directory=None):
        self.slice_path = Path(slice_path).expanduser().absolute()
        name = self.slice_path.name.rstrip("/") + self.SUFFIX
        if directory is not None:
            self.candidates = [Path(directory) / name]
        else:
            tag = hashlib.sha256(str(self.slice_path).encode()).hexdigest()[:12]
            self.candidates = [self.slice_path.parent / name, cache_dir() / "curation" / f"{tag}-{name}"]

    @property
    def path(self) -> Path:
        """Where the autosave is (or will be written)."""
        for candidate in self.candidates:
            if candidate.is_file():
                return candidate
        for candidate in self.candidates:
            if _writable_dir(candidate.parent):
                return candidate
        return self.candidates[0]

    def exists(self) -> bool:
        return any(c.is_file() for c in self.candidates)

    def save(self, annotations, obs_names) -> Path:
        """Write all annotations atomically; returns the file written."""
        annotations = as_annotation_dict(annotations)
        meta = {"version": self.VERSION, "saved_at": now_iso(), "slice": self.slice_path.name,
                "n_cells": len(obs_names), "obs_fingerprint": obs_fingerprint(obs_names),
                "annotations": {}}
        arrays = {}
        for i, (key, ann) in enumerate(annotations.items()):
            if ann.n_cells != len(obs_names):
                raise StofmInputError(f"{key} labels {ann.n_cells} cells but the slice has {len(obs_names)}; it belongs to another slice.")
            meta["annotations"][key] = {"index": i, "categories": ann.categories, "colors": ann.colors,
                                        "provenance": ann.provenance}
            arrays.update({f"a{i}_codes": ann.codes, f"a{i}_predicted": ann.predicted_codes,
                           f"a{i}_confidence": ann.confidence, f"a{i}_curated": ann.curated})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        target = self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, buffer.getvalue())
        return target

    def load(self, obs_names) -> Dict[str, Annotation]:
        """The autosaved annotations ({} when there is none); refuses one made for other cells."""
        if not self.exists():
            return {}
        path = self.path
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                arrays = {k: data[k] for k in data.files if k != "meta"}
        except Exception as err:
            raise StofmInputError(
                f"the autosave {path} cannot be read ({type(err).__name__}: {err}); move it away "
                "or delete it to start from the predictions again."
            ) from err
        if meta.get("obs_fingerprint") != obs_fingerprint(obs_names):
            raise StofmInputError(
                f"the autosave {path} was made for another set of cells ({meta.get('n_cells')} cells "
                f"of '{meta.get('slice')}', saved {meta.get('saved_at')}; this slice has "
                f"{len(obs_names)}): it is not loaded. Delete or rename it to start fresh, or open the "
                "slice it belongs to."
            )
        out = {}
        for key, entry in meta["annotations"].items():
            i = entry["index"]
            out[key] = Annotation(key, entry["categories"], entry["colors"], arrays[f"a{i}_codes"],
                                  arrays[f"a{i}_predicted"], arrays[f"a{i}_confidence"],
                                  arrays[f"a{i}_curated"], entry["provenance"])
        return out

    def discard(self) -> None:
        """Delete the autosave (e.g. after a successful export the user asked to clean up)."""
        for candidate in self.candidates:
            if candidate.is_file():
                candidate.unlink()


def _writable_dir(directory: Path) -> bool:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)
