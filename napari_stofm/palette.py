"""The one palette: class colours as ``'#rrggbb'`` (scverse ``uns['<key>_colors']``)."""
from __future__ import annotations

import colorsys
from typing import Dict, Iterable, List, Mapping, Optional

from napari_stofm.errors import StofmInputError

# Okabe-Ito (colour-blind safe; black left out: it reads as "no label") first, then colours
# from Kelly's, tab20 and scanpy's godsnot lists, each chosen farthest (CIELAB) from those
# before it: the first 20 are >= 26 Delta-E apart, all 30 >= 20 (tests/test_colors_by_name.py).
PALETTE = [
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#654522", "#11c638", "#be0032", "#c2b280", "#f99379", "#023fa5", "#98df8a",
    "#7f7f7f", "#637939", "#9467bd", "#8db600", "#882d17", "#c5b0d5", "#2b3d26",
    "#9edae5", "#8e063b", "#7b4173", "#393b79", "#ffbb78", "#0fcfc0", "#c49c94",
    "#7d87b9", "#c7c7c7",
]


def default_colors(n: int, used: Iterable[str] = ()) -> List[str]:
    """``n`` distinct hex colours, always the same for the same ``n`` and ``used``.

    The fixed list above first, then hues spread by the golden angle at alternating
    lightness; colours in ``used`` are skipped (a class added later gets a new colour).
    """
    taken = {c.lower() for c in used}
    out: List[str] = []
    for color in PALETTE:
        if len(out) == n:
            return out
        if color.lower() not in taken:
            out.append(color)
            taken.add(color.lower())
    i = len(PALETTE)
    while len(out) < n:
        hue = (i * 0.618033988749895) % 1.0
        lightness = 0.45 if i % 2 else 0.62
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.75)
        color = "#{:02x}{:02x}{:02x}".format(int(r * 255), int(g * 255), int(b * 255))
        if color not in taken:
            out.append(color)
            taken.add(color)
        i += 1
    return out


def to_hex(color) -> str:
    """'#rrggbb' from a hex string ('#rgb', '#rrggbb', '#rrggbbaa'), an RGB(A) sequence
    (floats in [0, 1] or ints in [0, 255]) or, when matplotlib is installed, a colour name."""
    if isinstance(color, str):
        text = color.strip().lower()
        digits = text[1:] if text.startswith("#") else text
        if all(c in "0123456789abcdef" for c in digits) and len(digits) in (3, 4, 6, 8):
            if len(digits) in (3, 4):
                digits = "".join(c * 2 for c in digits[:3])
            return "#" + digits[:6]
        try:
            from matplotlib.colors import to_hex as mpl_to_hex
        except ImportError:
            mpl_to_hex = None
        if mpl_to_hex is not None:
            try:
                return mpl_to_hex(text)
            except ValueError:
                pass
        raise StofmInputError(f"{color!r} is not a colour: use a hex string such as '#1f77b4'.")
    try:
        rgb = [float(v) for v in list(color)[:3]]
    except (TypeError, ValueError):
        raise StofmInputError(f"{color!r} is not a colour: use a hex string such as '#1f77b4'.") from None
    if len(rgb) != 3 or min(rgb) < 0:
        raise StofmInputError(f"{color!r} is not a colour: give 3 or 4 values (RGB or RGBA).")
    scale = 1.0 if max(rgb) <= 1.0 else 255.0
    if max(rgb) > scale:
        raise StofmInputError(f"{color!r} is not a colour: RGB values must be in [0, 1] or [0, 255].")
    return "#" + "".join(f"{round(v / scale * 255):02x}" for v in rgb)




def colors_for(names: Iterable[str], known: Optional[Mapping[str, str]] = None) -> List[str]:
    """One colour per class name: the colour ``known`` gives that name (e.g. the slice's
    ground-truth column, a reference's labels), else the first palette colour no other class
    of ``names`` uses (deterministic). The same name thus gets the same colour in every layer."""
    names = [str(n) for n in names]
    known = {str(k): to_hex(v) for k, v in (known or {}).items()}
    out: List[Optional[str]] = [known.get(n) for n in names]
    # a known colour given to two names (two columns disagreeing) is kept by the first only
    seen: set = set()
    for i, color in enumerate(out):
        if color is not None and color in seen:
            out[i] = None
        elif color is not None:
            seen.add(color)
    fresh = iter(default_colors(sum(c is None for c in out), used=seen))
    return [c if c is not None else next(fresh) for c in out]


def known_colors(adata, columns: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """``{class name: colour}`` from the categorical obs columns of an AnnData (or those in
    ``columns``) that store ``uns['<col>_colors']`` (one per category). Earlier columns win a
    name they share."""
    import pandas as pd

    out: Dict[str, str] = {}
    obs = getattr(adata, "obs", None)
    if obs is None:
        return out
    for col in list(columns) if columns is not None else list(obs.columns):
        if col not in obs or not isinstance(obs[col].dtype, pd.CategoricalDtype):
            continue
        cats = [str(c) for c in obs[col].cat.categories]
        stored = getattr(adata, "uns", {}).get(f"{col}_colors")
        if stored is None or isinstance(stored, (str, bytes)) or len(stored) != len(cats):
            continue
        try:
            colors = [to_hex(str(c) if not isinstance(c, (list, tuple)) else c) for c in stored]
        except (StofmInputError, TypeError, ValueError):
            continue
        for name, color in zip(cats, colors, strict=True):
            if name:
                out.setdefault(name, color)
    return out
