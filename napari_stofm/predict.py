"""``predict``: tissue regions and cell types for a slice, from SToFM embeddings.

* Regions, unsupervised: :class:`~napari_stofm.regions.RegionClusterer` over
  ``obsm['X_stofm']`` at ``n_regions`` (or a Leiden ``resolution``).
* Labels, supervised: a :class:`~napari_stofm.classifier.LabelHead` trained on a labelled
  reference slice (embedded by the same model) or on the slice's own partial labels.

Results go to ``obs['stofm_region']`` / ``obs['stofm_cell_type']`` (Categorical) with
``_confidence`` columns and colours in ``uns['<key>_colors']``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from .errors import StofmInputError
from .labels import LabelPrediction
from .progress import CancelToken, ProgressCallback, check_cancelled, report

REGION_KEY = "stofm_region"
CELL_TYPE_KEY = "stofm_cell_type"


@dataclass
class PredictionResult:
    """What :func:`predict` produced; ``clusterer`` re-clusters regions without the model."""

    predictions: Dict[str, LabelPrediction] = field(default_factory=dict)
    clusterer: object = None

    def __getitem__(self, key: str) -> LabelPrediction:
        return self.predictions[key]


def _xy(adata, spatial_key: str) -> np.ndarray:
    return np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]


def _labels_of(adata, key: str):
    if key not in adata.obs:
        cols = ", ".join(map(str, adata.obs.columns[:15])) or "none"
        raise StofmInputError(f"obs has no column {key!r} to learn labels from (columns: {cols}); pass label_key=")
    return adata.obs[key]


def predict(
    adata,
    model=None,
    *,
    n_regions: Optional[int] = None,
    resolution: Optional[float] = None,
    reference=None,
    label_key: Optional[str] = None,
    target_key: Optional[str] = None,
    spatial_key: str = "spatial",
    device: Optional[str] = None,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    **embed_kwargs,
) -> PredictionResult:
    """Embed ``adata`` (cached) and predict regions and/or labels into its ``obs``.

    Parameters
    ----------
    n_regions, resolution
        Unsupervised tissue regions: a number of regions, or a Leiden resolution. Neither
        (and no labels asked for) means 7 regions.
    reference, label_key
        Supervised labels: an AnnData (or path) labelled in ``obs[label_key]``, embedded
        with the same model; without ``reference``, the slice's own partially filled
        ``obs[label_key]`` is completed (given labels kept).
    target_key
        Where supervised labels go (default ``'stofm_cell_type'``; use ``'stofm_region'``
        for labelled tissue regions).
    """
    from .classifier import complete_labels, transfer_labels
    from .embedding import embed
    from .model.stofm import load_model
    from .regions import RegionClusterer

    model = model if model is not None else load_model(device=device)
    result = PredictionResult()
    want_regions = n_regions is not None or resolution is not None or label_key is None
    if label_key is None and reference is not None:
        raise StofmInputError("a reference slice needs label_key= (the obs column holding its labels)")
    embed(adata, model, device=device, spatial_key=spatial_key, seed=seed, progress=progress, cancel=cancel, **embed_kwargs)
    emb, xy = adata.obsm["X_stofm"], _xy(adata, spatial_key)
    check_cancelled(cancel)

    if want_regions:
        report(progress, 0, 1, "Tissue regions")
        clusterer = RegionClusterer(emb, xy, seed=seed, cancel=cancel)
        pred = clusterer.regions(n_regions=n_regions if (n_regions or resolution) else 7, resolution=resolution)
        pred.write_obs(adata, REGION_KEY)
        result.predictions[REGION_KEY] = pred
        result.clusterer = clusterer
        report(progress, 1, 1, "Tissue regions")

    if label_key is not None:
        target = target_key or CELL_TYPE_KEY
        report(progress, 0, 1, f"Labels from {label_key!r}")
        if reference is not None:
            if isinstance(reference, (str, bytes)) or hasattr(reference, "__fspath__"):
                from .slice_io import read_slice

                reference = read_slice(reference)
            labels = _labels_of(reference, label_key)
            embed(reference, model, device=device, spatial_key=spatial_key, seed=seed, progress=progress,
                  cancel=cancel, **embed_kwargs)
            check_cancelled(cancel)
            pred = transfer_labels(
                reference.obsm["X_stofm"], labels, emb, ref_xy=_xy(reference, spatial_key), query_xy=xy, seed=seed
            )
        else:
            pred = complete_labels(emb, _labels_of(adata, label_key), xy, seed=seed)
        pred.write_obs(adata, target)
        result.predictions[target] = pred
        report(progress, 1, 1, f"Labels from {label_key!r}")

    meta = dict(adata.uns.get("stofm", {}))
    meta["prediction"] = {
        "n_regions": len(result[REGION_KEY].categories) if REGION_KEY in result.predictions else None,
        "resolution": resolution,
        "label_key": label_key,
        "reference": None if reference is None else f"{getattr(reference, 'n_obs', '?')} cells",
        "seed": seed,
    }
    meta["prediction"] = {k: v for k, v in meta["prediction"].items() if v is not None}
    adata.uns["stofm"] = meta
    return result
