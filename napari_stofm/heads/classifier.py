"""Supervised label head: tissue regions or cell types from labelled cells.

One machinery serves three uses:

* :func:`complete_labels` - a slice with partial labels (NaN = unlabelled): learn from the
  labelled cells, predict the rest;
* :func:`transfer_labels` - a labelled reference slice predicts a query slice;
* :func:`refine_from_corrections` - retrain on a user's corrections and update the cells
  the user did not touch.

The model is a multinomial logistic regression (a linear probe, as foundation-model
embeddings are usually evaluated) on standardised features: convex, so the same data give
the same fit with no seed to get lucky with; calibrated-ish probabilities; and fitting takes
about a second for tens of thousands of cells on a CPU. With positions, the features are
the cell's embedding concatenated with the mean embedding of its spatial neighbours, since
tissue regions are defined by neighbourhoods (turn off with ``spatial_context=False``, e.g.
for cell types).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from napari_stofm.errors import StofmInputError
from napari_stofm.heads.prediction import LabelPrediction, encode_labels
from napari_stofm.heads.regions import neighbor_mean_operator
from napari_stofm.knn import spatial_neighbors


class LabelHead:
    """A classifier over cell embeddings (plus, optionally, their spatial context).

    Parameters
    ----------
    spatial_context
        Concatenate the mean embedding of each cell's ``n_neighbors`` spatial neighbours
        when positions are given to :meth:`fit` (then :meth:`predict` needs them too).
    n_neighbors
        Spatial neighbours for the context features.
    C
        Inverse L2 regularisation strength of the logistic regression (sample weights are
        normalised to mean 1, so its meaning does not depend on how weights are scaled).
    class_balance
        Weight classes inversely to their (weighted) size, at most 10x, so rare classes are
        not ignored (macro-F1 counts every class equally).
    max_train_cells
        Larger training sets are subsampled per class (proportionally, at least 50 per
        class), seeded.
    seed
        Seeds the subsampling. The fit itself (L-BFGS on a convex loss) is deterministic.
    """

    def __init__(
        self,
        *,
        spatial_context: bool = True,
        n_neighbors: int = 15,
        C: float = 1.0,
        class_balance: bool = True,
        max_train_cells: int = 50_000,
        max_iter: int = 1000,
        seed: int = 0,
    ):
        from napari_stofm.checks import integer, number

        self.spatial_context = spatial_context
        self.n_neighbors = integer(n_neighbors, "n_neighbors", minimum=1)
        self.C = number(C, "C", minimum=0.0, exclusive_minimum=True)
        self.class_balance = class_balance
        self.max_train_cells = integer(max_train_cells, "max_train_cells", minimum=2)
        self.max_iter = integer(max_iter, "max_iter", minimum=1)
        self.seed = integer(seed, "seed", minimum=0, maximum=2**32 - 1)
        self.categories_: Optional[list[str]] = None

    # ------------------------------------------------------------------------------ fit

    def fit(
        self,
        embeddings,
        labels,
        xy=None,
        sample_weight=None,
        categories: Optional[Sequence[str]] = None,
    ) -> "LabelHead":
        """Learn from the labelled cells of ``labels`` (NaN / None / "" = unlabelled).

        ``embeddings`` holds every cell of the slice (labelled or not: all of them set the
        feature scaling and the spatial context). ``categories`` fixes the class order;
        otherwise a Categorical keeps its own order and strings are sorted. Classes with a
        single labelled cell are trained with a warning; declared classes with none are kept
        (probability 0) with a warning. Fewer than two labelled classes is an error.
        """
        from sklearn.linear_model import LogisticRegression

        emb = _embeddings(embeddings)
        codes, cats = encode_labels(labels, categories)
        if codes.shape[0] != emb.shape[0]:
            raise StofmInputError(
                f"{codes.shape[0]} labels for {emb.shape[0]} embeddings; give one label (or NaN) per cell"
            )
        weight = _sample_weight(sample_weight, emb.shape[0])
        self.categories_ = cats
        self.n_features_in_ = emb.shape[1]
        self.uses_context_ = bool(self.spatial_context and xy is not None)
        raw = self._raw_features(emb, xy)
        self._mean = raw.mean(axis=0)
        self._std = np.where(raw.std(axis=0) > 1e-8, raw.std(axis=0), 1.0)
        train = np.flatnonzero((codes >= 0) & (weight > 0))
        self.classes_present_ = _check_classes(codes[train], cats)
        train = _subsample(train, codes, self.max_train_cells, self.seed)
        w = weight[train] * self._class_factors(codes[train], weight[train])
        self._model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self._model.fit(self._scaled(raw[train]), codes[train], sample_weight=w / w.mean())
        return self

    def _class_factors(self, codes: np.ndarray, weight: np.ndarray) -> np.ndarray:
        if not self.class_balance:
            return np.ones_like(weight)
        per_class = np.bincount(codes, weights=weight, minlength=len(self.categories_))
        present = per_class > 0
        factor = np.zeros_like(per_class)
        factor[present] = np.minimum(per_class[present].mean() / per_class[present], 10.0)
        return factor[codes]

    # -------------------------------------------------------------------------- predict

    def predict(self, embeddings, xy=None) -> LabelPrediction:
        """Class probabilities for every cell; ``codes`` is the most probable class."""
        proba = self.predict_proba(embeddings, xy)
        codes = proba.argmax(axis=1).astype(np.int32)
        confidence = proba[np.arange(proba.shape[0]), codes]
        return LabelPrediction(list(self.categories_), codes, confidence, proba)

    def predict_proba(self, embeddings, xy=None) -> np.ndarray:
        """(n, len(categories_)) float32 probabilities (0 for classes never seen in training)."""
        if self.categories_ is None:
            raise StofmInputError("this LabelHead is not trained yet; call fit(...) first")
        emb = _embeddings(embeddings)
        if emb.shape[1] != self.n_features_in_:
            raise StofmInputError(
                f"embeddings have {emb.shape[1]} dimensions but the head was trained on "
                f"{self.n_features_in_}; use embeddings from the same model"
            )
        if self.uses_context_ and xy is None:
            raise StofmInputError(
                "this head was trained with spatial context; pass xy= (the cells' positions) "
                "or train it with spatial_context=False"
            )
        raw = self._raw_features(emb, xy if self.uses_context_ else None)
        proba = np.zeros((emb.shape[0], len(self.categories_)), dtype=np.float32)
        proba[:, self._model.classes_] = self._model.predict_proba(self._scaled(raw))
        return proba

    # ------------------------------------------------------------------------- features

    def _raw_features(self, emb: np.ndarray, xy) -> np.ndarray:
        if xy is None or not self.uses_context_:
            return emb
        return with_spatial_context(emb, xy, self.n_neighbors)

    def _scaled(self, raw: np.ndarray) -> np.ndarray:
        return ((raw - self._mean) / self._std).astype(np.float32)


def with_spatial_context(embeddings, xy, n_neighbors: int = 15) -> np.ndarray:
    """``[embedding, mean embedding of the n_neighbors nearest cells]`` per cell, (n, 2d)."""
    from napari_stofm.checks import integer

    emb = _embeddings(embeddings)
    pos = _positions(xy, emb.shape[0])
    k = min(integer(n_neighbors, "n_neighbors", minimum=1), emb.shape[0] - 1)
    if k < 1:
        return np.hstack([emb, emb])
    context = neighbor_mean_operator(spatial_neighbors(pos, k)) @ emb
    return np.hstack([emb, context.astype(np.float32)])


# ------------------------------------------------------------------------ entry points


def complete_labels(
    embeddings,
    labels,
    xy=None,
    sample_weight=None,
    *,
    categories: Optional[Sequence[str]] = None,
    keep_given: bool = True,
    **head_kwargs,
) -> LabelPrediction:
    """Train on a slice's labelled cells and predict the others.

    With ``keep_given`` the labelled cells keep their label with confidence 1 (one-hot
    probabilities); otherwise they get the head's prediction like every other cell.
    """
    codes, cats = encode_labels(labels, categories)
    head = LabelHead(**head_kwargs).fit(embeddings, pd.Categorical.from_codes(codes, cats), xy, sample_weight)
    pred = head.predict(embeddings, xy)
    if keep_given:
        pred = _override(pred, codes >= 0, codes)
    return pred


def transfer_labels(
    ref_embeddings,
    ref_labels,
    query_embeddings,
    *,
    ref_xy=None,
    query_xy=None,
    sample_weight=None,
    categories: Optional[Sequence[str]] = None,
    **head_kwargs,
) -> LabelPrediction:
    """Train on a labelled reference slice, predict a query slice embedded by the same model.

    Spatial context is used only when both ``ref_xy`` and ``query_xy`` are given.
    """
    use_xy = ref_xy is not None and query_xy is not None
    head = LabelHead(**head_kwargs)
    head.fit(ref_embeddings, ref_labels, ref_xy if use_xy else None, sample_weight, categories)
    return head.predict(query_embeddings, query_xy if use_xy else None)


def refine_from_corrections(
    embeddings,
    xy,
    codes,
    curated_mask,
    categories: Sequence[str],
    current_confidence=None,
    *,
    min_confidence: float = 0.8,
    pseudo_weight: float = 0.1,
    max_pseudo_per_class: int = 1000,
    claim_fraction: float = 0.05,
    seed: int = 0,
    **head_kwargs,
) -> LabelPrediction:
    """Retrain on a user's corrections and update the cells the user did not touch.

    ``codes`` are the current per-cell codes into ``categories`` (curated cells carrying
    their curated class, -1 = none); ``curated_mask`` marks the cells the user set.

    The training set (the rule):

    1. every curated cell with a class, weight 1 (a curated "no class", code -1, stays
       as it is and is not trained on);
    2. pseudo-labels, so that a handful of corrections does not collapse the classes the
       user did not touch: uncurated cells whose current class has ``current_confidence
       >= min_confidence``, at most ``max_pseudo_per_class`` per class (the most
       confident; ties by cell order), weight ``pseudo_weight`` each;
    3. corrections claim their neighbourhood: each curated cell's nearest
       ``claim_fraction`` of all cells (at least 10) in the classifier's feature space
       (standardised embedding + spatial context, 32 principal components) lose their
       pseudo-label if it disagrees with the curated class. Without this, the old
       prediction on cells that look like the corrected ones outvotes the corrections
       and the correction does not spread.

    Class balancing (see :class:`LabelHead`) applies on top. Curated cells keep exactly
    their curated code (confidence 1, one-hot probabilities); every other cell gets the
    retrained head's prediction. ``xy`` may be None (no spatial context).
    """
    from napari_stofm.checks import integer, number

    min_confidence = number(min_confidence, "min_confidence", minimum=0.0, maximum=1.0)
    pseudo_weight = number(pseudo_weight, "pseudo_weight", minimum=0.0)
    max_pseudo_per_class = integer(max_pseudo_per_class, "max_pseudo_per_class", minimum=0)
    claim_fraction = number(claim_fraction, "claim_fraction", minimum=0.0, maximum=1.0)
    emb = _embeddings(embeddings)
    n = emb.shape[0]
    codes = _codes(codes, n, len(categories))
    curated = _mask(curated_mask, n)
    categories = [str(c) for c in categories]
    if not curated.any():
        raise StofmInputError("no curated cells: correct some cells (paint or fill) before refining")
    conf = np.ones(n, dtype=np.float32) if current_confidence is None else _confidence(current_confidence, n)
    weight = _pseudo_label_weights(codes, curated, conf, min_confidence, pseudo_weight, max_pseudo_per_class)
    head = LabelHead(seed=seed, **head_kwargs)
    use_xy = xy if head.spatial_context else None
    raw = emb if use_xy is None else with_spatial_context(emb, use_xy, head.n_neighbors)
    space = _claim_space(raw, seed)
    weight = _drop_contradicted(weight, codes, curated, space, claim_fraction, seed)
    train_codes = np.where(weight > 0, codes, -1)
    head.fit(emb, pd.Categorical.from_codes(train_codes, categories), use_xy, sample_weight=weight)
    return _override(head.predict(emb, use_xy), curated, codes)


def _pseudo_label_weights(codes, curated, conf, min_confidence, pseudo_weight, max_per_class) -> np.ndarray:
    """Rules 1 and 2 of :func:`refine_from_corrections`: per-cell training weights."""
    weight = np.zeros(codes.shape[0], dtype=np.float64)
    weight[curated & (codes >= 0)] = 1.0
    eligible = ~curated & (codes >= 0) & (conf >= min_confidence)
    for c in np.unique(codes[eligible]):
        cells = np.flatnonzero(eligible & (codes == c))
        best = cells[np.argsort(-conf[cells], kind="stable")[:max_per_class]]
        weight[best] = pseudo_weight
    return weight


def _claim_space(raw: np.ndarray, seed: int, n_components: int = 32) -> np.ndarray:
    from sklearn.decomposition import PCA

    z = (raw - raw.mean(axis=0)) / np.where(raw.std(axis=0) > 1e-8, raw.std(axis=0), 1.0)
    n_comp = min(n_components, z.shape[1], z.shape[0] - 1)
    if n_comp < 1 or n_comp >= z.shape[1]:
        return z.astype(np.float32)
    return PCA(n_components=n_comp, svd_solver="randomized", random_state=seed).fit_transform(z).astype(np.float32)


def _drop_contradicted(weight, codes, curated, space, claim_fraction, seed, max_claimers=2000) -> np.ndarray:
    """Rule 3 of :func:`refine_from_corrections` (at most ``max_claimers`` curated cells, seeded)."""
    n = codes.shape[0]
    k = min(n, max(10, int(round(claim_fraction * n))))
    claimers = np.flatnonzero(curated & (codes >= 0))
    if claimers.size > max_claimers:
        claimers = np.sort(np.random.default_rng(seed).choice(claimers, max_claimers, replace=False))
    pseudo = (weight > 0) & ~curated
    weight = weight.copy()
    sq = (space.astype(np.float64) ** 2).sum(axis=1)
    for chunk in np.array_split(claimers, max(1, int(np.ceil(claimers.size / 256)))):
        if chunk.size == 0:
            continue
        d2 = sq[chunk, None] + sq[None, :] - 2.0 * (space[chunk] @ space.T)
        near = np.argpartition(d2, k - 1, axis=1)[:, :k]
        conflict = pseudo[near] & (codes[near] != codes[chunk][:, None])
        weight[near[conflict]] = 0.0
    return weight


def _override(pred: LabelPrediction, mask: np.ndarray, codes: np.ndarray) -> LabelPrediction:
    """A copy of ``pred`` whose cells in ``mask`` carry ``codes`` with full confidence."""
    new_codes = pred.codes.copy()
    new_codes[mask] = codes[mask]
    confidence = pred.confidence.copy()
    confidence[mask] = (codes[mask] >= 0).astype(np.float32)
    proba = pred.probabilities.copy()
    proba[mask] = 0.0
    fixed = np.flatnonzero(mask & (codes >= 0))
    proba[fixed, codes[fixed]] = 1.0
    return LabelPrediction(pred.categories, new_codes, confidence, proba, colors=pred.colors)


# ------------------------------------------------------------------------------ checks


def _check_classes(train_codes: np.ndarray, categories: list[str]) -> list[str]:
    counts = np.bincount(train_codes, minlength=len(categories))
    present = [c for c, k in zip(categories, counts, strict=True) if k > 0]
    if len(present) < 2:
        found = f"only {present[0]!r}" if present else "none"
        raise StofmInputError(
            f"need labelled cells of at least two classes to train a classifier, found {found}; "
            "label cells of another class (or use unsupervised regions instead)"
        )
    single = [c for c, k in zip(categories, counts, strict=True) if k == 1]
    if single:
        warnings.warn(
            f"classes {single} have a single labelled cell; their predictions are unreliable - "
            "label a few more cells of them",
            stacklevel=3,
        )
    empty = [c for c, k in zip(categories, counts, strict=True) if k == 0]
    if empty:
        warnings.warn(
            f"classes {empty} have no labelled cells and will not be predicted; label some cells of them",
            stacklevel=3,
        )
    return present


def _subsample(train: np.ndarray, codes: np.ndarray, max_cells: int, seed: int) -> np.ndarray:
    """At most ~``max_cells`` of ``train``, per class proportionally (at least 50 each)."""
    if train.size <= max_cells:
        return train
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(codes[train]):
        cells = train[codes[train] == c]
        n_keep = min(cells.size, max(50, int(round(max_cells * cells.size / train.size))))
        keep.append(np.sort(rng.choice(cells, size=n_keep, replace=False)))
    return np.sort(np.concatenate(keep))


def _embeddings(embeddings) -> np.ndarray:
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise StofmInputError(f"embeddings must be a non-empty (cells, dims) array, got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise StofmInputError("embeddings contain NaN or infinite values; re-run the embedding step")
    return emb


def _positions(xy, n: int) -> np.ndarray:
    pos = np.asarray(xy, dtype=np.float64)
    if pos.shape != (n, 2):
        raise StofmInputError(f"xy must be ({n}, 2) positions for {n} cells, got shape {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise StofmInputError("xy contains NaN or infinite positions; drop or fix those cells")
    return pos


def _sample_weight(sample_weight, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise StofmInputError(f"sample_weight has {w.shape[0]} values for {n} cells")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise StofmInputError("sample_weight must be finite and non-negative")
    return w


def _mask(mask, n: int) -> np.ndarray:
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if m.shape[0] != n:
        raise StofmInputError(f"curated_mask has {m.shape[0]} values for {n} cells")
    return m


def _codes(codes, n: int, n_categories: int) -> np.ndarray:
    c = np.asarray(codes).reshape(-1)
    if c.shape[0] != n:
        raise StofmInputError(f"codes has {c.shape[0]} values for {n} cells")
    c = c.astype(np.int32)
    if n and (c.min() < -1 or c.max() >= n_categories):
        raise StofmInputError(
            f"codes must lie in [-1, {n_categories - 1}] for {n_categories} categories; "
            "pass the categories the codes index into"
        )
    return c


def _confidence(confidence, n: int) -> np.ndarray:
    c = np.asarray(confidence, dtype=np.float32).reshape(-1)
    if c.shape[0] != n:
        raise StofmInputError(f"current_confidence has {c.shape[0]} values for {n} cells")
    return np.nan_to_num(c, nan=0.0)
