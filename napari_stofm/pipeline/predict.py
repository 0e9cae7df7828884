"""The one run core: tissue regions and cell types for a slice, from SToFM embeddings.

:func:`run_annotations` embeds a slice (cached), finds tissue regions and/or learns labels,
and returns a :class:`RunResult` without changing anything it was given; :meth:`RunResult.write`
puts the result into the AnnData. :func:`predict` (Python API and ``stofm predict``) and
:class:`~napari_stofm.review.session.SliceSession` (the napari widgets) both call it, so the
GUI, the CLI and the API give the same regions and cell types on the same data.

* Regions, unsupervised: :class:`~napari_stofm.heads.regions.RegionClusterer` over
  ``obsm['X_stofm']`` at ``n_regions`` (or a Leiden ``resolution``).
* Labels, supervised: :mod:`napari_stofm.heads.classifier` trained on a labelled reference
  slice (embedded by the same model) or on the slice's own partial labels. When the two
  slices measure different gene panels, both are embedded on the genes they share for the
  transfer (rank-value tokens depend on the panel; on the shared data's DLPFC slices, whose
  5,000-gene panels differ, this lifts cross-slice region F1 from 0.17 to 0.80).

Results are :class:`~napari_stofm.heads.annotation.Annotation` objects, written by their
one writer: ``obs[key]`` (Categorical), ``<key>_confidence``, ``<key>_curated``,
``<key>_predicted``, ``uns['<key>_colors']``, ``uns['stofm']['provenance'][key]``, and the run
settings in ``uns['stofm']['prediction']``.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError
from napari_stofm.progress import CancelToken, ProgressCallback, StagedProgress, check_cancelled, staged

REGION_KEY = keys.REGION
CELL_TYPE_KEY = keys.CELL_TYPE
DEFAULT_N_REGIONS = 7

log = logging.getLogger(__name__)

#: Label transfer between slices rests on the genes both measure (and the model knows). A
#: cell's rank-value token sequence holds only the shared genes it expresses, a fraction
#: of them in sparse spatial data, so with a handful of genes whole groups of cells get the
#: same tokens and the classifier returns one label at full confidence for all of them (a
#: slice sharing no gene gave every cell one label at confidence 1.00). Refused below
#: ``max(MIN_TRANSFER_GENES, MIN_TRANSFER_FRACTION x the smaller panel)``: 10 genes is the
#: least for which sequences still differ between cell types of a targeted panel, and a
#: transfer that uses under a fifth of what the smaller slice measures discards most of
#: it. Allowed with a warning below ``max(WARN_TRANSFER_GENES, WARN_TRANSFER_FRACTION x the
#: smaller panel)``: half the smaller panel (or 20 genes).
MIN_TRANSFER_GENES = 10
MIN_TRANSFER_FRACTION = 0.2
WARN_TRANSFER_GENES = 20
WARN_TRANSFER_FRACTION = 0.5


def transfer_gene_limits(n_smaller_panel: int) -> Tuple[int, int]:
    """``(refuse_below, warn_below)``: the shared-gene counts under which a label transfer
    between slices is refused / warned about, for the smaller of the two panels."""
    refuse = max(MIN_TRANSFER_GENES, math.ceil(MIN_TRANSFER_FRACTION * n_smaller_panel))
    warn = max(WARN_TRANSFER_GENES, math.ceil(WARN_TRANSFER_FRACTION * n_smaller_panel))
    return refuse, max(refuse, warn)


@dataclass
class RunResult:
    """What :func:`run_annotations` produced; nothing of it is in the AnnData until :meth:`write`.

    ``clusterer`` re-cuts the regions at another count without the model.
    """

    annotations: Dict[str, "object"] = field(default_factory=dict)  # key -> Annotation
    clusterer: object = None
    embedding: object = None  # napari_stofm.pipeline.embed.Embedding
    prediction: dict = field(default_factory=dict)  # -> uns['stofm']['prediction']
    messages: List[str] = field(default_factory=list)
    territories: object = None  # filled by SliceSession.compute when it rasterised them

    @property
    def embedding_reused(self) -> bool:
        return bool(self.embedding is not None and self.embedding.reused)

    def __getitem__(self, key: str):
        return self.annotations[key]

    def write(self, adata) -> None:
        """Write the embedding, every annotation and the run settings into ``adata``.

        A labelling is replaced whole: where ``adata`` already held curated cells of a key
        this run predicts (e.g. a curated export fed to ``stofm predict`` again), every cell
        gets the new prediction and ``<key>_curated`` is all False; a warning (and
        :attr:`messages`) says how many curated cells were replaced. Other keys are left as
        they are.
        """
        if self.embedding is not None:
            self.embedding.write(adata)
        for key, ann in self.annotations.items():
            message = _discard_curation(adata, key)
            if message:
                warnings.warn(message, UserWarning, stacklevel=2)
                self.messages.append(message)
            ann.to_obs(adata)
        meta = dict(adata.uns.get(keys.UNS, {}) or {})
        meta[keys.PREDICTION] = dict(self.prediction)
        adata.uns[keys.UNS] = meta


def curated_count(adata, key: str) -> int:
    """How many cells ``obs['<key>_curated']`` marks as curated (0 without the column)."""
    column = keys.curated_key(key)
    if key not in adata.obs or column not in adata.obs:
        return 0
    try:
        flags = adata.obs[column].astype("boolean").fillna(False).to_numpy(dtype=bool)
    except (TypeError, ValueError):
        return 0
    return int(flags.sum())


def _discard_curation(adata, key: str) -> str:
    """Forget the curation of ``key`` held in ``adata`` (the export's curated-cell lists in
    ``uns['stofm']``); returns the warning to give when there was any ('' otherwise)."""
    n = curated_count(adata, key)
    stofm = adata.uns.get(keys.UNS)
    if isinstance(stofm, dict):
        stofm = dict(stofm)
        for field_name in ("curated_cells", "n_curated"):
            entry = stofm.get(field_name)
            if isinstance(entry, dict) and key in entry:
                stofm[field_name] = {k: v for k, v in entry.items() if k != key}
        adata.uns[keys.UNS] = stofm
    if not n:
        return ""
    return (f"obs['{key}'] held {n} curated cells; this prediction replaces the labels of every cell, the curated "
            f"ones included (obs['{keys.curated_key(key)}'] is now False everywhere). To keep the curated labels, "
            "keep the earlier file, or write the new prediction to another key (region_key= / target_key=)")


def shared_genes(*adatas) -> Optional[list]:
    """The genes (``var_names``) every slice measures, in the first slice's order, when their
    panels differ; None when the panels are the same or share no name."""
    panels = [[str(g) for g in a.var_names] for a in adatas]
    common = set(panels[0]).intersection(*panels[1:])
    if not common or all(len(p) == len(common) for p in panels):
        return None
    return [g for g in panels[0] if g in common]


def _xy(adata, spatial_key: str) -> np.ndarray:
    return np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]


def _known_class_colors(adata, label_key: str, reference=None) -> dict:
    """``{class name: colour}`` a prediction of cell types should reuse, so that a class
    shows in one colour in every layer: stored ``uns['<col>_colors']`` of the reference's
    label column and of the slice's categorical obs columns (ground truth, earlier exports),
    then the label column the head learns from as napari-stofm shows it."""
    from napari_stofm.errors import StofmError
    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.palette import known_colors

    known: dict = {}
    # stored colours first (the reference's label column, then the slice's columns) ...
    if reference is not None:
        known.update(known_colors(reference, [label_key]))
    for name, color in known_colors(adata).items():
        known.setdefault(name, color)
    # ... then the label column as napari-stofm shows it without stored colours
    for source in (reference, adata):
        if source is None or label_key not in getattr(source, "obs", {}):
            continue
        try:
            shown = Annotation.from_obs(source, label_key)
        except StofmError:  # a column that cannot be shown as labels brings no colours
            continue
        for name, color in zip(shown.categories, shown.colors, strict=True):
            known.setdefault(name, color)
    return known


def _labels_of(adata, key: str, what: str = "the slice"):
    if key not in adata.obs:
        cols = ", ".join(map(str, adata.obs.columns[:15])) or "none"
        raise StofmInputError(f"{what} has no obs column {key!r} to learn labels from (columns: {cols}); "
                              "pass label_key=")
    return adata.obs[key]


def _is_path(value) -> bool:
    return isinstance(value, (str, bytes)) or hasattr(value, "__fspath__")


def describe_reference(reference) -> Optional[str]:
    """How the provenance names a reference: its path, or ``'AnnData (N cells)'``."""
    if reference is None:
        return None
    if _is_path(reference):
        return os.fsdecode(reference)
    return f"AnnData ({getattr(reference, 'n_obs', '?')} cells)"


def model_provenance(meta: dict) -> dict:
    """The model fields of ``uns['stofm']`` that every annotation's provenance records."""
    prov = {"model": "SToFM"}
    for k in ("model", "weights", "fingerprint", "split_num", "split_mode", "seed"):
        if isinstance(meta.get(k), (str, int, float, bool)):
            prov[k if k != "fingerprint" else "weights_fingerprint"] = meta[k]
    return prov


#: the stages of a run, as its progress names them (see :class:`RunPlan`)
STAGE_WEIGHTS = "Loading the weights"
STAGE_REFERENCE_READ = "Reading the reference"
STAGE_EMBED = "Embedding the slice"
STAGE_REGIONS = "Tissue regions"
STAGE_REFERENCE = "Embedding the reference"
STAGE_SHARED = "Embedding the slice on the shared genes"
STAGE_LABELS = "Cell types"

#: the steps of an embedding, by the message each reports (its share of the embedding's time)
EMBEDDING_PARTS = (("Tokenizing", 0.08), ("Cell embeddings", 0.5), ("Macro scale", 0.07), ("SE(2)", 0.35))
#: about how long each stage takes, in seconds per 1,000 cells on a laptop CPU with the bundled
#: weights (only the proportions matter: they share out one progress bar; the time left is
#: measured)
SECONDS_PER_1000_CELLS = {STAGE_EMBED: 3.5, STAGE_REGIONS: 0.4, STAGE_LABELS: 0.5}
SECONDS_FIXED = {STAGE_WEIGHTS: 1.0, STAGE_REFERENCE_READ: 0.5, STAGE_REGIONS: 0.3, STAGE_LABELS: 0.5}


class RunPlan:
    """The stages of one run on one overall progress bar (:class:`~napari_stofm.progress.StagedProgress`).

    ``overall`` None (no progress wanted): every method does nothing and :meth:`callback`
    returns None.
    """

    def __init__(self, overall: Optional[StagedProgress]):
        self.overall = overall

    def declare(self, n_cells: int, *, load: bool, reference: bool, regions: bool, labels: bool) -> None:
        if self.overall is None:
            return
        k = n_cells / 1000.0
        if load:
            self.overall.add(STAGE_WEIGHTS, SECONDS_FIXED[STAGE_WEIGHTS])
        if reference:
            self.overall.add(STAGE_REFERENCE_READ, SECONDS_FIXED[STAGE_REFERENCE_READ])
        self.overall.add(STAGE_EMBED, SECONDS_PER_1000_CELLS[STAGE_EMBED] * k, EMBEDDING_PARTS)
        if regions:
            self.overall.add(STAGE_REGIONS, SECONDS_FIXED[STAGE_REGIONS] + SECONDS_PER_1000_CELLS[STAGE_REGIONS] * k)
        if labels:
            self.overall.add(STAGE_LABELS, SECONDS_FIXED[STAGE_LABELS] + SECONDS_PER_1000_CELLS[STAGE_LABELS] * k)

    def reference(self, n_reference: int, n_cells: int, *, shared: bool) -> None:
        """Add the reference's embedding (and the slice's on the shared genes) before the cell types."""
        if self.overall is None:
            return
        per_cell = SECONDS_PER_1000_CELLS[STAGE_EMBED] / 1000.0
        stages = [(STAGE_REFERENCE, per_cell * n_reference)] + ([(STAGE_SHARED, per_cell * n_cells)] if shared else [])
        labels = (SECONDS_FIXED[STAGE_LABELS] + SECONDS_PER_1000_CELLS[STAGE_LABELS] * (n_reference + n_cells) / 1000)
        self.overall.remove(STAGE_LABELS)
        for name, weight in stages:
            self.overall.add(name, weight, EMBEDDING_PARTS)
        self.overall.add(STAGE_LABELS, labels)

    def begin(self, name: str, message: str = "") -> None:
        if self.overall is not None:
            self.overall.begin(name, message)

    def callback(self, name: str) -> Optional[ProgressCallback]:
        return None if self.overall is None else self.overall.stage(name)


def run_annotations(
    adata,
    model=None,
    *,
    n_regions: Optional[int] = None,
    resolution: Optional[float] = None,
    reference=None,
    label_key: Optional[str] = None,
    target_key: str = CELL_TYPE_KEY,
    region_key: str = REGION_KEY,
    regions: Optional[bool] = None,
    weights=None,
    spatial_key: str = keys.SPATIAL,
    device: Optional[str] = None,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    **embed_kwargs,
) -> RunResult:
    """Embed ``adata`` and predict regions and/or labels; changes neither ``adata``, ``model``
    nor ``reference`` (see :func:`predict` for the parameters).

    ``regions``: ``True`` always finds tissue regions (at ``n_regions``, else ``resolution``,
    else 7), ``None`` finds them when ``n_regions`` / ``resolution`` is given or no labels
    are asked for. ``weights``: a checkpoint folder loaded when ``model`` is None.
    """
    from napari_stofm.checks import integer
    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.heads.classifier import complete_labels, transfer_labels
    from napari_stofm.heads.regions import RegionClusterer, check_n_regions, check_resolution
    from napari_stofm.model.stofm import load_model
    from napari_stofm.palette import colors_for
    from napari_stofm.pipeline.embed import compute_embedding

    if label_key is None and reference is not None:
        raise StofmInputError("a reference slice needs label_key= (the obs column holding its labels)")
    if n_regions is not None and resolution is not None:
        raise StofmInputError("give n_regions or resolution, not both")
    # every number is checked before the model runs (3.7 regions is an error, not 3)
    if n_regions is not None:
        n_regions = check_n_regions(n_regions)
    if resolution is not None:
        resolution = check_resolution(resolution)
    seed = integer(seed, "seed", minimum=0, maximum=2**32 - 1)
    want_regions = regions if regions is not None else (
        n_regions is not None or resolution is not None or label_key is None)
    if want_regions and n_regions is None and resolution is None:
        n_regions = DEFAULT_N_REGIONS
    check_cancelled(cancel)
    overall, owned = staged(progress)
    plan = RunPlan(overall)
    plan.declare(adata.n_obs, load=model is None, reference=reference is not None, regions=want_regions,
                 labels=label_key is not None)
    if model is None:
        plan.begin(STAGE_WEIGHTS)
        model = load_model(weights)
    embed_args = dict(embed_kwargs, device=device, spatial_key=spatial_key, seed=seed, cancel=cancel)
    transfer = None
    if reference is not None:  # read and checked before anything runs
        plan.begin(STAGE_REFERENCE_READ)
        transfer = _prepare_transfer(reference, label_key, adata, model, embed_args.get("gene_key"))
        plan.reference(transfer["reference"].n_obs, adata.n_obs, shared=transfer["shared"] is not None)
    embedding = compute_embedding(adata, model, progress=plan.callback(STAGE_EMBED), **embed_args)
    result = RunResult(embedding=embedding)
    if transfer is not None and transfer["warning"]:
        result.messages.append(transfer["warning"])
    if embedding.cell.meta.get("gene_match_warning"):
        result.messages.append(embedding.cell.meta["gene_match_warning"])
    emb, xy = embedding.representations, _xy(adata, spatial_key)
    meta = {**(adata.uns.get(keys.UNS) or {}), **embedding.cell.meta, **embedding.meta}
    base_prov = model_provenance(meta)
    check_cancelled(cancel)

    if want_regions:
        plan.begin(STAGE_REGIONS)
        clusterer = RegionClusterer(emb, xy, seed=seed, progress=plan.callback(STAGE_REGIONS), cancel=cancel)
        pred = clusterer.regions(n_regions=n_regions, resolution=resolution)
        result.clusterer = clusterer
        result.annotations[region_key] = Annotation.from_prediction(
            region_key, pred, provenance={**base_prov, "n_regions": n_regions, "resolution": resolution})

    transfer_genes = None
    if label_key is not None:
        check_cancelled(cancel)
        if reference is not None:
            ref, labels, shared = transfer["reference"], transfer["labels"], transfer["shared"]
            ref_progress = plan.callback(STAGE_REFERENCE)
            if shared is None:  # the same panel: each slice as it is
                ref_emb = compute_embedding(ref, model, progress=ref_progress, **embed_args).representations
                query_emb = emb
            else:
                # Rank-value tokens depend on which genes a slice measures: embed both slices on
                # the genes they share, so that the same cell state gets the same embedding.
                ref_emb, query_emb = (_embedded_on(a, shared, model, p, embed_args) for a, p in (
                    (ref, ref_progress), (adata, plan.callback(STAGE_SHARED))))
            transfer_genes = transfer["n_genes"]
            check_cancelled(cancel)
            plan.begin(STAGE_LABELS, f"learning {label_key!r} from the reference")
            pred = transfer_labels(ref_emb, labels, query_emb, ref_xy=_xy(ref, spatial_key), query_xy=xy, seed=seed)
            source = {"label_source": "reference", "reference": describe_reference(reference)}
        else:
            plan.begin(STAGE_LABELS, f"completing {label_key!r} from its labelled cells")
            pred = complete_labels(emb, _labels_of(adata, label_key), xy, seed=seed)
            source = {"label_source": "column"}
        check_cancelled(cancel)
        known = _known_class_colors(adata, label_key, transfer["reference"] if reference is not None else None)
        result.annotations[target_key] = Annotation.from_prediction(
            target_key, pred, colors=colors_for(pred.categories, known),
            provenance={**base_prov, **source, "label_key": label_key, "transfer_genes": transfer_genes})

    prediction = {
        "n_regions": len(result[region_key].categories) if region_key in result.annotations else None,
        "resolution": resolution,
        "label_key": label_key,
        "reference": describe_reference(reference),
        "transfer_genes": transfer_genes,
        "seed": seed,
    }
    result.prediction = {k: v for k, v in prediction.items() if v is not None}
    if owned:
        overall.finish("done")
    return result


def _prepare_transfer(reference, label_key, adata, model, gene_key) -> dict:
    """Read the reference, check its labels and the genes it shares with ``adata``; refuse
    (or warn about) a transfer resting on too few genes (see :func:`transfer_gene_limits`)."""
    ref = reference
    if _is_path(ref):
        from napari_stofm.io.slices import read_slice

        ref = read_slice(ref)
    labels = _labels_of(ref, label_key, "the reference slice")
    shared = shared_genes(ref, adata)
    n_shared = len(set(map(str, ref.var_names)) & set(map(str, adata.var_names)))
    smaller = min(ref.n_vars, adata.n_vars)
    refuse_below, warn_below = transfer_gene_limits(smaller)
    panels = (f"the reference measures {ref.n_vars} genes and the slice {adata.n_vars}; they share "
              f"{n_shared} ({'by var_names' if n_shared else 'no gene name'})")
    if n_shared < refuse_below:
        raise StofmInputError(
            f"cannot transfer labels: {panels}, fewer than the {refuse_below} needed (at least {MIN_TRANSFER_GENES} "
            f"genes and {100 * MIN_TRANSFER_FRACTION:.0f} % of the smaller panel); labels learned from so few genes "
            "are one label for whole groups of cells. Use a reference that measures the same genes (check that both "
            "use the same gene identifiers in var_names: symbols or Ensembl IDs), or predict the labels from the "
            "slice's own partial labels (label_key= without reference=)")
    known = _vocabulary_genes(adata if shared is None else adata[:, shared], model, gene_key)
    if known < MIN_TRANSFER_GENES:
        raise StofmInputError(
            f"cannot transfer labels: {panels}, but only {known} of those are in the model's gene vocabulary "
            f"(at least {MIN_TRANSFER_GENES} are needed). Pass gene_key= if the gene names are in a var column, or "
            "use a checkpoint whose vocabulary covers these panels")
    warning = ""
    if n_shared < warn_below:
        warning = (f"labels are transferred on few genes: {panels} ({known} in the model's vocabulary), under the "
                   f"{warn_below} (half the smaller panel, at least {WARN_TRANSFER_GENES}) that make a reliable "
                   "transfer; check the predicted labels, or use a reference with a closer gene panel")
        warnings.warn(warning, UserWarning, stacklevel=3)
    return dict(reference=ref, labels=labels, shared=shared, n_genes=int(n_shared), known=int(known),
                warning=warning)


def _vocabulary_genes(adata, model, gene_key) -> int:
    """How many of ``adata``'s genes the model's vocabulary knows (0 when none)."""
    from napari_stofm.genes.matching import resolve_genes

    try:
        return int(resolve_genes(adata, model.vocabulary, gene_key=gene_key).n_matched)
    except StofmInputError:
        return 0


def _embedded_on(adata, genes, model, progress, embed_args) -> np.ndarray:
    """``X_stofm`` of ``adata`` restricted to ``genes`` (a copy is embedded; ``adata`` is untouched)."""
    from napari_stofm.pipeline.embed import compute_embedding

    sub = adata[:, genes].copy()
    sub.uns.pop(keys.UNS, None)  # a cached embedding of the whole panel is not this one
    return compute_embedding(sub, model, progress=progress, **embed_args).representations


def predict(
    adata,
    model=None,
    *,
    n_regions: Optional[int] = None,
    resolution: Optional[float] = None,
    reference=None,
    label_key: Optional[str] = None,
    target_key: str = CELL_TYPE_KEY,
    region_key: str = REGION_KEY,
    spatial_key: str = keys.SPATIAL,
    device: Optional[str] = None,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    **embed_kwargs,
) -> RunResult:
    """Embed ``adata`` (cached) and predict regions and/or labels into its ``obs``.

    Parameters
    ----------
    n_regions, resolution
        Unsupervised tissue regions: a number of regions (a whole number >= 1; ``3.7`` is
        an error), or a Leiden resolution (> 0). Neither (and no labels asked for) means 7
        regions.
    reference, label_key
        Supervised labels: an AnnData (or path) labelled in ``obs[label_key]``, embedded
        with the same model (both slices on their shared genes when their panels differ;
        the number of shared genes is kept in ``uns['stofm']['prediction']['transfer_genes']``
        and the labelling's provenance). A transfer resting on fewer than
        ``max(10, 20 % of the smaller panel)`` shared genes is refused, one under
        ``max(20, half the smaller panel)`` is warned about (:func:`transfer_gene_limits`).
        Without ``reference``, the slice's own partially filled ``obs[label_key]`` is
        completed (given labels kept).
    target_key, region_key
        Where supervised labels and regions go (``key_added``-style; defaults
        ``'stofm_cell_type'`` and ``'stofm_region'``; use ``target_key='stofm_region'`` for
        labelled tissue regions).
    embed_kwargs
        ``split_num``, ``split_mode``, ``gene_key``, ``values``, ... (see
        :func:`~napari_stofm.pipeline.embed.embed`).

    A key this run predicts is replaced whole, curated cells included (with a warning that
    counts them); see :meth:`RunResult.write`.

    Returns the :class:`RunResult` (already written into ``adata``).
    """
    result = run_annotations(
        adata, model, n_regions=n_regions, resolution=resolution, reference=reference, label_key=label_key,
        target_key=target_key, region_key=region_key, spatial_key=spatial_key, device=device, seed=seed,
        progress=progress, cancel=cancel, **embed_kwargs)
    result.write(adata)
    return result
