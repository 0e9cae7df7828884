"""napari layers of a slice: the cells as Points, each annotation as a Labels layer.

Every layer made here carries ``metadata['adata']`` (the AnnData) and
``metadata['stofm_session']`` (the :class:`~napari_stofm.review.session.SliceSession`);
Labels layers also ``metadata['stofm_key']`` (the annotation they show). Label value
``code + 1`` is class ``code``; 0 is background / unassigned.

Labels layers are single-scale (napari 0.9 paints on no multiscale Labels layer), over a
territory raster whose size is capped (:data:`~napari_stofm.review.raster.DEFAULT_MAX_PIXELS`),
and hold the smallest dtype that fits their classes (uint8 up to 255 classes), which napari
sends to the GPU as it is. What a layer shows can be made off the UI thread
(:func:`prepare_labels`) and handed to these functions (:func:`offer_prepared`), which then
render nothing themselves.

Layer names tell a prediction from the labels that came with the slice
(:func:`layer_name`: ``tissue regions (SToFM)`` / ``cell_type (in file)``). A slice opened
into a viewer that already shows one is drawn to the right of it (:func:`place_beside`): its
layers are translated by :func:`display_offset`, in the world only (positions in the
AnnData and in every export stay as they are).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

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
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # session -> {key: LabelsDisplay}
#: metadata flag of a Labels layer whose pixels were just rendered from its annotation (the
#: binding then has nothing to re-map when it attaches)
IN_STEP = "stofm_in_step"


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


def label_colors(annotation) -> dict:
    """``{label value: RGBA}`` of an annotation: ``code + 1`` -> class colour; 0 and unknown
    (``None``) transparent. Plain numpy: can be made in a worker thread."""
    colors = {None: np.zeros(4, np.float32), 0: np.zeros(4, np.float32)}
    for code, hex_color in enumerate(annotation.colors):
        colors[code + 1] = _rgba(hex_color)
    return colors


def labels_colormap(annotation=None, *, colors: Optional[dict] = None):
    """A ``DirectLabelColormap``: value ``code + 1`` -> class colour; 0 and unknown transparent
    (``colors``: :func:`label_colors` made beforehand)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=label_colors(annotation) if colors is None else colors)


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


def _cell_ids(obs_names) -> pd.Categorical:
    """The cell ids as a Categorical in cell order (unique ids: no sort of a million strings)."""
    names = np.asarray(obs_names).astype(str)
    try:
        return pd.Categorical.from_codes(np.arange(names.size), categories=pd.Index(names))
    except ValueError:  # repeated ids
        return pd.Categorical(names)


def _point_features(adata) -> pd.DataFrame:
    """obs as a Points features table: numbers, booleans and categories (strings as categories)."""
    obs = adata.obs
    cols = {"cell_id": _cell_ids(adata.obs_names)}
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


@dataclass
class LabelsDisplay:
    """What a Labels layer of one annotation shows: its pixels (the smallest dtype that holds
    the classes, :func:`~napari_stofm.review.raster.label_dtype`), colours and features table.

    Made by :func:`prepare_labels` from plain numpy / pandas, so a worker thread can make it
    at the end of a long call; the UI thread then only hands it to napari."""

    annotation: object  # the Annotation it was rendered from
    data: np.ndarray
    colors: dict
    features: pd.DataFrame
    scale: Tuple[float, float]
    translate: Tuple[float, float]  # of the territories (the slice's display offset not added)
    _codes: np.ndarray = field(default=None, repr=False)  # the codes rendered
    _curated: np.ndarray = field(default=None, repr=False)  # the curated flags counted
    _classes: tuple = field(default=None, repr=False)  # the class names and colours shown

    def shows(self, annotation) -> bool:
        """Whether this is still what ``annotation`` looks like (same object, classes, codes,
        curated flags)."""
        return (annotation is self.annotation and _classes_of(annotation) == self._classes
                and np.array_equal(annotation.codes, self._codes)
                and np.array_equal(annotation.curated, self._curated))


def _classes_of(annotation) -> tuple:
    return tuple(annotation.categories), tuple(annotation.colors)


def prepare_labels(territories, annotation) -> LabelsDisplay:
    """The :class:`LabelsDisplay` of ``annotation`` over ``territories`` (no napari, no Qt)."""
    from napari_stofm.review.raster import label_dtype

    data = territories.class_image(annotation.codes, dtype=label_dtype(annotation.n_classes))
    return LabelsDisplay(annotation, data, label_colors(annotation), labels_features(annotation),
                         tuple(territories.scale), tuple(territories.translate),
                         _codes=annotation.codes.copy(), _curated=annotation.curated.copy(),
                         _classes=_classes_of(annotation))


def offer_prepared(session, displays: Dict[str, LabelsDisplay]) -> None:
    """Displays made off the UI thread for the annotations ``session`` is about to get: the
    layer functions below use them instead of rendering (until :func:`discard_prepared`, or
    until the annotation no longer looks like them)."""
    _PREPARED.setdefault(session, {}).update(displays)


def discard_prepared(session) -> None:
    _PREPARED.pop(session, None)


def prepared_for(session, key: str) -> Optional[LabelsDisplay]:
    """The display offered for ``session``'s annotation ``key`` when it still shows it."""
    displays = _PREPARED.get(session)
    display = displays.get(key) if displays else None
    if display is None:
        return None
    ann = session.annotations.get(key)
    if ann is None or not display.shows(ann):
        displays.pop(key, None)
        return None
    return display


def _display_of(session: SliceSession, key: str) -> LabelsDisplay:
    display = prepared_for(session, key)
    if display is None or tuple(display.data.shape) != tuple(session.territories.shape):
        display = prepare_labels(session.territories, session.annotations[key])
    return display


def labels_layer_data(session: SliceSession, key: str, *, visible: bool = True, in_step: bool = False):
    """Layer data tuple of one annotation as a Labels image over the cell territories.

    ``in_step``: the layer is bound as soon as napari adds it (nothing can paint on it
    before), so the binding need not compare its pixels with the annotation."""
    display = _display_of(session, key)
    kwargs = {
        "name": layer_name(key),
        "scale": display.scale,
        "translate": tuple(np.asarray(display.translate) + display_offset(session)),
        "colormap": labels_colormap(colors=display.colors),
        "features": display.features,
        "opacity": 0.75,
        "visible": visible,
        "metadata": {"adata": session.adata, "stofm_session": session, "stofm_role": ROLE_LABELS,
                     "stofm_key": key, **({IN_STEP: True} if in_step else {})},
    }
    return (display.data, kwargs, "labels")


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
    if layer is None:
        from napari_stofm._napari.binding import bind

        data, kwargs, _ = labels_layer_data(session, key, in_step=True)
        layer = unwrap(viewer.add_labels(data, **kwargs))
        _SESSIONS[layer] = session
        bind(layer, session, key)  # at once (a viewer already bound did so while adding it)
    else:
        display = prepared_for(session, key)
        if display is None or display.data is not layer.data:  # not brought in step already
            refresh_labels_layer(layer, session, key)
    return layer


def refresh_labels_layer(layer, session: SliceSession, key: str, *, data=None, classes_only: bool = False):
    """Bring a Labels layer in line with its annotation (data, colours, features).

    The pixels come from a display offered by :func:`offer_prepared` when there is one (no
    rendering here), else from ``data``, else they are rendered. A layer whose dtype cannot
    hold the classes (classes were added) gets a wider one."""
    from napari_stofm.review.raster import label_dtype

    ann = session.annotations[key]
    display = prepared_for(session, key)
    colors = display.colors if display is not None else label_colors(ann)
    with compat.one_refresh(layer):
        if not classes_only:
            terr = session.territories
            if display is not None and tuple(display.data.shape) == tuple(terr.shape):
                data = display.data  # taken as it is: the layer then holds the display's array
            elif data is None:
                data = terr.class_image(ann.codes, dtype=_layer_dtype(layer, ann))
            if data is not layer.data:
                same = layer.data.shape == data.shape and layer.data.dtype == data.dtype
                if data is not _display_data(display) and same:
                    layer.data[...] = data
                else:
                    layer.data = data
            layer.scale = terr.scale
            layer.translate = tuple(np.asarray(terr.translate) + display_offset(session))
            compat.clear_history(layer)
        elif np.asarray(layer.data).dtype != _layer_dtype(layer, ann):  # classes added past what the dtype holds
            layer.data = np.asarray(layer.data).astype(label_dtype(ann.n_classes))
            compat.clear_history(layer)
        layer.colormap = labels_colormap(colors=colors)
        layer.features = display.features if display is not None else labels_features(ann)


def _display_data(display: Optional[LabelsDisplay]):
    return display.data if display is not None else None


def _layer_dtype(layer, annotation) -> np.dtype:
    """The layer's dtype when it holds the annotation's classes, else the smallest that does."""
    from napari_stofm.review.raster import label_dtype

    dtype = np.asarray(layer.data).dtype
    if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max >= annotation.n_classes:
        return dtype
    return label_dtype(annotation.n_classes)
