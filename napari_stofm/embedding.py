"""``embed``: a slice in, SToFM cell representations out.

Three scales, in order:

1. gene scale: rank-value tokens -> cell encoder -> ``obsm['X_stofm_cell']`` (unit norm);
2. macro scale: Leiden virtual cells over position + embedding (``obs['stofm_virtual_cell']``);
3. micro scale + SE(2) transformer: sub-slices of ``[CLS] + virtual cells + cells`` ->
   ``obsm['X_stofm']``.

The gene-scale embeddings are cached in the AnnData itself, keyed by the weights and the
expression data: a second call on the same data and weights skips the cell encoder.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Optional

import numpy as np
import torch

from .errors import StofmInputError
from .progress import CancelToken, ProgressCallback, check_cancelled, report

log = logging.getLogger(__name__)

CELL_KEY = "X_stofm_cell"
STOFM_KEY = "X_stofm"
UNS_KEY = "stofm"


def expression_fingerprint(adata, layer: Optional[str] = None) -> str:
    """A content hash of the expression matrix, gene names and cell names."""
    import scipy.sparse as sp

    X = adata.X if layer is None else adata.layers[layer]
    h = hashlib.sha1()
    h.update(str(X.shape).encode())
    h.update("\0".join(map(str, adata.var_names)).encode())
    h.update("\0".join(map(str, adata.obs_names)).encode())
    if sp.issparse(X):
        X = X.tocsr()
        for part in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    return h.hexdigest()[:16]


def _gene_scale_key(model, adata, gene_key, layer) -> str:
    return f"{model.fingerprint}:{expression_fingerprint(adata, layer)}:{gene_key}:{model.settings.max_genes}"


def embed_cells(
    adata,
    model,
    *,
    gene_key: Optional[str] = None,
    layer: Optional[str] = None,
    batch_size: int = 64,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    use_cache: bool = True,
) -> np.ndarray:
    """Gene-scale embeddings (n, 256), from the cache in ``adata`` when still valid.

    Cells that express no vocabulary gene get a zero row and ``obs['stofm_empty'] = True``.
    """
    from .model.tokenizer import require_nonempty, tokenize_adata

    key = _gene_scale_key(model, adata, gene_key, layer)
    meta = adata.uns.get(UNS_KEY, {})
    cached = adata.obsm.get(CELL_KEY) if use_cache else None
    if cached is not None and meta.get("gene_scale_key") == key and cached.shape[0] == adata.n_obs:
        report(progress, 1, 1, "Cell embeddings (cached)")
        return np.asarray(cached, dtype=np.float32)
    check_cancelled(cancel)
    report(progress, 0, 1, "Tokenizing genes")
    tokens, match = tokenize_adata(adata, model.vocabulary, gene_key=gene_key, layer=layer, max_genes=model.settings.max_genes)
    require_nonempty(tokens, match)
    empty = np.asarray(tokens.empty, dtype=bool)
    if empty.any():
        examples = ", ".join(map(str, adata.obs_names[empty][:5]))
        log.warning(
            "%d of %d cells express no gene of the model's vocabulary (e.g. %s); they get a zero gene-scale "
            "embedding and obs['stofm_empty'] = True", int(empty.sum()), adata.n_obs, examples,
        )
    emb = model.cell_encoder.encode(tokens, batch_size=batch_size, device=model.device, progress=progress, cancel=cancel)
    adata.obsm[CELL_KEY] = emb
    adata.obs["stofm_empty"] = empty
    meta = dict(adata.uns.get(UNS_KEY, {}))
    meta.update(
        gene_scale_key=key,
        genes_matched=int(match.n_matched),
        genes_total=int(match.n_total),
        gene_id_kind=str(match.id_kind),
        species=str(match.species),
    )
    adata.uns[UNS_KEY] = meta
    return emb


def embed(
    adata,
    model=None,
    *,
    device: Optional[str] = None,
    spatial_key: str = "spatial",
    gene_key: Optional[str] = None,
    layer: Optional[str] = None,
    split_num: Optional[int] = None,
    split_mode: Optional[str] = None,
    batch_size: int = 4,
    cell_batch_size: int = 64,
    seed: int = 0,
    use_cache: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
):
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
        Cells per sub-slice and how crowded squares are split (default: the model's).
    batch_size
        Sub-slices per SE(2) forward pass.
    progress, cancel
        See :mod:`napari_stofm.progress`. Cancelling leaves ``adata`` as it was, except
        for the gene-scale cache when that stage had finished.

    Returns ``adata`` (modified in place).
    """
    from .model.multiscale import build_hypernodes, normalize_coordinates, split_subslices
    from .model.stofm import load_model, resolve_device
    from .slice_io import validate_slice

    t0 = time.perf_counter()
    validate_slice(adata, spatial_key=spatial_key)
    model = model if model is not None else load_model()
    model.to(resolve_device(device))
    settings = model.settings
    split_num = int(split_num or settings.split_num)
    split_mode = split_mode or settings.split_mode

    cell_emb = embed_cells(
        adata, model, gene_key=gene_key, layer=layer, batch_size=cell_batch_size,
        progress=progress, cancel=cancel, use_cache=use_cache,
    )
    positions = np.ascontiguousarray(np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2])
    run_key = "|".join([
        adata.uns[UNS_KEY]["gene_scale_key"], hashlib.sha1(positions.tobytes()).hexdigest()[:16],
        str(split_num), split_mode, str(seed),
    ])
    final = adata.obsm.get(STOFM_KEY)
    if use_cache and final is not None and adata.uns[UNS_KEY].get("run_key") == run_key and final.shape[0] == adata.n_obs:
        report(progress, adata.n_obs, adata.n_obs, "SE(2) transformer (cached)")
        return adata
    check_cancelled(cancel)
    report(progress, 0, 1, "Macro scale: virtual cells")
    xy = normalize_coordinates(positions)
    hyper = build_hypernodes(
        xy, cell_emb, alpha=settings.hypernode_alpha, resolution=settings.hypernode_resolution,
        max_hypernodes=settings.max_hypernodes, seed=seed,
    )
    check_cancelled(cancel)
    subslices = split_subslices(xy, split_num, mode=split_mode)
    out = run_se2(model, xy, cell_emb, hyper, subslices, batch_size=batch_size, progress=progress, cancel=cancel)

    adata.obsm[STOFM_KEY] = out
    adata.obs["stofm_virtual_cell"] = hyper.assignment.astype(np.int32)
    meta = dict(adata.uns.get(UNS_KEY, {}))
    meta.update(
        model=settings.name,
        weights=model.source,
        fingerprint=model.fingerprint,
        split_num=split_num,
        split_mode=split_mode,
        n_subslices=len(subslices),
        n_virtual_cells=int(hyper.xy.shape[0]),
        virtual_cell_resolution=float(hyper.resolution),
        seed=int(seed),
        run_key=run_key,
        seconds=round(time.perf_counter() - t0, 3),
    )
    adata.uns[UNS_KEY] = meta
    return adata


def run_se2(model, normalized_xy, cell_emb, hyper, subslices, *, batch_size=4, progress=None, cancel=None) -> np.ndarray:
    """SE(2) transformer over sub-slices -> (n, E) final cell representations."""
    from .model.multiscale import build_subslice_inputs, collate

    n = normalized_xy.shape[0]
    out = np.zeros((n, model.se2.config.embedding_dim), dtype=np.float32)
    # Similar sizes together: less padding.
    order = sorted(range(len(subslices)), key=lambda i: -len(subslices[i]))
    ordered = [subslices[i] for i in order]
    device = model.device
    done = 0
    report(progress, 0, n, "SE(2) transformer")
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            check_cancelled(cancel)
            items = list(build_subslice_inputs(normalized_xy, cell_emb, hyper, ordered[start : start + batch_size]))
            batch = collate(items)
            result = model.se2(
                batch["token_embeddings"].to(device), batch["attn_bias"].to(device), batch["token_types"].to(device),
                return_pair_rep=False,
            )
            hidden = result["last_hidden_state"].float().cpu().numpy()
            idx = batch["indices"].numpy()
            sel = idx >= 0
            out[idx[sel]] = hidden[sel]
            done += int(sel.sum())
            report(progress, done, n, "SE(2) transformer")
    if done < n:
        raise StofmInputError(f"{n - done} cells were not covered by any sub-slice; this is a bug, please report it")
    return out
