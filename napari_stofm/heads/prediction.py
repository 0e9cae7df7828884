"""The result every prediction head returns: one class per cell, a confidence, colours.

:class:`LabelPrediction` is shared by the unsupervised region clustering
(:mod:`napari_stofm.heads.regions`) and the supervised head (:mod:`napari_stofm.heads.classifier`), and
is what the curation layer and the exporters consume. It follows the scverse conventions of
``docs/architecture.md``: a Categorical ``obs[key]``, a float ``obs[key + '_confidence']`` in
[0, 1] and hex colours in ``uns[key + '_colors']``, one per category.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from napari_stofm.errors import StofmInputError
from napari_stofm.palette import default_colors


def encode_labels(labels, categories: Optional[Sequence[str]] = None) -> tuple[np.ndarray, list[str]]:
    """Turn per-cell labels into ``(codes int32, categories)``; missing labels get code -1.

    ``labels`` may be a pandas Categorical / Series or any array of strings in which
    ``None`` / NaN / ``""`` mean "unlabelled". The category order is, in this priority:
    ``categories`` when given, the Categorical's own order, else sorted (pandas' rule).
    Labels not among explicit ``categories`` raise :class:`StofmInputError`.
    """
    if isinstance(labels, pd.Series):
        labels = labels.array
    if categories is None and isinstance(labels, pd.Categorical):
        cats = [str(c) for c in labels.categories]
        values = np.asarray(labels.astype(object))
    else:
        values = np.asarray(labels, dtype=object)
        cats = None if categories is None else [str(c) for c in categories]
    if values.ndim != 1:
        raise StofmInputError(f"labels must be one value per cell (1-D), got shape {values.shape}")
    missing = pd.isna(values) | (values == "")
    text = np.where(missing, "", values).astype(str)
    if cats is None:
        cats = sorted(set(text[~missing].tolist()))
    _check_unique(cats)
    lookup = {c: i for i, c in enumerate(cats)}
    unknown = sorted(set(text[~missing].tolist()) - set(lookup))
    if unknown:
        raise StofmInputError(
            f"labels {unknown[:5]} are not among the categories {cats[:10]}; "
            "add them to the categories or fix the labels"
        )
    codes = np.full(len(text), -1, dtype=np.int32)
    if (~missing).any():
        codes[~missing] = [lookup[t] for t in text[~missing]]
    return codes, cats


def _check_unique(categories: Sequence[str]) -> None:
    seen = set()
    for c in categories:
        if c in seen:
            raise StofmInputError(f"category {c!r} appears twice; class names must be unique")
        seen.add(c)


@dataclass
class LabelPrediction:
    """Per-cell class predictions.

    Attributes
    ----------
    categories
        Class names; ``codes`` index into this list.
    codes
        ``int32`` array (n,), ``-1`` meaning "no class".
    confidence
        ``float32`` array (n,) in [0, 1]; set to 0 where the code is -1.
    probabilities
        Optional ``float32`` array (n, len(categories)), rows summing to 1 (or 0 for
        cells without a class).
    colors
        One hex colour per category; a deterministic palette when not given.
    """

    categories: list[str]
    codes: np.ndarray
    confidence: np.ndarray
    probabilities: Optional[np.ndarray] = None
    colors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.categories = [str(c) for c in self.categories]
        _check_unique(self.categories)
        k = len(self.categories)
        self.codes = np.asarray(self.codes).astype(np.int32, copy=False).reshape(-1)
        n = self.codes.shape[0]
        if n and (self.codes.min() < -1 or self.codes.max() >= k):
            raise StofmInputError(f"codes must lie in [-1, {k - 1}] for {k} categories")
        self.confidence = _checked_confidence(self.confidence, n)
        self.confidence[self.codes < 0] = 0.0
        if self.probabilities is not None:
            self.probabilities = np.asarray(self.probabilities, dtype=np.float32)
            if self.probabilities.shape != (n, k):
                raise StofmInputError(
                    f"probabilities have shape {self.probabilities.shape}, expected ({n}, {k})"
                )
        self.colors = list(self.colors) if self.colors else default_colors(k)
        if len(self.colors) != k:
            raise StofmInputError(f"{len(self.colors)} colours given for {k} categories; give one per category")

    @property
    def n_cells(self) -> int:
        return int(self.codes.shape[0])

    def counts(self) -> dict[str, int]:
        """Number of cells per category (in category order)."""
        counts = np.bincount(self.codes[self.codes >= 0], minlength=len(self.categories))
        return {c: int(n) for c, n in zip(self.categories, counts, strict=True)}

    def to_categorical(self) -> pd.Categorical:
        """A pandas Categorical with this prediction's categories; code -1 becomes NaN."""
        return pd.Categorical.from_codes(self.codes, categories=self.categories)


def _checked_confidence(confidence, n: int) -> np.ndarray:
    conf = np.asarray(confidence, dtype=np.float32).reshape(-1)
    if conf.shape[0] != n:
        raise StofmInputError(f"confidence has {conf.shape[0]} values for {n} cells")
    if not np.all(np.isfinite(conf)):
        raise StofmInputError("confidence contains NaN or infinite values; use 0 for unknown confidence")
    if n and (conf.min() < -1e-4 or conf.max() > 1 + 1e-4):
        raise StofmInputError(f"confidence must lie in [0, 1], got [{conf.min():.3g}, {conf.max():.3g}]")
    return np.clip(conf, 0.0, 1.0)
