"""The training heads and the loss pieces they need. Stage 1: :class:`MLMHead` (masked gene
tokens) and :class:`ProfileHead` (the cell's rank-weighted gene distribution, targets from
:func:`profile_targets`), both tied to the encoder's word embeddings, plus :func:`info_nce`
between two views of the same cells. Stage 2: the SE(2) transformer's ``lm_head`` (masked
cell embeddings) and ``pair_head`` (cell distances), saved with the checkpoint.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# built where the context readout (X_stofm read through them) needs them too
from napari_stofm.model.readout import make_lm_head, make_niche_head  # noqa: F401

# --------------------------------------------------------------------------- stage 1


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


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views (rows of ``a`` and ``b`` are the same cells)."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# --------------------------------------------------------------------------- stage 2


def make_pair_head(heads: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(heads, heads), nn.ReLU(), nn.Linear(heads, 1))
