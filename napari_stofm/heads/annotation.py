"""Editable labels of one slice: classes, colours, predicted vs curated, confidence.

An :class:`Annotation` holds one kind of label (``'stofm_region'`` or
``'stofm_cell_type'``) for every cell of a slice as integer codes into ``categories``
(-1 = unassigned). A head's :class:`~napari_stofm.heads.prediction.LabelPrediction` becomes
an annotation through one constructor, :meth:`Annotation.from_prediction`. The napari
widgets edit it through :meth:`Annotation.assign`, :meth:`~Annotation.rename`,
:meth:`~Annotation.recolor`, :meth:`~Annotation.merge` and :meth:`~Annotation.add_class`;
:meth:`~Annotation.to_obs` is the one writer of the scverse layout (Categorical obs column,
``<key>_confidence``, ``<key>_curated``, ``<key>_predicted``, ``uns['<key>_colors']`` and
``uns['stofm']['provenance'][key]``; names from :mod:`napari_stofm.keys`) and
:meth:`~Annotation.from_obs` reads it back.
"""
from __future__ import annotations

import json
from typing import Dict, List, Mapping, NamedTuple, Sequence

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError
from napari_stofm.palette import default_colors, to_hex
from napari_stofm.provenance import canonical, now_iso

UNASSIGNED = -1


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
            raise StofmInputError(f"{self.key}: {len(self.colors)} colours for {len(self.categories)} classes; "
                                  "give one colour per class.")
        self.predicted_codes = (self.codes.copy() if predicted_codes is None
                                else np.array(predicted_codes, dtype=np.int32).reshape(-1))
        self.confidence = (np.full(n, np.nan, np.float32) if confidence is None
                           else np.array(confidence, dtype=np.float32).reshape(-1))
        self.curated = np.zeros(n, bool) if curated is None else np.array(curated, dtype=bool).reshape(-1)
        for name, arr in (("predicted_codes", self.predicted_codes), ("confidence", self.confidence),
                          ("curated", self.curated)):
            if len(arr) != n:
                raise StofmInputError(f"{self.key}: {name} has {len(arr)} values for {n} cells; give one per cell.")
        for name, arr in (("codes", self.codes), ("predicted_codes", self.predicted_codes)):
            self._check_codes(arr, name)
        self.provenance = canonical(dict(provenance or {}))

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_prediction(cls, key, categories, codes=None, confidence=None, colors=None, provenance=None):
        """A fresh annotation from model output: nothing curated, predicted == current.

        ``categories`` may be a :class:`~napari_stofm.heads.prediction.LabelPrediction`
        (``Annotation.from_prediction(key, prediction, provenance=...)``), which brings its
        codes, confidence and colours; otherwise give the arrays. ``None`` values in
        ``provenance`` are dropped.
        """
        if hasattr(categories, "codes") and hasattr(categories, "categories"):
            pred = categories
            categories, codes = pred.categories, pred.codes
            confidence = pred.confidence if confidence is None else confidence
            colors = pred.colors if colors is None else colors
        if codes is None:
            raise StofmInputError(f"{key}: from_prediction needs the codes of every cell.")
        prov = {k: v for k, v in dict(provenance or {}).items() if v is not None}
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
            raise StofmInputError(f"{self.key}: a class named {name!r} already exists; pick another name or "
                                  "merge the two classes.")
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

    @property
    def is_prediction(self) -> bool:
        """Made by a model (a ``stofm_*`` key, or a provenance naming the model), not labels
        a slice came with (ground truth, a user's own annotation)."""
        return self.key in keys.PREDICTED_KEYS or self.key.startswith("stofm_") or bool(self.provenance.get("model"))

    def writes_companions(self, adata=None) -> bool:
        """Whether ``<key>_confidence`` / ``_curated`` / ``_predicted`` columns go with the
        labels: for a prediction, or where ``adata`` already has them (kept in step)."""
        if self.is_prediction:
            return True
        obs = getattr(adata, "obs", None)
        return obs is not None and any(c in obs for c in keys.companion_keys(self.key)[1:])

    def to_obs(self, adata) -> None:
        """Write the obs column, ``uns['<key>_colors']`` and ``uns['stofm']['provenance'][key]``;
        for a prediction also ``<key>_confidence``, ``<key>_curated`` and ``<key>_predicted``
        (:meth:`writes_companions`: labels a slice came with get no such columns; which of
        their cells were curated is in an export's ``uns['stofm']['curated_cells']``)."""
        if adata.n_obs != self.n_cells:
            raise StofmInputError(
                f"{self.key} labels {self.n_cells} cells but the slice has {adata.n_obs}: "
                "the annotation belongs to another slice (or the slice was filtered after predicting)."
            )
        key = self.key
        companions = self.writes_companions(adata)
        adata.obs[key] = self._categorical(self.codes)
        if companions:
            adata.obs[keys.confidence_key(key)] = self.confidence.copy()
            adata.obs[keys.curated_key(key)] = self.curated.copy()
            adata.obs[keys.predicted_key(key)] = self._categorical(self.predicted_codes)
        adata.uns[keys.colors_key(key)] = list(self.colors)
        stofm = adata.uns.get(keys.UNS)
        stofm = dict(stofm) if isinstance(stofm, Mapping) else {}
        prov = dict(stofm.get("provenance", {}) or {})
        prov[key] = canonical(self.provenance)
        stofm["provenance"] = prov
        adata.uns[keys.UNS] = stofm

    @classmethod
    def from_obs(cls, adata, key: str) -> "Annotation":
        """Read an annotation written by :meth:`to_obs` (or any obs column of labels).

        What is accepted, the same for the napari session and ``stofm export``:

        * ``obs[key]``: any Categorical / string / number column. Missing values (NaN,
          None) **and empty or blank strings** (``""``, ``"  "``) mean *unlabelled* (code
          -1); an empty name never becomes a class. Two classes with the same text (``1``
          and ``"1"``) are refused (StofmInputError naming the column).
        * ``obs['<key>_predicted']``: the same; it may only use classes of ``obs[key]``.
        * ``obs['<key>_confidence']``: numbers, or text holding numbers (``"0.5"``); missing
          or empty = unknown (NaN). Values outside [0, 1] are **clipped** into [0, 1] and
          infinite ones become unknown, with a ``UserWarning`` naming the column (a
          confidence is advice, so a broken column does not block the labels); text that is
          not a number is refused naming the column.
        * ``obs['<key>_curated']``: booleans, 0/1, or the text ``"True"``/``"False"`` (also
          ``"1"``/``"0"``, ``"yes"``/``"no"``, any case); missing or empty = not curated;
          anything else is refused naming the column.
        * ``uns['<key>_colors']``: one colour per class; when the list does not fit or holds
          something that is not a colour, default colours are used (with a warning).
        """
        if key not in adata.obs:
            raise StofmInputError(
                f"adata.obs has no column '{key}' (its columns: {list(map(str, adata.obs.columns))}).")
        categories, codes, kept, n_names = _label_codes(adata.obs[key], key)
        predicted = None
        if keys.predicted_key(key) in adata.obs:
            predicted = _codes_in(adata.obs[keys.predicted_key(key)], categories, key)
        confidence = None
        if keys.confidence_key(key) in adata.obs:
            confidence = clean_confidence(adata.obs[keys.confidence_key(key)], f"obs['{keys.confidence_key(key)}']")
        curated = None
        if keys.curated_key(key) in adata.obs:
            curated = parse_curated(adata.obs[keys.curated_key(key)], keys.curated_key(key))
        colors = _colors_from_uns(adata, key, len(categories), kept, n_names)
        stofm = adata.uns.get(keys.UNS, {})
        prov = stofm.get("provenance", {}) if isinstance(stofm, Mapping) else {}
        prov = prov.get(key, {}) if isinstance(prov, Mapping) else {}
        prov = prov if isinstance(prov, Mapping) else {}
        return cls(key, categories, colors, codes, predicted, confidence, curated, prov)


# ----------------------------------------------------------------------------- reading obs

_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0", ""}


def _is_blank(value) -> bool:
    return isinstance(value, str) and not value.strip()


def _object_values(column) -> np.ndarray:
    """The values of an obs column (or array) as an object array (NaN / None kept)."""
    import pandas as pd

    if isinstance(column, pd.Series):
        return column.astype(object).to_numpy()
    return np.asarray(column, dtype=object).reshape(-1)


def _show(values, n: int = 5) -> str:
    shown = []
    for v in values:
        if repr(v) not in shown:
            shown.append(repr(v))
        if len(shown) == n:
            break
    return ", ".join(shown)


def _label_codes(column, key: str):
    """(categories, codes, kept, n_names): class names, the code of each cell (-1 = unlabelled),
    per class its position among the column's ``n_names`` original categories (for the colours)."""
    import pandas as pd

    if not isinstance(column.dtype, pd.CategoricalDtype):
        try:
            column = column.astype("category")
        except (TypeError, ValueError):  # values of kinds that do not sort together
            values = _object_values(column)
            missing = pd.isna(values)
            column = pd.Series(np.where(missing, None, [str(v) for v in values]), dtype=object).astype("category")
    names = [str(c) for c in column.cat.categories]
    codes = column.cat.codes.to_numpy().astype(np.int32)
    kept = [i for i, name in enumerate(names) if name.strip()]
    categories = [names[i] for i in kept]
    seen = {}
    for name in categories:
        if name in seen:
            raise StofmInputError(
                f"obs['{key}'] has two different labels written {name!r} (e.g. the number 1 and the text '1'): "
                f"make them one, e.g. adata.obs['{key}'] = adata.obs['{key}'].astype(str).astype('category')."
            )
        seen[name] = True
    if len(kept) != len(names):  # "" (or blank) means unlabelled
        lookup = np.full(len(names) + 1, UNASSIGNED, dtype=np.int32)
        lookup[kept] = np.arange(len(kept), dtype=np.int32)
        codes = lookup[codes]  # code -1 picks the trailing UNASSIGNED
    return categories, codes, kept, len(names)


def clean_confidence(column, where: str) -> np.ndarray:
    """Confidences as float32 in [0, 1] (NaN = unknown): numeric text is parsed, values
    outside [0, 1] are clipped and infinite ones become NaN (with a UserWarning naming
    ``where``); text that is not a number raises StofmInputError naming ``where``."""
    import pandas as pd

    if isinstance(column, pd.Series):
        categorical = isinstance(column.dtype, pd.CategoricalDtype)
        raw = _object_values(column) if categorical else column.to_numpy()
    else:
        raw = np.asarray(column)
    if raw.dtype.kind in "biuf":
        values = raw.astype(np.float64).reshape(-1)
    elif raw.dtype.kind == "c":
        raise StofmInputError(f"{where} holds complex numbers; confidences are numbers in [0, 1].")
    else:
        objects = np.asarray(raw, dtype=object).reshape(-1)
        missing = pd.isna(objects) | np.array([_is_blank(v) for v in objects], dtype=bool)
        text = pd.Series(objects[~missing], dtype=object).map(lambda v: str(v).strip())
        parsed = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(parsed) & ~text.str.lower().isin(["nan", "na", "none", "null"]).to_numpy()
        if bad.any():
            raise StofmInputError(
                f"{where} holds values that are not numbers ({_show(text[bad].tolist())}): confidences are numbers "
                "in [0, 1] (empty = unknown). Fix or delete that column."
            )
        values = np.full(len(objects), np.nan)
        values[~missing] = parsed
    infinite = np.isinf(values)
    outside = np.isfinite(values) & ((values < 0) | (values > 1))
    if infinite.any() or outside.any():
        import warnings

        warnings.warn(
            f"{where}: {int(outside.sum())} confidences outside [0, 1] were clipped into [0, 1] and "
            f"{int(infinite.sum())} infinite ones set to unknown (NaN); confidences are probabilities.",
            UserWarning, stacklevel=3,
        )
        values = np.where(infinite, np.nan, np.clip(values, 0.0, 1.0))
    return values.astype(np.float32)


def parse_curated(column, name: str) -> np.ndarray:
    """Curated flags as a bool array: booleans, 0/1 or text True/False/1/0/yes/no (any case);
    missing / empty = False; anything else raises StofmInputError naming ``obs[name]``."""
    import pandas as pd

    series = column if isinstance(column, pd.Series) else pd.Series(np.asarray(column).reshape(-1))
    if series.dtype == bool:
        return series.to_numpy(dtype=bool)
    objects = _object_values(series)
    missing = np.asarray(pd.isna(objects), dtype=bool)
    text = pd.Series(objects[~missing], dtype=object).map(lambda v: str(v).strip().lower())
    flags = text.map(lambda t: True if t in _TRUE else (False if t in _FALSE else None))
    bad = flags.isna().to_numpy()
    if bad.any():
        shown = _show(pd.Series(objects[~missing], dtype=object)[bad].tolist())
        raise StofmInputError(
            f"obs['{name}'] must hold True/False (or 1/0) for each cell; it has {shown}. Fix the column "
            f"(e.g. adata.obs['{name}'] = adata.obs['{name}'] == 'yes') or delete it to mark no cell as curated."
        )
    out = np.zeros(len(objects), dtype=bool)
    out[~missing] = flags.to_numpy(dtype=bool)
    return out


def _codes_in(column, categories: List[str], key: str) -> np.ndarray:
    import pandas as pd

    values = _object_values(column)
    values = np.where(pd.isna(values) | np.array([_is_blank(v) for v in values], dtype=bool), None, values)
    lookup = {name: i for i, name in enumerate(categories)}
    unknown = {str(v) for v in values if v is not None and str(v) not in lookup}
    if unknown:
        raise StofmInputError(f"obs['{key}_predicted'] has classes {sorted(unknown)[:5]} that obs['{key}'] lacks; "
                              f"keep all classes as categories of obs['{key}'].")
    return np.array([UNASSIGNED if v is None else lookup[str(v)] for v in values], dtype=np.int32)


def _colors_from_uns(adata, key: str, n: int, kept=None, n_names=None) -> List[str]:
    """``uns['<key>_colors']`` for the classes kept from the column's categories (default
    colours, with a warning, when the list does not fit or is not colours)."""
    colors = adata.uns.get(keys.colors_key(key))
    if colors is None or isinstance(colors, (str, bytes)):
        return default_colors(n)
    try:
        colors = list(colors)
    except TypeError:
        return default_colors(n)
    if kept is not None and n_names is not None and len(colors) == n_names != n:
        colors = [colors[i] for i in kept]  # the colours of the blank categories go with them
    if len(colors) != n:
        return default_colors(n)
    try:
        return [to_hex(str(c) if isinstance(c, (str, bytes, np.str_)) else c) for c in colors]
    except StofmInputError as err:
        import warnings

        warnings.warn(f"uns['{keys.colors_key(key)}'] is not a list of colours ({err}); default colours are used.",
                      UserWarning, stacklevel=3)
        return default_colors(n)


def as_annotation_dict(annotations) -> Dict[str, Annotation]:
    if annotations is None:
        return {}
    if isinstance(annotations, Annotation):
        return {annotations.key: annotations}
    if isinstance(annotations, Mapping):
        return {str(k): a for k, a in annotations.items()}
    return {a.key: a for a in annotations}
