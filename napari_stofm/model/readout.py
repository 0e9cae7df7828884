"""What ``obsm['X_stofm']`` is read from: the SE(2) transformer's output tokens, one way or another.

``readout`` in a checkpoint's ``stofm.json`` picks one of :data:`READOUTS`:

- ``"hidden"`` (the published computation, and the default): the transformer's last hidden
  state, ``embedding_dim`` numbers per cell.
- ``"context"``: the transformer's own stage-2 heads read each cell's output token: the cell's
  reconstructed state (``lm_head``, the masked-cell head) and its predicted niche, the mean
  input embedding of its nearest cells at each trained scale (``niche_head``). The niche
  predictions are centred on the slice's mean, as they were trained, and each part is
  unit-normalised, so that the cell's own state and each scale of its surroundings weigh
  the same; the parts are concatenated, ``(1 + scales) x input_dim`` numbers per cell.

Why a second readout: a transformer trained to predict its cells' niches carries them in its
output, but in a minor share of the hidden state's variance, under the cell's own state
(see the model card); a clustering or a classifier on the hidden state then reads mostly the
cell. The context readout gives the niche as much weight as the cell. Measured so far (the
model card's v5 attempt, 1,111 CPU steps of the niche term): worse than the hidden state,
because the heads' niche prediction is still weak; the bundled weights read the hidden state.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch import nn

from napari_stofm.errors import CheckpointError

READOUTS = ("hidden", "context")


def make_lm_head(e: int, input_dim: int) -> nn.Sequential:
    """Stage 2's masked-cell head: an output token (``e``) -> the cell's input embedding."""
    return nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, input_dim))


def make_niche_head(e: int, input_dim: int, scales: int) -> nn.Sequential:
    """Predicts, from a cell's output token, the mean input embedding of its neighbours at
    each of ``scales`` neighbourhood sizes (concatenated)."""
    return nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, input_dim * scales))


class ContextReadout(nn.Module):
    """``lm_head`` + ``niche_head`` of stage 2 (:func:`make_lm_head`, :func:`make_niche_head`)."""

    def __init__(self, embedding_dim: int, input_dim: int, scales: int):
        super().__init__()
        self.input_dim = int(input_dim)
        self.scales = int(scales)
        self.lm_head = make_lm_head(embedding_dim, input_dim)
        self.niche_head = make_niche_head(embedding_dim, input_dim, scales)

    @property
    def dim(self) -> int:
        """Numbers per cell in the finished readout."""
        return (1 + self.scales) * self.input_dim

    @classmethod
    def from_heads(cls, heads: Dict[str, torch.Tensor], embedding_dim: int, input_dim: int,
                   source: str) -> "ContextReadout":
        """The readout from a checkpoint's saved pretraining heads (``lm_head.*``, ``niche_head.*``)."""
        need = ("lm_head.0.weight", "lm_head.2.weight", "niche_head.0.weight", "niche_head.2.weight")
        missing = [k for k in need if k not in heads]
        if missing:
            raise CheckpointError(
                f"{source}: stofm.json asks for readout 'context', but the SE(2) weights have no "
                f"{', '.join(missing)} (a checkpoint trained with a niche term carries them); set "
                "\"readout\": \"hidden\" in stofm.json to read the transformer's hidden state instead")
        out_rows = int(heads["niche_head.2.weight"].shape[0])
        if out_rows % input_dim:
            raise CheckpointError(f"{source}: niche_head.2.weight has {out_rows} rows, not a multiple of the "
                                  f"cell embedding size {input_dim}; the checkpoint is damaged")
        readout = cls(embedding_dim, input_dim, out_rows // input_dim)
        state = {k: v for k, v in heads.items() if k.startswith(("lm_head.", "niche_head."))}
        try:
            readout.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: the readout heads do not fit the transformer ({exc})") from None
        return readout.eval()

    @classmethod
    def from_modules(cls, lm_head: nn.Module, niche_head: nn.Module, embedding_dim: int, input_dim: int,
                     source: str) -> "ContextReadout":
        """The readout from a run's own (trained or adapted) heads; they are copied, not shared."""
        named = (("lm_head", lm_head), ("niche_head", niche_head))
        tensors = {f"{name}.{k}": v.detach().clone() for name, head in named for k, v in head.state_dict().items()}
        return cls.from_heads(tensors, embedding_dim, input_dim, source)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(cells, 1 + scales, input_dim): the raw self reconstruction and niche predictions."""
        own = self.lm_head(hidden).unsqueeze(1)
        niche = self.niche_head(hidden).view(hidden.shape[0], self.scales, self.input_dim)
        return torch.cat([own, niche], dim=1)


def finish_context(parts: np.ndarray) -> np.ndarray:
    """(cells, 1 + scales, D) raw readout of a whole slice -> (cells, (1 + scales) x D), in place:
    niche predictions centred on the slice's mean (the training target was centred too), every
    part unit-normalised."""
    if parts.shape[0]:
        parts[:, 1:] -= parts[:, 1:].mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.linalg.norm(parts, axis=2, keepdims=True)
    np.maximum(norms, 1e-6, out=norms)
    parts /= norms
    return parts.reshape(parts.shape[0], -1)
