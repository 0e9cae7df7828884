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
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object of configuration keys")
        return cls.from_dict(data)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


_ACTIVATIONS = {"gelu", "relu", "gelu_new", "tanh", "silu"}
