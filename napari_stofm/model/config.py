"""SToFM configuration, read and written in the published ``config.json`` format.

The published checkpoints were saved by a Hugging Face ``PretrainedConfig`` subclass; their
``config.json`` carries the model keys plus bookkeeping keys (``transformers_version``,
``hidden_size``, ...). Every key is kept: keys this package does not use round-trip
unchanged, so a configuration read and written again is the same file content.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

from napari_stofm.errors import CheckpointError

CONFIG_NAME = "config.json"
#: token types of the SE(2) transformer (cell, CLS, virtual cell, padding): its type embedding has 4 rows
N_TOKEN_TYPES = 4
#: bounds on the sizes read from config.json: far above any SToFM (published: 12 layers,
#: E = 768, about 42 million parameters; 1e9 parameters are 4 GiB of float32 weights)
MAX_SIZE = 65_536
MAX_LAYERS = 1_024
MAX_PARAMETERS = 1_000_000_000
#: values of ``attention_scope`` (see :class:`SToFMConfig`)
ATTENTION_SCOPES = ("all", "neighbours")


@dataclass
class SToFMConfig:
    """Hyper-parameters of the SE(2) transformer; defaults are the published ones."""

    num_hidden_layers: int = 12
    input_dim: int = 256
    embedding_dim: int = 768
    ffn_embedding_dim: int = 768
    num_attention_heads: int = 32
    gaussian_hidden_dim: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    layerdrop: float = 0.0
    encoder_normalize_before: bool = False
    pre_layernorm: bool = False
    apply_init: bool = False
    activation_fn: str = "gelu"
    embed_scale: Optional[float] = None
    freeze_embeddings: bool = False
    num_trans_layers_to_freeze: int = 0
    traceable: bool = False
    q_noise: float = 0.0
    qn_block_size: int = 8
    kdim: Optional[int] = None
    vdim: Optional[int] = None
    bias: bool = True
    self_attention: bool = True
    norm_type_id: int = 0
    cls_type_id: int = 1
    hyper_type_id: int = 2
    pad_type_id: int = 3
    # which token pairs attend to each other: "all" (published: every pair; far pairs only get
    # the kernel's value at distance 100) or "neighbours" (a cell attends to the tokens it has a
    # distance to: its nearest cells, the virtual cells, the CLS token and itself)
    attention_scope: str = "all"
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types_and_sizes()
        if self.embedding_dim % self.num_attention_heads:
            raise CheckpointError(
                f"embedding_dim={self.embedding_dim} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; fix config.json"
            )
        if self.activation_fn not in _ACTIVATIONS:
            raise CheckpointError(
                f"activation_fn={self.activation_fn!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
            )
        for name in ("kdim", "vdim"):
            value = getattr(self, name)
            if value is not None and value != self.embedding_dim:
                raise CheckpointError(
                    f"{name}={value} differs from embedding_dim={self.embedding_dim}; "
                    "SToFM uses self-attention with equal dimensions"
                )

    def _check_types_and_sizes(self) -> None:
        """Types and ranges of every key, and the parameter count, before anything is built:
        a wrong value is a :class:`CheckpointError` naming the key, not a ``TypeError`` /
        ``ZeroDivisionError`` from torch or an attempt to allocate terabytes."""
        from napari_stofm.checks import integer, number

        kw = dict(error=CheckpointError, where=CONFIG_NAME, fix="fix config.json")
        for name in ("num_hidden_layers", "input_dim", "embedding_dim", "ffn_embedding_dim", "num_attention_heads",
                     "gaussian_hidden_dim"):
            setattr(self, name, integer(getattr(self, name), name, minimum=1,
                                        maximum=MAX_LAYERS if name == "num_hidden_layers" else MAX_SIZE, **kw))
        self.qn_block_size = integer(self.qn_block_size, "qn_block_size", minimum=1, maximum=MAX_SIZE, **kw)
        self.num_trans_layers_to_freeze = integer(self.num_trans_layers_to_freeze, "num_trans_layers_to_freeze",
                                                  minimum=0, maximum=self.num_hidden_layers, **kw)
        type_ids = {}
        for name in ("norm_type_id", "cls_type_id", "hyper_type_id", "pad_type_id"):
            type_ids[name] = integer(getattr(self, name), name, minimum=0, maximum=N_TOKEN_TYPES - 1, **kw)
            setattr(self, name, type_ids[name])
        if len(set(type_ids.values())) != len(type_ids):
            raise CheckpointError(f"{CONFIG_NAME}: the token type ids {type_ids} must differ from each other; "
                                  "fix config.json (published: 0, 1, 2, 3)")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            setattr(self, name, number(getattr(self, name), name, minimum=0.0, maximum=1.0, exclusive_maximum=True,
                                       **kw))
        for name in ("layerdrop", "q_noise"):
            setattr(self, name, number(getattr(self, name), name, minimum=0.0, maximum=1.0, **kw))
        for name in ("encoder_normalize_before", "pre_layernorm", "apply_init", "freeze_embeddings", "traceable",
                     "bias", "self_attention"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise CheckpointError(f"{CONFIG_NAME}: {name} must be true or false, got {value!r}; fix config.json")
        if self.attention_scope not in ATTENTION_SCOPES:
            raise CheckpointError(f"{CONFIG_NAME}: attention_scope must be one of {list(ATTENTION_SCOPES)}, got "
                                  f"{self.attention_scope!r}; fix config.json (published: 'all')")
        if not isinstance(self.activation_fn, str):
            raise CheckpointError(f"{CONFIG_NAME}: activation_fn must be a string, got {self.activation_fn!r}")
        if self.embed_scale is not None:
            self.embed_scale = number(self.embed_scale, "embed_scale", **kw)
        for name in ("kdim", "vdim"):
            if getattr(self, name) is not None:
                setattr(self, name, integer(getattr(self, name), name, minimum=1, maximum=MAX_SIZE, **kw))
        n = self.parameter_count()
        if n > MAX_PARAMETERS:
            raise CheckpointError(
                f"{CONFIG_NAME} describes an SE(2) transformer of {n:,} parameters ({n * 4 / 2**30:,.0f} GiB of "
                f"float32 weights; num_hidden_layers={self.num_hidden_layers}, embedding_dim={self.embedding_dim}, "
                f"ffn_embedding_dim={self.ffn_embedding_dim}), more than the {MAX_PARAMETERS:,} this package "
                "builds: fix config.json (the published model has about 42 million)")

    def parameter_count(self) -> int:
        """Parameters of the SE(2) transformer this configuration describes (nothing is built)."""
        e, f, k, h = self.embedding_dim, self.ffn_embedding_dim, self.gaussian_hidden_dim, self.num_attention_heads
        attn = 4 * e * e + (4 * e if self.bias else 0)
        layer = attn + 2 * e + (e * f + f) + (f * e + e) + 2 * e
        gaussian = 2 + 2 * k + (k * k + k) + (k * h + h)
        return ((self.input_dim * e + e) + 4 * e + gaussian + self.num_hidden_layers * layer
                + (2 * e if self.pre_layernorm else 0))

    @property
    def hidden_size(self) -> int:
        return self.embedding_dim

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SToFMConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        if out.get("attention_scope") == "all":  # the published behaviour: not a key of published files
            del out["attention_scope"]
        out["hidden_size"] = self.embedding_dim
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, path: str | Path) -> "SToFMConfig":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"no {CONFIG_NAME} at {path}: a SToFM checkpoint directory needs one")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object of configuration keys")
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:  # name the file, not just config.json
            message = str(exc)
            if message.startswith(f"{CONFIG_NAME}"):
                message = str(path) + message[len(CONFIG_NAME):]
            else:
                message = f"{path}: {message}"
            raise CheckpointError(message) from None

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


_ACTIVATIONS = {"gelu", "relu", "gelu_new", "tanh", "silu"}
