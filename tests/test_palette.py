"""The default label palette: deterministic, distinct hex colours (Okabe-Ito first)."""
from __future__ import annotations

from napari_stofm.palette import default_colors


def test_palette_is_deterministic_distinct_hex():
    colors = default_colors(40)
    assert colors == default_colors(40)
    assert len(set(c.lower() for c in colors)) == 40
    assert all(len(c) == 7 and c.startswith("#") for c in colors)
    assert colors[:3] == ["#e69f00", "#56b4e9", "#009e73"]  # Okabe-Ito first
