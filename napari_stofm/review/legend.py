"""What a legend of one labelling shows: each class's colour, name and cell count, in class
order (no napari, no Qt; the canvas legend is :mod:`napari_stofm._napari.legend`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from napari_stofm.heads.annotation import Annotation

#: classes listed before the rest are summarised as "+ N more"
MAX_ENTRIES = 24


@dataclass(frozen=True)
class LegendEntry:
    code: int
    name: str
    color: str  # '#rrggbb'
    n_cells: int


@dataclass(frozen=True)
class Legend:
    title: str
    entries: List[LegendEntry]
    n_more: int = 0  # classes left out (the smallest ones)
    n_unassigned: int = 0

    def lines(self) -> List[str]:
        """The legend as text, one line per row (for a tooltip, a log or a test)."""
        out = [self.title] + [f"{e.name} ({e.n_cells:,})" for e in self.entries]
        if self.n_more:
            out.append(f"+ {self.n_more} more")
        if self.n_unassigned:
            out.append(f"unassigned ({self.n_unassigned:,})")
        return out


def legend_of(annotation: Annotation, title: str = "", *, max_entries: int = MAX_ENTRIES) -> Legend:
    """The legend of ``annotation``: every class in code order; past ``max_entries``, the
    largest classes are kept (still in code order) and the rest counted in ``n_more``."""
    counts = np.bincount(annotation.codes[annotation.codes >= 0], minlength=annotation.n_classes)
    codes = np.arange(annotation.n_classes)
    if codes.size > max_entries:
        keep = np.sort(np.argsort(-counts, kind="stable")[:max_entries])
    else:
        keep = codes
    entries = [LegendEntry(int(c), str(annotation.categories[c]), str(annotation.colors[c]), int(counts[c]))
               for c in keep]
    return Legend(title or annotation.key, entries, int(codes.size - keep.size), int(annotation.n_unassigned))
