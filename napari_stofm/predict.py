"""``predict``: tissue regions and cell types for a slice, from SToFM embeddings.

* Regions, unsupervised: :class:`~napari_stofm.regions.RegionClusterer` over
  ``obsm['X_stofm']`` at ``n_regions`` (or a Leiden ``resolution``).
* Labels, supervised: a :class:`~napari_stofm.classifier.LabelHead` trained on a labelled
  reference slice (embedded by the same model) or on the slice's own partial labels. When
  the two slices measure different gene panels, both are embedded on the genes they share
  for the transfer (rank-value tokens depend on the panel; on the shared data's DLPFC
  slices, whose 5,000-gene panels differ, this lifts cross-slice region F1 from 0.17 to 0.80).

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


def shared_genes(*adatas) -> Optional[list]:
    """The genes (``var_names``) every slice measures, in the first slice's order, when their
    panels differ; None when the panels are the same or share no name."""
    panels = [[str(g) for g in a.var_names] for a in adatas]
    common = set(panels[0]).intersection(*panels[1:])
    if not common or all(len(p) == len(common) for p in panels):
        return None
    return [g for g in panels[0] if g in common]


def _embedded_on(adata, genes, model, device, spatial_key, seed, progress, cancel, embed_kwargs) -> np.ndarray:
    """``X_stofm`` of ``adata`` restricted to ``genes`` (a copy is embedded; ``adata`` is untouched)."""
    from .embedding import embed

    sub = adata[:, genes].copy()
    sub.uns.pop("stofm", None)  # a cached embedding of the whole panel is not this one
    embed(sub, model, device=device, spatial_key=spatial_key, seed=seed, progress=progress, cancel=cancel,
          **embed_kwargs)
    return np.asarray(sub.obsm["X_stofm"])


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
        with the same model (both slices on their shared genes when their panels differ;
        the count is kept in ``uns['stofm']['prediction']['transfer_genes']``); without
        ``reference``, the slice's own partially filled ``obs[label_key]`` is completed
        (given labels kept).
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
    transfer_genes = None
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
            shared = shared_genes(reference, adata)
            if shared is None:  # same panel (or nothing in common by name): each slice as it is
                embed(reference, model, device=device, spatial_key=spatial_key, seed=seed, progress=progress,
                      cancel=cancel, **embed_kwargs)
                ref_emb, query_emb = reference.obsm["X_stofm"], emb
            else:
                # Rank-value tokens depend on which genes a slice measures: embed both slices on
                # the genes they share, so that the same cell state gets the same embedding.
                ref_emb, query_emb = (
                    _embedded_on(a, shared, model, device, spatial_key, seed, progress, cancel, embed_kwargs)
                    for a in (reference, adata))
                transfer_genes = len(shared)
            check_cancelled(cancel)
            pred = transfer_labels(
                ref_emb, labels, query_emb, ref_xy=_xy(reference, spatial_key), query_xy=xy, seed=seed
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
        "transfer_genes": transfer_genes,
        "seed": seed,
    }
    meta["prediction"] = {k: v for k, v in meta["prediction"].items() if v is not None}
    adata.uns["stofm"] = meta
    return result
