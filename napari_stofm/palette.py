"""The one palette: class colours as ``'#rrggbb'`` (scverse ``uns['<key>_colors']``)."""
from __future__ import annotations

import colorsys
from typing import Iterable, List

from napari_stofm.errors import StofmInputError

# Okabe-Ito (colour-blind safe; black left out: it reads as "no label") first, then
# distinct colours from scanpy's default_20 / godsnot palettes.
PALETTE = [
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#8c564b", "#17becf", "#bcbd22", "#9467bd", "#e377c2", "#2ca02c", "#d62728",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5", "#023fa5", "#8e063b", "#11c638", "#ef9708", "#0fcfc0",
    "#7d87b9", "#e07b91",
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


