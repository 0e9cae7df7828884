"""How a labelling agrees with another labelling of the same cells (e.g. predicted regions with
the slice's ground truth): the confusion table, ARI / NMI, and per-class agreement.

No napari, no Qt: the Review widget's agreement panel only shows :func:`agreement`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from napari_stofm import keys
from napari_stofm.errors import StofmInputError
from napari_stofm.heads.annotation import Annotation

#: ground-truth columns looked for first, per predicted key
PREFERRED_TRUTH = {keys.REGION: ("region", "layer", "domain", "annotation"),
                   keys.CELL_TYPE: ("cell_type", "celltype", "cell_class", "cell_types")}


@dataclass
class Agreement:
    """``confusion``: cells per (predicted class, existing class), classes in their own order,
    over the cells labelled in both. ``per_class``: for each predicted class its best
    matching existing class, the cells they share, ``precision`` (share of the predicted
    class in that match), ``recall`` (share of the match in the predicted class) and their
    ``jaccard``. ``accuracy``: the share of cells whose two class names are equal, when the
    two labellings share class names (None otherwise)."""

    predicted_key: str
    truth_key: str
    confusion: pd.DataFrame
    per_class: pd.DataFrame
    ari: float
    nmi: float
    n_cells: int  # labelled in both
    accuracy: Optional[float] = None

    def describe(self) -> str:
        text = f"ARI {self.ari:.2f}, NMI {self.nmi:.2f} over {self.n_cells:,} cells labelled in both"
        if self.accuracy is not None:
            text += f"; same class name for {100 * self.accuracy:.0f} %"
        return text


def _codes_and_names(labels, n_cells: int, what: str):
    """``(codes, names)`` of an Annotation or an obs column (NaN / '' = unlabelled: -1)."""
    if isinstance(labels, Annotation):
        return labels.codes.astype(np.int64), [str(c) for c in labels.categories]
    series = pd.Series(labels) if not isinstance(labels, pd.Series) else labels
    if len(series) != n_cells:
        raise StofmInputError(f"{what} has {len(series)} values for {n_cells} cells.")
    values = series.astype(object).where(series.notna(), None)
    text = values.map(lambda v: None if v is None or str(v).strip() == "" else str(v))
    if isinstance(series.dtype, pd.CategoricalDtype):
        order = [str(c) for c in series.cat.categories]
        names = list(dict.fromkeys(n for n in order if n.strip()))
    else:
        names = sorted(set(t for t in text if t is not None))
    index = {n: i for i, n in enumerate(names)}
    codes = np.array([index.get(t, -1) if t is not None else -1 for t in text], dtype=np.int64)
    return codes, names


def agreement(predicted: Annotation, truth, *, truth_key: str = "") -> Agreement:
    """Compare ``predicted`` with ``truth`` (an :class:`Annotation` or an obs column of the
    same cells) over the cells labelled in both."""
    p_codes, p_names = predicted.codes.astype(np.int64), [str(c) for c in predicted.categories]
    t_codes, t_names = _codes_and_names(truth, predicted.n_cells, f"the column {truth_key or 'compared'}")
    both = (p_codes >= 0) & (t_codes >= 0)
    p, t = p_codes[both], t_codes[both]
    counts = np.bincount(p * max(len(t_names), 1) + t, minlength=len(p_names) * len(t_names))
    confusion = pd.DataFrame(counts.reshape(len(p_names), len(t_names)), index=pd.Index(p_names, name="predicted"),
                             columns=pd.Index(t_names, name=truth_key or "existing"))
    rows = []
    t_sizes = confusion.sum(axis=0).to_numpy()
    for name, row in confusion.iterrows():
        size = int(row.sum())
        if size == 0 or not t_names:
            rows.append((name, size, None, 0, np.nan, np.nan, np.nan))
            continue
        j = int(np.argmax(row.to_numpy()))
        shared = int(row.iloc[j])
        union = size + int(t_sizes[j]) - shared
        rows.append((name, size, t_names[j], shared, shared / size, shared / t_sizes[j] if t_sizes[j] else np.nan,
                     shared / union if union else np.nan))
    per_class = pd.DataFrame(rows, columns=["class", "n_cells", "best_match", "shared", "precision", "recall",
                                            "jaccard"]).set_index("class")
    n = int(both.sum())
    ari, nmi = contingency_scores(confusion.to_numpy())
    accuracy = None
    if n and set(p_names) & set(t_names):
        p_text = np.asarray(p_names, dtype=object)[p]
        t_text = np.asarray(t_names, dtype=object)[t]
        accuracy = float(np.mean(p_text == t_text))
    return Agreement(predicted.key, truth_key, confusion, per_class, ari, nmi, n, accuracy)


def contingency_scores(table) -> tuple:
    """``(ARI, NMI)`` of two labellings from their contingency table (cells per class pair),
    as scikit-learn's ``adjusted_rand_score`` and ``normalized_mutual_info_score`` (arithmetic
    mean) give them; NaN for an empty table. Computed here, from the table the agreement
    already has, so that the UI thread imports nothing while a worker imports scanpy."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    if n == 0:
        return float("nan"), float("nan")
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    pairs = lambda x: (x * (x - 1) / 2.0).sum()  # noqa: E731
    both, a, b, total = pairs(table), pairs(rows), pairs(cols), n * (n - 1) / 2.0
    expected = a * b / total if total else 0.0
    best = (a + b) / 2.0
    ari = 1.0 if best == expected else float((both - expected) / (best - expected))
    nz = table > 0
    outer = np.outer(rows, cols)
    mutual = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    entropy = lambda x: float(-(x[x > 0] / n * np.log(x[x > 0] / n)).sum())  # noqa: E731
    h_rows, h_cols = entropy(rows), entropy(cols)
    if h_rows == 0 and h_cols == 0:
        nmi = 1.0
    else:
        nmi = mutual / ((h_rows + h_cols) / 2.0) if (h_rows + h_cols) > 0 else 0.0
    return ari, float(min(max(nmi, 0.0), 1.0))


def truth_columns(adata, predicted_key: str, *, exclude: Sequence[str] = ()) -> List[str]:
    """The obs columns a labelling can be compared with: categorical (or text) columns with
    2 to 200 classes (and at most one per two cells) that are not a prediction or one of its
    companions; the likeliest ground
    truth first (a name of :data:`PREFERRED_TRUTH`, then the label column the prediction
    learned from, then the others in obs order)."""
    obs = adata.obs
    companions = {c for key in keys.PREDICTED_KEYS for c in keys.companion_keys(key)}
    out = []
    for col in obs.columns:
        name = str(col)
        if name in companions or name.startswith("stofm_") or name in exclude or name == predicted_key:
            continue
        column = obs[col]
        if not (isinstance(column.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(column)
                or pd.api.types.is_string_dtype(column)):
            continue
        n = column.nunique(dropna=True)
        if 2 <= n <= min(200, max(2, len(column) // 2)):  # not an id per cell
            out.append(name)
    stofm = adata.uns.get(keys.UNS, {}) if hasattr(adata, "uns") else {}
    prov = (stofm.get("provenance", {}) or {}).get(predicted_key, {}) if isinstance(stofm, dict) else {}
    learned = prov.get("label_key") if isinstance(prov, dict) else None
    preferred = list(PREFERRED_TRUTH.get(predicted_key, ())) + ([str(learned)] if learned else [])
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(out, key=lambda c: (rank.get(c, rank.get(c.lower(), len(rank))), out.index(c)))
