"""The SE(2) forward pass over a whole slice: micro-scale sub-slices + macro-scale virtual cells.

:func:`forward_slice` takes gene-scale embeddings and positions and returns the final cell
representations (the published computation: normalised coordinates, Leiden virtual cells,
sub-slices of ``[CLS] + virtual cells + cells``, the SE(2) transformer per sub-slice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from napari_stofm.errors import StofmInputError
from napari_stofm.model.multiscale import (
    Hypernodes,
    build_hypernodes,
    build_subslice_inputs,
    collate,
    normalize_coordinates,
    split_subslices,
)
from napari_stofm.model.readout import finish_context
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report


@dataclass
class SliceForward:
    """What :func:`forward_slice` computed."""

    representations: np.ndarray  # (n, E) float32
    hypernodes: Hypernodes
    subslices: List[np.ndarray]


def forward_slice(model, positions: np.ndarray, cell_emb: np.ndarray, *, split_num: int, split_mode: str,
                  seed: int = 0, batch_size: int = 4, progress: Optional[ProgressCallback] = None,
                  cancel: CancelToken = None) -> SliceForward:
    """Macro scale (virtual cells), micro scale (sub-slices) and the SE(2) transformer."""
    settings = model.settings
    report(progress, 0, 1, "Macro scale: virtual cells")
    xy = normalize_coordinates(positions)
    hyper = build_hypernodes(
        xy, cell_emb, alpha=settings.hypernode_alpha, resolution=settings.hypernode_resolution,
        max_hypernodes=settings.max_hypernodes, seed=seed,
    )
    check_cancelled(cancel)
    subslices = split_subslices(xy, split_num, mode=split_mode)
    out = run_se2(model, xy, cell_emb, hyper, subslices, batch_size=batch_size, progress=progress, cancel=cancel)
    return SliceForward(out, hyper, subslices)


def run_se2(model, normalized_xy, cell_emb, hyper, subslices, *, batch_size=4, progress=None,
            cancel=None) -> np.ndarray:
    """SE(2) transformer over sub-slices -> (n, E) final cell representations."""
    n = normalized_xy.shape[0]
    readout = getattr(model, "readout", None)
    if readout is None:
        out = np.zeros((n, model.se2.config.embedding_dim), dtype=np.float32)
    else:  # (n, 1 + scales, D) raw parts, finished over the whole slice below
        out = np.zeros((n, 1 + readout.scales, readout.input_dim), dtype=np.float32)
    # Similar sizes together: less padding.
    order = sorted(range(len(subslices)), key=lambda i: -len(subslices[i]))
    ordered = [subslices[i] for i in order]
    device = model.device
    done = 0
    report(progress, 0, n, "SE(2) transformer")
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            check_cancelled(cancel)
            items = list(build_subslice_inputs(normalized_xy, cell_emb, hyper, ordered[start : start + batch_size]))
            batch = collate(items)
            result = model.se2(
                batch["token_embeddings"].to(device), batch["attn_bias"].to(device), batch["token_types"].to(device),
                return_pair_rep=False,
            )
            idx = batch["indices"].numpy()
            sel = idx >= 0
            hidden = result["last_hidden_state"][torch.from_numpy(sel).to(device)]
            if readout is not None:
                hidden = readout(hidden)
            out[idx[sel]] = hidden.float().cpu().numpy()
            done += int(sel.sum())
            report(progress, done, n, "SE(2) transformer")
    if done < n:
        raise StofmInputError(f"{n - done} cells were not covered by any sub-slice; this is a bug, please report it")
    return out if readout is None else finish_context(out)
