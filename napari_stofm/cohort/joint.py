"""One tissue-region vocabulary for a whole cohort (``stofm predict ... --joint-regions K``).

The single-slice :class:`~napari_stofm.heads.regions.RegionClusterer` standardises and
projects a slice's embeddings on its own principal components, smooths them over spatial
neighbours, over-clusters them and cuts one modularity tree: its ``Region 3`` means nothing
on another slide. The joint model runs the same steps, splitting them between the slices
and the cohort:

1. **Per slice, where it runs** (:func:`region_sample`): the single-slice standardisation
   (each dimension z-scored over the slice's own cells), the single-slice spatial smoothing
   ``s = (1 - w) z + w mean(z[neighbours])`` (same neighbours, same weight), and a seeded
   random sample of the slice's cells (at most ``sample / n_slices``, so every slice is
   represented and the pooled sample stays bounded however large the cohort).
2. **Once, on the pooled sample** (:class:`JointRegions`): the PCA of the single-slice path,
   fitted on the pooled unsmoothed cells and applied to the smoothed ones (smoothing is a
   weighted mean with weights summing to one, so it commutes with the projection: this is
   exactly "reduce, then smooth"), then the same micro-clusters, co-membership graph,
   modularity tree and speck-free cut at K.
3. **Per slice again** (:meth:`JointRegions.predict`): each cell goes to its nearest joint
   micro-cluster, hence to a joint region; then the single-slice clean-up (majority vote
   over spatial neighbours) and confidence (Gaussian posterior of the joint regions, and
   the neighbours' votes).

Why the standardisation stays per slice: every cell of a slice attends to the same virtual
cells (the macro scale is built per slice), so SToFM embeddings carry a slice-wide offset.
Standardised on the pooled cells, the joint regions are the slices themselves (on the four
DLPFC slides of the shared data, K = 7, each slide came out almost entirely one or two
regions of its own); standardised per slice, they are layers again, about as good on each
slide as regions found on it alone (ARI 0.36 / 0.50 / 0.44 / 0.35 against 0.41 / 0.36 /
0.47 / 0.44) and consistent across them (0.39 over the four slides pooled, against 0.27 for
the separate regions, whose names only match by size rank; ``benchmarks/bench_cohort.py
--joint``). The price: slices are assumed to sample comparable tissue; a slide made of a
single region of the others would be stretched over all of them.

Regions are named ``Region 1`` ... ``Region K`` by decreasing size in the pooled sample, and
every slice gets all K classes (a region absent from a slice has 0 cells there), with the
same colours.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError
from napari_stofm.heads import regions as single

#: cells pooled across the cohort for the joint fit (split evenly between slices)
DEFAULT_SAMPLE = 50_000
N_NEIGHBORS = 15  # RegionClusterer's defaults: the single-slice path's smoothing and vote
SMOOTHING_ITERATIONS = 2
N_PCS = 30
N_MICRO = 300


def joint_settings(n_regions: int, n_slices: int, *, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> dict:
    """The settings every slice of a joint-regions run gets (they enter its key)."""
    from napari_stofm.checks import integer

    n_regions = single.check_n_regions(n_regions)
    sample = integer(sample, "joint sample", minimum=100, fix="the number of cells pooled for the joint fit")
    return {"n_regions": n_regions, "sample": sample, "per_slice": -(-sample // max(1, n_slices)),
            "seed": int(seed), "spatial_weight": single.DEFAULT_SPATIAL_WEIGHT, "n_neighbors": N_NEIGHBORS}


@dataclass
class RegionSample:
    """The cells one slice gives the joint fit: their standardised embeddings, unsmoothed and smoothed."""

    name: str
    embeddings: np.ndarray  # (m, E) float32
    smoothed: np.ndarray  # (m, E) float32
    n_cells: int  # cells of the whole slice


def _standardised(emb: np.ndarray) -> np.ndarray:
    """The single-slice z-score: each dimension over the slice's cells (constant ones become 0)."""
    std = emb.std(axis=0)
    return ((emb - emb.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)


def _smoothed(emb: np.ndarray, xy: np.ndarray, settings: dict):
    """(standardised embeddings, xy, spatial neighbours, their spatially smoothed version)."""
    emb, xy = single._validated(emb, xy)
    z = _standardised(emb)
    neighbors = single.spatial_neighbors(xy, min(int(settings["n_neighbors"]), emb.shape[0] - 1))
    return z, xy, neighbors, single._smooth(z, neighbors, float(settings["spatial_weight"]))


def _embedding_of(adata, spatial_key: str = keys.SPATIAL):
    if keys.EMBEDDING not in adata.obsm:
        raise StofmInputError(f"the slice has no obsm['{keys.EMBEDDING}'] to find regions in; embed it first")
    return (np.asarray(adata.obsm[keys.EMBEDDING], dtype=np.float32),
            np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2])


def region_sample(adata, settings: dict, name: str, spatial_key: str = keys.SPATIAL) -> RegionSample:
    """Smooth a slice's embeddings in space and draw its share of the joint sample (seeded by
    the slice's name, so a rerun draws the same cells)."""
    emb, xy = _embedding_of(adata, spatial_key)
    emb, _, _, smooth = _smoothed(emb, xy, settings)
    n = emb.shape[0]
    take = min(n, int(settings["per_slice"]))
    rng = np.random.default_rng([int(settings["seed"]), zlib.crc32(name.encode())])
    idx = np.sort(rng.choice(n, take, replace=False)) if take < n else np.arange(n)
    return RegionSample(name, emb[idx], smooth[idx], n)


class JointRegions:
    """Tissue regions fitted once on a cohort's pooled sample; :meth:`predict` labels any slice.

    Small (a projection, a few hundred centroids): it is sent to every slice's task.
    """

    def __init__(self, samples: Sequence[RegionSample], settings: dict, *, n_pcs: int = N_PCS,
                 n_micro: int = N_MICRO, min_region_size: Optional[int] = None):
        samples = [s for s in samples if s is not None and s.embeddings.shape[0]]
        if not samples:
            raise StofmInputError("no slice could be embedded, so no joint regions can be fitted")
        self.settings = dict(settings)
        self.n_regions = int(settings["n_regions"])
        seed = int(settings["seed"])
        emb = np.vstack([s.embeddings for s in samples])
        smooth = np.vstack([s.smoothed for s in samples])
        n = emb.shape[0]
        if n < 3:
            raise StofmInputError(f"the cohort has {n} cells; need at least 3 to find regions")
        # 1. the single-slice projection (PCA of the standardised cells), fitted on the pooled cells
        n_comp = min(int(n_pcs), emb.shape[1], emb.shape[0] - 1)
        self.pca = None
        if n_comp < emb.shape[1]:
            from sklearn.decomposition import PCA

            solver = "randomized" if n > 5000 else "full"
            self.pca = PCA(n_components=n_comp, svd_solver=solver, random_state=seed).fit(emb)
        features = self.project(smooth)
        # 2. the single-slice micro-clusters, tree and speck-free cut, on the pooled cells
        n_micro = min(int(n_micro), n, max(50, n // 20))
        micro_labels, self.centroids = single._micro_clusters(features, n_micro, seed)
        self.n_micro = self.centroids.shape[0]
        if not 1 <= self.n_regions <= self.n_micro:
            raise StofmInputError(f"--joint-regions must be between 1 and {self.n_micro} for this cohort, got "
                                  f"{self.n_regions}; use fewer regions")
        sizes = np.bincount(micro_labels, minlength=self.n_micro)
        if min_region_size is None:
            min_region_size = max(single.MIN_REGION_CELLS, int(round(single.MIN_REGION_SHARE * n)))
        merges = single._modularity_merges(single._co_membership_graph(features, self.centroids))
        micro_to_region = single._cut_without_specks(merges, sizes, self.n_regions, int(min_region_size))
        k = int(micro_to_region.max()) + 1
        labels = micro_to_region[micro_labels]
        # names by decreasing pooled size (ties by region index: positions mean nothing across slices)
        order = np.lexsort((np.arange(k), -np.bincount(labels, minlength=k)))
        rank = np.empty(k, dtype=np.int64)
        rank[order] = np.arange(k)
        self.micro_to_region = rank[micro_to_region]
        labels = rank[labels]
        self.n_found = k
        self.region_centroids, region_sizes = single._cluster_means(features, labels, k)
        self.log_priors = np.log(np.maximum(region_sizes, 1.0) / n)
        d2 = self._distances(features, self.region_centroids)
        self.variance = max(float(d2[np.arange(n), labels].mean()) / features.shape[1], 1e-12)
        self.n_sample = n
        self.slices = [s.name for s in samples]
        self.categories = [f"Region {i + 1}" for i in range(k)]

    # -- per slice ----------------------------------------------------------------

    def project(self, z: np.ndarray) -> np.ndarray:
        """Standardised (smoothed) embeddings -> the joint feature space."""
        z = np.asarray(z, dtype=np.float32)
        return (z if self.pca is None else self.pca.transform(z)).astype(np.float32)

    @staticmethod
    def _distances(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        f = features.astype(np.float64)
        return np.maximum((f * f).sum(axis=1)[:, None] + (centroids**2).sum(axis=1)[None, :]
                          - 2.0 * f @ centroids.T, 0.0)

    def predict(self, embeddings, xy):
        """A :class:`~napari_stofm.heads.prediction.LabelPrediction` of the joint regions for one slice."""
        from napari_stofm.heads.prediction import LabelPrediction

        _, xy, neighbors, smooth = _smoothed(embeddings, xy, self.settings)
        features = self.project(smooth)
        n = features.shape[0]
        micro = np.empty(n, dtype=np.int64)
        for start in range(0, n, 20000):
            micro[start:start + 20000] = self._distances(features[start:start + 20000], self.centroids).argmin(axis=1)
        labels = self.micro_to_region[micro]
        k = self.n_found
        min_size = max(single.MIN_REGION_CELLS, int(round(single.MIN_REGION_SHARE * n)))
        labels = single._majority_smooth(labels, neighbors, k, SMOOTHING_ITERATIONS, min_size)
        logit = self.log_priors[None, :] - self._distances(features, self.region_centroids) / (2.0 * self.variance)
        logit -= logit.max(axis=1, keepdims=True)
        posterior = np.exp(logit)
        posterior /= posterior.sum(axis=1, keepdims=True)
        probabilities = 0.5 * posterior + 0.5 * single._neighbor_votes(labels, neighbors, k)
        confidence = probabilities[np.arange(n), labels]
        return LabelPrediction(list(self.categories), labels.astype(np.int32), confidence,
                               probabilities.astype(np.float32))

    def provenance(self) -> dict:
        return {"n_regions": self.n_regions, "joint": True, "cohort_slices": len(self.slices),
                "joint_sample_cells": int(self.n_sample), "joint_seed": int(self.settings["seed"])}

    def write(self, adata, *, region_key: str = keys.REGION, spatial_key: str = keys.SPATIAL) -> None:
        """Label an embedded slice with the joint regions: ``obs[region_key]`` and its companions
        through :meth:`Annotation.to_obs`, and the settings in ``uns['stofm']['prediction']``."""
        from napari_stofm.heads.annotation import Annotation
        from napari_stofm.pipeline.predict import _discard_curation, model_provenance

        emb, xy = _embedding_of(adata, spatial_key)
        pred = self.predict(emb, xy)
        meta = dict(adata.uns.get(keys.UNS, {}) or {})
        _discard_curation(adata, region_key)
        Annotation.from_prediction(region_key, pred, provenance={**model_provenance(meta), **self.provenance()}
                                   ).to_obs(adata)
        meta = dict(adata.uns.get(keys.UNS, {}) or {})
        prediction = dict(meta.get(keys.PREDICTION, {}) or {})
        prediction.update(n_regions=len(pred.categories), joint_regions=True, cohort_slices=len(self.slices))
        meta[keys.PREDICTION] = prediction
        adata.uns[keys.UNS] = meta
