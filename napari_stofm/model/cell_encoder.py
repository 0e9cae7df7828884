"""The gene-scale cell encoder: a BERT encoder plus a linear projection to 256 dims.

:class:`BertEncoder` is written in plain torch with exactly the parameter names of Hugging
Face's ``BertModel`` (absolute position embeddings, post-LayerNorm layers), so the
published ``cell_encoder/cell_bert`` weights load unchanged without the ``transformers``
package. :class:`CellEncoder` adds ``cell_proj`` (Linear(hidden -> 256)); a cell's
embedding is the L2-normalised projection of the ``<cls>`` (position 0) last hidden state.

Layouts read by :meth:`CellEncoder.from_pretrained` (``dir`` = a checkpoint root holding
``cell_encoder/``, or the ``cell_encoder`` folder itself)::

    cell_encoder/cell_bert/config.json
    cell_encoder/cell_bert/model.safetensors | pytorch_model.bin   (torch.load weights_only=True)
    cell_encoder/cell_proj.safetensors | cell_proj.bin              (keys weight, bias)

:meth:`CellEncoder.save_pretrained` writes the same layout with safetensors files (which
Hugging Face's loader reads too), and ``cell_proj.bin`` as well when asked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_stofm.errors import CheckpointError, StofmInputError
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report

PathLike = Union[str, Path]
CELL_EMBEDDING_DIM = 256

#: bounds on the sizes read from the cell encoder's config.json: far above any real one
#: (Geneformer: 25,426 tokens, hidden 256-1152, 6-20 layers; 1e9 parameters = 4 GiB float32)
MAX_BERT_VOCABULARY = 10_000_000
MAX_BERT_SIZE = 65_536
MAX_BERT_LAYERS = 1_024
MAX_BERT_PARAMETERS = 1_000_000_000

_BERT_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
    position_embedding_type="absolute",
)


class BertConfig(dict):
    """A Hugging Face ``BertConfig`` as a plain dict (attribute access; unknown keys kept)."""

    def __init__(self, **kwargs):
        super().__init__({**_BERT_DEFAULTS, **kwargs})
        self.setdefault("model_type", "bert")
        self._check_types_and_sizes()
        if self["hidden_size"] % self["num_attention_heads"]:
            raise CheckpointError(
                f"hidden_size {self['hidden_size']} is not a multiple of num_attention_heads "
                f"{self['num_attention_heads']}")
        if self.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"position_embedding_type {self['position_embedding_type']!r} is not supported (only 'absolute')")
        _activation(self["hidden_act"])

    def _check_types_and_sizes(self) -> None:
        """Types and ranges of the keys that size the encoder, and its parameter count, before
        anything is built (a :class:`CheckpointError` naming the key instead of a ``TypeError``
        from torch or an attempt to allocate terabytes)."""
        from napari_stofm.checks import integer, number

        kw = dict(error=CheckpointError, where="cell encoder config (cell_bert/config.json)",
                  fix="fix the cell encoder's config.json")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            self[name] = integer(self[name], name, minimum=1, maximum=MAX_BERT_VOCABULARY if name == "vocab_size"
                                 else MAX_BERT_SIZE, **kw)
        self["num_hidden_layers"] = integer(self["num_hidden_layers"], "num_hidden_layers", minimum=1,
                                            maximum=MAX_BERT_LAYERS, **kw)
        if self.get("pad_token_id") is not None:
            self["pad_token_id"] = integer(self["pad_token_id"], "pad_token_id", minimum=0,
                                           maximum=self["vocab_size"] - 1, **kw)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            self[name] = number(self[name], name, minimum=0.0, maximum=1.0, exclusive_maximum=True, **kw)
        self["layer_norm_eps"] = number(self["layer_norm_eps"], "layer_norm_eps", minimum=0.0,
                                        exclusive_minimum=True, **kw)
        self["initializer_range"] = number(self["initializer_range"], "initializer_range", minimum=0.0, **kw)
        if not isinstance(self["hidden_act"], str):
            raise CheckpointError(f"cell encoder config: hidden_act must be a string, got {self['hidden_act']!r}")
        n = self.parameter_count()
        if n > MAX_BERT_PARAMETERS:
            raise CheckpointError(
                f"cell encoder config (cell_bert/config.json) describes a BERT of {n:,} parameters "
                f"({n * 4 / 2**30:,.0f} GiB of float32 weights; vocab_size={self['vocab_size']}, "
                f"hidden_size={self['hidden_size']}, num_hidden_layers={self['num_hidden_layers']}, "
                f"intermediate_size={self['intermediate_size']}), more than the {MAX_BERT_PARAMETERS:,} this "
                "package builds: fix the cell encoder's config.json")

    def parameter_count(self) -> int:
        """Parameters of the BERT this configuration describes (no pooler; nothing is built)."""
        h, f = self["hidden_size"], self["intermediate_size"]
        emb = (self["vocab_size"] + self["max_position_embeddings"] + self["type_vocab_size"]) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
        return emb + self["num_hidden_layers"] * layer

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_json(cls, path: PathLike) -> "BertConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the cell encoder needs its BERT config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        try:
            return cls(**data)
        except CheckpointError as exc:  # name the file
            message = str(exc).replace("cell encoder config (cell_bert/config.json)", str(path), 1)
            raise CheckpointError(message) from None

    def to_json(self, path: PathLike) -> None:
        data = dict(self)
        data.setdefault("architectures", ["BertModel"])
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
                "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def _activation(name):
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"hidden_act {name!r} is not supported ({', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


# --------------------------------------------------------------------------- BERT


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings.weight[0])  # token_type_ids are all 0
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], queries: Optional[int] = None) -> torch.Tensor:
        """``queries``: only the first ``queries`` tokens attend (their outputs only are returned);
        keys and values are still every token."""
        b, length, h = x.shape

        def heads(t):
            return t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q = self.query(x if queries is None else x[:, :queries])
        out = F.scaled_dot_product_attention(
            heads(q), heads(self.key(x)), heads(self.value(x)), attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, q.shape[1], h)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask, queries: Optional[int] = None):
        residual = x if queries is None else x[:, :queries]
        return self.output(self.self(x, mask, queries), residual)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask, queries: Optional[int] = None):
        a = self.attention(x, mask, queries)
        return self.output(self.intermediate(a), a)


class BertLayerStack(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask, last_queries: Optional[int] = None):
        """``last_queries``: the last layer computes only the first ``last_queries`` tokens'
        outputs (every token is still a key and value): the same numbers for those tokens."""
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, last_queries if i == last else None)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden):
        return self.activation(self.dense(hidden[:, 0]))


class BertEncoder(nn.Module):
    """Hugging Face ``BertModel`` in plain torch (same parameter names); returns last hidden states."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertLayerStack(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.get("initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                last_queries: Optional[int] = None) -> torch.Tensor:
        """``(B, L)`` token ids and 1/0 padding mask -> ``(B, L, hidden)`` last hidden states
        (``(B, last_queries, hidden)``: only the first tokens' states, at a lower cost)."""
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # keys only, as BertModel
        return self.encoder(x, mask, last_queries)


# --------------------------------------------------------------------------- cell encoder


class CellEncoder(nn.Module):
    """BERT + ``cell_proj`` (Linear(hidden -> 256)); ``forward`` gives unit-norm cell embeddings."""

    def __init__(self, config: Union[BertConfig, dict], embedding_dim: int = CELL_EMBEDDING_DIM,
                 add_pooling_layer: bool = False):
        super().__init__()
        config = config if isinstance(config, BertConfig) else BertConfig(**config)
        self.config = config
        self.bert = BertEncoder(config, add_pooling_layer=add_pooling_layer)
        self.cell_proj = nn.Linear(config.hidden_size, embedding_dim)
        nn.init.normal_(self.cell_proj.weight, std=config.get("initializer_range", 0.02))
        nn.init.zeros_(self.cell_proj.bias)

    @property
    def embedding_dim(self) -> int:
        return self.cell_proj.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Only the CLS token's last state is used: the last layer computes that one only.
        hidden = self.bert(input_ids, attention_mask, last_queries=1)
        return F.normalize(self.cell_proj(hidden[:, 0]).float(), dim=-1)  # unit norm in float32 at any precision

    # ---------------------------------------------------------------- inference

    def encode(self, tokenized, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
               progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> np.ndarray:
        """Embeddings ``(n_cells, 256)`` float32 of :class:`~.tokenizer.TokenizedCells`.

        Cells are batched by length (longest first) to limit padding; the result is in the
        original order. Empty cells get a zero row (see ``tokenized.empty``). Moves the
        model to ``device``; raises :class:`~napari_stofm.errors.Cancelled` when ``cancel`` says so.
        """
        n = tokenized.n_cells
        out = np.zeros((n, self.embedding_dim), dtype=np.float32)
        lengths = tokenized.lengths
        todo = np.flatnonzero(~np.asarray(tokenized.empty, dtype=bool))
        if todo.size == 0:
            report(progress, n, n, "Cell embeddings")
            return out
        longest = int(lengths[todo].max())
        if longest > self.config.max_position_embeddings:
            raise StofmInputError(
                f"a cell has {longest} tokens but the encoder takes at most {self.config.max_position_embeddings}: "
                f"tokenize with max_genes={self.config.max_position_embeddings - 1}")
        top = int(tokenized.input_ids.max(initial=0))
        if top >= self.config.vocab_size or tokenized.cls_id >= self.config.vocab_size:
            raise StofmInputError(
                f"token id {max(top, tokenized.cls_id)} is outside the encoder's vocabulary of "
                f"{self.config.vocab_size}: tokenize with the vocabulary that ships with this encoder")
        order = todo[np.argsort(-lengths[todo], kind="stable")]
        device = torch.device(device)
        self.to(device)
        was_training = self.training
        self.eval()
        done = n - todo.size
        report(progress, done, n, "Cell embeddings")
        try:
            with torch.inference_mode():
                for start in range(0, order.size, batch_size):
                    check_cancelled(cancel)
                    idx = order[start:start + batch_size]
                    ids, mask = tokenized.padded(idx)
                    emb = self(ids.to(device), mask.to(device))
                    out[idx] = emb.float().cpu().numpy()
                    done += idx.size
                    report(progress, done, n, "Cell embeddings")
        finally:
            self.train(was_training)
        return out

    def encode_windows(self, tokenized, width: int, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
                       progress: Optional[ProgressCallback] = None, cancel: CancelToken = None) -> np.ndarray:
        """Like :meth:`encode`, for cells longer than the encoder reads: each cell is cut into
        rank-interleaved windows of ``width`` genes (:meth:`TokenizedCells.interleaved`), every
        window is encoded and a cell's embedding is the normalised mean of its windows'."""
        windows, owner = tokenized.interleaved(width)
        if windows.n_cells == tokenized.n_cells:
            return self.encode(windows, batch_size=batch_size, device=device, progress=progress, cancel=cancel)
        emb = self.encode(windows, batch_size=batch_size, device=device, progress=progress, cancel=cancel)
        out = np.zeros((tokenized.n_cells, emb.shape[1]), dtype=np.float64)
        np.add.at(out, owner, emb)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return np.where(norm > 0, out / np.maximum(norm, 1e-12), 0.0).astype(np.float32)

    # ---------------------------------------------------------------- I/O

    def bert_state_dict(self) -> Dict[str, torch.Tensor]:
        """The BERT weights under Hugging Face ``BertModel`` names."""
        return {k: v for k, v in self.bert.state_dict().items()}

    def save_pretrained(self, directory: PathLike, write_bin: bool = False) -> Path:
        """Write ``cell_bert/config.json``, ``cell_bert/model.safetensors`` and ``cell_proj.safetensors``
        into ``directory`` (the ``cell_encoder`` folder); ``write_bin`` also writes ``cell_proj.bin``
        (a plain state dict) for loaders that only read ``torch.load`` files."""
        from safetensors.torch import save_file

        directory = Path(directory)
        bert_dir = directory / "cell_bert"
        bert_dir.mkdir(parents=True, exist_ok=True)
        config = BertConfig(**self.config)
        config["cell_embedding_dim"] = self.embedding_dim
        config.to_json(bert_dir / "config.json")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.bert_state_dict().items()}
        save_file(tensors, str(bert_dir / "model.safetensors"), metadata={"format": "pt"})
        proj = {k: v.detach().cpu().contiguous() for k, v in self.cell_proj.state_dict().items()}
        save_file(proj, str(directory / "cell_proj.safetensors"), metadata={"format": "pt"})
        if write_bin:
            torch.save(proj, directory / "cell_proj.bin")
        return directory

    @classmethod
    def from_pretrained(cls, directory: PathLike, map_location: Union[str, torch.device] = "cpu") -> "CellEncoder":
        """Load the published layout or ours (see the module docstring)."""
        root = _cell_encoder_dir(Path(directory))
        bert_dir = root / "cell_bert"
        config = BertConfig.from_json(bert_dir / "config.json")
        bert_sd = _normalise_bert_keys(_load_tensors(bert_dir, ("model.safetensors", "pytorch_model.bin"),
                                                     "BERT weights", map_location))
        proj_sd = _load_tensors(root, ("cell_proj.safetensors", "cell_proj.bin"), "cell projection", map_location)
        if "weight" not in proj_sd or "bias" not in proj_sd:
            raise CheckpointError(
                f"{root}: the cell projection must hold 'weight' and 'bias'; found {sorted(proj_sd)}")
        w = proj_sd["weight"]
        if w.ndim != 2 or w.shape[1] != config.hidden_size:
            raise CheckpointError(
                f"{root}: tensor 'cell_proj.weight' has shape {tuple(w.shape)}, expected "
                f"(embedding_dim, {config.hidden_size}) for hidden_size {config.hidden_size}")
        embedding_dim = int(w.shape[0])
        model = cls(config, embedding_dim=embedding_dim,
                    add_pooling_layer=any(k.startswith("pooler.") for k in bert_sd))
        _load_checked(model.bert, bert_sd, f"{bert_dir}")
        _load_checked(model.cell_proj, proj_sd, f"{root}", prefix="cell_proj.")
        model.eval()
        return model


# --------------------------------------------------------------------------- loading helpers


def _cell_encoder_dir(path: Path) -> Path:
    for cand in (path, path / "cell_encoder"):
        if (cand / "cell_bert").is_dir():
            return cand
    if path.name == "cell_bert" and path.is_dir():
        return path.parent
    raise CheckpointError(
        f"{path} holds no cell encoder: expected {path}/cell_encoder/cell_bert/config.json (published layout) "
        f"or {path}/cell_bert/config.json")


def _load_tensors(folder: Path, names, what: str, map_location) -> Dict[str, torch.Tensor]:
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(str(path), device=str(map_location))
            else:
                sd = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a checkpoint problem
            raise CheckpointError(f"cannot read {what} from {path}: {exc}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path} must hold a plain state dict of tensors")
        return dict(sd)
    raise CheckpointError(f"{what} missing: none of {', '.join(names)} is in {folder}")


def _normalise_bert_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip a ``bert.`` prefix (BertForMaskedLM checkpoints), drop heads and buffers, map
    old ``gamma``/``beta`` LayerNorm names to ``weight``/``bias``."""
    if any(k.startswith("bert.") for k in sd):
        sd = {k[5:]: v for k, v in sd.items() if k.startswith("bert.")}
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids") or k.startswith("cls."):
            continue
        if k.endswith(".gamma"):
            k = k[:-6] + ".weight"
        elif k.endswith(".beta"):
            k = k[:-5] + ".bias"
        out[k] = v
    return out


def _load_checked(module: nn.Module, sd: Dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        shown = ", ".join(prefix + k for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
    if unexpected:
        shown = ", ".join(prefix + k for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{where}: tensor(s) that the config does not describe: {shown} (does config.json match the weights?)")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: tensor '{prefix}{k}' has shape {tuple(sd[k].shape)} in the checkpoint, "
                f"expected {tuple(t.shape)} from config.json")
    module.load_state_dict({k: sd[k].to(t.dtype) for k, t in expected.items()}, strict=True)
