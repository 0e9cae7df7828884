""""Review labels" dock widget: the class table of a SToFM Labels layer, and the tools
to correct it.

* The table lists every class (colour, name, cells, mean confidence, curated cells);
  double-click a name to rename it, click a swatch to recolour, select rows to merge
  them, add a class. Selecting a row makes it the label napari's brush paints.
* Paint, fill and erase on the layer itself are mapped back to cells by
  :class:`~napari_stofm._napari.binding.LabelsBinding` (undo/redo included).
* The least-confident review (:class:`~napari_stofm.widgets._cell_review.CellReviewPanel`)
  shows one uncorrected cell at a time, lowest confidence first: centred, ringed, its class
  and confidence said; accept it or relabel it, from the buttons or the keys ``N`` /
  ``Shift-N`` / ``A`` / ``R`` on the layer.
* "Refine from corrections" retrains the label head on the curated cells (worker thread,
  with progress and Cancel), says how many cells would change, and updates only the cells
  nobody corrected (one undo step).
* Tabs: the selected class's top genes (:class:`~napari_stofm.widgets._markers.MarkerPanel`)
  and the agreement with the slice's other labels
  (:class:`~napari_stofm.widgets._agreement.AgreementPanel`).
* "Legend on canvas" shows or hides the canvas legend of the visible labels
  (:mod:`napari_stofm._napari.legend`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QColorDialog,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_stofm._napari.binding import bind, bind_viewer, binding_of
from napari_stofm._napari.layers import ROLE_LABELS, session_of
from napari_stofm._napari.legend import legend_for
from napari_stofm.errors import StofmError
from napari_stofm.keys import display_name
from napari_stofm.widgets._agreement import AgreementPanel
from napari_stofm.widgets._cell_review import CellReviewPanel
from napari_stofm.widgets._common import TaskProgress, report_failure, show_error, start_worker
from napari_stofm.widgets._markers import MarkerPanel

COLUMNS = ("", "class", "cells", "confidence", "curated")


class ReviewWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._session = None
        self._key: Optional[str] = None
        self._layers = []
        self._filling = False
        self.refine_worker = None
        self.last_error: Optional[str] = None
        bind_viewer(napari_viewer)

        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._on_layer_chosen)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.cellClicked.connect(self._on_cell_clicked)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.table.setMinimumHeight(200)
        header = self.table.horizontalHeader()
        for col in (2, 3, 4):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Fixed)
        self.table.setColumnWidth(0, 24)
        self.table.horizontalHeaderItem(3).setToolTip("mean confidence of the class's cells")

        self.add_button = QPushButton("Add class")
        self.add_button.clicked.connect(self._ask_add_class)
        self.merge_button = QPushButton("Merge selected")
        self.merge_button.setToolTip("Merge the selected classes into the first selected one")
        self.merge_button.clicked.connect(self._merge_selected)
        self.legend_box = QCheckBox("Legend on canvas")
        self.legend_box.setChecked(True)
        self.legend_box.toggled.connect(self._on_legend_toggled)
        self.cells = CellReviewPanel(napari_viewer)  # least-confident review: one cell at a time
        self.next_button = self.cells.next_button
        self.refine_button = QPushButton("Refine from corrections")
        self.refine_button.setToolTip("Retrain the label head on the corrected cells; only uncorrected cells "
                                       "change. Says how many first; one undo step")
        self.refine_button.clicked.connect(self.refine)
        self.refine_task = TaskProgress(self)
        self.refine_task.setVisible(False)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.markers = MarkerPanel(napari_viewer)  # top genes of the selected class; click -> expression
        self.agreement = AgreementPanel(napari_viewer)  # against the slice's other labels
        self.tabs = QTabWidget()
        self.tabs.addTab(self.markers, "Top genes")
        self.tabs.addTab(self.agreement, "Agreement")

        row1 = QHBoxLayout()
        row1.addWidget(self.add_button)
        row1.addWidget(self.merge_button)
        row2 = QHBoxLayout()
        row2.addWidget(self.refine_button)
        row2.addWidget(self.refine_task.cancel_button)
        top = QHBoxLayout()
        top.addWidget(QLabel("Labels layer"))
        top.addStretch(1)
        top.addWidget(self.legend_box)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.layer_combo)
        layout.addWidget(self.table)
        layout.addLayout(row1)
        layout.addWidget(self.info)
        layout.addWidget(QLabel("<b>Least confident cells</b>"))
        layout.addWidget(self.cells)
        layout.addLayout(row2)
        layout.addWidget(self.refine_task)
        layout.addWidget(self.tabs)

        napari_viewer.layers.events.inserted.connect(self._refresh_layers)
        napari_viewer.layers.events.removed.connect(self._refresh_layers)
        napari_viewer.layers.selection.events.active.connect(self._on_active_layer)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def _refresh_layers(self, event=None):
        current = self.layer
        self._layers = [l for l in self.viewer.layers
                        if (l.metadata or {}).get("stofm_role") == ROLE_LABELS and session_of(l) is not None]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for layer in self._layers:
            self.layer_combo.addItem(layer.name)
        self.layer_combo.blockSignals(False)
        if current in self._layers:
            self.layer_combo.setCurrentIndex(self._layers.index(current))
        self._on_layer_chosen()

    def _on_active_layer(self, event=None):
        active = self.viewer.layers.selection.active
        if active in self._layers and active is not self.layer:
            self.layer_combo.setCurrentIndex(self._layers.index(active))

    @property
    def layer(self):
        i = self.layer_combo.currentIndex() if hasattr(self, "layer_combo") else -1
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def select_layer(self, layer) -> None:
        self._refresh_layers()
        if layer in self._layers:
            self.layer_combo.setCurrentIndex(self._layers.index(layer))

    @property
    def binding(self):
        layer = self.layer
        return binding_of(layer) if layer is not None else None

    @property
    def annotation(self):
        if self._session is None or self._key not in self._session.annotations:
            return None
        return self._session.annotations[self._key]

    def _on_layer_chosen(self, *_):
        layer = self.layer
        session = session_of(layer) if layer is not None else None
        key = (layer.metadata or {}).get("stofm_key") if layer is not None else None
        if self._session is not None and self._session is not session:
            self._session.unsubscribe(self._on_session_change)
        self._session, self._key = session, key
        if session is not None and key in session.annotations:
            bind(layer, session, key)
            session.subscribe(self._on_session_change)
        self.fill_table()
        self.markers.set_source(session, key)
        self.cells.set_source(layer, session, key)
        self.agreement.set_source(session, key)

    def _on_session_change(self, key, what):
        self.agreement.on_session_change(key, what)
        if key == self._key:
            self.fill_table()
            self.markers.request()
            self.cells.on_session_change(key, what)

    def _on_legend_toggled(self, on: bool):
        legend = legend_for(self.viewer)
        if legend is not None:
            legend.set_enabled(on)

    # ------------------------------------------------------------------ table
    def fill_table(self):
        ann = self.annotation
        self._filling = True
        try:
            self.table.setRowCount(0)
            enabled = ann is not None
            for w in (self.add_button, self.merge_button, self.next_button):
                w.setEnabled(enabled)
            self.refine_button.setEnabled(enabled and self.refine_worker is None)
            if ann is None:
                self.info.setText("Run SToFM (or open labelled data) to review labels.")
                return
            summary = ann.summary()
            self.table.setRowCount(len(summary))
            for code, row in summary.iterrows():
                swatch = QTableWidgetItem("")
                swatch.setBackground(QColor(row["color"]))
                swatch.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                swatch.setToolTip("click to change the colour")
                name = QTableWidgetItem(str(row["name"]))
                name.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEditable)
                conf = row["mean_confidence"]
                items = [swatch, name, _number(int(row["n_cells"])),
                         _number("–" if not np.isfinite(conf) else f"{conf:.2f}"), _number(int(row["n_curated"]))]
                for col, item in enumerate(items):
                    self.table.setItem(int(code), col, item)
            n_cur = int(ann.curated.sum())
            self.info.setText(f"{display_name(ann.key)}: {ann.n_classes} classes, {ann.n_cells} cells, "
                              f"{n_cur} corrected, {ann.n_unassigned} unassigned")
        finally:
            self._filling = False

    def _on_item_changed(self, item):
        if self._filling or item.column() != 1:
            return
        self.rename(item.row(), item.text())

    def _on_cell_clicked(self, row, col):
        if col == 0:
            ann = self.annotation
            if ann is None:
                return
            color = QColorDialog.getColor(QColor(ann.colors[row]), self, f"Colour of {ann.categories[row]}")
            if color.isValid():
                self.recolor(row, color.name())

    def _on_selection(self):
        rows = self.selected_codes()
        if rows and self.layer is not None:
            self.layer.selected_label = rows[0] + 1
        ann = self.annotation
        if rows and ann is not None and rows[0] < ann.n_classes:
            self.markers.show_class(ann.categories[rows[0]])

    def selected_codes(self):
        return sorted({i.row() for i in self.table.selectedIndexes()})

    # ------------------------------------------------------------------ class edits
    def _guard(self, what, func, *args):
        try:
            return func(*args)
        except StofmError as err:
            self.last_error = str(err)
            show_error(f"{what}: {err}")
            self.fill_table()
            return None

    def rename(self, code: int, name: str):
        return self._guard("Rename", self._session.rename, self._key, code, name)

    def recolor(self, code: int, color):
        return self._guard("Recolour", self._session.recolor, self._key, code, color)

    def add_class(self, name: str, color=None):
        code = self._guard("Add class", self._session.add_class, self._key, name, color)
        if code is not None and self.layer is not None:
            self.layer.selected_label = code + 1
        return code

    def merge(self, src: int, dst: int):
        return self._guard("Merge", self._session.merge, self._key, src, dst)

    def _ask_add_class(self):
        name, ok = QInputDialog.getText(self, "Add class", "Name of the new class:")
        if ok and name.strip():
            self.add_class(name.strip())

    def _merge_selected(self):
        codes = self.selected_codes()
        if len(codes) < 2:
            show_error("Select two or more classes to merge (the first one keeps its name).")
            return
        dst = codes[0]
        # merge from the highest code down so the lower codes keep their numbers
        for src in sorted(codes[1:], reverse=True):
            self.merge(src, dst)

    # ------------------------------------------------------------------ least-confident review
    @property
    def current_cell(self) -> Optional[int]:
        return self.cells.current_cell

    def next_least_confident(self) -> Optional[int]:
        """Show the next uncorrected cell with the lowest confidence (see :class:`CellReviewPanel`)."""
        return self.cells.next()

    # ------------------------------------------------------------------ refine
    def refine(self):
        """Retrain the head on the corrected cells in a worker; update uncorrected cells."""
        session, key = self._session, self._key
        if session is None or key is None:
            return None
        binding = self.binding
        if binding is not None:
            binding.flush()
        self.refine_button.setEnabled(False)
        self.info.setText("refining from the corrections…")
        self.refine_task.setVisible(True)
        progress, cancel = self.refine_task.start("Refine")
        self.refine_worker = start_worker(
            session.preview_refinement, key, progress=progress, cancel=cancel,
            on_return=lambda preview: self._on_refined(session, key, preview),
            on_error=self._on_refine_error,
            on_finish=self._on_refine_finished,
        )
        return self.refine_worker

    def cancel_refine(self):
        """Stop a refinement being computed (nothing changes)."""
        self.refine_task.cancel()

    #: ask "N cells would change — apply?" before a refinement is applied (tests turn it off)
    confirm_refine = True

    def _on_refined(self, session, key, preview):
        """The refinement is computed: say how many cells it changes, ask, then apply."""
        if self.refine_task.cancelling:  # Cancel pressed while the last step finished
            self.refine_task.finish("cancelled", "Refine cancelled; nothing was changed.")
            self.info.setText("not refined (cancelled).")
            return None
        self.refine_task.finish("done", "refinement computed")
        self.pending_refinement = (session, key, preview)
        text = preview.describe()
        self.info.setText(f"{text}.")
        if self.confirm_refine:
            from qtpy.QtWidgets import QMessageBox

            answer = QMessageBox.question(
                self, "Refine from corrections",
                f"{text}.\n\nApply? (Corrected cells keep their labels; Ctrl+Z on the layer undoes it.)")
            if answer != QMessageBox.StandardButton.Yes:
                self.info.setText(f"not refined ({text}).")
                return None
        return self.apply_pending_refinement()

    def apply_pending_refinement(self):
        """Apply the refinement last previewed (one undo step of the layer)."""
        pending, self.pending_refinement = getattr(self, "pending_refinement", None), None
        if pending is None:
            return None
        session, key, preview = pending
        try:
            changed = session.apply_refinement(key, preview)
            self.info.setText(f"refined: {changed.size} uncorrected cells changed class (Ctrl+Z undoes it).")
            return changed
        except Exception as err:  # noqa: BLE001 - UI callback: never leave the widget half-updated; reported
            self.last_error = report_failure(err, "Refine")
            return None

    def _on_refine_error(self, err):
        self.last_error = report_failure(err, "Refine", self.refine_task)
        self.info.setText(self.last_error)

    def _on_refine_finished(self):
        self.refine_worker = None
        if self.refine_task.running:
            self.refine_task.finish("failed", self.last_error or "the refinement ended without a result")
        self.refine_task.setVisible(False)
        self.refine_button.setEnabled(self.annotation is not None)


def _number(value) -> QTableWidgetItem:
    item = QTableWidgetItem(str(value))
    item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
    return item
