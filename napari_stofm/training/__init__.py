"""Pretraining SToFM on your own slices (``stofm pretrain``), in two stages as in the paper.

:mod:`.config` holds :class:`PretrainConfig`; :mod:`.corpus` finds and reads the slices
(never the held-out ones) and :mod:`.packed` stores them as one ``.npz``; :mod:`.heads` and
:mod:`.batches` are the training heads and the per-step batches; :mod:`.trainer` runs the
recipe (:class:`Trainer`, :func:`pretrain`), on one process or several under torchrun
(:mod:`.distributed`); :mod:`.report` is the progress bar and the loss curve. The names below
are imported on first use, so importing this package is cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PretrainConfig": "config",
    "HELD_OUT_SLICES": "corpus",
    "find_slices": "corpus",
    "load_corpus": "corpus",
    "pack_corpus": "corpus",
    "Trainer": "trainer",
    "pretrain": "trainer",
    "plot_losses": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
