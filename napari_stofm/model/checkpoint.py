"""Reading and writing SE(2) transformer checkpoints.

Accepted layouts in a checkpoint directory:

* published: ``config.json`` + ``se2transformer.pth`` (a plain state dict saved with
  ``torch.save``; the pretraining wrapper's ``model.`` prefix and its ``lm_head.*`` /
  ``pair_head.*`` tensors are accepted too);
* ours: ``config.json`` + ``se2transformer.safetensors`` (same keys).

Tensors are only ever read with ``torch.load(weights_only=True)`` or safetensors: no
arbitrary object is unpickled.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from napari_stofm.errors import CheckpointError
from napari_stofm.model.config import SToFMConfig
from napari_stofm.model.se2_transformer import SE2Transformer

SE2_PTH = "se2transformer.pth"
SE2_SAFETENSORS = "se2transformer.safetensors"
PRETRAIN_HEAD_PREFIXES = ("lm_head.", "pair_head.", "niche_head.")


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.bin`` (weights only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure here means an unusable file: re-raised as CheckpointError
        raise CheckpointError(
            f"cannot read weights from {path} ({type(exc).__name__}: {exc}); the file is corrupt or "
            "not a plain state dict (only tensors are loaded, never pickled objects)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def split_pretraining_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(transformer tensors, pretraining-head tensors), with the wrapper's ``model.`` prefix removed."""
    if any(k.startswith("model.") for k in state):
        model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        heads = {k: v for k, v in state.items() if k.startswith(PRETRAIN_HEAD_PREFIXES)}
        rest = set(state) - {f"model.{k}" for k in model} - set(heads)
        if rest:
            raise CheckpointError(f"unexpected tensors in a pretraining checkpoint: {sorted(rest)[:5]}")
        return model, heads
    heads = {k: v for k, v in state.items() if k.startswith(PRETRAIN_HEAD_PREFIXES)}
    return {k: v for k, v in state.items() if k not in heads}, heads


def load_state_checked(module: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with errors that name the tensor and both shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [(k, tuple(own[k].shape), tuple(state[k].shape))
             for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if wrong:
        k, exp, got = wrong[0]
        problems.append(
            f"tensor '{k}' has shape {got} but the configuration expects {exp}"
            + (f" (and {len(wrong) - 1} more mismatched tensors)" if len(wrong) > 1 else "")
        )
    if missing:
        problems.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise CheckpointError(
            f"the weights in {source} do not fit its config.json: " + "; ".join(problems)
            + ". Use the config.json that was saved with these weights."
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def find_se2_weights(checkpoint_dir: Path) -> Path:
    for name in (SE2_SAFETENSORS, SE2_PTH):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise CheckpointError(
        f"{checkpoint_dir} has no {SE2_PTH} or {SE2_SAFETENSORS}: point to a SToFM checkpoint directory "
        "(config.json + se2transformer.pth [+ cell_encoder/])"
    )


def load_se2_transformer(
    checkpoint_dir: str | Path, *, return_heads: bool = False, device: Optional[str] = None
):
    """The SE(2) transformer of a checkpoint directory, in eval mode.

    With ``return_heads=True`` also returns the pretraining heads' tensors (may be empty).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    config = SToFMConfig.from_json(checkpoint_dir)
    weights = find_se2_weights(checkpoint_dir)
    state, heads = split_pretraining_state(read_state_dict(weights))
    model = SE2Transformer(config)
    load_state_checked(model, state, str(weights))
    model.eval()
    if device is not None:
        model.to(device)
    return (model, heads) if return_heads else model


def save_se2_transformer(model: SE2Transformer, checkpoint_dir: str | Path,
                         heads: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write ``config.json`` + ``se2transformer.safetensors`` (heads saved alongside if given)."""
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json(checkpoint_dir / "config.json")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if heads:
        tensors.update({k: v.detach().cpu().contiguous() for k, v in heads.items()})
    save_file(tensors, str(checkpoint_dir / SE2_SAFETENSORS))


def fingerprint_files(paths) -> str:
    """A short content hash of weight files (cache keys, provenance)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
