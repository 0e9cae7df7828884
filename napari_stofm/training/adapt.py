"""Per-slice adaptation, label-free: the stage-2 self-supervised objective (masked cells, pair
distances, niches; :func:`~.trainer.stage2_loss`) continued on the user's own slice for a
bounded time, then that slice is embedded with the adapted SE(2) transformer.

The model passed in is never changed: :func:`adapt_model` trains a copy of its SE(2)
transformer and returns a new :class:`~napari_stofm.model.stofm.SToFM` that shares the
(frozen) cell encoder and vocabulary. The heads come from the checkpoint when it holds them
(``se2transformer.safetensors``); a term whose head the checkpoint lacks is left out.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report

#: adaptation learning rate: a fifth of stage 2's, constant (a short run from trained weights)
ADAPT_LR_SHARE = 0.2


def adapt_config():
    """The objective adaptation continues: every stage-2 term (those whose head the
    checkpoint lacks are then switched off), the recipe's batch settings."""
    from napari_stofm.training.config import PretrainConfig

    return PretrainConfig(niche_weight=2.0, self_weight=0.5)


#: the fewest cells with a gene-scale embedding a slice needs to be adapted on
MIN_ADAPT_CELLS = 50


@dataclass
class Adaptation:
    """What :func:`adapt_model` did (written to ``uns['stofm']['adaptation']``)."""

    seconds: float
    steps: int
    first_loss: Optional[float]
    last_loss: Optional[float]
    terms: tuple

    def as_dict(self) -> Dict[str, object]:
        return dict(seconds=round(self.seconds, 2), steps=self.steps, first_loss=self.first_loss,
                    last_loss=self.last_loss, terms=list(self.terms))


def _checkpoint_heads(model, cfg):
    """The pretraining heads of ``model``'s checkpoint directory (fresh ones when it has none)
    and the config with the terms whose head is missing switched off."""
    from napari_stofm.model.checkpoint import load_se2_transformer
    from napari_stofm.training.heads import make_lm_head, make_niche_head, make_pair_head

    e, d, h = model.se2.config.embedding_dim, model.cell_encoder.embedding_dim, model.se2.config.num_attention_heads
    heads = {"lm_head": make_lm_head(e, d), "pair_head": make_pair_head(h),
             "niche_head": make_niche_head(e, d, len(cfg.niche_neighbours))}
    stored: Dict[str, torch.Tensor] = {}
    source = Path(str(model.source))
    if source.is_dir():
        try:
            _, stored = load_se2_transformer(source, return_heads=True)
        except Exception:  # noqa: BLE001 - a checkpoint without readable heads adapts with fresh ones
            stored = {}
    found = set()
    for name, head in heads.items():
        sd = {k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(name + ".")}
        want = head.state_dict()
        if sd.keys() == want.keys() and all(sd[k].shape == want[k].shape for k in want):
            head.load_state_dict(sd)
            found.add(name)
    # a freshly initialised head would pull the trained transformer towards noise
    cfg = replace(cfg,
                  niche_weight=cfg.niche_weight if "niche_head" in found else 0.0,
                  self_weight=cfg.self_weight if "lm_head" in found else 0.0,
                  pair_weight=cfg.pair_weight if "pair_head" in found else 0.0)
    return heads, cfg, found


def adapt_model(
    model,
    cell_embeddings: np.ndarray,
    xy: np.ndarray,
    seconds: float,
    *,
    seed: int = 0,
    config=None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
):
    """``(adapted model, Adaptation)``: ``model``'s SE(2) transformer trained for ``seconds``
    on one slice (its gene-scale embeddings and positions), starting from its weights."""
    from napari_stofm.checks import number
    from napari_stofm.errors import StofmInputError
    from napari_stofm.model.multiscale import build_hypernodes, normalize_coordinates
    from napari_stofm.model.stofm import SToFM
    from napari_stofm.training.batches import make_training_batch
    from napari_stofm.training.corpus import SpatialSlice
    from napari_stofm.training.trainer import stage2_step

    seconds = number(seconds, "adapt", minimum=0.0, exclusive_minimum=True,
                     fix="the seconds of per-slice adaptation, e.g. 60 (0 turns it off)")
    cfg = config or adapt_config()
    emb = np.asarray(cell_embeddings, dtype=np.float32)
    ok = np.any(emb != 0, axis=1)
    if int(ok.sum()) < MIN_ADAPT_CELLS:
        raise StofmInputError(f"adaptation needs at least {MIN_ADAPT_CELLS} cells with vocabulary genes; this slice "
                              f"has {int(ok.sum())}: embed it without adapt")
    pos = np.asarray(xy, dtype=np.float64)[:, :2][ok]
    emb = emb[ok]
    settings = model.settings
    hyper = build_hypernodes(normalize_coordinates(pos), emb, alpha=settings.hypernode_alpha,
                             resolution=settings.hypernode_resolution, max_hypernodes=settings.max_hypernodes,
                             seed=seed)
    sl = SpatialSlice("slice", pos, emb, hyper.assignment)
    device = model.device
    se2 = copy.deepcopy(model.se2).to(device)
    heads, cfg, found = _checkpoint_heads(model, cfg)
    if "lm_head" not in found:
        raise StofmInputError(
            f"the weights in {model.source} carry no pretraining heads (lm_head.* in se2transformer.safetensors), "
            "which adaptation trains with: embed without adapt, or use weights saved by stofm pretrain "
            "(the bundled weights have them)")
    for head in heads.values():
        head.to(device)
    params = list(se2.parameters()) + [p for head in heads.values() for p in head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr2 * ADAPT_LR_SHARE, weight_decay=cfg.weight_decay)
    torch.manual_seed(seed)
    t0 = time.monotonic()
    losses = []
    step = 0
    report(progress, 0, 1, "Adapting to the slice")
    while time.monotonic() - t0 < seconds:
        check_cancelled(cancel)
        batch = make_training_batch(sl, np.random.default_rng([int(seed), 3, step]), cfg)
        row = stage2_step(se2, heads, opt, batch, cfg, device)
        losses.append(float(row["loss"]))
        step += 1
        report(progress, min(time.monotonic() - t0, seconds), seconds, "Adapting to the slice")
    se2.eval()
    terms = ("cosine",) + tuple(t for t, w in (("pair_mse", cfg.pair_weight), ("niche", cfg.niche_weight),
                                               ("self", cfg.self_weight)) if w > 0)
    info = Adaptation(seconds=time.monotonic() - t0, steps=step, first_loss=losses[0] if losses else None,
                      last_loss=float(np.mean(losses[-5:])) if losses else None, terms=terms)
    readout = None
    if model.readout is not None:  # X_stofm is read through the heads: the adapted ones
        from napari_stofm.model.readout import ContextReadout

        readout = ContextReadout.from_modules(heads["lm_head"], heads["niche_head"], model.se2.config.embedding_dim,
                                              model.cell_encoder.embedding_dim, str(model.source)).to(device)
    adapted = SToFM(se2, model.cell_encoder, model.vocabulary, model.settings,
                    source=f"{model.source} (adapted for {info.seconds:.0f} s, {step} steps)", readout=readout)
    return adapted, info
