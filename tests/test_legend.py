"""What the canvas legend shows for a labelling (no napari)."""
from __future__ import annotations

import numpy as np

from napari_stofm.heads.annotation import Annotation
from napari_stofm.review.legend import legend_of


def test_every_class_in_order_with_its_colour_and_cells():
    ann = Annotation.from_prediction("stofm_region", ["a", "b", "c"], np.array([0, 2, 2, -1]))
    legend = legend_of(ann, "tissue regions (SToFM)")
    assert [(e.name, e.color, e.n_cells) for e in legend.entries] == [
        (n, c, k) for n, c, k in zip(ann.categories, ann.colors, [1, 0, 2], strict=True)]
    assert legend.lines() == ["tissue regions (SToFM)", "a (1)", "b (0)", "c (2)", "unassigned (1)"]


def test_many_classes_keep_the_largest_in_class_order():
    codes = np.repeat(np.arange(30), np.arange(1, 31))  # class i has i + 1 cells
    ann = Annotation.from_prediction("stofm_cell_type", [f"t{i}" for i in range(30)], codes)
    legend = legend_of(ann, max_entries=5)
    assert [e.name for e in legend.entries] == ["t25", "t26", "t27", "t28", "t29"]
    assert legend.n_more == 25 and legend.lines()[-1] == "+ 25 more"
