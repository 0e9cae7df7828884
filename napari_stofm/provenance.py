"""Provenance values: JSON-like records that survive .h5ad, .zarr and JSON unchanged."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Mapping

import numpy as np


def canonical(value):
    """A JSON-like form of ``value`` that survives .h5ad / .zarr / JSON unchanged.

    dicts keep their structure (keys as str); lists of one scalar kind stay lists; any other
    list becomes a JSON string; numpy scalars and arrays become Python values.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [canonical(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
        if all(isinstance(v, str) for v in items) or all(isinstance(v, bool) for v in items):
            return items
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return [float(v) for v in items]
        return json.dumps(items, default=str)
    return str(value)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


