"""The least-confident review of the Review widget: one cell at a time, least confident first.

The order and the position are :class:`napari_stofm.review.queue.ReviewQueue`; accepting
and relabelling are :meth:`~napari_stofm._napari.binding.LabelsBinding.relabel` (one undo
step of the layer each). This panel only shows the current cell: it centres the view on it,
rings it with a marker (a Points layer, ``review: current cell``), says its class and
confidence, and binds these keys on the labels layer the Review widget shows:

=========  ==================================================================
``N``      next least confident cell (``Shift-N``: the previous one)
``A``      accept: mark the cell curated, class unchanged
``R``      relabel the cell to the label napari's brush paints (``layer.selected_label``;
           pick a class in the table, or with napari's ``-`` / ``=`` keys)
=========  ==================================================================
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from napari_stofm._napari.binding import bind
from napari_stofm._napari.layers import world_yx
from napari_stofm.errors import StofmError
from napari_stofm.review.raster import PIXELS_PER_SPACING
from napari_stofm.widgets._common import show_error

log = logging.getLogger(__name__)

#: the role (layer metadata) of the marker layer
ROLE_MARKER = "review_marker"
MARKER_NAME = "review: current cell"
MARKER_COLOR = "#ffea00"
#: the keys bound on the layer under review (napari key names) -> panel method
KEYS = {"N": "next", "Shift-N": "previous", "A": "accept", "R": "relabel"}
#: cells across the view when the review zooms in on one
CELLS_ACROSS = 12


class CellReviewPanel(QWidget):
    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.session = None
        self.key: Optional[str] = None
        self._layer_ref = None
        self._keyed_ref = None  # the layer whose keys are bound
        self.queue = None
        self.last_error: Optional[str] = None

        self.previous_button = QPushButton("◀ Previous")
        self.previous_button.setToolTip("the cell shown before (Shift+N on the layer)")
        self.previous_button.clicked.connect(self.previous)
        self.next_button = QPushButton("Next least confident ▶")
        self.next_button.setToolTip("centre on the next uncorrected cell with the lowest confidence (N on the layer)")
        self.next_button.clicked.connect(self.next)
        self.accept_button = QPushButton("Accept")
        self.accept_button.setToolTip("the class is right: mark the cell curated without changing it (A)")
        self.accept_button.clicked.connect(self.accept)
        self.relabel_button = QPushButton("Relabel to selected")
        self.relabel_button.setToolTip("give the cell the class selected in the table / napari's label box (R)")
        self.relabel_button.clicked.connect(lambda: self.relabel())
        self.info = QLabel("")
        self.info.setWordWrap(True)
        row1 = QHBoxLayout()
        row1.addWidget(self.previous_button)
        row1.addWidget(self.next_button)
        row2 = QHBoxLayout()
        row2.addWidget(self.accept_button)
        row2.addWidget(self.relabel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row1)
        layout.addLayout(row2)
        layout.addWidget(self.info)
        self._update_enabled()

    # ------------------------------------------------------------------ source
    @property
    def layer(self):
        return self._layer_ref() if self._layer_ref is not None else None

    @property
    def annotation(self):
        if self.session is None or self.key not in self.session.annotations:
            return None
        return self.session.annotations[self.key]

    @property
    def current_cell(self) -> Optional[int]:
        return self.queue.current if self.queue is not None else None

    def set_source(self, layer, session, key) -> None:
        """Review labelling ``key`` of ``session`` shown by ``layer`` (None: nothing)."""
        if layer is self.layer and session is self.session and key == self.key:
            return
        self._unbind_keys()
        self._layer_ref = weakref.ref(layer) if layer is not None else None
        self.session, self.key = session, key
        self.reset()
        if self.annotation is not None:
            self._bind_keys()  # the review's keys work on the layer from now on

    def reset(self) -> None:
        """Start the order again (after the classes were renumbered or replaced)."""
        self.queue = None
        self._hide_marker()
        self.info.setText("")
        self._update_enabled()

    def on_session_change(self, key: str, what: str) -> None:
        if key != self.key:
            return
        if what in ("replaced", "merged"):
            self.reset()
        elif self.current_cell is not None:
            self._describe()

    def _ensure_queue(self):
        from napari_stofm.review.queue import ReviewQueue

        ann = self.annotation
        if ann is None:
            return None
        if self.queue is None or self.queue.annotation is not ann:
            self.queue = ReviewQueue(ann, self.session.adata.obs_names)
            self._bind_keys()
        return self.queue

    def _update_enabled(self) -> None:
        has = self.annotation is not None
        current = self.current_cell is not None
        self.next_button.setEnabled(has)
        self.previous_button.setEnabled(has and self.queue is not None and self.queue.position > 0)
        self.accept_button.setEnabled(current)
        self.relabel_button.setEnabled(current)

    # ------------------------------------------------------------------ navigation
    def next(self) -> Optional[int]:
        """Show the next least confident uncorrected cell; returns it (None when none is left)."""
        queue = self._ensure_queue()
        if queue is None:
            return None
        cell = queue.next()
        if cell is None:
            self.info.setText("every uncorrected cell has been shown (Previous goes back through them).")
            self._update_enabled()
            return None
        self._show(cell)
        return cell

    def previous(self) -> Optional[int]:
        queue = self._ensure_queue()
        cell = queue.previous() if queue is not None else None
        if cell is not None:
            self._show(cell)
        self._update_enabled()
        return cell

    def _show(self, cell: int) -> None:
        """Centre on ``cell`` (zooming in to about a dozen cells across, never out), ring it,
        keep the labels layer active (for the keys and the brush) and describe the cell."""
        session, layer = self.session, self.layer
        yx = world_yx(session, cell)[0]
        self.viewer.camera.center = tuple(yx)
        span = max(session.territories.scale) * PIXELS_PER_SPACING * CELLS_ACROSS
        self.viewer.camera.zoom = max(600.0 / span, self.viewer.camera.zoom)
        self._show_marker(yx)
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.selection.active = layer
        self._describe()
        self._update_enabled()

    def _describe(self) -> None:
        summary = self.queue.summary() if self.queue is not None else None
        if summary is None:
            return
        keys = "N next, Shift+N previous, A accept, R relabel to the selected class"
        self.info.setText(f"{summary.describe()}\n{keys}")

    # ------------------------------------------------------------------ answers
    def accept(self):
        """Mark the current cell curated without changing its class (one undo step)."""
        return self._answer(None)

    def relabel(self, code: Optional[int] = None):
        """Give the current cell class ``code`` (default: the label napari's brush paints,
        ``layer.selected_label - 1``; label 0 unassigns) and mark it curated (one undo step)."""
        layer = self.layer
        if code is None:
            if layer is None:
                return None
            code = int(layer.selected_label) - 1
        return self._answer(int(code))

    def _answer(self, code: Optional[int]):
        cell, layer = self.current_cell, self.layer
        if cell is None or layer is None or self.session is None:
            return None
        try:
            edit = bind(layer, self.session, self.key).relabel([cell], code)
        except StofmError as err:
            self.last_error = str(err)
            show_error(f"Review: {err}")
            return None
        self._describe()
        return edit

    # ------------------------------------------------------------------ marker
    @property
    def marker_layer(self):
        for layer in self.viewer.layers:
            if (layer.metadata or {}).get("stofm_role") == ROLE_MARKER:
                return layer
        return None

    def _show_marker(self, yx) -> None:
        from napari_stofm.review.raster import spacing_of

        data = np.asarray([yx], dtype=np.float64)
        marker = self.marker_layer
        if marker is None:
            size = 2.6 * spacing_of(self.session.xy)
            marker = self.viewer.add_points(
                data, name=MARKER_NAME, symbol="ring", size=size, face_color=MARKER_COLOR, border_color="#000000",
                border_width=0.08, border_width_is_relative=True, opacity=1.0,
                metadata={"stofm_role": ROLE_MARKER})
        else:
            marker.data = data
            marker.visible = True
            if self.viewer.layers.index(marker) != len(self.viewer.layers) - 1:
                self.viewer.layers.move(self.viewer.layers.index(marker), len(self.viewer.layers))

    def _hide_marker(self) -> None:
        marker = self.marker_layer
        if marker is not None:
            marker.visible = False

    # ------------------------------------------------------------------ keys
    def _bind_keys(self) -> None:
        layer = self.layer
        if layer is None or (self._keyed_ref is not None and self._keyed_ref() is layer):
            return
        self._unbind_keys()
        ref = weakref.ref(self)
        for key, method in KEYS.items():
            def action(_layer, method=method):
                panel = ref()
                if panel is not None:
                    getattr(panel, method)()
            layer.bind_key(key, action, overwrite=True)
        self._keyed_ref = weakref.ref(layer)

    def _unbind_keys(self) -> None:
        layer = self._keyed_ref() if self._keyed_ref is not None else None
        self._keyed_ref = None
        if layer is None:
            return
        for key in KEYS:
            try:
                layer.bind_key(key, None)
            except (KeyError, ValueError, TypeError):  # already unbound / the layer is being torn down
                log.debug("could not unbind %s", key, exc_info=True)
