"""SToFM itself: torch + numpy, never napari or Qt.

Public names used across the package and by parity checks:

- :func:`load_se2_transformer` (checkpoint dir -> ``torch.nn.Module``)
- :func:`normalize_coordinates`, :func:`split_subslices`, :func:`subslice_distances`
"""
from napari_stofm.model.checkpoint import load_se2_transformer, save_se2_transformer
from napari_stofm.model.config import SToFMConfig
from napari_stofm.model.multiscale import (
    Hypernodes,
    build_hypernodes,
    build_subslice_inputs,
    collate,
    hypernodes_from_assignment,
    normalize_coordinates,
    split_subslices,
    subslice_distances,
)
from napari_stofm.model.se2_transformer import GaussianKernel, SE2Transformer

__all__ = [
    "GaussianKernel",
    "Hypernodes",
    "SE2Transformer",
    "SToFMConfig",
    "build_hypernodes",
    "build_subslice_inputs",
    "collate",
    "hypernodes_from_assignment",
    "load_se2_transformer",
    "normalize_coordinates",
    "save_se2_transformer",
    "split_subslices",
    "subslice_distances",
]
