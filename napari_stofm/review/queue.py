"""The least-confident review: the cells of one labelling in the order a person should check
them, with a position to go forward and back (no napari, no Qt).

:class:`ReviewQueue` orders the cells nobody has curated by confidence, lowest first
(unknown confidence last), as :meth:`~napari_stofm.heads.annotation.Annotation.least_confident`
does. :meth:`~ReviewQueue.next` moves to the next cell not yet shown that is still
uncurated (a cell corrected or accepted meanwhile is skipped); :meth:`~ReviewQueue.previous`
goes back through the cells shown, curated or not, so an answer can be checked again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from napari_stofm.heads.annotation import Annotation


@dataclass
class CellSummary:
    """What the review shows about one cell."""

    cell: int
    cell_id: str
    code: int  # -1: unassigned
    class_name: str
    confidence: float  # NaN: unknown
    curated: bool
    rank: int  # 1 = the least confident of the cells to review
    n_to_review: int

    def describe(self) -> str:
        """``"cell c_12: Astrocyte, confidence 0.31 (3rd least confident of 2,950)"``."""
        conf = "unknown" if not np.isfinite(self.confidence) else f"{self.confidence:.2f}"
        state = ", curated" if self.curated else ""
        where = (f"{_ordinal(self.rank)} least confident of {self.n_to_review:,}" if self.rank > 0
                 else "curated before this review")
        return f"cell {self.cell_id}: {self.class_name}, confidence {conf}{state} ({where})"


class ReviewQueue:
    """Cells of ``annotation`` to review, least confident first (see the module docs)."""

    def __init__(self, annotation: Annotation, cell_ids=None):
        self.annotation = annotation
        self.cell_ids = None if cell_ids is None else np.asarray(cell_ids).astype(str)
        self.order = annotation.least_confident(annotation.n_cells)  # uncurated cells, as of now
        self._rank = np.full(annotation.n_cells, -1, dtype=np.int64)
        self._rank[self.order] = np.arange(self.order.size)
        self.shown: List[int] = []  # cells shown, in order
        self.position = -1  # index into shown
        self._next = 0  # next index into order to consider

    @property
    def current(self) -> Optional[int]:
        return self.shown[self.position] if 0 <= self.position < len(self.shown) else None

    @property
    def n_to_review(self) -> int:
        return int(self.order.size)

    def next(self) -> Optional[int]:
        """The next cell: forward through the cells shown, then the least confident cell not
        yet shown and still uncurated; None (and the position kept) when none is left."""
        if self.position + 1 < len(self.shown):
            self.position += 1
            return self.current
        curated = self.annotation.curated
        while self._next < self.order.size:
            cell = int(self.order[self._next])
            self._next += 1
            if cell < curated.size and not curated[cell]:
                self.shown.append(cell)
                self.position = len(self.shown) - 1
                return cell
        return None

    def previous(self) -> Optional[int]:
        """The cell shown before the current one (None at the first)."""
        if self.position <= 0:
            return None
        self.position -= 1
        return self.current

    def summary(self, cell: Optional[int] = None) -> Optional[CellSummary]:
        """What to show about ``cell`` (default: the current one)."""
        cell = self.current if cell is None else int(cell)
        if cell is None:
            return None
        ann = self.annotation
        code = int(ann.codes[cell])
        name = ann.categories[code] if code >= 0 else "unassigned"
        rank = int(self._rank[cell]) + 1 if self._rank[cell] >= 0 else 0
        cell_id = str(self.cell_ids[cell]) if self.cell_ids is not None else str(cell)
        return CellSummary(cell, cell_id, code, name, float(ann.confidence[cell]), bool(ann.curated[cell]), rank,
                           self.n_to_review)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n:,}{suffix}"
