"""Editable labels of one slice: classes, colours, predicted vs curated, confidence; autosave.

An :class:`Annotation` holds one kind of label (``'stofm_region'`` or
``'stofm_cell_type'``) for every cell of a slice as integer codes into ``categories``
(-1 = unassigned). The napari widgets edit it through :meth:`Annotation.assign`,
:meth:`~Annotation.rename`, :meth:`~Annotation.recolor`, :meth:`~Annotation.merge` and
:meth:`~Annotation.add_class`; :meth:`~Annotation.to_obs` / :meth:`~Annotation.from_obs`
convert to the scverse layout (Categorical obs column, ``<key>_confidence``,
``<key>_curated``, ``<key>_predicted``, ``uns['<key>_colors']`` and
``uns['stofm']['provenance'][key]``).

:class:`CurationStore` autosaves every annotation of a slice in one file beside it
(atomically), so nothing curated is lost when the application stops unexpectedly.
"""
from __future__ import annotations

import colorsys
import hashlib
import io
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import StofmInputError

KEYS = ("stofm_region", "stofm_cell_type")
UNASSIGNED = -1

# scanpy's ``default_20`` palette (the colours scanpy gives categorical obs columns).
DEFAULT_20 = [
    "#1f77b4", "#ff7f0e", "#279e68", "#d62728", "#aa40fc", "#8c564b", "#e377c2", "#b5bd61",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5", "#ad494a", "#8c6d31",
]


# ----------------------------------------------------------------------------- colours


def default_colors(n: int, used: Iterable[str] = ()) -> List[str]:
    """``n`` distinct hex colours: scanpy's default_20, then evenly spread hues; skips ``used``."""
    taken = {c.lower() for c in used}
    out: List[str] = []
    for color in DEFAULT_20:
        if len(out) == n:
            return out
        if color not in taken:
            out.append(color)
            taken.add(color)
    i = 0
    while len(out) < n:
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio hue steps stay apart
        light, sat = (0.45, 0.75) if (i // 7) % 2 == 0 else (0.62, 0.55)
        r, g, b = colorsys.hls_to_rgb(hue, light, sat)
        color = "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))
        if color not in taken:
            out.append(color)
            taken.add(color)
        i += 1
    return out


def to_hex(color) -> str:
    """'#rrggbb' from a hex string ('#rgb', '#rrggbb', '#rrggbbaa'), an RGB(A) sequence
    (floats in [0, 1] or ints in [0, 255]) or, when matplotlib is installed, a colour name."""
    if isinstance(color, str):
        text = color.strip().lower()
        digits = text[1:] if text.startswith("#") else text
        if all(c in "0123456789abcdef" for c in digits) and len(digits) in (3, 4, 6, 8):
            if len(digits) in (3, 4):
                digits = "".join(c * 2 for c in digits[:3])
            return "#" + digits[:6]
        try:
            from matplotlib.colors import to_hex as mpl_to_hex
        except ImportError:
            mpl_to_hex = None
        if mpl_to_hex is not None:
            try:
                return mpl_to_hex(text)
            except ValueError:
                pass
        raise StofmInputError(f"{color!r} is not a colour: use a hex string such as '#1f77b4'.")
    try:
        rgb = [float(v) for v in list(color)[:3]]
    except (TypeError, ValueError):
        raise StofmInputError(f"{color!r} is not a colour: use a hex string such as '#1f77b4'.") from None
    if len(rgb) != 3 or min(rgb) < 0:
        raise StofmInputError(f"{color!r} is not a colour: give 3 or 4 values (RGB or RGBA).")
    scale = 1.0 if max(rgb) <= 1.0 else 255.0
    if max(rgb) > scale:
        raise StofmInputError(f"{color!r} is not a colour: RGB values must be in [0, 1] or [0, 255].")
    return "#" + "".join(f"{round(v / scale * 255):02x}" for v in rgb)


# ----------------------------------------------------------------------------- provenance


def canonical(value):
    """A JSON-like form of ``value`` that survives .h5ad / .zarr / JSON unchanged.

    dicts keep their structure (keys as str); lists of one scalar kind stay lists; any other
    list becomes a JSON string; numpy scalars and arrays become Python values.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [canonical(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
        if all(isinstance(v, str) for v in items) or all(isinstance(v, bool) for v in items):
            return items
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return [float(v) for v in items]
        return json.dumps(items, default=str)
    return str(value)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- Annotation


class PreviousState(NamedTuple):
    """What :meth:`Annotation.assign` replaced; ``annotation.restore(*previous)`` undoes it."""

    cell_indices: np.ndarray
    codes: np.ndarray
    curated: np.ndarray


class Annotation:
    """The editable labels of one kind for every cell of a slice.

    Attributes
    ----------
    key : str
        obs column name, ``'stofm_region'`` or ``'stofm_cell_type'`` (any name works).
    categories : list[str]
        class names, unique; code ``i`` means ``categories[i]``.
    colors : list[str]
        one ``'#rrggbb'`` per class.
    codes : int32 array (n_cells,)
        current label of each cell, -1 = unassigned.
    predicted_codes : int32 array (n_cells,)
        what the model predicted (renumbered with the classes on :meth:`merge`).
    confidence : float32 array (n_cells,)
        model confidence in [0, 1], NaN where unknown.
    curated : bool array (n_cells,)
        True where a person set (or confirmed) the label.
    provenance : dict
        model name, weights fingerprint, parameters, timestamps (JSON-like).
    """

    def __init__(self, key, categories, colors, codes, predicted_codes=None, confidence=None,
                 curated=None, provenance=None):
        self.key = str(key)
        self.categories = [str(c) for c in categories]
        self._check_unique_names(self.categories)
        self.codes = np.array(codes, dtype=np.int32).reshape(-1)
        n = len(self.codes)
        self.colors = [to_hex(c) for c in colors] if colors is not None else default_colors(len(self.categories))
        if len(self.colors) != len(self.categories):
            raise StofmInputError(f"{self.key}: {len(self.colors)} colours for {len(self.categories)} classes; give one colour per class.")
        self.predicted_codes = (self.codes.copy() if predicted_codes is None
                                else np.array(predicted_codes, dtype=np.int32).reshape(-1))
        self.confidence = (np.full(n, np.nan, np.float32) if confidence is None
                           else np.array(confidence, dtype=np.float32).reshape(-1))
        self.curated = np.zeros(n, bool) if curated is None else np.array(curated, dtype=bool).reshape(-1)
        for name, arr in (("predicted_codes", self.predicted_codes), ("confidence", self.confidence), ("curated", self.curated)):
            if len(arr) != n:
                raise StofmInputError(f"{self.key}: {name} has {len(arr)} values for {n} cells; give one per cell.")
        for name, arr in (("codes", self.codes), ("predicted_codes", self.predicted_codes)):
            self._check_codes(arr, name)
        self.provenance = canonical(dict(provenance or {}))

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_prediction(cls, key, categories, codes, confidence=None, colors=None, provenance=None):
        """A fresh annotation from model output: nothing curated, predicted == current."""
        prov = dict(provenance or {})
        prov.setdefault("created_at", now_iso())
        codes = np.asarray(codes, dtype=np.int32)
        return cls(key, categories, colors, codes, codes.copy(), confidence, None, prov)

    def copy(self) -> "Annotation":
        return Annotation(self.key, list(self.categories), list(self.colors), self.codes.copy(),
                          self.predicted_codes.copy(), self.confidence.copy(), self.curated.copy(),
                          json.loads(json.dumps(self.provenance)))

    # -- checks ---------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        return len(self.codes)

    @property
    def n_classes(self) -> int:
        return len(self.categories)

    def _check_codes(self, codes: np.ndarray, what: str = "codes") -> None:
        if codes.size and (codes.min() < UNASSIGNED or codes.max() >= self.n_classes):
            raise StofmInputError(
                f"{self.key}: {what} must be -1 (unassigned) or 0..{self.n_classes - 1} "
                f"(one per class); got values {int(codes.min())}..{int(codes.max())}."
            )

    def _check_code(self, code: int, allow_unassigned: bool = False) -> int:
        code = int(code)
        low = UNASSIGNED if allow_unassigned else 0
        if not low <= code < self.n_classes:
            raise StofmInputError(
                f"{self.key}: class code {code} does not exist; valid codes are {low}..{self.n_classes - 1}"
                + (" (-1 = unassigned)." if allow_unassigned else ".")
            )
        return code

    @staticmethod
    def _check_unique_names(names: Sequence[str]) -> None:
        seen = set()
        for name in names:
            if not name.strip():
                raise StofmInputError("class names must not be empty.")
            if name in seen:
                raise StofmInputError(f"class name {name!r} is used twice: class names must be unique.")
            seen.add(name)

    def _indices(self, cell_indices) -> np.ndarray:
        idx = np.asarray(cell_indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_cells,):
                raise StofmInputError(f"{self.key}: a boolean cell mask needs {self.n_cells} values, got {idx.shape}.")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise StofmInputError(f"{self.key}: cell indices must be in 0..{self.n_cells - 1}.")
        return idx

    def _touch(self) -> None:
        self.provenance["modified_at"] = now_iso()

    # -- edits ----------------------------------------------------------------------

    def assign(self, cell_indices, code: int) -> PreviousState:
        """Give cells the class ``code`` (-1 = unassigned) and mark them curated.

        Returns the previous codes and curated flags; ``restore(*previous)`` undoes the edit.
        """
        code = self._check_code(code, allow_unassigned=True)
        idx = self._indices(cell_indices)
        previous = PreviousState(idx.copy(), self.codes[idx].copy(), self.curated[idx].copy())
        self.codes[idx] = code
        self.curated[idx] = True
        self._touch()
        return previous

    def restore(self, cell_indices, codes, curated) -> None:
        """Set codes and curated flags of cells exactly (the undo of :meth:`assign`)."""
        idx = self._indices(cell_indices)
        codes = np.asarray(codes, dtype=np.int32).reshape(-1)
        curated = np.asarray(curated, dtype=bool).reshape(-1)
        if not len(idx) == len(codes) == len(curated):
            raise StofmInputError(f"{self.key}: restore needs as many codes and curated flags as cells.")
        self._check_codes(codes)
        self.codes[idx] = codes
        self.curated[idx] = curated
        self._touch()

    def rename(self, code: int, name: str) -> None:
        code = self._check_code(code)
        name = str(name).strip()
        others = self.categories[:code] + self.categories[code + 1:]
        if not name:
            raise StofmInputError("class names must not be empty.")
        if name in others:
            raise StofmInputError(f"{self.key}: a class named {name!r} already exists; pick another name or merge the two classes.")
        self.categories[code] = name
        self._touch()

    def recolor(self, code: int, color) -> None:
        code = self._check_code(code)
        self.colors[code] = to_hex(color)
        self._touch()

    def add_class(self, name: str, color=None) -> int:
        """Append a class; returns its code."""
        name = str(name).strip()
        self._check_unique_names(self.categories + [name])
        self.categories.append(name)
        self.colors.append(to_hex(color) if color is not None else default_colors(1, self.colors)[0])
        self._touch()
        return self.n_classes - 1

    def merge(self, src_code: int, dst_code: int) -> Dict[int, int]:
        """Move every cell of class ``src_code`` into ``dst_code`` and remove ``src_code``.

        Codes above ``src_code`` shift down by one (current and predicted codes alike).
        Returns ``{old_code: new_code}`` for every old class (and -1 -> -1).
        """
        src, dst = self._check_code(src_code), self._check_code(dst_code)
        if src == dst:
            raise StofmInputError(f"{self.key}: cannot merge class {src} into itself.")
        mapping = {UNASSIGNED: UNASSIGNED}
        for old in range(self.n_classes):
            target = dst if old == src else old
            mapping[old] = target - (1 if target > src else 0)
        lookup = np.array([mapping[c] for c in range(self.n_classes)] + [UNASSIGNED], dtype=np.int32)
        self.codes = lookup[self.codes]  # index -1 picks the trailing UNASSIGNED
        self.predicted_codes = lookup[self.predicted_codes]
        del self.categories[src]
        del self.colors[src]
        merges = self.provenance.setdefault("n_merges", 0)
        self.provenance["n_merges"] = merges + 1
        self._touch()
        return mapping

    # -- inspection -----------------------------------------------------------------

    @property
    def n_unassigned(self) -> int:
        return int((self.codes == UNASSIGNED).sum())

    def names(self) -> np.ndarray:
        """Class name of every cell (None where unassigned), as an object array."""
        lookup = np.array(self.categories + [None], dtype=object)
        return lookup[self.codes]

    def summary(self):
        """One row per class: name, color, n_cells, mean_confidence, n_curated (index = code)."""
        import pandas as pd

        k = self.n_classes
        assigned = self.codes >= 0
        counts = np.bincount(self.codes[assigned], minlength=k)
        curated = np.bincount(self.codes[assigned & self.curated], minlength=k)
        known = assigned & np.isfinite(self.confidence)
        conf_sum = np.bincount(self.codes[known], weights=self.confidence[known], minlength=k)
        conf_n = np.bincount(self.codes[known], minlength=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_conf = np.where(conf_n > 0, conf_sum / np.maximum(conf_n, 1), np.nan)
        frame = pd.DataFrame(
            {"name": self.categories, "color": self.colors, "n_cells": counts.astype(int),
             "mean_confidence": mean_conf, "n_curated": curated.astype(int)},
            index=pd.RangeIndex(k, name="code"),
        )
        return frame

    def least_confident(self, n: int, exclude_curated: bool = True) -> np.ndarray:
        """Indices of the ``n`` cells with the lowest confidence (unknown confidence last)."""
        conf = self.confidence.astype(np.float64)
        order = np.lexsort((np.arange(self.n_cells), np.where(np.isnan(conf), np.inf, conf), np.isnan(conf)))
        if exclude_curated:
            order = order[~self.curated[order]]
        return order[: max(int(n), 0)]

    def equals(self, other: "Annotation") -> bool:
        """Same classes, colours, per-cell values (NaN == NaN) and provenance."""
        return (
            isinstance(other, Annotation)
            and self.key == other.key
            and self.categories == other.categories
            and self.colors == other.colors
            and np.array_equal(self.codes, other.codes)
            and np.array_equal(self.predicted_codes, other.predicted_codes)
            and np.array_equal(self.confidence, other.confidence, equal_nan=True)
            and np.array_equal(self.curated, other.curated)
            and self.provenance == other.provenance
        )

    def __repr__(self) -> str:
        return (f"Annotation({self.key!r}, {self.n_classes} classes, {self.n_cells} cells, "
                f"{int(self.curated.sum())} curated, {self.n_unassigned} unassigned)")

    # -- AnnData --------------------------------------------------------------------

    def _categorical(self, codes: np.ndarray):
        import pandas as pd

        return pd.Categorical.from_codes(codes, categories=pd.Index(self.categories, dtype=object))

    def to_obs(self, adata) -> None:
        """Write the obs columns, ``uns['<key>_colors']`` and ``uns['stofm']['provenance'][key]``."""
        if adata.n_obs != self.n_cells:
            raise StofmInputError(
                f"{self.key} labels {self.n_cells} cells but the slice has {adata.n_obs}: "
                "the annotation belongs to another slice (or the slice was filtered after predicting)."
            )
        key = self.key
        adata.obs[key] = self._categorical(self.codes)
        adata.obs[f"{key}_confidence"] = self.confidence.copy()
        adata.obs[f"{key}_curated"] = self.curated.copy()
        adata.obs[f"{key}_predicted"] = self._categorical(self.predicted_codes)
        adata.uns[f"{key}_colors"] = list(self.colors)
        stofm = adata.uns.get("stofm")
        stofm = dict(stofm) if isinstance(stofm, Mapping) else {}
        prov = dict(stofm.get("provenance", {}) or {})
        prov[key] = canonical(self.provenance)
        stofm["provenance"] = prov
        adata.uns["stofm"] = stofm

    @classmethod
    def from_obs(cls, adata, key: str) -> "Annotation":
        """Read an annotation written by :meth:`to_obs` (or any Categorical obs column)."""
        import pandas as pd

        if key not in adata.obs:
            raise StofmInputError(f"adata.obs has no column '{key}' (its columns: {list(map(str, adata.obs.columns))}).")
        column = adata.obs[key]
        if not isinstance(column.dtype, pd.CategoricalDtype):
            column = column.astype("category")
        categories = [str(c) for c in column.cat.categories]
        codes = column.cat.codes.to_numpy().astype(np.int32)
        predicted = None
        if f"{key}_predicted" in adata.obs:
            predicted = _codes_in(adata.obs[f"{key}_predicted"], categories, key)
        confidence = adata.obs[f"{key}_confidence"].to_numpy() if f"{key}_confidence" in adata.obs else None
        curated = None
        if f"{key}_curated" in adata.obs:
            curated = adata.obs[f"{key}_curated"].astype("boolean").fillna(False).to_numpy(dtype=bool)
        colors = _colors_from_uns(adata, key, len(categories))
        stofm = adata.uns.get("stofm", {})
        prov = (stofm.get("provenance", {}) or {}).get(key, {}) if isinstance(stofm, Mapping) else {}
        return cls(key, categories, colors, codes, predicted, confidence, curated, prov)


def _codes_in(column, categories: List[str], key: str) -> np.ndarray:
    import pandas as pd

    values = column.astype(object).where(pd.notna(column), None).to_numpy()
    lookup = {name: i for i, name in enumerate(categories)}
    unknown = {str(v) for v in values if v is not None and str(v) not in lookup}
    if unknown:
        raise StofmInputError(f"obs['{key}_predicted'] has classes {sorted(unknown)[:5]} that obs['{key}'] lacks; keep all classes as categories of obs['{key}'].")
    return np.array([UNASSIGNED if v is None else lookup[str(v)] for v in values], dtype=np.int32)


def _colors_from_uns(adata, key: str, n: int) -> List[str]:
    colors = adata.uns.get(f"{key}_colors")
    if colors is None or len(colors) != n:
        return default_colors(n)
    return [to_hex(str(c)) for c in list(colors)]


# ----------------------------------------------------------------------------- autosave


def obs_fingerprint(obs_names) -> str:
    """sha256 of the cell ids in order: an autosave only fits a slice with the same cells."""
    digest = hashlib.sha256()
    digest.update(str(len(obs_names)).encode())
    for name in obs_names:
        digest.update(b"\0" + str(name).encode("utf-8"))
    return digest.hexdigest()


def _as_dict(annotations) -> Dict[str, Annotation]:
    if annotations is None:
        return {}
    if isinstance(annotations, Annotation):
        return {annotations.key: annotations}
    if isinstance(annotations, Mapping):
        return {str(k): a for k, a in annotations.items()}
    return {a.key: a for a in annotations}


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


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-stofm" / "curation"


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
            self.candidates = [self.slice_path.parent / name, _cache_root() / f"{tag}-{name}"]

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
        annotations = _as_dict(annotations)
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
