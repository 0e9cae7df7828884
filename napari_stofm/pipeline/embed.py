"""``embed``: a slice in, SToFM cell representations out.

Three scales, in order:

1. gene scale: rank-value tokens -> cell encoder -> ``obsm['X_stofm_cell']`` (unit norm);
2. macro scale: Leiden virtual cells over position + embedding (``obs['stofm_virtual_cell']``);
3. micro scale + SE(2) transformer (:mod:`napari_stofm.model.forward`): sub-slices of
   ``[CLS] + virtual cells + cells`` -> ``obsm['X_stofm']``.

:func:`compute_embedding` computes and returns an :class:`Embedding` without changing the
AnnData (what a worker thread runs); :meth:`Embedding.write` puts it into the AnnData;
:func:`embed` does both. Both stages are cached in the AnnData itself, keyed by the weights,
the expression data, the positions and the settings: a second call on the same data and
weights runs nothing.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError
from napari_stofm.genes.expression import expression_fingerprint
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report

log = logging.getLogger(__name__)

CELL_KEY = keys.CELL_EMBEDDING
STOFM_KEY = keys.EMBEDDING
UNS_KEY = keys.UNS


def _gene_scale_key(model, adata, gene_key, layer, values: str, precision: str = "float32") -> str:
    return (f"{model.fingerprint}:{expression_fingerprint(adata, layer)}:{gene_key}:{model.settings.max_genes}"
            f"{'' if model.settings.gene_windows == 1 else f'x{model.settings.gene_windows}'}"
            f":{values}{'' if precision == 'float32' else ':' + precision}")


def _matrix(adata, layer):
    if layer is None:
        return adata.X
    return adata.layers[layer] if layer in adata.layers else None


@dataclass
class CellEmbedding:
    """Gene-scale embeddings of a slice and what :meth:`write` records about them."""

    embeddings: np.ndarray  # (n, 256) float32, unit norm (zero rows for empty cells)
    empty: np.ndarray  # bool (n,): cells that express no vocabulary gene
    meta: dict = field(default_factory=dict)
    reused: bool = False

    def write(self, adata) -> None:
        adata.obsm[CELL_KEY] = self.embeddings
        adata.obs[keys.EMPTY] = self.empty
        meta = dict(adata.uns.get(UNS_KEY, {}) or {})
        meta.update(self.meta)
        adata.uns[UNS_KEY] = meta


@dataclass
class Embedding:
    """The output of :func:`compute_embedding`: both scales, virtual cells and run metadata."""

    cell: CellEmbedding
    representations: np.ndarray  # (n, E) float32: obsm['X_stofm']
    virtual_cell: Optional[np.ndarray]  # int32 (n,), None when reused from the AnnData
    meta: dict = field(default_factory=dict)
    reused: bool = False  # True: the AnnData already held this very embedding

    def write(self, adata) -> None:
        """Write ``obsm['X_stofm']``, ``obsm['X_stofm_cell']``, their obs columns and ``uns['stofm']``."""
        if self.reused:
            return
        self.cell.write(adata)
        adata.obsm[STOFM_KEY] = self.representations
        if self.virtual_cell is not None:
            adata.obs[keys.VIRTUAL_CELL] = self.virtual_cell
        meta = dict(adata.uns.get(UNS_KEY, {}) or {})
        meta.update(self.meta)
        adata.uns[UNS_KEY] = meta


def compute_cell_embedding(
    adata,
    model,
    *,
    gene_key: Optional[str] = None,
    layer: Optional[str] = None,
    batch_size: int = 64,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    use_cache: bool = True,
    values: Optional[str] = None,
    precision: str = "float32",
) -> CellEmbedding:
    """Gene-scale embeddings (n, 256), from the cache in ``adata`` when still valid; ``adata``
    is not changed.

    ``values``: what the expression matrix holds (``'raw_counts'``, ``'volume_normalized'``,
    ``'log_normalized'``); default: ``uns['source']['values']``, ``uns['log1p']``, else read
    off the matrix (log-normalised when its values are non-integers no larger than 20; a
    warning says so). What was used goes to ``uns['stofm']['values_assumed']``.
    ``precision``: the cell encoder's arithmetic (``'float32'`` or ``'bfloat16'``).
    """
    from napari_stofm.checks import integer
    from napari_stofm.genes.expression import infer_values_kind
    from napari_stofm.genes.tokenizer import prepare_tokenization, require_nonempty
    from napari_stofm.model.stofm import check_precision

    batch_size = integer(batch_size, "cell_batch_size", minimum=1)
    check_precision(precision)
    kind, basis = infer_values_kind(adata, _matrix(adata, layer), values)
    key = _gene_scale_key(model, adata, gene_key, layer, kind, precision)
    meta = adata.uns.get(UNS_KEY, {}) or {}
    cached = adata.obsm.get(CELL_KEY) if use_cache else None
    if cached is not None and meta.get("gene_scale_key") == key and cached.shape[0] == adata.n_obs:
        report(progress, 1, 1, "Cell embeddings (cached)")
        empty = (np.asarray(adata.obs[keys.EMPTY], dtype=bool) if keys.EMPTY in adata.obs
                 else ~np.any(np.asarray(cached) != 0, axis=1))
        return CellEmbedding(np.asarray(cached, dtype=np.float32), empty, {}, reused=True)
    check_cancelled(cancel)
    report(progress, 0, 1, "Tokenizing genes")
    X, match = prepare_tokenization(adata, model.vocabulary, gene_key=gene_key, layer=layer, values=kind)
    match.values_basis = basis
    if basis.startswith("detected") and kind == "log_normalized":
        log.warning(
            "X has no uns['log1p'] and no uns['source']['values'], but its values look log-normalised (%s): "
            "they are read as log1p values (expm1 before ranking genes). If X holds counts or another linear "
            "scale, pass values='raw_counts' (stofm: --values raw_counts) or set uns['source']['values']",
            basis[len("detected: "):])
    few_genes = match.few_genes_message()
    if few_genes:
        log.warning("%s", few_genes)
    emb, empty = encode_streamed(X, match, model, kind, batch_size=batch_size, progress=progress, cancel=cancel,
                                 precision=precision)
    require_nonempty(empty, match)
    if empty.any():
        examples = ", ".join(map(str, adata.obs_names[empty][:5]))
        log.warning(
            "%d of %d cells express no gene of the model's vocabulary (e.g. %s); they get a zero gene-scale "
            "embedding and obs['%s'] = True", int(empty.sum()), adata.n_obs, examples, keys.EMPTY,
        )
    meta = dict(
        gene_scale_key=key,
        genes_matched=int(match.n_matched),
        genes_total=int(match.n_total),
        gene_id_kind=str(match.id_kind),
        species=str(match.species),
        values_assumed=str(kind),
        values_basis=str(basis),
        few_genes_matched=bool(match.few_genes),
        precision=str(precision),
    )
    if few_genes:
        meta["gene_match_warning"] = few_genes
    return CellEmbedding(emb, empty, meta)


#: cells tokenised and encoded at a time: the tokens of one block are all that is held
STREAM_CELLS = 65_536


def encode_streamed(X, match, model, values: str, *, batch_size: int = 64, block: Optional[int] = None,
                    progress: Optional[ProgressCallback] = None, cancel: CancelToken = None,
                    precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Gene-scale embeddings ``(n, 256)`` and the ``empty`` mask of the rows of ``X``, read,
    tokenised and encoded ``block`` rows at a time (a backed matrix is read block by block)
    into one preallocated array: memory holds one block's tokens, whatever the slice's size.
    The embeddings are those of tokenising the whole matrix at once."""
    from napari_stofm.genes.tokenizer import tokenize

    settings = model.settings
    encoder = model.cell_encoder_in(precision)
    block = STREAM_CELLS if block is None else int(block)
    n = int(X.shape[0])
    out = np.zeros((n, model.cell_encoder.embedding_dim), dtype=np.float32)
    empty = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        check_cancelled(cancel)
        stop = min(start + block, n)
        rows = X if (start == 0 and stop == n) else X[start:stop]
        tokens = tokenize(rows, match, model.vocabulary, max_genes=settings.max_genes * settings.gene_windows,
                          values=values)
        empty[start:stop] = tokens.empty

        def block_progress(done, total, message="", _start=start):
            report(progress, _start + done, n, message)

        if settings.gene_windows > 1:
            out[start:stop] = encoder.encode_windows(
                tokens, settings.max_genes, batch_size=batch_size, device=model.device, progress=block_progress,
                cancel=cancel)
        else:
            out[start:stop] = encoder.encode(tokens, batch_size=batch_size, device=model.device,
                                             progress=block_progress, cancel=cancel)
        del tokens
    return out, empty


def embed_cells(adata, model, **kwargs) -> np.ndarray:
    """Gene-scale embeddings (n, 256), written to ``obsm['X_stofm_cell']`` (cached).

    Cells that express no vocabulary gene get a zero row and ``obs['stofm_empty'] = True``.
    Keywords: those of :func:`compute_cell_embedding`.
    """
    cell = compute_cell_embedding(adata, model, **kwargs)
    if not cell.reused:
        cell.write(adata)
    return cell.embeddings


def compute_embedding(
    adata,
    model=None,
    *,
    device: Optional[str] = None,
    spatial_key: str = keys.SPATIAL,
    gene_key: Optional[str] = None,
    layer: Optional[str] = None,
    split_num: Optional[int] = None,
    split_mode: Optional[str] = None,
    batch_size: Optional[int] = None,
    cell_batch_size: Optional[int] = None,
    seed: int = 0,
    use_cache: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    values: Optional[str] = None,
    adapt: float = 0.0,
    precision: str = "float32",
) -> Embedding:
    """Run SToFM on a slice and return the result; ``adata`` and ``model`` are not changed.

    Parameters: those of :func:`embed`.
    """
    from napari_stofm.checks import integer, number
    from napari_stofm.genes.expression import check_values_kind
    from napari_stofm.io.slices import validate_slice
    from napari_stofm.model.forward import forward_slice
    from napari_stofm.model.stofm import SPLIT_MODES, batch_sizes, load_model, resolve_device

    t0 = time.perf_counter()
    # every number given is checked before anything runs (a bad one would size a loop)
    if split_num is not None:
        split_num = integer(split_num, "split_num", minimum=1,
                            fix="the number of cells per sub-slice, e.g. 1000 (the published value)")
    if split_mode is not None and split_mode not in SPLIT_MODES:
        raise StofmInputError(f"split_mode={split_mode!r} is not one of {', '.join(SPLIT_MODES)}")
    if batch_size is not None:
        batch_size = integer(batch_size, "batch_size", minimum=1, fix="sub-slices per SE(2) forward pass")
    if cell_batch_size is not None:
        cell_batch_size = integer(cell_batch_size, "cell_batch_size", minimum=1, fix="cells per cell-encoder batch")
    seed = integer(seed, "seed", minimum=0, maximum=2**32 - 1)
    adapt = number(adapt, "adapt", minimum=0.0, fix="seconds of per-slice adaptation, e.g. 60 (0: off)")
    if values is not None:
        check_values_kind(values)
    validate_slice(adata, spatial_key=spatial_key)
    model = model if model is not None else load_model()
    model = model.on(resolve_device(device))
    settings = model.settings
    auto_subslices, auto_cells = batch_sizes(model, settings.split_num + settings.max_hypernodes + 1)
    batch_size = auto_subslices if batch_size is None else batch_size
    cell_batch_size = auto_cells if cell_batch_size is None else cell_batch_size
    split_num = settings.split_num if split_num is None else split_num
    split_mode = split_mode or settings.split_mode

    cell = compute_cell_embedding(
        adata, model, gene_key=gene_key, layer=layer, batch_size=cell_batch_size,
        progress=progress, cancel=cancel, use_cache=use_cache, values=values, precision=precision,
    )
    gene_scale_key = cell.meta.get("gene_scale_key") or (adata.uns.get(UNS_KEY) or {}).get("gene_scale_key")
    positions = np.ascontiguousarray(np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2])
    run_key = "|".join([
        gene_scale_key, hashlib.sha1(positions.tobytes()).hexdigest()[:16], str(split_num), split_mode, str(seed),
    ] + ([f"adapt{adapt:g}"] if adapt > 0 else [])
        + ([f"readout-{settings.readout}"] if settings.readout != "hidden" else []))
    final = adata.obsm.get(STOFM_KEY)
    meta_before = adata.uns.get(UNS_KEY, {}) or {}
    if (use_cache and cell.reused and final is not None and meta_before.get("run_key") == run_key
            and final.shape[0] == adata.n_obs):
        report(progress, adata.n_obs, adata.n_obs, "SE(2) transformer (cached)")
        return Embedding(cell, np.asarray(final, dtype=np.float32), None, {}, reused=True)
    check_cancelled(cancel)
    adaptation = None
    if adapt > 0:
        from napari_stofm.training.adapt import adapt_model

        model, adaptation = adapt_model(model, cell.embeddings, positions, adapt, seed=seed, progress=progress,
                                        cancel=cancel)
    forward = forward_slice(model, positions, cell.embeddings, split_num=split_num, split_mode=split_mode,
                            seed=seed, batch_size=batch_size, progress=progress, cancel=cancel)
    meta = dict(
        model=settings.name,
        weights=model.source,
        fingerprint=model.fingerprint,
        split_num=split_num,
        split_mode=split_mode,
        n_subslices=len(forward.subslices),
        n_virtual_cells=int(forward.hypernodes.xy.shape[0]),
        virtual_cell_resolution=float(forward.hypernodes.resolution),
        seed=int(seed),
        run_key=run_key,
        seconds=round(time.perf_counter() - t0, 3),
    )
    if adaptation is not None:
        meta["adaptation"] = adaptation.as_dict()
    return Embedding(cell, forward.representations, forward.hypernodes.assignment.astype(np.int32), meta)


def embed(adata, model=None, **kwargs):
    """Run SToFM on a slice; writes ``obsm['X_stofm']`` and ``obsm['X_stofm_cell']``.

    Parameters
    ----------
    adata
        Cells x genes with positions (x, y) in ``obsm[spatial_key]``.
    model
        A :class:`~napari_stofm.model.stofm.SToFM` (default: the bundled weights).
    device
        ``'cpu'``, ``'cuda'`` or ``None`` (CUDA when available).
    split_num, split_mode
        Cells per sub-slice (a positive integer) and how crowded squares are split
        (``'published'`` or ``'spatial'``; default: the model's).
    batch_size, cell_batch_size
        Sub-slices per SE(2) forward pass and cells per cell-encoder pass (default: 4 and
        64 on a CPU, sized to the free memory on a GPU; see
        :func:`~napari_stofm.model.stofm.batch_sizes`).
    values
        What ``X`` (or ``layers[layer]``) holds: ``'raw_counts'``, ``'volume_normalized'`` or
        ``'log_normalized'``. Default: ``uns['source']['values']``, else ``'log_normalized'``
        when scanpy's ``uns['log1p']`` is there, else read off the values (non-integers no
        larger than 20 are taken as log1p data, with a warning). Recorded in
        ``uns['stofm']['values_assumed']`` (and how it was decided in ``values_basis``).
    precision
        The cell encoder's arithmetic: ``'float32'`` (default) or ``'bfloat16'`` (faster
        where the CPU or GPU has bfloat16 matrix units; the SE(2) stage stays float32).
    adapt
        Seconds of label-free per-slice adaptation (0, the default: off): the SE(2) stage's
        self-supervised objective continues on this slice, on a copy of the model, before
        it is embedded (:mod:`napari_stofm.training.adapt`); what ran goes to
        ``uns['stofm']['adaptation']``.
    progress, cancel
        See :mod:`napari_stofm.progress`. Cancelling leaves ``adata`` as it was.

    The keywords are those of :func:`compute_embedding` (``gene_key``, ``layer``,
    ``cell_batch_size``, ``use_cache``, ...), which this writes into ``adata``.

    Returns ``adata`` (modified in place).
    """
    compute_embedding(adata, model, **kwargs).write(adata)
    return adata
