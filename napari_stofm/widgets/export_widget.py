""""Export labels" dock widget: curated labels to .h5ad, CSV or SpatialData .zarr.

The export itself is :meth:`napari_stofm.review.session.SliceSession.export` (atomic writes in
:mod:`napari_stofm.io.export`), in a worker with its progress (marker genes, writing) and a
Cancel button (a cancelled export writes nothing); the widget asks before replacing an
existing target and shows any failure as a napari message.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_stofm._napari.binding import bind_viewer, binding_of
from napari_stofm._napari.layers import ROLE_LABELS, session_of
from napari_stofm.widgets._common import (
    SliceCombo,
    TaskProgress,
    button_row,
    report_failure,
    show_error,
    show_info,
    start_worker,
)

log = logging.getLogger(__name__)

FORMATS = {"h5ad": ".h5ad", "CSV": ".csv", "SpatialData": ".zarr"}
_FORMAT_KEYS = {"h5ad": "h5ad", "CSV": "csv", "SpatialData": "spatialdata"}


class ExportWidget(QWidget):
    def __init__(self, napari_viewer, parent=None, *, confirm_overwrite: Optional[Callable[[Path], bool]] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.last_error: Optional[str] = None
        self.last_written: Optional[Path] = None
        self.confirm_overwrite = confirm_overwrite or self._ask_overwrite
        bind_viewer(napari_viewer)

        self.slice_combo = SliceCombo(napari_viewer)
        self.format_combo = QComboBox()
        self.format_combo.addItems(list(FORMATS))
        self.format_combo.currentTextChanged.connect(self._on_format)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("where to write the curated labels")
        self.browse = QPushButton("Browse…")
        self.browse.clicked.connect(self._browse)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(lambda: self.export())
        self.task = TaskProgress(self)
        self.status = self.task.message

        row = QWidget()
        rl = QHBoxLayout(row)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.path_edit)
        rl.addWidget(self.browse)
        form = QFormLayout()
        form.addRow("Slice", self.slice_combo)
        form.addRow("Format", self.format_combo)
        form.addRow("File", row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(button_row(self.export_button, self.task.cancel_button))
        layout.addWidget(self.task)
        layout.addStretch(1)

    # ------------------------------------------------------------------ form
    @property
    def fmt(self) -> str:
        return _FORMAT_KEYS[self.format_combo.currentText()]

    def _on_format(self, name: str):
        text = self.path_edit.text().strip()
        if text:
            base = text.rstrip("/")
            for suffix in FORMATS.values():
                if base.lower().endswith(suffix):
                    base = base[: -len(suffix)]
            self.path_edit.setText(base + FORMATS[name])

    def _browse(self):
        name = self.format_combo.currentText()
        suffix = FORMATS[name]
        path, _ = QFileDialog.getSaveFileName(self, "Export curated labels", "", f"{name} (*{suffix})",
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            if not path.lower().endswith(suffix):
                path += suffix
            self.path_edit.setText(path)

    def _ask_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(self, "Replace existing file?",
                                      f"{path} exists. Replace it? "
                                      "(The old file stays intact until the new one is complete.)")
        return answer == QMessageBox.StandardButton.Yes

    # ------------------------------------------------------------------ export
    def export(self, path=None, fmt: Optional[str] = None):
        """Export the chosen slice's annotations in a worker; returns the worker (None if refused)."""
        self.last_error = None
        session = self.slice_combo.current_session()
        if session is None:
            return self._fail("open a slice and run SToFM first: there is nothing to export.")
        if not session.annotations:
            return self._fail(f"{session.name} has no labels yet: run SToFM first.")
        text = str(path) if path is not None else self.path_edit.text().strip()
        if not text:
            return self._fail("choose where to write the labels (the File box).")
        fmt = fmt or self.fmt
        target = Path(text).expanduser()
        suffix = {"h5ad": ".h5ad", "csv": ".csv", "spatialdata": ".zarr"}[fmt]
        if not str(target).lower().rstrip("/").endswith(suffix):
            return self._fail(f"a {fmt} export must end in {suffix} (got {target.name}).")
        if not target.parent.is_dir():
            return self._fail(f"the folder {target.parent} does not exist.")
        overwrite = False
        if target.exists():
            if not self.confirm_overwrite(target):
                self.status.setText("not exported: the existing file was kept.")
                return None
            overwrite = True
        for layer in self.viewer.layers:  # map pending edits, save the autosave first
            if (layer.metadata or {}).get("stofm_role") == ROLE_LABELS and session_of(layer) is session:
                b = binding_of(layer)
                if b is not None:
                    b.flush()
        try:
            session.autosave()
        except Exception as err:  # noqa: BLE001 - UI action: a failed autosave must not block the export; reported
            log.debug("autosave before the export failed", exc_info=True)
            show_error(f"autosave failed ({err}); exporting anyway.")
        self.export_button.setEnabled(False)
        progress, cancel = self.task.start(f"Export to {target.name}")
        self.worker = start_worker(
            session.export, target, fmt=fmt, overwrite=overwrite, progress=progress, cancel=cancel,
            on_return=self._on_written, on_error=self._on_error, on_finish=self._on_finished,
        )
        return self.worker

    def cancel(self):
        """Stop the export before it replaces anything (nothing is written)."""
        self.task.cancel()

    def _on_written(self, path):
        self.last_written = Path(path)
        self.task.finish("done", f"exported to {path}")
        show_info(f"Curated labels exported to {path}")

    def _on_error(self, err):
        self.last_error = report_failure(err, "Export", self.task)

    def _on_finished(self):
        self.worker = None
        if self.task.running:
            self.task.finish("failed", self.last_error or "the export ended without a result")
        self.export_button.setEnabled(True)

    def _fail(self, message: str):
        self.last_error = message
        self.status.setText(message)
        show_error(message)
        return None
