"""The batches of both stages, built on the CPU from numpy ``Generator`` streams (one per step,
so a batch never depends on resuming or on which loader thread built it). Stage 1:
:func:`pad_sequences`, BERT masking (:func:`mask_tokens`) and a second view with genes
dropped (:func:`drop_genes`). Stage 2: an augmented slice (:func:`augment_positions`) cut
into sub-slices with masked cells, noisy positions and their targets
(:func:`make_training_batch`). :func:`prefetched` builds the next batches in threads.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from napari_stofm.knn import spatial_neighbors
from napari_stofm.model.multiscale import (
    CLS_TYPE,
    FAR_DISTANCE,
    HYPER_TYPE,
    NORM_TYPE,
    SubsliceInput,
    collate,
    hypernodes_from_assignment,
    normalize_coordinates,
    split_subslices,
    subslice_distances,
)
from napari_stofm.training.config import PretrainConfig
from napari_stofm.training.corpus import SpatialSlice

# --------------------------------------------------------------------------- stage 1


def pad_sequences(seqs: Sequence[np.ndarray], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``: the sequences right-padded with ``pad_id`` to the longest."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    ids_t = torch.from_numpy(ids)
    return ids_t, (ids_t != pad_id).long()


def mask_tokens(ids: torch.Tensor, rng: np.random.Generator, *, mask_prob: float, mask_id: int, pad_id: int,
                gene_low: int, gene_high: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of gene tokens (position 0, ``<cls>``, and padding never chosen).

    Returns ``(masked_ids, labels)`` with label -100 where nothing is scored.
    """
    a = ids.numpy()
    gene = (a != pad_id)
    gene[:, 0] = False
    chosen = gene & (rng.random(a.shape) < mask_prob)
    # every cell with genes scores at least one
    for i in np.flatnonzero(gene.any(1) & ~chosen.any(1)):
        chosen[i, rng.choice(np.flatnonzero(gene[i]))] = True
    labels = np.where(chosen, a, -100)
    out = a.copy()
    r = rng.random(a.shape)
    out[chosen & (r < 0.8)] = mask_id
    rand = chosen & (r >= 0.8) & (r < 0.9)
    out[rand] = rng.integers(gene_low, gene_high, size=int(rand.sum()))
    return torch.from_numpy(out), torch.from_numpy(labels)


def drop_genes(seqs: Sequence[np.ndarray], rng: np.random.Generator, p: float) -> List[np.ndarray]:
    """A view of each cell with a random ``p`` of its genes removed (rank order kept, one gene at least)."""
    out = []
    for s in seqs:
        genes = s[1:]
        keep = rng.random(genes.size) >= p
        if genes.size and not keep.any():
            keep[rng.integers(genes.size)] = True
        out.append(np.concatenate([s[:1], genes[keep]]))
    return out


# --------------------------------------------------------------------------- stage 2


def augment_positions(xy: np.ndarray, rng: np.random.Generator, cfg: PretrainConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of the kept cells and their rotated / reflected / translated positions
    (cropped to a random rectangle and subsampled)."""
    n = xy.shape[0]
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if rng.random() < 0.5:
        rot = rot @ np.diag([1.0, -1.0])
    p = (xy - xy.mean(0)) @ rot.T + rng.normal(0, 1, size=2) * np.ptp(xy, axis=0).max()
    keep = np.ones(n, dtype=bool)
    if rng.random() < cfg.crop_prob:
        lo, hi = p.min(0), p.max(0)
        frac = rng.uniform(cfg.min_crop, 1.0, size=2)
        start = lo + rng.random(2) * (hi - lo) * (1 - frac)
        end = start + (hi - lo) * frac
        keep &= np.all((p >= start) & (p <= end), axis=1)
    keep &= rng.random(n) < rng.uniform(cfg.subsample_min, 1.0)
    idx = np.flatnonzero(keep)
    if idx.size < 20:  # too small a crop: use the whole slice
        idx = np.arange(n)
    return idx, p[idx]


def make_training_batch(sl: SpatialSlice, rng: np.random.Generator, cfg: PretrainConfig) -> Optional[dict]:
    """One augmented batch of sub-slices with masked cells, noisy positions and targets."""
    idx, p = augment_positions(sl.xy, rng, cfg)
    xy = normalize_coordinates(p)
    emb = sl.embeddings[idx]
    hyper = hypernodes_from_assignment(xy, emb, sl.assignment[idx])
    n = xy.shape[0]
    area = float(np.prod(np.maximum(np.ptp(xy, axis=0), 1e-6)))
    spacing = math.sqrt(area / n)
    parts = split_subslices(xy, cfg.train_split_num, mode="spatial")
    chosen = rng.choice(len(parts), size=min(cfg.batch_subslices, len(parts)), replace=False)
    scales = tuple(int(k) for k in cfg.niche_neighbours) if cfg.niche_weight > 0 else ()
    niche = niche_targets(xy, emb, np.concatenate([parts[c] for c in chosen]).astype(np.int64), scales)
    h = hyper.xy.shape[0]
    d = emb.shape[1]
    items, masks, keeps = [], [], []
    true_dists, neighbour_pos = [], []
    for c in chosen:
        cells = np.asarray(parts[c], dtype=np.int64)
        m = cells.size
        # drawn before the masks, from the stream only a run with the term uses: a run
        # without it gets the batches it got before the term existed
        nb = neighbour_positives(xy[cells], rng, cfg.neighbour_k) if cfg.neighbour_weight > 0 \
            else np.zeros(m, dtype=np.int64)
        neighbour_pos.append(1 + hyper.xy.shape[0] + nb)
        r = rng.random(m)
        masked = r < cfg.cell_mask_prob
        kept = (r >= cfg.cell_mask_prob) & (r < cfg.cell_mask_prob + cfg.cell_keep_prob)
        if not (masked | kept).any():
            masked[rng.integers(m)] = True
        sel = masked | kept
        token_xy = np.concatenate([np.zeros((1, 2)), hyper.xy, xy[cells]])
        types = np.full(token_xy.shape[0], NORM_TYPE, dtype=np.int32)
        types[0] = CLS_TYPE
        types[1 : h + 1] = HYPER_TYPE
        noisy = token_xy.copy()
        noisy[1 + h :][sel] += rng.normal(0, cfg.noise_spacings * spacing, size=(int(sel.sum()), 2))
        token_emb = np.concatenate([np.zeros((1, d)), hyper.embeddings, emb[cells]]).astype(np.float32)
        target_emb = emb[cells].astype(np.float32)
        token_emb[1 + h :][masked] = cfg.cell_mask_value
        items.append(SubsliceInput(token_embeddings=token_emb, attn_bias=subslice_distances(noisy, types),
                                   token_types=types, indices=np.concatenate([np.full(1 + h, -1), cells]),
                                   spatial=noisy.astype(np.float32)))
        true_dists.append(subslice_distances(token_xy, types))
        masks.append((sel, target_emb))
        keeps.append(h)
    batch = collate(items)
    b, l = batch["token_types"].shape
    sel_mask = torch.zeros(b, l, dtype=torch.bool)
    targets = []
    cell_mask = torch.zeros(b, l, dtype=torch.bool)
    unmasked_mask = torch.zeros(b, l, dtype=torch.bool)
    unmasked_targets = []
    pair_b, pair_i, pair_j, pair_t = [], [], [], []
    for k, ((sel, target_emb), h_k) in enumerate(zip(masks, keeps, strict=True)):
        pos = 1 + h_k + np.flatnonzero(sel)
        sel_mask[k, torch.from_numpy(pos)] = True
        targets.append(torch.from_numpy(target_emb[sel]))
        cell_mask[k, 1 + h_k : 1 + h_k + sel.size] = True
        unmasked = np.flatnonzero(~sel)
        unmasked_mask[k, torch.from_numpy(1 + h_k + unmasked)] = True
        unmasked_targets.append(torch.from_numpy(target_emb[unmasked]))
        dist = true_dists[k]
        cell_tok = np.zeros(dist.shape[0], dtype=bool)
        cell_tok[1 + h_k :] = True
        is_sel = np.zeros(dist.shape[0], dtype=bool)
        is_sel[pos] = True
        neighbour = (dist != FAR_DISTANCE) & (dist != 0)
        pair = neighbour & cell_tok[:, None] & cell_tok[None, :] & (is_sel[:, None] | is_sel[None, :])
        ii, jj = np.nonzero(pair)
        pair_b.append(np.full(ii.size, k))
        pair_i.append(ii)
        pair_j.append(jj)
        pair_t.append(dist[ii, jj] / spacing)
    batch["selected"] = sel_mask
    batch["target"] = torch.cat(targets)
    # every cell token, in sub-slice then cell order (the order of ``niche``)
    batch["cells"] = cell_mask
    batch["niche_target"] = torch.from_numpy(niche)
    # for every cell token (the order of ``cells``): the token index, in its sub-slice, of
    # the neighbour the spatial-agreement term asks it to pick out
    batch["neighbour_pos"] = torch.from_numpy(np.concatenate(neighbour_pos).astype(np.int64))
    batch["unmasked"] = unmasked_mask
    batch["unmasked_target"] = torch.cat(unmasked_targets)
    batch["pairs"] = tuple(torch.from_numpy(np.concatenate(a).astype(np.int64)) for a in (pair_b, pair_i, pair_j))
    batch["pair_target"] = torch.from_numpy(np.concatenate(pair_t).astype(np.float32))
    return batch


def neighbour_positives(xy: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """For each of the sub-slice's cells (positions ``xy``), the index of one of its ``k``
    nearest other cells, drawn uniformly: the positive of the spatial-agreement term. A
    sub-slice of one cell points at itself (the term then has nothing to contrast it with)."""
    m = xy.shape[0]
    k = min(int(k), m - 1)
    if k < 1:
        return np.zeros(m, dtype=np.int64)
    nbr = spatial_neighbors(xy, k)
    return nbr[np.arange(m), rng.integers(0, k, size=m)].astype(np.int64)


def niche_targets(xy: np.ndarray, emb: np.ndarray, cells: np.ndarray, scales: Sequence[int]) -> np.ndarray:
    """(len(cells), len(scales), D): for each cell, the mean embedding of its ``k`` nearest
    cells of the (augmented) slice, itself excluded, for each ``k`` in ``scales``, minus the
    slice's mean embedding.

    The stage-2 niche target: a cell's output token must say what surrounds it, at the
    scale of its immediate neighbours and of a wider neighbourhood. Centred, because the
    raw means of unit vectors share most of their direction (the slice average): a cosine
    against them is near 1 whatever the prediction and teaches little.
    """
    d = emb.shape[1]
    if not len(scales) or cells.size == 0:
        return np.zeros((cells.size, len(scales), d), dtype=np.float32)
    k_max = min(int(max(scales)), xy.shape[0] - 1)
    if k_max < 1:
        return np.zeros((cells.size, len(scales), d), dtype=np.float32)
    nbr = spatial_neighbors(xy, k_max, rows=cells)
    out = np.empty((cells.size, len(scales), d), dtype=np.float32)
    for j, k in enumerate(scales):
        k = min(int(k), k_max)
        w = sp.csr_matrix((np.full(cells.size * k, 1.0 / k, dtype=np.float32), nbr[:, :k].ravel(),
                           np.arange(0, cells.size * k + 1, k)), shape=(cells.size, xy.shape[0]))
        out[:, j] = w @ emb
    out -= emb.mean(0, dtype=np.float64).astype(np.float32)
    return out


# --------------------------------------------------------------------------- loader


def prefetched(build: Callable[[int], dict], start: int, workers: int):
    """Batches ``build(start)``, ``build(start + 1)``, ... in order.

    With ``workers`` > 0 they are built by that many threads, up to ``2 * workers`` steps
    ahead, while the model trains on the current one (numpy and torch release the GIL in
    their heavy parts). Every step seeds its own random stream, so the batches are the
    same with or without workers. Call ``.close()`` on the generator when done.
    """
    if workers <= 0:
        step = start
        while True:
            yield build(step)
            step += 1
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stofm-batches")
    try:
        pending = deque(pool.submit(build, k) for k in range(start, start + 2 * workers))
        nxt = start + 2 * workers
        while True:
            batch = pending.popleft().result()
            pending.append(pool.submit(build, nxt))
            nxt += 1
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
