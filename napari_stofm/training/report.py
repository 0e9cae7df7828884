"""What a pretraining run reports: the loss terms of each stage, the one-line progress bar
(:class:`ProgressLine`), the recent-mean summaries of the loss history (:func:`mean_recent`)
and the loss-curve plot (:func:`plot_losses`) written beside the checkpoint as
``loss_curve.png``, next to the full history in ``training_log.json``.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

LOG_NAME = "training_log.json"
CURVE_NAME = "loss_curve.png"
#: what the progress bar, the final summary and the log report of each stage
STAGE1_TERMS = ("mlm", "mlm_acc", "profile_kl", "contrastive", "cell_cos")
STAGE2_TERMS = ("cosine", "pair_mse", "niche", "self", "neighbour")


# --------------------------------------------------------------------------- progress


class ProgressLine:
    """A one-line stderr progress bar with losses."""

    def __init__(self, stream=None, min_interval: float = 1.0):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0

    def __call__(self, stage: str, step: int, total: int, losses: dict, elapsed: float, force: bool = False):
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        frac = step / max(total, 1)
        bar = "#" * int(round(frac * 20))
        parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        self.stream.write(f"\r{stage} [{bar:<20}] {step}/{total} {elapsed / 60:5.1f} min  {parts}   ")
        if force:
            self.stream.write("\n")
        self.stream.flush()


def mean_recent(rows: List[dict], keys: Sequence[str], n: int = 50) -> dict:
    """The mean of each of ``keys`` over the last ``n`` history rows (keys none of them has left out)."""
    recent = rows[-n:]
    out = {}
    for k in keys:
        vals = [r[k] for r in recent if k in r]
        if vals:
            out[k] = float(np.mean(vals))
    return out


# --------------------------------------------------------------------------- loss curve


def _smooth(values: Sequence[float], k: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.size == 0 or k <= 1:
        return v
    k = min(k, v.size)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([np.full(k - 1, np.nan), out])


def plot_losses(history: dict, path: PathLike) -> Optional[Path]:
    """Loss curves of both stages as a PNG; skipped with a warning without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss-curve plot (pip install matplotlib)")
        return None
    panels = [("stage1", ("mlm", "profile_kl", "contrastive"), "Stage 1: gene scale"),
              ("stage2", STAGE2_TERMS, "Stage 2: SE(2) transformer")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, terms, title) in zip(axes, panels, strict=True):
        rows = history.get(key, [])
        ax.set_title(title)
        ax.set_xlabel("step")
        if not rows:
            ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
            continue
        steps = [r["step"] for r in rows]
        k = max(1, len(rows) // 50)
        for term in terms:
            vals = [r.get(term, np.nan) for r in rows]
            line, = ax.plot(steps, vals, alpha=0.25)
            ax.plot(steps, _smooth(vals, k), color=line.get_color(), label=term)
        ax.legend()
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
