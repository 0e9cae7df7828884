"""The SToFM pretraining recipe (torch + numpy; no napari).

Two stages, as in the paper, run on the CPU in minutes for a small model (or on a GPU with
``device="cuda"``; the recipe never needs one):

1. **Gene scale.** The cell encoder's BERT learns masked gene-token modelling on
   rank-value sequences: 15 % of the gene tokens of a cell are chosen (80 % replaced by
   ``<mask>``, 10 % by a random gene, 10 % kept) and predicted by a head tied to the word
   embeddings (cross-entropy over the genes present in the batch). The masked-gene loss
   never reads the ``<cls>`` output, so two terms train the cell embedding (the
   ``cell_proj`` output of ``<cls>``):

   * **profile reconstruction** (weight ``profile_weight``): from the embedding of the
     masked sequence, :class:`ProfileHead` predicts the cell's whole gene distribution,
     each of its genes weighted 1 / rank (KL divergence). This makes the embedding a
     summary of which genes the cell expresses and how highly, which is what cell types
     and tissue regions are read from (scGPT's expression prediction for cell modelling,
     on rank tokens);
   * **contrastive** (InfoNCE, weight ``contrastive_weight``, temperature 0.1) between
     that embedding and the one of a second view of the same cell with 25 % of its genes
     dropped, against the other cells of the batch. Alone it spreads the embeddings but
     they keep little cell-type information (the first bundled weights, trained that way,
     lost to their own random initialisation), hence its small weight.

   Sequences are capped at ``max_genes`` genes (the top of the rank order), and the
   shipped settings use the same cap at inference.
2. **SE(2) transformer, encoder frozen.** Cell embeddings are computed once per slice and
   virtual cells (Leiden) once per slice. Each step draws a slice, augments it (random
   rotation, reflection, translation, a random rectangular crop, random cell
   subsampling), cuts it into spatial sub-slices of ``train_split_num`` cells and trains
   on a batch of them with

   * masked cell modelling: 12 % of the cell tokens get the constant input vector -100,
     3 % are kept but scored; ``lm_head`` (Linear(E, E), ReLU, Linear(E, input_dim)),
     L2-normalised, predicts the original cell embedding (cosine loss);
   * pair-distance recovery: the positions of those selected cells get Gaussian noise of
     sigma = 5 x sqrt(area / n_cells) (normalised units), the distance matrix is rebuilt
     from the noisy positions, and ``pair_head`` (heads -> heads, ReLU, -> 1) on the pair
     representation regresses the original distance (in units of the cell spacing
     sqrt(area / n_cells)) of every original neighbour pair of cells involving a selected
     cell (MSE).

Joint fine-tuning of both (the paper's third stage) is not part of this recipe.

Every step draws its batch from its own numpy ``Generator`` seeded by (seed, stage, step),
so batches do not depend on resuming or on ``loader_threads`` (threads that build the next
batches while the model trains, worth it on a GPU). Slices can be read here and trained on
elsewhere through a packed corpus (:mod:`.packed_corpus`, :func:`pack_corpus`).

Everything is seeded (``torch.manual_seed`` and the per-step generators), checkpoints are
written every few minutes into ``OUT/state/`` (weights as safetensors, optimiser and torch RNG
states as plain tensors, the rest as JSON) and :func:`pretrain` with ``resume=True``
continues from there. The result is a checkpoint directory written by
:meth:`SToFM.save`, with ``training_log.json`` and ``loss_curve.png`` beside it.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_stofm.errors import StofmInputError
from napari_stofm.model.multiscale import (CLS_TYPE, FAR_DISTANCE, HYPER_TYPE, NORM_TYPE, Hypernodes, build_hypernodes, collate,
                         hypernodes_from_assignment, normalize_coordinates, split_subslices, subslice_distances,
                         SubsliceInput)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Slices the shared data README keeps for evaluation only (``dataset/slice``); never train on them.
HELD_OUT_SLICES = (
    "visium_human_dlpfc/151676",
    "st_human_her2st/G2",
    "st_human_her2st/H1",
    "merfish_human_lung_cancer/tessera_warmup",
    "merfish_mouse_hypothalamus_3slices/animal7_bregma-0.09",
    "merfish_mouse_hypothalamus_3slices/animal7_bregma0.16",
)

STATE_DIR = "state"
#: settings a resumed run may change (the model's shapes and the vocabulary stay)
RESUME_OVERRIDABLE = ("train_split_num", "batch_subslices", "batch_cells", "stage1_share", "crop_prob",
                      "subsample_min", "contrastive_weight", "profile_weight", "pair_weight", "device",
                      "loader_threads")
LOG_NAME = "training_log.json"
CURVE_NAME = "loss_curve.png"
MASK_VALUE = -100.0
#: what the progress bar, the final summary and the log report of each stage
STAGE1_TERMS = ("mlm", "mlm_acc", "profile_kl", "contrastive", "cell_cos")
STAGE2_TERMS = ("cosine", "pair_mse")
TIED_HEADS = ("mlm_head", "profile_head")  # their decoder is the encoder's word embeddings (not saved twice)


@dataclass
class PretrainConfig:
    """Hyper-parameters of a pretraining run (all sizes small enough for a CPU)."""

    seed: int = 0
    threads: int = 2
    loader_threads: int = 0  # threads building the next batches while the model trains (0: in line)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps" or "auto" (the GPU when there is one)
    # time and steps
    stage1_steps: int = 1000
    stage2_steps: int = 2000
    minutes: Optional[float] = None  # wall-clock budget of one call (both stages)
    stage1_share: float = 0.4  # part of ``minutes`` stage 1 may use
    checkpoint_minutes: float = 3.0
    # stage 1: gene scale
    max_genes: int = 255
    batch_cells: int = 32
    lr1: float = 1e-3
    mask_prob: float = 0.15
    profile_weight: float = 1.0
    contrastive_weight: float = 0.1
    gene_dropout: float = 0.25
    temperature: float = 0.1
    # stage 2: SE(2)
    train_split_num: int = 400
    batch_subslices: int = 4
    lr2: float = 5e-4
    cell_mask_prob: float = 0.12
    cell_keep_prob: float = 0.03
    pair_weight: float = 1.0
    noise_spacings: float = 5.0
    crop_prob: float = 0.5
    min_crop: float = 0.5
    subsample_min: float = 0.7
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # sizes
    bert_hidden: int = 128
    bert_layers: int = 2
    bert_heads: int = 4
    bert_intermediate: int = 256
    # attention-probability dropout of both transformers while training: 0 lets SDPA use its
    # fused kernels (with dropout the CPU falls back to the math path, about 4x slower)
    attention_dropout: float = 0.0
    se2_layers: int = 4
    se2_dim: int = 128
    se2_ffn: int = 256
    se2_heads: int = 8
    se2_gaussians: int = 64
    min_cells_per_gene: int = 10
    # output
    name: str = "napari-stofm-small"
    split_num: int = 1000  # inference sub-slice size written into stofm.json

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- corpus


@dataclass
class CorpusSlice:
    name: str  # dataset/slice
    path: str
    adata: object


def slice_name(path: PathLike) -> str:
    """``dataset/slice`` of a slice file (its folder and its stem)."""
    p = Path(path)
    stem = p.name[: -len(".h5ad")] if p.name.endswith(".h5ad") else p.stem
    return f"{p.parent.name}/{stem}"


def is_held_out(path: PathLike) -> bool:
    return slice_name(path) in HELD_OUT_SLICES


def find_slices(inputs: Sequence[PathLike], exclude_held_out: bool = True) -> Tuple[List[Path], List[Path]]:
    """Slice files of ``inputs`` (files, or folders searched recursively for ``*.h5ad``).

    Returns ``(used, skipped)``: held-out slices found inside a folder are skipped; one
    named explicitly is refused with :class:`StofmInputError` (unless ``exclude_held_out``
    is False).
    """
    used: List[Path] = []
    skipped: List[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise StofmInputError(f"{p} does not exist: pass slice files (.h5ad) or folders holding them")
        if p.is_dir() and not p.name.endswith(".zarr"):
            found = sorted(p.rglob("*.h5ad"))
            if not found:
                raise StofmInputError(f"{p} holds no .h5ad slice files")
            for f in found:
                (skipped if exclude_held_out and is_held_out(f) else used).append(f)
        else:
            if exclude_held_out and is_held_out(p):
                raise StofmInputError(
                    f"{p} is held out for evaluation ({slice_name(p)}); it must never be used for pretraining. "
                    "Remove it from --data.")
            used.append(p)
    seen, unique = set(), []
    for p in used:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise StofmInputError("no slice is left to train on (all given slices are held out)")
    return unique, skipped


def check_not_held_out(names: Sequence[str]) -> None:
    bad = [n for n in names if n in HELD_OUT_SLICES]
    if bad:
        raise StofmInputError(f"held-out slices may not be used for pretraining: {', '.join(bad)}")


def read_corpus(paths: Sequence[PathLike]) -> List[CorpusSlice]:
    from napari_stofm.io.slices import read_slice

    out = []
    for p in paths:
        adata = read_slice(p)
        out.append(CorpusSlice(slice_name(p), str(p), adata))
    return out


# --------------------------------------------------------------------------- heads


class MLMHead(nn.Module):
    """BERT's masked-token head, decoder tied to the word embeddings."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the vocabulary, or over the token ids ``candidates`` only."""
        h = self.norm(F.gelu(self.dense(h)))
        if candidates is None:
            return h @ self.word_embeddings.weight.t() + self.bias
        return h @ self.word_embeddings.weight[candidates].t() + self.bias[candidates]


class ProfileHead(nn.Module):
    """Reads a cell's gene profile back from its embedding (the ``cell_proj`` output).

    Logits over genes = ``Linear(embedding -> hidden)`` of the cell embedding dotted with the
    word embeddings (tied, as in :class:`MLMHead`) plus a bias. Trained against the cell's
    own rank-weighted gene distribution, it makes the cell embedding a summary of which
    genes the cell expresses and how highly (scGPT's "expression prediction for cell
    modelling", on rank tokens).
    """

    def __init__(self, embedding_dim: int, hidden: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(embedding_dim, hidden)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, z: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.dense(z) @ self.word_embeddings.weight[candidates].t() + self.bias[candidates]


def profile_targets(ids: torch.Tensor, attn: torch.Tensor, remap: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """(cells, candidates) distribution: each cell's genes weighted 1 / rank, summing to 1."""
    genes = ids[:, 1:]
    present = attn[:, 1:].bool()
    rank = torch.arange(1, genes.shape[1] + 1, device=ids.device, dtype=torch.float32)
    w = torch.where(present, 1.0 / rank, torch.zeros((), device=ids.device))
    col = torch.where(present, remap[genes], torch.zeros_like(genes))
    out = torch.zeros(ids.shape[0], n_candidates, device=ids.device)
    out.scatter_add_(1, col, w)
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)


def make_lm_head(e: int, input_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, input_dim))


def make_pair_head(heads: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(heads, heads), nn.ReLU(), nn.Linear(heads, 1))


# --------------------------------------------------------------------------- stage 1 data


class GeneCorpus:
    """Token sequences of every non-empty cell of the corpus."""

    def __init__(self, tokenized: Sequence, names: Sequence[str]):
        self.tokenized = list(tokenized)
        self.names = list(names)
        refs = []
        for k, tok in enumerate(self.tokenized):
            cells = np.flatnonzero(~np.asarray(tok.empty, dtype=bool))
            refs.append(np.column_stack([np.full(cells.size, k), cells]))
        self.refs = np.concatenate(refs) if refs else np.zeros((0, 2), dtype=np.int64)
        if self.refs.shape[0] == 0:
            raise StofmInputError("no cell of the corpus expresses a vocabulary gene")

    def __len__(self) -> int:
        return self.refs.shape[0]

    def sequences(self, rows: np.ndarray) -> List[np.ndarray]:
        return [self.tokenized[s].cell(c) for s, c in self.refs[rows]]


def _pad(seqs: Sequence[np.ndarray], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
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


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views (rows of ``a`` and ``b`` are the same cells)."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# --------------------------------------------------------------------------- stage 2 data


@dataclass
class SpatialSlice:
    """A slice ready for stage 2: raw positions, frozen cell embeddings, Leiden assignment."""

    name: str
    xy: np.ndarray  # (n, 2) source units (non-empty cells only)
    embeddings: np.ndarray  # (n, D) unit norm
    assignment: np.ndarray  # (n,) virtual cell of each cell


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
    h = hyper.xy.shape[0]
    d = emb.shape[1]
    items, masks, keeps = [], [], []
    true_dists = []
    for c in chosen:
        cells = np.asarray(parts[c], dtype=np.int64)
        m = cells.size
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
        token_emb[1 + h :][masked] = MASK_VALUE
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
    pair_b, pair_i, pair_j, pair_t = [], [], [], []
    for k, ((sel, target_emb), h_k) in enumerate(zip(masks, keeps)):
        pos = 1 + h_k + np.flatnonzero(sel)
        sel_mask[k, torch.from_numpy(pos)] = True
        targets.append(torch.from_numpy(target_emb[sel]))
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
    batch["pairs"] = tuple(torch.from_numpy(np.concatenate(a).astype(np.int64)) for a in (pair_b, pair_i, pair_j))
    batch["pair_target"] = torch.from_numpy(np.concatenate(pair_t).astype(np.float32))
    return batch


# --------------------------------------------------------------------------- training state


def _lr_factor(step: int, total: int, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % over the steps (or over the time budget,
    whichever runs out first)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


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


class Trainer:
    """Holds the model, the heads, the optimisers and the loss history of one run."""

    def __init__(self, out: Path, cfg: PretrainConfig, vocabulary, slices: Sequence[str],
                 progress: Optional[Callable[[str], None]] = None):
        from napari_stofm.model.stofm import PipelineSettings, build_model

        self.out = Path(out)
        self.cfg = cfg
        self.vocabulary = vocabulary
        self.slices = list(slices)
        self.settings = PipelineSettings(split_num=cfg.split_num, split_mode="spatial", max_genes=cfg.max_genes,
                                         name=cfg.name)
        model = build_model(
            vocabulary,
            encoder_config=dict(hidden_size=cfg.bert_hidden, num_hidden_layers=cfg.bert_layers,
                                num_attention_heads=cfg.bert_heads, intermediate_size=cfg.bert_intermediate,
                                max_position_embeddings=cfg.max_genes + 1,
                                attention_probs_dropout_prob=cfg.attention_dropout),
            se2_config=dict(num_hidden_layers=cfg.se2_layers, embedding_dim=cfg.se2_dim,
                            ffn_embedding_dim=cfg.se2_ffn, num_attention_heads=cfg.se2_heads,
                            gaussian_hidden_dim=cfg.se2_gaussians, attention_dropout=cfg.attention_dropout),
            settings=self.settings, seed=cfg.seed,
        )
        self.encoder = model.cell_encoder
        self.se2 = model.se2
        torch.manual_seed(cfg.seed + 1)
        self.mlm_head = MLMHead(cfg.bert_hidden, self.encoder.bert.embeddings.word_embeddings)
        self.profile_head = ProfileHead(self.encoder.embedding_dim, cfg.bert_hidden,
                                        self.encoder.bert.embeddings.word_embeddings)
        self.lm_head = make_lm_head(cfg.se2_dim, self.encoder.embedding_dim)
        self.pair_head = make_pair_head(cfg.se2_heads)
        from napari_stofm.model.stofm import resolve_device

        self.device = resolve_device(cfg.device)
        for mod in self.modules().values():
            mod.to(self.device)
        self.opt1 = torch.optim.AdamW(list(self.encoder.parameters())
                                      + [p for head in (self.mlm_head, self.profile_head)
                                         for n, p in head.named_parameters() if not n.startswith("word_embeddings")],
                                      lr=cfg.lr1, weight_decay=cfg.weight_decay)
        self.opt2 = torch.optim.AdamW(list(self.se2.parameters()) + list(self.lm_head.parameters())
                                      + list(self.pair_head.parameters()), lr=cfg.lr2, weight_decay=cfg.weight_decay)
        self.stage = 1
        self.step = 0  # steps done in the current stage
        self.stage1_done_steps = 0
        self.history: Dict[str, list] = {"stage1": [], "stage2": []}
        self.seconds = {"stage1": 0.0, "stage2": 0.0}
        self.progress = progress
        special = {vocabulary.pad_id, vocabulary.mask_id, vocabulary.cls_id}
        genes = [i for i in range(vocabulary.size) if i not in special]
        self.gene_low, self.gene_high = min(genes), max(genes) + 1
        self.time_frac = 0.0  # share of the stage's time budget spent (drives the schedule with --minutes)

    # ------------------------------------------------------------ state I/O

    def modules(self) -> Dict[str, nn.Module]:
        return {"encoder": self.encoder, "se2": self.se2, "mlm_head": self.mlm_head,
                "profile_head": self.profile_head, "lm_head": self.lm_head, "pair_head": self.pair_head}

    def save_state(self) -> None:
        from safetensors.torch import save_file

        d = self.out / STATE_DIR
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, mod in self.modules().items():
            for k, v in mod.state_dict().items():
                if name in TIED_HEADS and k.startswith("word_embeddings"):
                    continue  # tied to the encoder
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(d / "weights.tmp"))
        torch.save({"opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(),
                    "torch_rng": torch.get_rng_state()}, d / "optim.tmp")
        meta = {"stage": self.stage, "step": self.step, "stage1_done_steps": self.stage1_done_steps,
                "history": self.history, "seconds": self.seconds,
                "config": asdict(self.cfg), "slices": self.slices}
        (d / "state.tmp").write_text(json.dumps(meta))
        self.vocabulary.save(d / "vocabulary.tsv")
        for tmp, final in (("weights.tmp", "weights.safetensors"), ("optim.tmp", "optim.pt"),
                           ("state.tmp", "state.json")):
            (d / tmp).replace(d / final)

    @classmethod
    def resume(cls, out: Path, overrides: dict, progress=None) -> "Trainer":
        from safetensors.torch import load_file

        from napari_stofm.genes.vocabulary import GeneVocabulary

        d = Path(out) / STATE_DIR
        if not (d / "state.json").is_file():
            raise StofmInputError(f"{out} holds no pretraining state to resume ({d / 'state.json'} is missing)")
        meta = json.loads((d / "state.json").read_text())
        cfg_dict = dict(meta["config"])
        cfg_dict.update({k: v for k, v in overrides.items() if v is not None})
        cfg = PretrainConfig.from_dict(cfg_dict)
        vocab = GeneVocabulary.load(d / "vocabulary.tsv")
        tr = cls(out, cfg, vocab, meta["slices"], progress=progress)
        tensors = load_file(str(d / "weights.safetensors"))
        for name, mod in tr.modules().items():
            sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if name in TIED_HEADS:
                sd["word_embeddings.weight"] = tr.encoder.bert.embeddings.word_embeddings.weight.detach()
            mod.load_state_dict(sd, strict=True)
        opt = torch.load(d / "optim.pt", map_location="cpu", weights_only=True)
        tr.opt1.load_state_dict(opt["opt1"])
        tr.opt2.load_state_dict(opt["opt2"])
        torch.set_rng_state(opt["torch_rng"])
        tr.stage, tr.step = int(meta["stage"]), int(meta["step"])
        tr.stage1_done_steps = int(meta.get("stage1_done_steps", 0))
        tr.history = meta["history"]
        tr.seconds = meta.get("seconds", tr.seconds)
        return tr

    # ------------------------------------------------------------ stage 1

    def step_rng(self, stage: int, step: int) -> np.random.Generator:
        """The random stream of one step. Seeded by (seed, stage, step), so a step draws the
        same batch whether the run was resumed or not and whichever loader thread builds it."""
        return np.random.default_rng([int(self.cfg.seed), int(stage), int(step)])

    def stage1_batch(self, corpus: GeneCorpus, step: int) -> dict:
        """The CPU tensors of stage-1 step ``step``: masked sequences, labels, a second view."""
        cfg, v = self.cfg, self.vocabulary
        rng = self.step_rng(1, step)
        rows = rng.choice(len(corpus), size=min(cfg.batch_cells, len(corpus)), replace=False)
        seqs = corpus.sequences(rows)
        ids, attn = _pad(seqs, v.pad_id)
        masked, labels = mask_tokens(ids, rng, mask_prob=cfg.mask_prob, mask_id=v.mask_id, pad_id=v.pad_id,
                                     gene_low=self.gene_low, gene_high=self.gene_high)
        batch = {"ids": ids, "attn": attn, "masked": masked, "labels": labels}
        if cfg.contrastive_weight > 0:
            batch["ids2"], batch["attn2"] = _pad(drop_genes(seqs, rng, cfg.gene_dropout), v.pad_id)
        return batch

    def stage1_update(self, batch: dict) -> dict:
        """One optimisation step of stage 1 on a batch from :meth:`stage1_batch`."""
        cfg = self.cfg
        dev = self.device
        ids, attn, masked, labels = (batch[k].to(dev, non_blocking=True) for k in ("ids", "attn", "masked", "labels"))
        self.encoder.train()
        self.mlm_head.train()
        hidden = self.encoder.bert(masked, attn)
        scored = labels != -100
        # Softmax over the genes present in the batch (in-batch candidates): the panels
        # differ per slice, and the full 17k-gene softmax costs more than the encoder.
        cand = torch.unique(ids[:, 1:][attn[:, 1:].bool()])
        remap = torch.full((self.vocabulary.size,), -1, dtype=torch.long, device=dev)
        remap[cand] = torch.arange(cand.numel(), device=dev)
        logits = self.mlm_head(hidden[scored], cand)
        target = remap[labels[scored]]
        mlm = F.cross_entropy(logits, target)
        loss = mlm
        con = torch.zeros((), device=dev)
        prof = torch.zeros((), device=dev)
        z1 = self.encoder.cell_proj(hidden[:, 0])
        if cfg.profile_weight > 0:
            target_p = profile_targets(ids, attn, remap, cand.numel())
            logp = F.log_softmax(self.profile_head(z1, cand), dim=-1)
            # cross-entropy minus the target's entropy = KL(target || prediction), 0 when perfect
            prof = (target_p * (torch.log(target_p.clamp_min(1e-12)) - logp)).sum(1).mean()
            loss = loss + cfg.profile_weight * prof
        if cfg.contrastive_weight > 0:
            z2 = self.encoder.cell_proj(self.encoder.bert(batch["ids2"].to(dev), batch["attn2"].to(dev))[:, 0])
            con = info_nce(z1, z2, cfg.temperature)
            loss = loss + cfg.contrastive_weight * con
        for g in self.opt1.param_groups:
            g["lr"] = cfg.lr1 * _lr_factor(self.step, cfg.stage1_steps, cfg.warmup_steps, self.time_frac)
        self.opt1.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt1.param_groups for p in g["params"]], 1.0)
        self.opt1.step()
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean()
            # collapse watch: mean cosine between different cells of the batch
            zn = F.normalize(z1.detach(), dim=-1)
            nb = zn.shape[0]
            cell_cos = ((zn @ zn.t()).sum() - nb) / max(1, nb * (nb - 1))
            values = torch.stack([loss.detach(), mlm.detach(), acc, prof.detach(), con.detach(), cell_cos]).cpu().tolist()
        return dict(zip(("loss",) + STAGE1_TERMS, values))

    # ------------------------------------------------------------ stage 2

    def stage2_batch(self, slices: Sequence[SpatialSlice], step: int) -> dict:
        """The CPU tensors of stage-2 step ``step`` (a slice drawn with weight sqrt(n_cells))."""
        rng = self.step_rng(2, step)
        weights = np.sqrt([s.xy.shape[0] for s in slices])
        sl = slices[rng.choice(len(slices), p=weights / weights.sum())]
        batch = make_training_batch(sl, rng, self.cfg)
        batch["slice"] = sl.name
        return batch

    def train_on_batch(self, batch: dict) -> dict:
        """One optimisation step of stage 2 on a batch from :func:`make_training_batch`."""
        cfg = self.cfg
        dev = self.device
        batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else
                     tuple(t.to(dev) for t in v) if isinstance(v, tuple) else v) for k, v in batch.items()}
        self.se2.train()
        self.lm_head.train()
        self.pair_head.train()
        out = self.se2(batch["token_embeddings"], batch["attn_bias"], batch["token_types"], return_pair_rep=True)
        hidden = out["last_hidden_state"][batch["selected"]]
        pred = F.normalize(self.lm_head(hidden), dim=-1)
        cos = 1.0 - (pred * F.normalize(batch["target"], dim=-1)).sum(-1).mean()
        b, i, j = batch["pairs"]
        if b.numel():
            dist_pred = self.pair_head(out["pair_rep"][b, i, j]).squeeze(-1)
            pair = F.mse_loss(dist_pred, batch["pair_target"])
        else:
            pair = torch.zeros((), device=dev)
        loss = cos + cfg.pair_weight * pair
        for g in self.opt2.param_groups:
            g["lr"] = cfg.lr2 * _lr_factor(self.step, cfg.stage2_steps, cfg.warmup_steps, self.time_frac)
        self.opt2.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt2.param_groups for p in g["params"]], 1.0)
        self.opt2.step()
        values = torch.stack([loss.detach(), cos.detach(), pair.detach()]).cpu().tolist()
        row = dict(zip(("loss",) + STAGE2_TERMS, values))
        if "slice" in batch:
            row["slice"] = batch["slice"]
        return row

    # ------------------------------------------------------------ output

    def heads_state(self) -> Dict[str, torch.Tensor]:
        out = {}
        for prefix, mod in (("lm_head", self.lm_head), ("pair_head", self.pair_head)):
            for k, v in mod.state_dict().items():
                out[f"{prefix}.{k}"] = v
        return out

    def export(self, info: dict) -> Path:
        """Write the checkpoint directory (``SToFM.save`` layout + heads + log + curve)."""
        from napari_stofm.model.checkpoint import save_se2_transformer
        from napari_stofm.model.stofm import SToFM

        for mod in self.modules().values():
            mod.to("cpu")
        self.device = torch.device("cpu")
        settings = self.settings
        settings.info = info
        model = SToFM(self.se2, self.encoder, self.vocabulary, settings, source=str(self.out))
        model.save(self.out)
        save_se2_transformer(self.se2, self.out, heads=self.heads_state())
        log_data = {"config": asdict(self.cfg), "slices": self.slices, "history": self.history,
                    "seconds": self.seconds, "info": info}
        (self.out / LOG_NAME).write_text(json.dumps(log_data, indent=1) + "\n")
        plot_losses(self.history, self.out / CURVE_NAME)
        return self.out


# --------------------------------------------------------------------------- plotting


def _smooth(values: Sequence[float], k: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.size == 0 or k <= 1:
        return v
    k = min(k, v.size)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([np.full(k - 1, np.nan), out])


def plot_losses(history: dict, path: PathLike) -> Optional[Path]:
    """Loss curves of both stages as a PNG; skipped with a warning without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss-curve plot (pip install matplotlib)")
        return None
    panels = [("stage1", ("mlm", "profile_kl", "contrastive"), "Stage 1: gene scale"),
              ("stage2", STAGE2_TERMS, "Stage 2: SE(2) transformer")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, terms, title) in zip(axes, panels):
        rows = history.get(key, [])
        ax.set_title(title)
        ax.set_xlabel("step")
        if not rows:
            ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
            continue
        steps = [r["step"] for r in rows]
        k = max(1, len(rows) // 50)
        for term in terms:
            vals = [r.get(term, np.nan) for r in rows]
            line, = ax.plot(steps, vals, alpha=0.25)
            ax.plot(steps, _smooth(vals, k), color=line.get_color(), label=term)
        ax.legend()
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- main entry


class _Line:
    """A one-line stderr progress bar with losses."""

    def __init__(self, stream=None, min_interval: float = 1.0):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0

    def __call__(self, stage: str, step: int, total: int, losses: dict, elapsed: float, force: bool = False):
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        frac = step / max(total, 1)
        bar = "#" * int(round(frac * 20))
        parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        self.stream.write(f"\r{stage} [{bar:<20}] {step}/{total} {elapsed / 60:5.1f} min  {parts}   ")
        if force:
            self.stream.write("\n")
        self.stream.flush()


def _mean_recent(rows: List[dict], keys: Sequence[str], n: int = 50) -> dict:
    recent = rows[-n:]
    out = {}
    for k in keys:
        vals = [r[k] for r in recent if k in r]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def pretrain(
    data: Sequence[PathLike],
    out: PathLike,
    config: Optional[PretrainConfig] = None,
    *,
    resume: bool = False,
    exclude_held_out: bool = True,
    show_progress: bool = True,
    adatas: Optional[Sequence[Tuple[str, object]]] = None,
    resume_overrides: Sequence[str] = (),
) -> Path:
    """Pretrain SToFM on slices and write a checkpoint directory to ``out``.

    ``data`` are slice files or folders (searched for ``*.h5ad``); ``adatas`` may instead
    give ``(name, AnnData)`` pairs already in memory. With ``resume=True`` the run
    continues from ``out/state`` (the stored configuration is used, except the step
    counts, the time budget and the thread count given in ``config``, and the fields named
    in ``resume_overrides``, e.g. the stage-2 batch settings ``train_split_num`` and
    ``batch_subslices``).
    """
    cfg = config or PretrainConfig()
    out = Path(out)
    t_start = time.monotonic()
    torch.set_num_threads(max(1, int(cfg.threads)))
    bar = _Line() if show_progress else (lambda *a, **k: None)

    pack = None
    if resume:
        overrides = {k: getattr(cfg, k) for k in ("stage1_steps", "stage2_steps", "minutes", "threads",
                                                  "checkpoint_minutes", "device", "loader_threads")}
        overrides.update({k: getattr(cfg, k) for k in resume_overrides if k in RESUME_OVERRIDABLE})
        tr = Trainer.resume(out, overrides)
        cfg = tr.cfg
        pack = load_corpus(data, adatas, exclude_held_out, tr.vocabulary, cfg.max_genes)
        if sorted(tr.slices) != sorted(pack.names):
            raise StofmInputError(
                f"the slices differ from those the run in {out} started with ({', '.join(tr.slices)}): "
                "pass the same --data to resume")
        log.info("resuming stage %d at step %d", tr.stage, tr.step)
    else:
        if (out / STATE_DIR / "state.json").is_file():
            raise StofmInputError(f"{out} already holds a pretraining run: pass --resume to continue it, "
                                  "or choose another output folder")
        torch.manual_seed(cfg.seed)
        pack = load_corpus(data, adatas, exclude_held_out, None, cfg.max_genes, min_cells=cfg.min_cells_per_gene)
        if pack.max_genes != cfg.max_genes:
            log.info("max_genes %d comes from the packed corpus", pack.max_genes)
            cfg.max_genes = pack.max_genes
        log.info("vocabulary: %d genes from %d slices", pack.vocabulary.n_genes, len(pack.names))
        tr = Trainer(out, cfg, pack.vocabulary, pack.names)
    names, tokenized = pack.names, pack.tokenized
    log.info("training on %s", tr.device)
    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    last_ckpt = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - t_start

    def maybe_checkpoint(force: bool = False):
        nonlocal last_ckpt
        if force or time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            tr.save_state()
            last_ckpt = time.monotonic()

    # ---------------- stage 1
    if tr.stage == 1:
        gcorpus = GeneCorpus(tokenized, names)
        log.info("stage 1: %d cells", len(gcorpus))
        stage_budget = None if budget is None else budget * cfg.stage1_share
        t0 = time.monotonic()
        loader = prefetched(lambda k: tr.stage1_batch(gcorpus, k), tr.step, cfg.loader_threads)
        while tr.step < cfg.stage1_steps:
            if stage_budget is not None and elapsed() > stage_budget:
                log.info("stage 1 stops at step %d: its time budget is spent", tr.step)
                break
            if stage_budget is not None:
                tr.time_frac = (time.monotonic() - t0) / max(1.0, stage_budget - (t0 - t_start))
            row = tr.stage1_update(next(loader))
            tr.step += 1
            row["step"] = tr.step
            row["seconds"] = round(tr.seconds["stage1"] + time.monotonic() - t0, 2)
            tr.history["stage1"].append(row)
            bar("stage 1", tr.step, cfg.stage1_steps, _mean_recent(tr.history["stage1"], STAGE1_TERMS, 20),
                elapsed())
            maybe_checkpoint()
        bar("stage 1", tr.step, cfg.stage1_steps, _mean_recent(tr.history["stage1"], STAGE1_TERMS, 20),
            elapsed(), force=True)
        loader.close()
        tr.seconds["stage1"] += time.monotonic() - t0
        tr.stage1_done_steps = tr.step
        tr.stage, tr.step = 2, 0
        maybe_checkpoint(force=True)

    # ---------------- stage 2
    spatial = prepare_spatial_slices(names, pack.xy, tokenized, tr, seed=cfg.seed)
    t0 = time.monotonic()
    tr.time_frac = 0.0
    loader = prefetched(lambda k: tr.stage2_batch(spatial, k), tr.step, cfg.loader_threads)
    while tr.step < cfg.stage2_steps:
        if budget is not None and elapsed() > budget:
            log.info("stage 2 stops at step %d: the time budget is spent", tr.step)
            break
        if budget is not None:
            tr.time_frac = (time.monotonic() - t0) / max(1.0, budget - (t0 - t_start))
        row = tr.train_on_batch(next(loader))
        tr.step += 1
        row["step"] = tr.step
        row["seconds"] = round(tr.seconds["stage2"] + time.monotonic() - t0, 2)
        tr.history["stage2"].append(row)
        bar("stage 2", tr.step, cfg.stage2_steps, _mean_recent(tr.history["stage2"], STAGE2_TERMS, 20), elapsed())
        maybe_checkpoint()
    bar("stage 2", tr.step, cfg.stage2_steps, _mean_recent(tr.history["stage2"], STAGE2_TERMS, 20), elapsed(),
        force=True)
    loader.close()
    tr.seconds["stage2"] += time.monotonic() - t0
    maybe_checkpoint(force=True)

    info = {
        "training_slices": names,
        "held_out_excluded": list(HELD_OUT_SLICES) if exclude_held_out else [],
        "stage1_steps": tr.stage1_done_steps,
        "stage2_steps": tr.step,
        "stage3": "not run (joint fine-tuning is not part of this recipe)",
        "final_losses": {"stage1": _mean_recent(tr.history["stage1"], STAGE1_TERMS),
                         "stage2": _mean_recent(tr.history["stage2"], STAGE2_TERMS)},
        "seed": cfg.seed,
        "minutes": round((tr.seconds["stage1"] + tr.seconds["stage2"]) / 60, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "vocabulary_genes": tr.vocabulary.n_genes,
        "recipe": "napari_stofm.training.pretrain",
    }
    return tr.export(info)


def load_corpus(data: Sequence[PathLike], adatas, exclude_held_out: bool, vocabulary, max_genes: int,
                min_cells: int = 10):
    """The training slices as a :class:`~.packed_corpus.PackedCorpus`.

    ``data`` is one packed corpus (``.npz``) or slice files / folders (``adatas`` may give
    ``(name, AnnData)`` pairs instead). ``vocabulary`` None builds one from the slices (a
    pack brings its own); a given vocabulary must be the pack's (on resume).
    """
    from napari_stofm.training.packed import is_packed_corpus, load_packed_corpus, pack_slices
    from napari_stofm.genes.vocabulary import build_vocabulary

    if adatas is None and any(is_packed_corpus(d) for d in data):
        if len(data) != 1:
            raise StofmInputError("a packed corpus (.npz) must be passed alone to --data")
        pack = load_packed_corpus(data[0])
        if exclude_held_out:
            check_not_held_out(pack.names)
        if vocabulary is not None and list(vocabulary.tokens) != list(pack.vocabulary.tokens):
            raise StofmInputError(f"{data[0]}: its vocabulary is not the one this run started with; "
                                  "resume with the same --data")
        return pack
    if adatas is not None:
        names = [n for n, _ in adatas]
        if exclude_held_out:
            check_not_held_out(names)
        objs = [a for _, a in adatas]
    else:
        paths, skipped = find_slices(data, exclude_held_out=exclude_held_out)
        for p in skipped:
            log.info("held out, not used: %s", slice_name(p))
        corpus = read_corpus(paths)
        names, objs = [c.name for c in corpus], [c.adata for c in corpus]
    if vocabulary is None:
        vocabulary = build_vocabulary(objs, min_cells=min_cells)
    return pack_slices(names, objs, vocabulary, max_genes)


def pack_corpus(data: Sequence[PathLike], path: PathLike, max_genes: int = 255, min_cells: int = 10,
                exclude_held_out: bool = True) -> Path:
    """Read slices, build their vocabulary and tokens, and write them to one ``.npz`` (see
    :mod:`.packed_corpus`); :func:`pretrain` then trains from that file alone."""
    pack = load_corpus(data, None, exclude_held_out, None, max_genes, min_cells=min_cells)
    return pack.save(path)


def prepare_spatial_slices(names: Sequence[str], xys: Sequence[np.ndarray], tokenized, tr: Trainer,
                           seed: int = 0) -> List[SpatialSlice]:
    """Frozen cell embeddings and Leiden virtual-cell assignments of every slice (once;
    kept in ``state/stage2_inputs.npz`` so that a resumed run does not recompute them)."""
    cache = tr.out / STATE_DIR / "stage2_inputs.npz"
    key = f"{tr.stage1_done_steps}:{seed}:" + ",".join(names)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return [SpatialSlice(str(z[f"name{i}"]), z[f"xy{i}"], z[f"emb{i}"], z[f"assign{i}"])
                        for i in range(int(z["n"]))]
    log.info("stage 2: embedding the cells of %d slices with the frozen encoder", len(names))
    tr.encoder.eval()
    out = []
    for name, xy_all, tok in zip(names, xys, tokenized):
        emb = tr.encoder.encode(tok, batch_size=128 if tr.device.type == "cpu" else 1024, device=tr.device)
        ok = ~np.asarray(tok.empty, dtype=bool)
        xy = np.asarray(xy_all, dtype=np.float64)[:, :2][ok]
        emb = emb[ok]
        if xy.shape[0] < 20:
            log.warning("%s: fewer than 20 cells with vocabulary genes; not used in stage 2", name)
            continue
        hyper = build_hypernodes(normalize_coordinates(xy), emb, alpha=tr.settings.hypernode_alpha,
                                 resolution=tr.settings.hypernode_resolution,
                                 max_hypernodes=tr.settings.max_hypernodes, seed=seed)
        out.append(SpatialSlice(name, xy, emb, hyper.assignment))
    if not out:
        raise StofmInputError("no slice has enough cells for the SE(2) stage")
    arrays = {"key": np.array(key), "n": np.array(len(out))}
    for i, sl in enumerate(out):
        arrays.update({f"name{i}": np.array(sl.name), f"xy{i}": sl.xy, f"emb{i}": sl.embeddings,
                       f"assign{i}": sl.assignment})
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache.with_suffix(".tmp.npz"), **arrays)
    cache.with_suffix(".tmp.npz").replace(cache)
    return out
