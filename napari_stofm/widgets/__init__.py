"""napari dock widgets of napari-stofm (thin: every action is a library call).

* :class:`RunWidget` — "Run SToFM"
* :class:`ReviewWidget` — "Review labels"
* :class:`ExportWidget` — "Export labels"
"""
from .export_widget import ExportWidget
from .review_widget import ReviewWidget
from .run_widget import RunWidget

__all__ = ["RunWidget", "ReviewWidget", "ExportWidget"]
