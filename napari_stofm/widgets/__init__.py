"""napari dock widgets of napari-stofm (thin: every action is a library call).

* :class:`RunWidget` — "Run SToFM"
* :class:`ReviewWidget` — "Review labels"
* :class:`ExportWidget` — "Export labels"
"""
from napari_stofm.widgets.export_widget import ExportWidget
from napari_stofm.widgets.review_widget import ReviewWidget
from napari_stofm.widgets.run_widget import RunWidget

__all__ = ["RunWidget", "ReviewWidget", "ExportWidget"]
