"""Pretraining on several processes: ``torchrun --nproc_per_node=N -m napari_stofm.cli pretrain ...``
(or ``torchrun --nproc_per_node=N $(which stofm) pretrain ...``), data-parallel with
``DistributedDataParallel``: gloo on the CPU, nccl on GPUs (process ``LOCAL_RANK`` trains on
``cuda:LOCAL_RANK``).

The configured batch sizes (``batch_cells``, ``batch_subslices``) are the *global* batch. Every
process draws the same global batch from the step's seeded generator (``Trainer.step_rng``) and
keeps its own contiguous share of it (:func:`shard_stage1`, :func:`shard_stage2`), so N
processes see exactly the batches one process sees. Each loss term is a mean over items (masked
genes, cells, selected cells, cell pairs): a process computes its share of the *global* mean
(its sum divided by the global count, :class:`ShardMeans`); terms that compare the items of the
batch with each other (the contrastive term, the collapse watch, the centring of the niche
predictions) gather what they need across the processes with gradients. Backpropagating
``world x share`` and letting DDP average the gradients gives the gradient of the one-process
loss, and the logged losses are the sums of the shares (the global values, the same on every
process). With dropout off (``--dropout 0``) N processes reproduce one process's losses up to
float rounding (but see stage 2 below); with dropout on, each process draws its masks from its
own seeded stream.

Only process 0 writes files (checkpoints, the stage-2 input cache, the trained checkpoint, the
training log and loss curve, a packed corpus); the others wait at a barrier and then read what
it wrote. Decisions taken from the clock (time budget, schedule under ``--minutes``, when to
checkpoint) are process 0's, broadcast to the others. Without ``WORLD_SIZE`` (or with 1) none of
this is used: one process trains exactly as before.

Stage 2 reads frozen cell embeddings and their Leiden virtual cells, computed once from the
encoder stage 1 trained. The virtual cells are a discontinuous function of that encoder: the
rounding by which N processes' stage 1 differs from one process's (about 1e-7) can move a few
cells to another virtual cell, and stage 2 then trains on slightly different inputs (the same
recipe; losses alike, not equal). Its losses match one process's to float rounding when the
stage-2 inputs are the same: with ``stage1_steps=0`` (e.g. stage 2 alone from ``init_from``), or
from the same ``OUT/state/stage2_inputs.npz``.

Each process builds the whole global batch and keeps its share, so building batches costs every
process what it costs one (``--loader-threads`` overlaps it with training on a GPU).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from napari_stofm.errors import StofmError, StofmInputError

#: how long a process waits for the others at a collective (process 0 alone reads and packs the
#: slices or embeds them for stage 2 while the others wait)
TIMEOUT = timedelta(minutes=120)


def launched_world() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def launched_rank() -> int:
    """This process's rank among them (``RANK``; 0 without torchrun)."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text in (None, ""):
        return default
    try:
        return int(text)
    except ValueError:
        raise StofmInputError(f"the environment variable {name}={text!r} is not an integer: start the "
                              "processes with torchrun, which sets it") from None


def rank_device(device: Optional[str], local_rank: int) -> torch.device:
    """The device process ``local_rank`` trains on: ``cuda:LOCAL_RANK`` for ``'cuda'`` / ``'auto'``
    (with a GPU), the CPU for ``'cpu'``."""
    name = "auto" if device in (None, "") else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise StofmInputError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'auto'") from None
    if dev.type != "cuda":
        raise StofmInputError(f"training on several processes runs on the CPU (gloo) or on CUDA GPUs (nccl), not "
                              f"on {name!r}: pass --device cpu or --device cuda")
    if dev.index is not None and dev.index != local_rank:
        raise StofmInputError(f"under torchrun each process trains on the GPU of its LOCAL_RANK (cuda:{local_rank} "
                              f"here), not on {name}: pass --device cuda (or auto); choose the GPUs with "
                              "CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise StofmInputError("device 'cuda' was asked for but no CUDA GPU is available here: pass --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise StofmInputError(f"process LOCAL_RANK={local_rank} has no GPU (this node has "
                              f"{torch.cuda.device_count()}): start at most that many processes per node "
                              "(torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


@dataclass
class Distributed:
    """The process group one pretraining run uses (``world == 1``: a single process, no group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None  # where this process trains (None: as the config says)
    backend: Optional[str] = None
    owned: bool = False  # the group was created here (and is destroyed by :meth:`close`)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where the small tensors of the collectives live (nccl only moves GPU tensors)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes (every process gets it)."""
        if self.active:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def agree(self, *values: float) -> Sequence[float]:
        """Process 0's ``values`` on every process (the values themselves with one process)."""
        if not self.active:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.broadcast(t, src=0)
        return t.cpu().tolist()

    def gather_objects(self, obj) -> List:
        """``obj`` of every process, in rank order."""
        if not self.active:
            return [obj]
        out: List = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def run_on_main(self, fn: Callable[[], object]):
        """``fn()`` on process 0 only; the others wait for it, and fail with its error if it fails.
        Returns ``fn()``'s value on process 0, None elsewhere."""
        if not self.active:
            return fn()
        result, error, message = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - passed on to the other processes, then raised
                error = exc
                message = (type(exc).__name__, str(exc), isinstance(exc, StofmError))
        box = [message]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            name, text, ours = box[0]
            if ours:
                raise StofmInputError(text)
            raise RuntimeError(f"process 0 failed ({name}: {text})")
        return result

    def close(self, ok: bool = True) -> None:
        """Wait for every process (``ok``), then destroy the group if it was created here."""
        if self.owned and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
        self.owned = False

    # ------------------------------------------------------------ modules

    def wrap(self, objective: "Objective") -> nn.Module:
        """``objective`` in ``DistributedDataParallel`` (parameters broadcast from process 0)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # every parameter of an objective gets a gradient at every step (the modules a configuration
        # does not train are left out of it, and a term with nothing to score in a process's share
        # still runs its head on an empty selection): no search for unused parameters needed.
        # (The recipe's modules hold no buffers: nothing for DDP to broadcast per step.)
        return DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=False)


SINGLE = Distributed()


def setup(device: Optional[str] = None) -> Distributed:
    """The process group of this run: under torchrun (``WORLD_SIZE`` > 1) it is created here
    (gloo on the CPU, nccl on CUDA, ``torch.cuda.set_device(LOCAL_RANK)``) unless the caller
    already created one; otherwise :data:`SINGLE` (one process, nothing to set up).

    ``device``: what the run trains on (``'cpu'``, ``'cuda'``, ``'auto'``); None for a group used
    only to wait for process 0 (packing a corpus)."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            return SINGLE
        local = _env_int("LOCAL_RANK", rank)
        backend = str(dist.get_backend())
        if device is None:
            dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
        else:
            dev = rank_device(device, local)
            if (backend == "nccl") != (dev.type == "cuda"):
                raise StofmInputError(f"the process group already created uses {backend}, which cannot train on "
                                      f"{dev}: use nccl for CUDA GPUs and gloo for the CPU")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return Distributed(rank, world, local, dev, backend, owned=False)
    world = launched_world()
    if world <= 1:
        return SINGLE
    if not dist.is_available():
        raise StofmInputError("this PyTorch build has no torch.distributed: train in one process (without "
                              "torchrun), or install a PyTorch with distributed support")
    rank, local = launched_rank(), _env_int("LOCAL_RANK", 0)
    dev = torch.device("cpu") if device is None else rank_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = dev
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return Distributed(dist.get_rank(), dist.get_world_size(), local, dev, backend, owned=True)


def check_batches(cfg, world: int) -> None:
    """The global batches of ``cfg`` must split evenly over ``world`` processes."""
    if world <= 1:
        return
    for field, flag, what in (("batch_cells", "--batch-cells", "cells of a stage-1 step"),
                              ("batch_subslices", "--batch-subslices", "sub-slices of a stage-2 step")):
        n = int(getattr(cfg, field))
        if n % world:
            fit = max(world, n // world * world)
            raise StofmInputError(
                f"{flag} {n}: the {what} are the global batch, shared by the {world} processes torchrun started, "
                f"so it must be a multiple of {world}: pass {flag} {fit} (or another multiple of {world}), or start "
                f"a number of processes that divides {n}")


def check_stage1_batch(n_rows: int, cfg, world: int, corpus_cells: int) -> None:
    """A stage-1 batch capped by a small corpus must still split evenly."""
    if world > 1 and n_rows % world:
        fit = n_rows // world * world
        raise StofmInputError(
            f"the corpus has {corpus_cells} cells, fewer than --batch-cells {cfg.batch_cells}, and a stage-1 batch of "
            f"{n_rows} cells does not split over {world} processes: pass --batch-cells {max(world, fit)}")


def rank_seed(seed: int, rank: int, stage: int = 0, step: int = 0) -> int:
    """A torch seed for process ``rank`` (its dropout stream), from the run's seed."""
    return int(np.random.SeedSequence([int(seed), 11, int(rank), int(stage), int(step)]).generate_state(1)[0])


def rng_state(device: torch.device) -> dict:
    """This process's torch random state (the CPU's, and its GPU's when it trains on one)."""
    state = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- shares of a batch


def _share(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``n`` items process ``rank`` keeps (blocks differ by one at most)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_stage1(batch: dict, rank: int, world: int) -> dict:
    """Process ``rank``'s share of a stage-1 batch (equal blocks of cells, :func:`check_stage1_batch`),
    with the global candidate genes and counts the loss needs."""
    ids, attn, labels = batch["ids"], batch["attn"], batch["labels"]
    n = ids.shape[0]
    rows = _share(n, rank, world)
    out = {k: v[rows.start:rows.stop] for k, v in batch.items()}
    # the masked-gene softmax runs over the genes of the whole batch, as in one process
    out["cand"] = torch.unique(ids[:, 1:][attn[:, 1:].bool()])
    out["counts"] = {"scored": int((labels != -100).sum()), "cells": n}
    return out


#: the stage-2 batch keys with one row per sub-slice (``make_training_batch``)
_PER_SUBSLICE = ("token_embeddings", "attn_bias", "token_types", "indices", "spatial", "selected", "cells",
                 "unmasked")
#: the flat targets, concatenated in sub-slice order, and the mask whose rows count them
_FLAT = {"target": "selected", "niche_target": "cells", "unmasked_target": "unmasked", "neighbour_pos": "cells"}


def shard_stage2(batch: dict, rank: int, world: int) -> dict:
    """Process ``rank``'s share of a stage-2 batch: a contiguous block of its sub-slices with
    their targets and cell pairs, and the global counts the loss means divide by.

    A batch with fewer sub-slices than processes (a small slice) leaves some processes without
    one: they get the first sub-slice with nothing selected, so they run the same computation
    and contribute zero.
    """
    known = set(_PER_SUBSLICE) | set(_FLAT) | {"pairs", "pair_target", "slice"}
    unknown = set(batch) - known
    if unknown:
        raise KeyError(f"shard_stage2 does not know how to split {sorted(unknown)}: add them to its tables")
    b = batch["token_embeddings"].shape[0]
    block = _share(b, rank, world)
    empty = len(block) == 0
    lo, hi = (0, 1) if empty else (block.start, block.stop)
    out = {k: batch[k][lo:hi].clone() if empty else batch[k][lo:hi] for k in _PER_SUBSLICE}
    for key, mask in _FLAT.items():
        per = batch[mask].sum(1)
        start, stop = int(per[:lo].sum()), int(per[:hi].sum())
        out[key] = batch[key][start:start if empty else stop]
    pb, pi, pj = batch["pairs"]
    keep = torch.zeros_like(pb, dtype=torch.bool) if empty else (pb >= lo) & (pb < hi)
    out["pairs"] = (pb[keep] - lo, pi[keep], pj[keep])
    out["pair_target"] = batch["pair_target"][keep]
    if empty:
        for k in ("selected", "cells", "unmasked"):
            out[k][:] = False
    if "slice" in batch:
        out["slice"] = batch["slice"]
    nt = batch["niche_target"]
    out["counts"] = {"selected": int(batch["selected"].sum()), "pairs": int(batch["pair_target"].numel()),
                     "cells": int(nt.shape[0]), "niche": int(nt.shape[0] * nt.shape[1]),
                     "unmasked": int(batch["unmasked"].sum())}
    return out


# --------------------------------------------------------------------------- global means


class _GatherRows(torch.autograd.Function):
    """The rows of every process's (equal-sized) tensor, in rank order; the gradient of a
    process's rows is the sum of the gradients every process's loss gives them."""

    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


class _SumAcross(torch.autograd.Function):
    """The sum of a tensor over the processes, differentiable (its gradient is summed likewise)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class LocalMeans:
    """The means of the loss terms in one process (what the recipe always computed)."""

    sharded = False

    @staticmethod
    def mean(x: torch.Tensor, key: str) -> torch.Tensor:
        return x.mean()

    @staticmethod
    def one_minus_mean(x: torch.Tensor, key: str) -> torch.Tensor:
        return 1.0 - x.mean()

    @staticmethod
    def cross_entropy(logits: torch.Tensor, target: torch.Tensor, key: str) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, target)

    @staticmethod
    def mse(pred: torch.Tensor, target: torch.Tensor, key: str) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred, target)

    @staticmethod
    def centre(x: torch.Tensor, key: str) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)

    @staticmethod
    def whole(fn: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
        return fn(*rows)


class ShardMeans:
    """This process's share of each global mean: its items' sum over the global count (shares
    summed over the processes give the one-process means)."""

    sharded = True

    def __init__(self, counts: Dict[str, int]):
        self.counts = counts
        self.world = dist.get_world_size()

    def _n(self, key: str) -> float:
        return float(max(1, self.counts[key]))  # nothing to score anywhere: the term is 0

    def mean(self, x, key):
        return x.sum() / self._n(key)

    def one_minus_mean(self, x, key):
        return (x.numel() - x.sum()) / self._n(key)

    def cross_entropy(self, logits, target, key):
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum") / self._n(key)

    def mse(self, pred, target, key):
        return ((pred - target) ** 2).sum() / self._n(key)

    def centre(self, x, key):
        return x - _SumAcross.apply(x.sum(0, keepdim=True)) / self._n(key)

    def whole(self, fn, *rows):
        """``fn`` on the rows of every process (the same value everywhere): a share of 1 / world."""
        return fn(*(_GatherRows.apply(r) for r in rows)) / self.world


LOCAL = LocalMeans()


def means_for(batch: dict):
    """How the loss terms of ``batch`` are averaged: a share of the global batch (from
    :func:`shard_stage1` / :func:`shard_stage2`) or a whole batch."""
    counts = batch.get("counts")
    return LOCAL if counts is None else ShardMeans(counts)


class Objective(nn.Module):
    """One stage's loss as one module for DDP to wrap: ``loss_fn(batch)`` -> ``(share, terms)``
    and ``modules``, the modules whose parameters it trains (what DDP averages the gradients of).
    Returns ``(world x share, terms)``, the share of the loss in ``terms['loss']``."""

    def __init__(self, loss_fn: Callable[[dict], tuple], modules: Dict[str, nn.Module], world: int):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.loss_fn = loss_fn
        self.world = world

    def forward(self, batch: dict):
        loss, terms = self.loss_fn(batch)
        return loss * self.world, {"loss": loss, **terms}
