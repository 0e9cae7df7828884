"""The SE(2) transformer of SToFM, with the published parameter names.

Geometry enters only through pairwise distances: a distance matrix goes through the
Gaussian basis kernel into a per-head additive attention bias. Each layer's pre-softmax
attention logits (bias included, masked keys set to 0) become the next layer's bias, and
the last layer's logits are the pair representation (Uni-Mol style).

Numerics follow the published model (post-LayerNorm by default, exact-erf GELU, padding
masked as keys only, ``encoder.final_layer_norm`` held but never applied). What differs
is *how* the same numbers are computed (each checked against the straightforward form in
the tests):

* the Gaussian kernel is not evaluated on the dense (B, L, L, K) tensor: all non-neighbour
  pairs share one distance, CLS pairs and the diagonal are 0, the virtual cells' rows and
  columns are evaluated as blocks (mirrored), and the few neighbour pairs left one by one;
  its exponent is clamped where exp would leave float32's normal range (no change to the
  result, a 2x change to the stage's time on x86 CPUs);
* padded keys are masked as one slice per padded sub-slice, not a pass over (B, H, L, L);
* attention logits are formed with one fused ``baddbmm`` (bias + q k^T).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from napari_stofm.model.config import SToFMConfig

_ACT = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "silu": F.silu,
}

_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: the distance the published rules give to non-neighbour pairs
FAR = 100.0

# Distances evaluated at once by the kernel (keeps the (chunk, K) scratch in cache).
_KERNEL_CHUNK = 4096
# The Gaussians' exponent is clamped here: exp(-60) ~ 1e-26 is zero to float32 precision
# in every sum it enters, while exp of anything below about -87 is a subnormal float (or an
# underflow), which x86 CPUs handle ~50-80x slower, in the exp and in the MLP that reads it.
# A kernel far from a distance made the whole SE(2) stage about twice as slow.
_MIN_EXPONENT = -60.0


class GaussianKernel(nn.Module):
    """Distance -> per-head attention bias: 1->1 linear map, K Gaussians, MLP to heads."""

    def __init__(self, config: SToFMConfig):
        super().__init__()
        k = config.gaussian_hidden_dim
        self.K = k
        self.num_heads = config.num_attention_heads
        self.linear = nn.Linear(1, 1)
        self.means = nn.Embedding(1, k)
        self.stds = nn.Embedding(1, k)
        self.proj = nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Linear(k, config.num_attention_heads))

    def basis(self, d: torch.Tensor) -> torch.Tensor:
        """The kernel on a vector of distances: (N,) -> (N, heads), before zero-masking.

        Evaluated in cache-sized chunks with in-place operations (the dense formula, up to
        float rounding: exponents below ``_MIN_EXPONENT`` are clamped, see there).
        """
        std = self.stds.weight.float().view(-1).abs() + 1e-5
        inv_std = 1.0 / std
        scale = 1.0 / (_SQRT_2PI * std)
        mean = self.means.weight.float().view(-1)
        w, b = self.linear.weight.view(()), self.linear.bias.view(())
        out = torch.empty(d.shape[0], self.num_heads, dtype=scale.dtype, device=d.device)
        for start in range(0, d.shape[0], _KERNEL_CHUNK):
            x = (d[start : start + _KERNEL_CHUNK] * w + b).unsqueeze(-1)
            if torch.is_grad_enabled():  # training: autograd needs the intermediate values
                g = torch.exp((((x - mean) * inv_std).square() * -0.5).clamp(min=_MIN_EXPONENT)) * scale
            else:
                g = torch.exp((x - mean).mul_(inv_std).square_().mul_(-0.5).clamp_(min=_MIN_EXPONENT)).mul_(scale)
            out[start : start + _KERNEL_CHUNK] = self.proj(g)
        return out

    def forward(self, dist: torch.Tensor, block_span: Optional[slice] = None) -> torch.Tensor:
        """(B, L, L) distances -> (B, heads, L, L) bias, zero wherever the distance is 0.

        Same numbers as :meth:`dense_forward`, evaluated on few values: every pair at the
        far distance (100) shares one kernel value, pairs at distance 0 get 0, and only the
        remaining (neighbour and virtual-cell) pairs are evaluated one by one.

        ``block_span`` names token positions (the virtual cells, whose every pair has its own
        distance) whose rows and columns are evaluated as whole blocks, the columns mirrored
        from the rows where the distances are symmetric. It changes the cost, not the result.
        """
        b, l, _ = dist.shape
        dtype = self.proj[0].weight.dtype
        far = dist == FAR
        far_value = self.basis(torch.tensor([FAR], dtype=dtype, device=dist.device))[0]  # (H,)
        out = (far.unsqueeze(1).to(dtype) * far_value.view(1, -1, 1, 1)).contiguous()
        rest = ~far & (dist != 0)
        blocks = block_span is not None and block_span.stop > block_span.start
        if blocks:
            rows = dist[:, block_span, :]  # (B, h, L)
            row_block = self._dense_block(rows)  # (B, h, L, H)
            out[:, :, block_span, :] = row_block.permute(0, 3, 1, 2)
            cols = dist[:, :, block_span].transpose(1, 2)
            col_block = row_block if torch.equal(cols, rows) else self._dense_block(cols)
            out[:, :, :, block_span] = col_block.permute(0, 3, 2, 1)
            rest[:, block_span, :] = False
            rest[:, :, block_span] = False
        bi, ii, jj = rest.nonzero(as_tuple=True)
        if bi.numel():
            values = dist[bi, ii, jj].to(dtype)
            if blocks:  # few pairs left (each cell's neighbours): evaluated directly
                out[bi, :, ii, jj] = self.basis(values)
            else:  # many repeated values (the virtual cells' pairs seen from both sides)
                values, inverse = torch.unique(values, return_inverse=True)
                out[bi, :, ii, jj] = self.basis(values)[inverse]
        return out

    def _dense_block(self, d: torch.Tensor) -> torch.Tensor:
        """(B, h, L) distances -> (B, h, L, heads) kernel values, 0 where the distance is 0."""
        values = self.basis(d.reshape(-1).to(self.proj[0].weight.dtype)).view(*d.shape, -1)
        return values.masked_fill_(d.unsqueeze(-1) == 0, 0.0)

    def dense_forward(self, dist: torch.Tensor) -> torch.Tensor:
        """The published dense evaluation over a (B, L, L, K) tensor (reference and benchmark)."""
        zero_mask = dist.eq(0.0)
        x = self.linear(dist.unsqueeze(-1)).expand(-1, -1, -1, self.K)
        mean = self.means.weight.float().view(-1)
        std = self.stds.weight.float().view(-1).abs() + 1e-5
        x = torch.exp(-0.5 * (((x - mean) / std) ** 2)) / (_SQRT_2PI * std)
        x = self.proj(x).permute(0, 3, 1, 2).contiguous()
        return x.masked_fill(zero_mask.unsqueeze(1), 0.0)


def fill_padded_keys(scores: torch.Tensor, key_padding_mask: torch.Tensor, value: float) -> torch.Tensor:
    """``scores[b, :, :, j] = value`` wherever ``key_padding_mask[b, j]``, in place.

    Padding that is a suffix of each row (what :func:`~napari_stofm.model.multiscale.collate`
    makes) is filled as one slice per padded row: the cost of the padded columns only, not a
    pass over the whole (B, H, L, L) tensor. Any other mask falls back to ``masked_fill_``.
    """
    length = key_padding_mask.shape[1]
    valid = (~key_padding_mask).sum(dim=1)
    positions = torch.arange(length, device=key_padding_mask.device)
    if not torch.equal(key_padding_mask, positions[None, :] >= valid[:, None]):
        return scores.masked_fill_(key_padding_mask[:, None, None, :], value)
    for row in torch.nonzero(valid < length).view(-1).tolist():
        scores[row, :, :, int(valid[row]):].fill_(value)
    return scores


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive bias that returns its logits."""

    def __init__(self, config: SToFMConfig):
        super().__init__()
        e = config.embedding_dim
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.k_proj = nn.Linear(e, e, bias=config.bias)
        self.v_proj = nn.Linear(e, e, bias=config.bias)
        self.q_proj = nn.Linear(e, e, bias=config.bias)
        self.out_proj = nn.Linear(e, e, bias=config.bias)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        need_logits: bool = True,
        logits_out: Optional[torch.Tensor] = None,
        bias_writable: bool = False,
        scope_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, L, E), bias (B, H, L, L), key_padding_mask (B, L) bool -> (out, logits).

        ``logits`` (B, H, L, L) are the pre-softmax scores (bias included) with masked keys
        set to 0: the next layer's bias and, after the last layer, the pair representation.
        The attention itself runs through the fused ``scaled_dot_product_attention``.
        ``logits_out`` (inference only) is a spare (B, H, L, L) buffer to write them into;
        ``bias_writable`` says ``bias`` is scratch that may be changed in place.
        ``scope_mask`` (B, 1, L, L), 0 or -inf, is added to the attention scores only (not to
        the logits): the pairs a ``neighbours`` attention scope leaves out.
        """
        b, l, e = x.shape
        h, d = self.num_heads, self.head_dim
        q = (self.q_proj(x) * self.scaling).view(b, l, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, l, h, d).transpose(1, 2)
        v = self.v_proj(x).view(b, l, h, d).transpose(1, 2)
        has_padding = key_padding_mask is not None and bool(key_padding_mask.any())
        mask = bias
        fresh = False
        if scope_mask is not None:
            mask, fresh = bias + scope_mask, True
        if has_padding:
            # A consumed scratch bias may take the -inf in place: the logits below get 0 at
            # those keys either way.
            mask = fill_padded_keys(mask if (fresh or bias_writable) else bias.clone(), key_padding_mask,
                                    float("-inf"))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.to(q.dtype), dropout_p=self.dropout.p if self.training else 0.0, scale=1.0
        )
        logits = None
        if need_logits:
            out = None if logits_out is None else logits_out.view(b * h, l, l)
            logits = torch.baddbmm(
                bias.reshape(b * h, l, l), q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2), out=out
            ).view(b, h, l, l)
            if has_padding:
                fill_padded_keys(logits, key_padding_mask, 0.0)
        return self.out_proj(attn.transpose(1, 2).reshape(b, l, e)), logits


class EncoderLayer(nn.Module):
    def __init__(self, config: SToFMConfig):
        super().__init__()
        e = config.embedding_dim
        self.pre_layernorm = config.pre_layernorm
        self.self_attn = SelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(e)
        self.fc1 = nn.Linear(e, config.ffn_embedding_dim)
        self.fc2 = nn.Linear(config.ffn_embedding_dim, e)
        self.final_layer_norm = nn.LayerNorm(e)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.activation = _ACT[config.activation_fn]

    def forward(self, x, bias, key_padding_mask, need_logits=True, logits_out=None, bias_writable=False,
                scope_mask=None):
        residual = x
        if self.pre_layernorm:
            x = self.self_attn_layer_norm(x)
        x, logits = self.self_attn(x, bias, key_padding_mask, need_logits, logits_out, bias_writable, scope_mask)
        x = residual + self.dropout(x)
        if not self.pre_layernorm:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_layernorm:
            x = self.final_layer_norm(x)
        x = self.fc2(self.activation_dropout(self.activation(self.fc1(x))))
        x = residual + self.dropout(x)
        if not self.pre_layernorm:
            x = self.final_layer_norm(x)
        return x, logits


class Encoder(nn.Module):
    def __init__(self, config: SToFMConfig):
        super().__init__()
        if config.pre_layernorm:
            # Present in published checkpoints; the published forward pass never applies it.
            self.final_layer_norm = nn.LayerNorm(config.embedding_dim)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.layerdrop = config.layerdrop

    def forward(self, x, bias, key_padding_mask, need_last_logits=True, bias_is_scratch=False, scope_mask=None):
        """Returns the last hidden states and the last layer's logits (None if not needed)."""
        x = self.dropout(x)
        last = len(self.layers) - 1
        logits = None
        # Inference: the (B, H, L, L) logits ping-pong between two buffers instead of a
        # fresh allocation per layer (a consumed bias becomes the next output buffer; the
        # input bias only when the caller says it is scratch).
        reuse = not torch.is_grad_enabled()
        spare = None
        for i, layer in enumerate(self.layers):
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue
            need = need_last_logits or i < last
            writable = reuse and (i > 0 or bias_is_scratch)
            x, logits = layer(
                x, bias, key_padding_mask, need_logits=need, logits_out=spare if need else None, bias_writable=writable,
                scope_mask=scope_mask,
            )
            if logits is not None:
                if writable:
                    spare = bias
                bias = logits
        return x, logits


class SE2Transformer(nn.Module):
    """SToFM's SE(2)-invariant transformer over `[CLS] + virtual cells + cells` tokens."""

    def __init__(self, config: SToFMConfig):
        super().__init__()
        self.config = config
        self.embedding_layer = nn.Linear(config.input_dim, config.embedding_dim)
        self.token_type_embeddings = nn.Embedding(4, config.embedding_dim)
        self.gaussian = GaussianKernel(config)
        self.encoder = Encoder(config)

    def init_weights(self, seed: Optional[int] = None) -> "SE2Transformer":
        """The published initialisation (normal(0, 0.02) linear/embedding weights, Gaussian
        means and stds uniform in [0, 3], LayerNorm identity)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            g = self.gaussian
            g.means.weight.copy_(torch.rand(g.means.weight.shape, generator=gen) * 3)
            g.stds.weight.copy_(torch.rand(g.stds.weight.shape, generator=gen) * 3)
            g.linear.weight.fill_(1.0)
            g.linear.bias.zero_()
        return self

    def _virtual_cell_positions(self, token_types: torch.Tensor) -> Optional[slice]:
        """The positions of the virtual cells when every row holds them at the same place
        (``[CLS] + virtual cells + cells``, as the sub-slices are built), else None."""
        hyper = token_types.eq(self.config.hyper_type_id)
        where = torch.nonzero(hyper[0]).view(-1)
        if where.numel() == 0:
            return None
        span = slice(int(where[0]), int(where[-1]) + 1)
        expected = torch.zeros_like(hyper[0])
        expected[span] = True
        return span if bool((hyper == expected).all()) else None

    def scope_mask(self, distances: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """(B, L, L) distances -> the (B, 1, L, L) additive attention mask of the configured
        scope: None for ``all`` (published); for ``neighbours``, -inf at every pair the distance
        rules give the far distance (not neighbours, no virtual cell, no CLS), 0 elsewhere.
        Every token keeps itself, so no row is left without a key."""
        if self.config.attention_scope == "all":
            return None
        mask = torch.zeros(distances.shape, dtype=dtype, device=distances.device)
        return mask.masked_fill_(distances == FAR, float("-inf")).unsqueeze(1)

    def forward(
        self,
        token_embeddings: torch.Tensor,
        attn_bias: torch.Tensor,
        token_types: torch.Tensor,
        return_pair_rep: bool = True,
        dense_kernel: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """token_embeddings (B, L, D), attn_bias (B, L, L) distances, token_types (B, L).

        Returns ``last_hidden_state`` (B, L, E) and, if asked, ``pair_rep`` (B, L, L, heads).
        """
        dtype = self.embedding_layer.weight.dtype
        device = self.embedding_layer.weight.device
        token_embeddings = torch.as_tensor(token_embeddings, device=device).to(dtype)
        attn_bias = torch.as_tensor(attn_bias, device=device)
        token_types = torch.as_tensor(token_types, device=device).long()
        x = self.embedding_layer(token_embeddings) + self.token_type_embeddings(token_types)
        if dense_kernel:
            bias = self.gaussian.dense_forward(attn_bias.to(x.dtype))
        else:
            bias = self.gaussian(attn_bias.to(x.dtype), block_span=self._virtual_cell_positions(token_types))
        padding = token_types.eq(self.config.pad_type_id)
        scope = self.scope_mask(attn_bias, x.dtype)
        if scope is not None and not return_pair_rep and not torch.is_grad_enabled():
            # Inference: the out-of-scope pairs get -inf in the first bias itself; each layer's
            # logits (bias + q k^T) carry it on to the next layer's bias, so no layer needs the
            # mask again. Only the logits differ (-inf there), and they are not returned.
            bias.masked_fill_(attn_bias.unsqueeze(1) == FAR, float("-inf"))
            scope = None
        x, logits = self.encoder(x, bias, padding, need_last_logits=return_pair_rep, bias_is_scratch=True,
                                 scope_mask=scope)
        out = {"last_hidden_state": x}
        if return_pair_rep:
            out["pair_rep"] = logits.permute(0, 2, 3, 1).contiguous()
        return out
