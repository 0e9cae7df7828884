"""The least-confident review order (no napari)."""
from __future__ import annotations

import numpy as np

from napari_stofm.heads.annotation import Annotation
from napari_stofm.review.queue import ReviewQueue


def _annotation():
    conf = np.array([0.9, 0.2, np.nan, 0.5, 0.1, 0.7], dtype=np.float32)
    ann = Annotation.from_prediction("stofm_cell_type", ["A", "B"], np.array([0, 1, 0, 1, 0, -1]), conf)
    ann.curated[3] = True  # already curated: not to review
    return ann


def test_least_confident_first_unknown_last_curated_left_out():
    ann = _annotation()
    queue = ReviewQueue(ann, [f"c{i}" for i in range(6)])
    assert queue.n_to_review == 5
    shown = [queue.next() for _ in range(5)]
    assert shown == [4, 1, 5, 0, 2]
    assert queue.next() is None and queue.current == 2  # none left: the position is kept


def test_next_skips_cells_curated_meanwhile_and_previous_goes_back_through_the_shown():
    ann = _annotation()
    queue = ReviewQueue(ann)
    assert queue.next() == 4
    ann.curated[1] = True  # corrected on the canvas meanwhile
    assert queue.next() == 5
    assert queue.previous() == 4 and queue.previous() is None
    assert queue.next() == 5  # forward through the shown cells first
    assert queue.next() == 0


def test_summary_says_class_confidence_and_rank():
    ann = _annotation()
    queue = ReviewQueue(ann, [f"c{i}" for i in range(6)])
    queue.next()
    queue.next()
    summary = queue.summary()
    assert (summary.cell, summary.class_name, summary.rank) == (1, "B", 2)
    assert summary.describe() == "cell c1: B, confidence 0.20 (2nd least confident of 5)"
    assert "unassigned, confidence 0.70" in queue.summary(5).describe()
    assert "curated before this review" in queue.summary(3).describe()
    assert "confidence unknown" in queue.summary(2).describe()
