"""napari layers of a slice: the cells as Points, each annotation as a Labels layer.

Every layer made here carries ``metadata['adata']`` (the AnnData) and
``metadata['stofm_session']`` (the :class:`~napari_stofm.review.session.SliceSession`);
Labels layers also ``metadata['stofm_key']`` (the annotation they show). Label value
``code + 1`` is class ``code``; 0 is background / unassigned.

Layer names tell a prediction from the labels that came with the slice
(:func:`layer_name`: ``tissue regions (SToFM)`` / ``cell_type (in file)``). A slice opened
into a viewer that already shows one is drawn to the right of it (:func:`place_beside`): its
layers are translated by :func:`display_offset`, in the world only (positions in the
AnnData and in every export stay as they are).
"""
from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import pandas as pd

from napari_stofm._napari import compat
from napari_stofm._napari.compat import unwrap_proxy as unwrap
from napari_stofm.keys import PREDICTED_KEYS, display_name
from napari_stofm.review.session import SliceSession

ROLE_CELLS = "cells"
ROLE_LABELS = "labels"
#: a slice placed beside another is this share of the wider one's width away from it
GAP_FRACTION = 0.06

_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_OFFSETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # session -> (dy, dx) in world units


def layer_name(key: str) -> str:
    """The layer name of labelling ``key``: ``'<name> (SToFM)'`` for a prediction (the
    ``stofm_*`` keys), ``'<column> (in file)'`` for labels the slice came with."""
    if key in PREDICTED_KEYS or key.startswith("stofm_"):
        return f"{display_name(key)} (SToFM)"
    return f"{key} (in file)"


# ----------------------------------------------------------------------------- placement


def display_offset(session) -> np.ndarray:
    """``(dy, dx)`` the layers of ``session`` are moved by in the world (0, 0 unless placed beside)."""
    return np.asarray(_OFFSETS.get(session, (0.0, 0.0)), dtype=np.float64)


def world_yx(session, cells=None) -> np.ndarray:
    """World ``(y, x)`` of cells (all when None) as the viewer shows them."""
    xy = session.xy if cells is None else session.xy[np.atleast_1d(cells)]
    return xy[:, ::-1] + display_offset(session)


def _slice_box(session) -> np.ndarray:
    """``[[y0, x0], [y1, x1]]`` of a slice's cells plus their territory reach, in its own units."""
    from napari_stofm.review.raster import RADIUS_PER_SPACING, spacing_of

    yx = session.xy[:, ::-1]
    reach = RADIUS_PER_SPACING * spacing_of(session.xy)
    return np.array([yx.min(axis=0) - reach, yx.max(axis=0) + reach])


def place_beside(viewer, session) -> Optional[str]:
    """Put ``session`` to the right of the slices ``viewer`` shows (top edges aligned) and
    return a note saying so; None (offset 0) when it shows none. Only the layers of SToFM
    slices count: a slice opened over an image of the same tissue stays where it is."""
    others = []
    for layer in viewer.layers:
        other = (layer.metadata or {}).get("stofm_session")
        if other is not None and other is not session and all(o is not other for o in others):
            others.append(other)
    if not others:
        _OFFSETS.pop(session, None)
        return None
    boxes = [_slice_box(o) + display_offset(o) for o in others]
    right = max(b[1, 1] for b in boxes)
    top = min(b[0, 0] for b in boxes)
    width = max(max(b[1, 1] - b[0, 1] for b in boxes), 1e-9)
    own = _slice_box(session)
    gap = GAP_FRACTION * max(width, own[1, 1] - own[0, 1])
    _OFFSETS[session] = (float(top - own[0, 0]), float(right + gap - own[0, 1]))
    units = {str(((o.adata.uns.get("source") or {}) if hasattr(o.adata, "uns") else {}).get("spatial_unit", ""))
             for o in [*others, session]}
    note = f"{session.name} is shown to the right of {', '.join(o.name for o in others)}"
    if len(units - {""}) > 1:
        note += f" (their positions are in different units: {', '.join(sorted(units - {''}))})"
    return note + "; its positions in the data and in exports are unchanged."


# ----------------------------------------------------------------------------- registry


def session_of(layer) -> Optional[SliceSession]:
    """The slice session a layer belongs to (registry first, then the layer's metadata).

    A layer that carries only ``metadata['adata']`` (e.g. made by a script) gets a new
    session, shared from then on by every layer holding the same AnnData.
    """
    if layer is None:
        return None
    layer = unwrap(layer)
    try:
        found = _SESSIONS.get(layer)
    except TypeError:
        found = None
    if found is not None:
        return found
    meta = getattr(layer, "metadata", None) or {}
    session = meta.get("stofm_session")
    if session is None and meta.get("adata") is not None:
        adata = meta["adata"]
        for s in list(_SESSIONS.values()):
            if s.adata is adata:
                session = s
                break
        if session is None:
            session = SliceSession(adata)
        meta["stofm_session"] = session
    if session is not None:
        try:
            _SESSIONS[layer] = session
        except TypeError:
            pass
    return session


def slice_layers(viewer):
    """Layers of the viewer that carry a slice (cells Points first, then any other)."""
    out = [l for l in viewer.layers if (l.metadata or {}).get("stofm_role") == ROLE_CELLS]
    seen = {id(session_of(l)) for l in out}
    for layer in viewer.layers:
        meta = layer.metadata or {}
        s = session_of(layer) if "adata" in meta or "stofm_session" in meta else None
        if s is not None and id(s) not in seen:
            out.append(layer)
            seen.add(id(s))
    return out


def labels_layer_for(viewer, session, key):
    for layer in viewer.layers:
        meta = layer.metadata or {}
        if meta.get("stofm_key") == key and session_of(layer) is session and _is_labels(layer):
            return layer
    return None


def _is_labels(layer) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels)


# ----------------------------------------------------------------------------- styling


def labels_colormap(annotation):
    """A ``DirectLabelColormap``: value ``code + 1`` -> class colour; 0 and unknown transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {None: np.zeros(4, np.float32), 0: np.zeros(4, np.float32)}
    for code, hex_color in enumerate(annotation.colors):
        colors[code + 1] = _rgba(hex_color)
    return DirectLabelColormap(color_dict=colors)


def _rgba(hex_color: str) -> np.ndarray:
    h = hex_color.lstrip("#")
    return np.array([int(h[i: i + 2], 16) / 255.0 for i in (0, 2, 4)] + [1.0], dtype=np.float32)


def labels_features(annotation) -> pd.DataFrame:
    """One row per label value (0 = unassigned): class name, cells, mean confidence, curated."""
    summary = annotation.summary()
    unassigned = annotation.codes < 0
    rows = {
        "index": np.arange(annotation.n_classes + 1, dtype=np.int64),
        "class": ["unassigned"] + list(summary["name"]),
        "n_cells": np.concatenate([[int(unassigned.sum())], summary["n_cells"].to_numpy()]),
        "mean_confidence": np.round(np.concatenate([[np.nan], summary["mean_confidence"].to_numpy()]), 3),
        "n_curated": np.concatenate([[int((unassigned & annotation.curated).sum())], summary["n_curated"].to_numpy()]),
    }
    return pd.DataFrame(rows)


def _point_features(adata) -> pd.DataFrame:
    """obs as a Points features table: numbers, booleans and categories (strings as categories)."""
    obs = adata.obs
    cols = {"cell_id": pd.Categorical(np.asarray(adata.obs_names).astype(str))}
    for name in obs.columns:
        col = obs[name]
        if (isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_numeric_dtype(col)
                or pd.api.types.is_bool_dtype(col)):
            cols[str(name)] = col.to_numpy() if not isinstance(col.dtype, pd.CategoricalDtype) else col.array
        elif pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col):
            cols[str(name)] = pd.Categorical(col.astype(str))
    return pd.DataFrame(cols).reset_index(drop=True)


# ----------------------------------------------------------------------------- layer data


def cells_layer_data(session: SliceSession):
    """Layer data tuple of the cells as Points at (y, x), with obs as features."""
    from napari_stofm.review.raster import spacing_of

    xy = session.xy
    spacing = spacing_of(xy)
    meta = {"adata": session.adata, "stofm_session": session, "stofm_role": ROLE_CELLS}
    kwargs = {
        "name": f"{session.name} cells",
        "translate": tuple(display_offset(session)),
        "features": _point_features(session.adata),
        "size": max(spacing * 0.45, 1e-9),
        "face_color": "#9aa0a6",
        "border_width": 0,
        "opacity": 0.8,
        "metadata": meta,
        "visible": not session.annotations,
    }
    return (xy[:, ::-1].copy(), kwargs, "points")


def labels_layer_data(session: SliceSession, key: str, *, visible: bool = True):
    """Layer data tuple of one annotation as a Labels image over the cell territories."""
    terr = session.territories
    ann = session.annotations[key]
    kwargs = {
        "name": layer_name(key),
        "scale": terr.scale,
        "translate": tuple(np.asarray(terr.translate) + display_offset(session)),
        "colormap": labels_colormap(ann),
        "features": labels_features(ann),
        "opacity": 0.75,
        "visible": visible,
        "metadata": {"adata": session.adata, "stofm_session": session, "stofm_role": ROLE_LABELS,
                     "stofm_key": key},
    }
    return (terr.class_image(ann.codes), kwargs, "labels")


def slice_layer_data(session: SliceSession):
    """Everything a slice shows when opened: its cells, then one Labels layer per annotation.

    One Labels layer is visible (a prediction first: stacked label images hide each other),
    and it comes last, so napari puts it on top and makes it the active layer: the layer
    shown is the one the layer controls and the brush act on."""
    layers = [cells_layer_data(session)]
    keys = list(session.annotations)
    shown = next((k for k in keys if k.startswith("stofm_")), keys[0] if keys else None)
    for key in [k for k in keys if k != shown] + ([shown] if shown is not None else []):
        layers.append(labels_layer_data(session, key, visible=key == shown))
    return layers


def add_or_update_labels(viewer, session: SliceSession, key: str):
    """Show annotation ``key`` of ``session``: refresh its layer, or add one."""
    layer = labels_layer_for(viewer, session, key)
    data, kwargs, _ = labels_layer_data(session, key)
    if layer is None:
        layer = unwrap(viewer.add_labels(data, **kwargs))
        _SESSIONS[layer] = session
    else:
        refresh_labels_layer(layer, session, key, data=data)
    return layer


def refresh_labels_layer(layer, session: SliceSession, key: str, *, data=None, classes_only: bool = False):
    """Bring a Labels layer in line with its annotation (data, colours, features)."""
    ann = session.annotations[key]
    if not classes_only:
        terr = session.territories
        if data is None:
            data = terr.class_image(ann.codes)
        if layer.data.shape == data.shape:
            layer.data[...] = data
        else:
            layer.data = data
        layer.scale = terr.scale
        layer.translate = tuple(np.asarray(terr.translate) + display_offset(session))
        compat.clear_history(layer)
    layer.colormap = labels_colormap(ann)
    layer.features = labels_features(ann)
    layer.refresh()
