"""The SToFM pretraining recipe (torch + numpy; no napari): :class:`Trainer` holds the model,
the heads, the optimisers and the loss history of one run and makes its optimisation steps;
:func:`pretrain` runs both stages on a corpus, checkpointing as it goes, and writes the result.

Two stages, as in the paper, run on the CPU in minutes for a small model (or on a GPU with
``device="cuda"``; the recipe never needs one):

1. **Gene scale.** The cell encoder's BERT learns masked gene-token modelling on
   rank-value sequences: 15 % of the gene tokens of a cell are chosen (80 % replaced by
   ``<mask>``, 10 % by a random gene, 10 % kept) and predicted by a head tied to the word
   embeddings (cross-entropy over the genes present in the batch). The masked-gene loss
   never reads the ``<cls>`` output, so two terms train the cell embedding (the
   ``cell_proj`` output of ``<cls>``):

   * **profile reconstruction** (weight ``profile_weight``): from the embedding of the
     masked sequence, :class:`~.heads.ProfileHead` predicts the cell's whole gene distribution,
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
     cell (MSE);
   * niche prediction (weight ``niche_weight``, 0 by default: the bundled weights were
     trained without it; see the model card's v3 attempt): from *every* cell token's output,
     ``niche_head`` predicts the mean input embedding of the cell's 10 and 40 nearest cells
     (itself excluded), centred on the slice's mean embedding, the predictions centred on
     theirs (cosine per scale). The two
     terms above score only the few selected cells and ask for their own embedding or
     distances; this one asks each cell's output to say what surrounds it, which is what
     tissue regions are read from;
   * self reconstruction (weight ``self_weight``, 0 by default): ``lm_head`` on every unmasked cell's output
     gives back its own input embedding (cosine), so the output keeps the cell's state beside
     its niche;
   * spatial agreement (weight ``neighbour_weight``, 0 by default): every cell token's output,
     L2-normalised, must pick out one of its ``neighbour_k`` nearest cells (drawn per step)
     among the other cell tokens of its sub-slice (InfoNCE): the output itself, not a head's
     reading of it, is asked to vary with the tissue around the cell.

   ``init_from`` starts a run from a checkpoint (its vocabulary, sizes, encoder, SE(2)
   transformer and heads); with ``stage1_steps=0`` only stage 2 trains.

Joint fine-tuning of both (the paper's third stage) is not part of this recipe.

Every step draws its batch from its own numpy ``Generator`` seeded by (seed, stage, step),
so batches do not depend on resuming or on ``loader_threads`` (threads that build the next
batches while the model trains, worth it on a GPU). Slices can be read here and trained on
elsewhere through a packed corpus (:mod:`.packed`, :func:`~.corpus.pack_corpus`).

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
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_stofm.errors import StofmInputError
from napari_stofm.training import distributed
from napari_stofm.training.batches import drop_genes, make_training_batch, mask_tokens, pad_sequences, prefetched
from napari_stofm.training.config import RESUME_OVERRIDABLE, STATE_DIR, PretrainConfig
from napari_stofm.training.corpus import HELD_OUT_SLICES, GeneCorpus, SpatialSlice, load_corpus, prepare_spatial_slices
from napari_stofm.training.heads import (
    MLMHead,
    ProfileHead,
    info_nce,
    make_lm_head,
    make_niche_head,
    make_pair_head,
    profile_targets,
)
from napari_stofm.training.report import (
    CURVE_NAME,
    LOG_NAME,
    STAGE1_TERMS,
    STAGE2_TERMS,
    ProgressLine,
    mean_recent,
    plot_losses,
)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

TIED_HEADS = ("mlm_head", "profile_head")  # their decoder is the encoder's word embeddings (not saved twice)


# --------------------------------------------------------------------------- training state


def _lr_factor(step: int, total: int, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % over the steps (or over the time budget,
    whichever runs out first)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


class Trainer:
    """Holds the model, the heads, the optimisers and the loss history of one run."""

    def __init__(self, out: Path, cfg: PretrainConfig, vocabulary, slices: Sequence[str],
                 progress: Optional[Callable[[str], None]] = None):
        from napari_stofm.model.stofm import PipelineSettings, build_model

        self.out = Path(out)
        self.cfg = cfg
        self.vocabulary = vocabulary
        self.slices = list(slices)
        if cfg.readout == "context" and cfg.niche_weight <= 0:
            raise StofmInputError("readout 'context' reads X_stofm through the niche head, which a run with "
                                  "niche_weight 0 does not train: give a niche weight (e.g. 2) or readout 'hidden'")
        self.settings = PipelineSettings(split_num=cfg.split_num, split_mode="spatial", max_genes=cfg.max_genes,
                                         gene_windows=cfg.gene_windows, name=cfg.name)
        model = build_model(
            vocabulary,
            encoder_config=dict(hidden_size=cfg.bert_hidden, num_hidden_layers=cfg.bert_layers,
                                num_attention_heads=cfg.bert_heads, intermediate_size=cfg.bert_intermediate,
                                max_position_embeddings=cfg.max_genes + 1,
                                attention_probs_dropout_prob=cfg.attention_dropout, hidden_dropout_prob=cfg.dropout),
            se2_config=dict(num_hidden_layers=cfg.se2_layers, embedding_dim=cfg.se2_dim,
                            ffn_embedding_dim=cfg.se2_ffn, num_attention_heads=cfg.se2_heads,
                            gaussian_hidden_dim=cfg.se2_gaussians, attention_scope=cfg.se2_attention,
                            attention_dropout=cfg.attention_dropout,
                            dropout=cfg.dropout, activation_dropout=cfg.dropout),
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
        self.niche_head = make_niche_head(cfg.se2_dim, self.encoder.embedding_dim, len(cfg.niche_neighbours))
        from napari_stofm.model.stofm import resolve_device

        self.device = resolve_device(cfg.device)
        for mod in self.modules().values():
            mod.to(self.device)
        self.opt1 = torch.optim.AdamW(list(self.encoder.parameters())
                                      + [p for head in (self.mlm_head, self.profile_head)
                                         for n, p in head.named_parameters() if not n.startswith("word_embeddings")],
                                      lr=cfg.lr1, weight_decay=cfg.weight_decay)
        self.opt2 = torch.optim.AdamW(list(self.se2.parameters()) + list(self.lm_head.parameters())
                                      + list(self.pair_head.parameters()) + list(self.niche_head.parameters()),
                                      lr=cfg.lr2, weight_decay=cfg.weight_decay)
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
        # several processes (torchrun): the process group, the DDP-wrapped objective of each stage,
        # and the random states of every process read from a checkpoint
        self.dist = distributed.SINGLE
        self.objectives: Dict[int, nn.Module] = {}
        self.rank_rng: Optional[list] = None

    # ------------------------------------------------------------ state I/O

    def modules(self) -> Dict[str, nn.Module]:
        return {"encoder": self.encoder, "se2": self.se2, "mlm_head": self.mlm_head,
                "profile_head": self.profile_head, "lm_head": self.lm_head, "pair_head": self.pair_head,
                "niche_head": self.niche_head}

    def save_state(self, rank_rng: Optional[list] = None) -> None:
        """Write the resumable state to ``OUT/state/`` (``rank_rng``: the random states of every
        process of a multi-process run, in rank order)."""
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
        optim = {"opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(), "torch_rng": torch.get_rng_state()}
        if rank_rng is not None:
            optim["rank_rng"] = rank_rng
        torch.save(optim, d / "optim.tmp")
        meta = {"stage": self.stage, "step": self.step, "stage1_done_steps": self.stage1_done_steps,
                "history": self.history, "seconds": self.seconds,
                "config": asdict(self.cfg), "slices": self.slices}
        (d / "state.tmp").write_text(json.dumps(meta))
        self.vocabulary.save(d / "vocabulary.tsv")
        for tmp, final in (("weights.tmp", "weights.safetensors"), ("optim.tmp", "optim.pt"),
                           ("state.tmp", "state.json")):
            (d / tmp).replace(d / final)

    def checkpoint(self) -> None:
        """:meth:`save_state`; with several processes, process 0 writes the state (with every
        process's random state) while the others wait."""
        if not self.dist.active:
            self.save_state()
            return
        states = self.dist.gather_objects(distributed.rng_state(self.device))
        if self.dist.is_main:
            self.save_state(rank_rng=states)
        self.dist.barrier()

    def use_processes(self, ctx: "distributed.Distributed") -> None:
        """Train as one of ``ctx.world`` processes: this one's share of every batch, gradients
        averaged by DDP, the logged losses those of the global batch. Each process gets its own
        dropout stream: the one saved for it by a checkpoint of a run with as many processes, else
        one seeded from (seed, rank, stage, step)."""
        self.dist = ctx
        if not ctx.active:
            return
        states = self.rank_rng
        if states is not None and len(states) == ctx.world:
            distributed.set_rng_state(states[ctx.rank], self.device)
        else:
            if states is not None:
                log.info("the checkpoint was written by %d processes, not %d: the dropout streams start anew",
                         len(states), ctx.world)
            torch.manual_seed(distributed.rank_seed(self.cfg.seed, ctx.rank, self.stage, self.step))

    def objective(self, stage: int) -> nn.Module:
        """The DDP-wrapped loss of ``stage`` (built on first use; every process calls it at the
        same step). It holds exactly the modules whose parameters the configuration trains (DDP
        then needs no search for unused ones): ``cell_proj`` only with the profile or contrastive
        term (the masked-gene term never reads it), the profile and niche heads only when weighted."""
        if stage not in self.objectives:
            cfg, size, dev = self.cfg, self.vocabulary.size, self.device
            if stage == 1:
                mods = {"bert": self.encoder.bert, "mlm_head": self.mlm_head}
                if cfg.profile_weight > 0 or cfg.contrastive_weight > 0:
                    mods["cell_proj"] = self.encoder.cell_proj
                if cfg.profile_weight > 0:
                    mods["profile_head"] = self.profile_head

                def fn(batch):
                    return stage1_loss(self.encoder, self.mlm_head, self.profile_head, batch, cfg, size, dev)
            else:
                mods = {"se2": self.se2, "lm_head": self.lm_head, "pair_head": self.pair_head}
                if cfg.niche_weight > 0:
                    mods["niche_head"] = self.niche_head

                def fn(batch):
                    return stage2_loss(self.se2, self.stage2_heads(), batch, cfg)
            # one stage's wrapper at a time: stage 1's is let go when stage 2 starts
            self.objectives = {stage: self.dist.wrap(distributed.Objective(fn, mods, self.dist.world))}
        return self.objectives[stage]

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
        tr.rank_rng = opt.get("rank_rng")
        tr.stage, tr.step = int(meta["stage"]), int(meta["step"])
        tr.stage1_done_steps = int(meta.get("stage1_done_steps", 0))
        tr.history = meta["history"]
        tr.seconds = meta.get("seconds", tr.seconds)
        return tr

    def start_from(self, path: PathLike, model=None) -> None:
        """Load a checkpoint's cell encoder, SE(2) transformer and pretraining heads (those it
        holds) into this run's modules; the shapes must match (:func:`init_config` sets them).
        ``model``: the checkpoint already loaded (it is then not read again)."""
        from napari_stofm.model.checkpoint import load_se2_transformer
        from napari_stofm.model.stofm import load_model

        path = init_path(path)
        model = model if model is not None else load_model(path)
        _, heads = load_se2_transformer(path, return_heads=True)
        self.encoder.load_state_dict(model.cell_encoder.state_dict(), strict=True)
        self.se2.load_state_dict(model.se2.state_dict(), strict=True)
        for prefix, mod in (("lm_head", self.lm_head), ("pair_head", self.pair_head),
                            ("niche_head", self.niche_head)):
            sd = {k[len(prefix) + 1:]: v for k, v in heads.items() if k.startswith(prefix + ".")}
            if sd and all(sd[k].shape == v.shape for k, v in mod.state_dict().items() if k in sd):
                mod.load_state_dict(sd, strict=True)
        for mod in self.modules().values():
            mod.to(self.device)

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
        ids, attn = pad_sequences(seqs, v.pad_id)
        masked, labels = mask_tokens(ids, rng, mask_prob=cfg.mask_prob, mask_id=v.mask_id, pad_id=v.pad_id,
                                     gene_low=self.gene_low, gene_high=self.gene_high)
        batch = {"ids": ids, "attn": attn, "masked": masked, "labels": labels}
        if cfg.contrastive_weight > 0:
            batch["ids2"], batch["attn2"] = pad_sequences(drop_genes(seqs, rng, cfg.gene_dropout), v.pad_id)
        if self.dist.active:  # every process drew the same global batch; it keeps its share
            return distributed.shard_stage1(batch, self.dist.rank, self.dist.world)
        return batch

    def stage1_update(self, batch: dict) -> dict:
        """One optimisation step of stage 1 on a batch from :meth:`stage1_batch`."""
        cfg = self.cfg
        self.encoder.train()
        self.mlm_head.train()
        if self.dist.active:
            loss, terms = self.objective(1)(batch)
        else:
            loss, terms = stage1_loss(self.encoder, self.mlm_head, self.profile_head, batch, cfg, self.vocabulary.size,
                                      self.device)
        for g in self.opt1.param_groups:
            g["lr"] = cfg.lr1 * _lr_factor(self.step, cfg.stage1_steps, cfg.warmup_steps, self.time_frac)
        self.opt1.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt1.param_groups for p in g["params"]], 1.0)
        self.opt1.step()
        values = torch.stack([terms.get("loss", loss).detach()] + [terms[k].detach() for k in STAGE1_TERMS])
        values = self.dist.all_sum(values).cpu().tolist()
        return dict(zip(("loss",) + STAGE1_TERMS, values, strict=True))

    # ------------------------------------------------------------ stage 2

    def stage2_batch(self, slices: Sequence[SpatialSlice], step: int) -> dict:
        """The CPU tensors of stage-2 step ``step`` (a slice drawn with weight sqrt(n_cells))."""
        rng = self.step_rng(2, step)
        weights = np.sqrt([s.xy.shape[0] for s in slices])
        sl = slices[rng.choice(len(slices), p=weights / weights.sum())]
        batch = make_training_batch(sl, rng, self.cfg)
        batch["slice"] = sl.name
        if self.dist.active:  # every process drew the same global batch; it keeps its share
            return distributed.shard_stage2(batch, self.dist.rank, self.dist.world)
        return batch

    def train_on_batch(self, batch: dict) -> dict:
        """One optimisation step of stage 2 on a batch from :func:`make_training_batch`."""
        cfg = self.cfg
        for g in self.opt2.param_groups:
            g["lr"] = cfg.lr2 * _lr_factor(self.step, cfg.stage2_steps, cfg.warmup_steps, self.time_frac)
        if self.dist.active:
            return stage2_step(self.se2, self.stage2_heads(), self.opt2, batch, cfg, self.device,
                               objective=self.objective(2), reduce=self.dist.all_sum)
        return stage2_step(self.se2, self.stage2_heads(), self.opt2, batch, cfg, self.device)

    def stage2_heads(self) -> Dict[str, nn.Module]:
        return {"lm_head": self.lm_head, "pair_head": self.pair_head, "niche_head": self.niche_head}

    # ------------------------------------------------------------ output

    def heads_state(self) -> Dict[str, torch.Tensor]:
        out = {}
        heads = [("lm_head", self.lm_head), ("pair_head", self.pair_head)]
        if self.cfg.niche_weight > 0:  # an untrained niche head is not worth shipping
            heads.append(("niche_head", self.niche_head))
        for prefix, mod in heads:
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
        settings.readout = self.cfg.readout
        readout = None
        if settings.readout == "context":
            from napari_stofm.model.readout import ContextReadout

            readout = ContextReadout.from_modules(self.lm_head, self.niche_head, self.se2.config.embedding_dim,
                                                  self.encoder.embedding_dim, str(self.out))
        model = SToFM(self.se2, self.encoder, self.vocabulary, settings, source=str(self.out), readout=readout)
        model.save(self.out)
        save_se2_transformer(self.se2, self.out, heads=self.heads_state())
        log_data = {"config": asdict(self.cfg), "slices": self.slices, "history": self.history,
                    "seconds": self.seconds, "info": info}
        (self.out / LOG_NAME).write_text(json.dumps(log_data, indent=1) + "\n")
        plot_losses(self.history, self.out / CURVE_NAME)
        return self.out


# --------------------------------------------------------------------------- stage-1 loss


def stage1_loss(encoder: nn.Module, mlm_head: nn.Module, profile_head: Optional[nn.Module], batch: dict,
                cfg: PretrainConfig, vocab_size: int, device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The stage-1 objective on one batch from :meth:`Trainer.stage1_batch`: masked-gene
    cross-entropy + ``profile_weight`` x profile KL + ``contrastive_weight`` x InfoNCE. Returns
    the total and each term of ``STAGE1_TERMS`` (accuracy and collapse watch without gradient).
    A share of a multi-process batch (:func:`~.distributed.shard_stage1`) gives its share of them."""
    dev = device
    red = distributed.means_for(batch)
    ids, attn, masked, labels = (batch[k].to(dev, non_blocking=True) for k in ("ids", "attn", "masked", "labels"))
    hidden = encoder.bert(masked, attn)
    scored = labels != -100
    # Softmax over the genes present in the batch (in-batch candidates): the panels
    # differ per slice, and the full 17k-gene softmax costs more than the encoder.
    cand = batch["cand"].to(dev) if "cand" in batch else torch.unique(ids[:, 1:][attn[:, 1:].bool()])
    remap = torch.full((vocab_size,), -1, dtype=torch.long, device=dev)
    remap[cand] = torch.arange(cand.numel(), device=dev)
    logits = mlm_head(hidden[scored], cand)
    target = remap[labels[scored]]
    mlm = red.cross_entropy(logits, target, "scored")
    loss = mlm
    con = torch.zeros((), device=dev)
    prof = torch.zeros((), device=dev)
    z1 = encoder.cell_proj(hidden[:, 0])
    if cfg.profile_weight > 0:
        target_p = profile_targets(ids, attn, remap, cand.numel())
        logp = F.log_softmax(profile_head(z1, cand), dim=-1)
        # cross-entropy minus the target's entropy = KL(target || prediction), 0 when perfect
        prof = red.mean((target_p * (torch.log(target_p.clamp_min(1e-12)) - logp)).sum(1), "cells")
        loss = loss + cfg.profile_weight * prof
    if cfg.contrastive_weight > 0:
        z2 = encoder.cell_proj(encoder.bert(batch["ids2"].to(dev), batch["attn2"].to(dev))[:, 0])
        con = red.whole(lambda a, b: info_nce(a, b, cfg.temperature), z1, z2)
        loss = loss + cfg.contrastive_weight * con
    with torch.no_grad():
        acc = red.mean((logits.argmax(-1) == target).float(), "scored")
        # collapse watch: mean cosine between different cells of the batch
        cell_cos = red.whole(_mean_cross_cosine, F.normalize(z1.detach(), dim=-1))
    return loss, {"mlm": mlm, "mlm_acc": acc, "profile_kl": prof, "contrastive": con, "cell_cos": cell_cos}


def _mean_cross_cosine(zn: torch.Tensor) -> torch.Tensor:
    nb = zn.shape[0]
    return ((zn @ zn.t()).sum() - nb) / max(1, nb * (nb - 1))


# --------------------------------------------------------------------------- stage-2 step


def stage2_loss(se2: nn.Module, heads: Dict[str, nn.Module], batch: dict, cfg: PretrainConfig
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The stage-2 objective on one batch (already on the model's device): masked-cell
    cosine + ``pair_weight`` x pair-distance MSE + ``niche_weight`` x niche cosine +
    ``self_weight`` x unmasked-cell reconstruction. Returns the total and each term.

    A share of a multi-process batch (:func:`~.distributed.shard_stage2`) gives its share of
    the global means; every head then runs, on an empty selection if need be, so that all
    processes run the same computation."""
    dev = batch["token_embeddings"].device
    red = distributed.means_for(batch)
    out = se2(batch["token_embeddings"], batch["attn_bias"], batch["token_types"], return_pair_rep=True)
    last = out["last_hidden_state"]
    lm_head = heads["lm_head"]
    pred = F.normalize(lm_head(last[batch["selected"]]), dim=-1)
    cos = red.one_minus_mean((pred * F.normalize(batch["target"], dim=-1)).sum(-1), "selected")
    b, i, j = batch["pairs"]
    zero = torch.zeros((), device=dev)
    pair = red.mse(heads["pair_head"](out["pair_rep"][b, i, j]).squeeze(-1), batch["pair_target"], "pairs") \
        if b.numel() or red.sharded else zero
    niche = self_rec = zero
    if cfg.niche_weight > 0 and (batch["niche_target"].numel() or red.sharded):
        h = last[batch["cells"]]
        pred_n = heads["niche_head"](h).view(h.shape[0], len(cfg.niche_neighbours), batch["niche_target"].shape[-1])
        # the targets are centred on the slice's mean (a batch holds one slice); so are the
        # predictions: the head is asked how a cell's surroundings differ from the slice's
        # average, which it can read off the tokens, not the average itself, which it cannot
        pred_n = red.centre(pred_n, "cells")
        niche = red.one_minus_mean(F.cosine_similarity(pred_n, batch["niche_target"], dim=-1, eps=1e-6), "niche")
    if cfg.self_weight > 0 and (batch["unmasked_target"].numel() or red.sharded):
        pred_s = F.normalize(lm_head(last[batch["unmasked"]]), dim=-1)
        self_rec = red.one_minus_mean((pred_s * F.normalize(batch["unmasked_target"], dim=-1)).sum(-1), "unmasked")
    agree = zero
    if cfg.neighbour_weight > 0 and (batch["neighbour_pos"].numel() or red.sharded):
        agree = red.cross_entropy(neighbour_logits(last, batch["cells"], cfg.neighbour_temperature),
                                  batch["neighbour_pos"], "cells")
    loss = cos + cfg.pair_weight * pair + cfg.niche_weight * niche + cfg.self_weight * self_rec \
        + cfg.neighbour_weight * agree
    return loss, {"cosine": cos, "pair_mse": pair, "niche": niche, "self": self_rec, "neighbour": agree}


def neighbour_logits(last: torch.Tensor, cells: torch.Tensor, temperature: float) -> torch.Tensor:
    """(cell tokens, L): each cell token's cosine to every token of its sub-slice over
    ``temperature``, kept only for the sub-slice's other cell tokens (-inf elsewhere: itself,
    CLS, virtual cells, padding). Rows in the order of ``cells`` (sub-slice, then token); a cell
    alone in its sub-slice is compared with itself."""
    z = F.normalize(last, dim=-1)
    logits = z @ z.transpose(1, 2) / temperature
    eye = torch.eye(last.shape[1], dtype=torch.bool, device=last.device)[None]
    others = cells[:, None, :] & ~eye
    # a cell alone in its sub-slice keeps its own logit (its positive, then): a loss of 0, not inf
    others |= eye & ~others.any(-1, keepdim=True)
    return logits.masked_fill(~others, float("-inf"))[cells]


def stage2_step(se2: nn.Module, heads: Dict[str, nn.Module], opt: torch.optim.Optimizer, batch: dict,
                cfg: PretrainConfig, device, objective: Optional[nn.Module] = None,
                reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """One optimisation step of the stage-2 objective (learning rates as set in ``opt``);
    returns the loss terms as floats (and the batch's slice name). ``objective``: the loss as a
    (DDP-wrapped) :class:`~.distributed.Objective` instead of :func:`stage2_loss`; ``reduce``:
    what sums the logged terms over the processes."""
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else
                 tuple(t.to(device) for t in v) if isinstance(v, tuple) else v) for k, v in batch.items()}
    se2.train()
    for head in heads.values():
        head.train()
    loss, terms = stage2_loss(se2, heads, batch, cfg) if objective is None else objective(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    values = torch.stack([terms.get("loss", loss).detach()] + [terms[k].detach() for k in STAGE2_TERMS])
    if reduce is not None:
        values = reduce(values)
    values = values.cpu().tolist()
    row = dict(zip(("loss",) + STAGE2_TERMS, values, strict=True))
    if "slice" in batch:
        row["slice"] = batch["slice"]
    return row


# --------------------------------------------------------------------------- main entry


def init_path(init_from: PathLike) -> Path:
    """The checkpoint folder ``init_from`` names (``'bundled'``: the bundled weights)."""
    from napari_stofm.model.stofm import BUNDLED_DIR

    return BUNDLED_DIR if str(init_from) == "bundled" else Path(init_from)


def init_config(cfg: PretrainConfig):
    """Set the model sizes of ``cfg`` to those of the checkpoint ``cfg.init_from`` and return
    that checkpoint, loaded (the corpus is tokenized with its vocabulary)."""
    from napari_stofm.model.stofm import load_model

    model = load_model(init_path(cfg.init_from))
    enc = model.cell_encoder.config
    se2 = model.se2.config if hasattr(model.se2, "config") else None
    get = enc.get if hasattr(enc, "get") else (lambda k, d=None: getattr(enc, k, d))
    cfg.bert_hidden, cfg.bert_layers = int(get("hidden_size")), int(get("num_hidden_layers"))
    cfg.bert_heads, cfg.bert_intermediate = int(get("num_attention_heads")), int(get("intermediate_size"))
    cfg.max_genes = int(get("max_position_embeddings")) - 1
    cfg.gene_windows = int(model.settings.gene_windows)  # how its gene scale reads long cells
    if se2 is not None:
        sget = se2.get if hasattr(se2, "get") else (lambda k, d=None: getattr(se2, k, d))
        cfg.se2_layers, cfg.se2_dim = int(sget("num_hidden_layers")), int(sget("embedding_dim"))
        cfg.se2_ffn, cfg.se2_heads = int(sget("ffn_embedding_dim")), int(sget("num_attention_heads"))
        cfg.se2_gaussians = int(sget("gaussian_hidden_dim"))
    return model


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

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), each process trains on its share of every
    global batch and only process 0 writes (see :mod:`.distributed`); every process returns
    ``out``.
    """
    cfg = config or PretrainConfig()
    if not resume:  # before the processes wait for each other: a bad batch size fails at once
        distributed.check_batches(cfg, distributed.launched_world())
    ctx = distributed.setup(cfg.device)
    try:
        result = _pretrain(ctx, data, Path(out), cfg, resume=resume, exclude_held_out=exclude_held_out,
                           show_progress=show_progress, adatas=adatas, resume_overrides=resume_overrides)
    except BaseException:
        ctx.close(ok=False)
        raise
    ctx.close()
    return result


def _pretrain(ctx: "distributed.Distributed", data, out: Path, cfg: PretrainConfig, *, resume, exclude_held_out,
              show_progress, adatas, resume_overrides) -> Path:
    t_start = time.monotonic()
    torch.set_num_threads(max(1, int(cfg.threads)))
    bar = ProgressLine() if show_progress and ctx.is_main else (lambda *a, **k: None)
    if ctx.active:
        cfg.device = str(ctx.device)  # cuda:LOCAL_RANK or cpu

    pack = None
    if resume:
        overrides = {k: getattr(cfg, k) for k in ("stage1_steps", "stage2_steps", "minutes", "threads",
                                                  "checkpoint_minutes", "device", "loader_threads")}
        overrides.update({k: getattr(cfg, k) for k in resume_overrides if k in RESUME_OVERRIDABLE})
        tr = Trainer.resume(out, overrides)
        cfg = tr.cfg
        distributed.check_batches(cfg, ctx.world)
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
        start = init_config(cfg) if cfg.init_from else None
        pack = load_corpus(data, adatas, exclude_held_out, None if start is None else start.vocabulary,
                           cfg.max_genes, min_cells=cfg.min_cells_per_gene)
        if pack.max_genes != cfg.max_genes:
            log.info("max_genes %d comes from the packed corpus", pack.max_genes)
            cfg.max_genes = pack.max_genes
        log.info("vocabulary: %d genes from %d slices", pack.vocabulary.n_genes, len(pack.names))
        tr = Trainer(out, cfg, pack.vocabulary, pack.names)
        if cfg.init_from:
            tr.start_from(cfg.init_from, start)
            log.info("starting from %s", cfg.init_from)
    tr.use_processes(ctx)
    ctx.barrier()  # every process has read the state (or seen there is none) before process 0 writes any
    names, tokenized = pack.names, pack.tokenized
    log.info("training on %s%s", tr.device, f" (process {ctx.rank} of {ctx.world})" if ctx.active else "")
    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    last_ckpt = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - t_start

    def maybe_checkpoint(force: bool = False):
        nonlocal last_ckpt
        due = force or time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60
        if not force and ctx.active:
            due = bool(ctx.agree(due)[0])  # process 0's clock decides for all
        if due:
            tr.checkpoint()
            last_ckpt = time.monotonic()

    def clock(stage_budget: float, t0: float) -> Tuple[bool, float]:
        """(budget spent, share of it spent): process 0's, with several processes."""
        spent = elapsed() > stage_budget
        frac = (time.monotonic() - t0) / max(1.0, stage_budget - (t0 - t_start))
        spent, frac = ctx.agree(spent, frac)
        return bool(spent), frac

    # ---------------- stage 1
    if tr.stage == 1:
        gcorpus = GeneCorpus(tokenized, names)
        log.info("stage 1: %d cells", len(gcorpus))
        distributed.check_stage1_batch(min(cfg.batch_cells, len(gcorpus)), cfg, ctx.world, len(gcorpus))
        stage_budget = None if budget is None else budget * cfg.stage1_share
        t0 = time.monotonic()
        loader = prefetched(lambda k: tr.stage1_batch(gcorpus, k), tr.step, cfg.loader_threads)
        while tr.step < cfg.stage1_steps:
            if stage_budget is not None:
                spent, frac = clock(stage_budget, t0)
                if spent:
                    log.info("stage 1 stops at step %d: its time budget is spent", tr.step)
                    break
                tr.time_frac = frac
            row = tr.stage1_update(next(loader))
            tr.step += 1
            row["step"] = tr.step
            row["seconds"] = round(tr.seconds["stage1"] + time.monotonic() - t0, 2)
            tr.history["stage1"].append(row)
            bar("stage 1", tr.step, cfg.stage1_steps, mean_recent(tr.history["stage1"], STAGE1_TERMS, 20),
                elapsed())
            maybe_checkpoint()
        bar("stage 1", tr.step, cfg.stage1_steps, mean_recent(tr.history["stage1"], STAGE1_TERMS, 20),
            elapsed(), force=True)
        loader.close()
        tr.seconds["stage1"] += time.monotonic() - t0
        tr.stage1_done_steps = tr.step
        tr.stage, tr.step = 2, 0
        maybe_checkpoint(force=True)

    # ---------------- stage 2
    def stage2_inputs(cache_only: bool = False):
        return prepare_spatial_slices(names, pack.xy, tokenized, encoder=tr.encoder, device=tr.device,
                                      settings=tr.settings, out_dir=tr.out, stage1_steps=tr.stage1_done_steps,
                                      seed=cfg.seed, cache_only=cache_only)

    # with several processes, process 0 embeds the cells and writes the cache the others read
    spatial = ctx.run_on_main(stage2_inputs)
    if not ctx.is_main:
        spatial = stage2_inputs(cache_only=True)
    t0 = time.monotonic()
    tr.time_frac = 0.0
    loader = prefetched(lambda k: tr.stage2_batch(spatial, k), tr.step, cfg.loader_threads)
    while tr.step < cfg.stage2_steps:
        if budget is not None:
            spent, frac = clock(budget, t0)
            if spent:
                log.info("stage 2 stops at step %d: the time budget is spent", tr.step)
                break
            tr.time_frac = frac
        row = tr.train_on_batch(next(loader))
        tr.step += 1
        row["step"] = tr.step
        row["seconds"] = round(tr.seconds["stage2"] + time.monotonic() - t0, 2)
        tr.history["stage2"].append(row)
        bar("stage 2", tr.step, cfg.stage2_steps, mean_recent(tr.history["stage2"], STAGE2_TERMS, 20), elapsed())
        maybe_checkpoint()
    bar("stage 2", tr.step, cfg.stage2_steps, mean_recent(tr.history["stage2"], STAGE2_TERMS, 20), elapsed(),
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
        "final_losses": {"stage1": mean_recent(tr.history["stage1"], STAGE1_TERMS),
                         "stage2": mean_recent(tr.history["stage2"], STAGE2_TERMS)},
        "seed": cfg.seed,
        "minutes": round((tr.seconds["stage1"] + tr.seconds["stage2"]) / 60, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "vocabulary_genes": tr.vocabulary.n_genes,
        "recipe": "napari_stofm.training",
    }
    if ctx.active:
        info["processes"] = ctx.world
    result = ctx.run_on_main(lambda: tr.export(info))
    return out if result is None else result
