"""The agreement panel of the Review widget: the reviewed labelling against another labelling
of the same cells (the slice's ground truth, say), as :func:`napari_stofm.review.agreement.agreement`
computes it: ARI / NMI, a confusion table (predicted classes down, existing classes across,
each cell shaded by its share of the row) and each class's best match. "Side by side" shows
the two labels layers in napari's grid view.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_stofm._napari.layers import labels_layer_for
from napari_stofm.errors import StofmError

#: recompute this long after the last edit (ms): a brush stroke does not recompute per pixel
REFRESH_DELAY_MS = 300


class AgreementPanel(QWidget):
    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.session = None
        self.key: Optional[str] = None
        self.result = None  # the last Agreement
        self.last_error: Optional[str] = None
        self._grid_before = None  # (grid enabled, {layer: visible}) before "side by side"

        self.truth_combo = QComboBox()
        self.truth_combo.setToolTip("the labels to compare with (e.g. the slice's ground truth)")
        self.truth_combo.currentIndexChanged.connect(lambda *_: self.refresh())
        self.side_button = QPushButton("Side by side")
        self.side_button.setCheckable(True)
        self.side_button.setToolTip("show the two labels layers next to each other (napari's grid view)")
        self.side_button.toggled.connect(self.side_by_side)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(140)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.refresh)
        row = QHBoxLayout()
        row.addWidget(QLabel("Compare with"))
        row.addWidget(self.truth_combo, 1)
        row.addWidget(self.side_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)

    # ------------------------------------------------------------------ source
    def set_source(self, session, key) -> None:
        from napari_stofm.review.agreement import truth_columns

        self.session, self.key = session, key
        self.truth_combo.blockSignals(True)
        self.truth_combo.clear()
        if session is not None and key is not None:
            self.truth_combo.addItems(truth_columns(session.adata, key))
        self.truth_combo.blockSignals(False)
        self.refresh()

    @property
    def truth_key(self) -> Optional[str]:
        text = self.truth_combo.currentText()
        return text or None

    def on_session_change(self, key: str, what: str) -> None:
        if self.session is not None and key in (self.key, self.truth_key):
            self._timer.start(REFRESH_DELAY_MS)

    # ------------------------------------------------------------------ computing
    def refresh(self):
        """Compare the reviewed labelling with the chosen column (the live annotation when
        that column is shown as labels too, so its corrections count)."""
        from napari_stofm.review.agreement import agreement

        self.result = None
        session, key, truth = self.session, self.key, self.truth_key
        self.side_button.setEnabled(self._truth_layer() is not None)
        if session is None or key not in getattr(session, "annotations", {}) or truth is None:
            self.summary.setText("no other labels of these cells to compare with" if session is not None
                                 and key is not None else "")
            self.table.setRowCount(0)
            self.table.setColumnCount(0)
            return None
        labels = session.annotations.get(truth)
        if labels is None:
            labels = session.adata.obs[truth]
        try:
            self.result = agreement(session.annotations[key], labels, truth_key=truth)
        except StofmError as err:
            self.last_error = str(err)
            self.summary.setText(f"cannot compare with {truth}: {err}")
            return None
        self._show(self.result)
        return self.result

    def _show(self, result) -> None:
        confusion, per_class = result.confusion, result.per_class
        self.summary.setText(result.describe())
        columns = [str(c) for c in confusion.columns] + ["best match"]
        self.table.setRowCount(len(confusion.index))
        self.table.setColumnCount(len(columns))
        self.table.setHorizontalHeaderLabels(columns)
        self.table.setVerticalHeaderLabels([str(i) for i in confusion.index])
        values = confusion.to_numpy()
        for i, name in enumerate(confusion.index):
            total = values[i].sum()
            for j in range(values.shape[1]):
                item = QTableWidgetItem(f"{int(values[i, j]):,}")
                item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                share = values[i, j] / total if total else 0.0
                if share > 0:
                    item.setBackground(QColor(70, 130, 220, int(40 + 180 * share)))
                self.table.setItem(i, j, item)
            row = per_class.loc[name]
            match = "–" if row["best_match"] is None or not np.isfinite(row["precision"]) else (
                f"{row['best_match']} ({100 * row['precision']:.0f} % of the class, "
                f"{100 * row['recall']:.0f} % of it)")
            self.table.setItem(i, values.shape[1], QTableWidgetItem(match))

    # ------------------------------------------------------------------ side by side
    def _truth_layer(self):
        if self.session is None or self.truth_key is None:
            return None
        return labels_layer_for(self.viewer, self.session, self.truth_key)

    def side_by_side(self, on: bool) -> bool:
        """Show the reviewed and the compared labels layers side by side (napari's grid
        view, only those two visible); off puts the view and visibilities back."""
        layers = self.viewer.layers
        if on:
            mine = labels_layer_for(self.viewer, self.session, self.key) if self.session is not None else None
            theirs = self._truth_layer()
            if mine is None or theirs is None:
                self.side_button.blockSignals(True)
                self.side_button.setChecked(False)
                self.side_button.blockSignals(False)
                return False
            if self._grid_before is None:
                self._grid_before = (self.viewer.grid.enabled, {layer: layer.visible for layer in layers})
            for layer in layers:
                layer.visible = layer is mine or layer is theirs
            self.viewer.grid.enabled = True
            self.viewer.reset_view()
            return True
        if self._grid_before is not None:
            enabled, visible = self._grid_before
            self._grid_before = None
            for layer in layers:
                if layer in visible:
                    layer.visible = visible[layer]
            self.viewer.grid.enabled = enabled
            self.viewer.reset_view()
        return False
