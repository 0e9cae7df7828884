"""The result every prediction head returns: one class per cell, a confidence, colours.

:class:`LabelPrediction` is shared by the unsupervised region clustering
(:mod:`napari_stofm.regions`) and the supervised head (:mod:`napari_stofm.classifier`), and
is what the curation layer and the exporters consume. It follows the scverse conventions of
``docs/architecture.md``: a Categorical ``obs[key]``, a float ``obs[key + '_confidence']`` in
[0, 1] and hex colours in ``uns[key + '_colors']``, one per category.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .errors import StofmInputError

# Okabe-Ito (colour-blind safe, black left out: it reads as "no label") first, then
# distinct colours from scanpy's default_20 / godsnot palettes.
_PALETTE = [
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#8c564b", "#17becf", "#bcbd22", "#9467bd", "#e377c2", "#2ca02c", "#d62728",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5", "#023fa5", "#8e063b", "#11c638", "#ef9708", "#0fcfc0",
    "#7d87b9", "#e07b91",
]


def default_colors(n: int) -> list[str]:
    """``n`` distinct hex colours, always the same for the same ``n``.

    The first 30 come from a fixed colour-blind-friendly-first list; beyond that hues
    are spread by the golden angle at alternating lightness.
    """
    colors = list(_PALETTE[:n])
    for i in range(len(colors), n):
        hue = (i * 0.618033988749895) % 1.0
        lightness = 0.45 if i % 2 else 0.62
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.75)
        colors.append("#{:02x}{:02x}{:02x}".format(int(r * 255), int(g * 255), int(b * 255)))
    return colors


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
        return {c: int(n) for c, n in zip(self.categories, counts)}

    def to_categorical(self) -> pd.Categorical:
        """A pandas Categorical with this prediction's categories; code -1 becomes NaN."""
        return pd.Categorical.from_codes(self.codes, categories=self.categories)

    def write_obs(self, adata, key: str, *, curated: Optional[np.ndarray] = None) -> None:
        """Write ``obs[key]``, ``obs[key + '_confidence']`` and ``uns[key + '_colors']``.

        ``curated`` (bool per cell), when given, is written to ``obs[key + '_curated']``.
        """
        if adata.n_obs != self.n_cells:
            raise StofmInputError(
                f"the prediction has {self.n_cells} cells but the AnnData has {adata.n_obs}; "
                "predict on this AnnData (same cells, same order) before writing"
            )
        adata.obs[key] = self.to_categorical()
        adata.obs[key + "_confidence"] = self.confidence.astype(np.float32)
        if curated is not None:
            curated = np.asarray(curated, dtype=bool).reshape(-1)
            if curated.shape[0] != self.n_cells:
                raise StofmInputError(f"curated has {curated.shape[0]} values for {self.n_cells} cells")
            adata.obs[key + "_curated"] = curated
        adata.uns[key + "_colors"] = list(self.colors)

    @classmethod
    def from_obs(cls, adata, key: str) -> "LabelPrediction":
        """Read back what :meth:`write_obs` wrote (confidence 1 where the column is absent)."""
        if key not in adata.obs:
            raise StofmInputError(f"obs[{key!r}] is missing; run a prediction or name an existing label column")
        codes, categories = encode_labels(adata.obs[key])
        conf_key = key + "_confidence"
        if conf_key in adata.obs:
            confidence = np.nan_to_num(np.asarray(adata.obs[conf_key], dtype=np.float32), nan=0.0)
        else:
            confidence = (codes >= 0).astype(np.float32)
        colors = list(adata.uns.get(key + "_colors", []))
        if len(colors) != len(categories):
            colors = []
        return cls(categories, codes, confidence, colors=colors)


def _checked_confidence(confidence, n: int) -> np.ndarray:
    conf = np.asarray(confidence, dtype=np.float32).reshape(-1)
    if conf.shape[0] != n:
        raise StofmInputError(f"confidence has {conf.shape[0]} values for {n} cells")
    if not np.all(np.isfinite(conf)):
        raise StofmInputError("confidence contains NaN or infinite values; use 0 for unknown confidence")
    if n and (conf.min() < -1e-4 or conf.max() > 1 + 1e-4):
        raise StofmInputError(f"confidence must lie in [0, 1], got [{conf.min():.3g}, {conf.max():.3g}]")
    return np.clip(conf, 0.0, 1.0)
