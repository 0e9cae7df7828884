""""Run SToFM" dock widget: parameters in, Labels layers out; the work happens in the library.

The run (:meth:`napari_stofm.review.session.SliceSession.compute`) goes to a worker thread;
its one overall progress (every stage on one bar, with the stage's name and the time left)
shows in the dock, and Cancel sets the ``cancel`` Event
(:class:`~napari_stofm.widgets._common.TaskProgress`). The worker also makes what the
layers will show (label images, colours, feature tables:
:func:`~napari_stofm._napari.layers.prepare_labels`); the result is then shown one layer per
turn of the event loop (the visible layer first) and the embedding cache is written from a
worker, so the viewer stays responsive at the end of a run. Changing the number of regions
after a run re-cuts the cached region tree
(:meth:`~napari_stofm.review.session.SliceSession.compute_regions`) without running the model
again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_stofm._napari.binding import bind_viewer, binding_of
from napari_stofm._napari.layers import (
    ROLE_LABELS,
    add_or_update_labels,
    discard_prepared,
    labels_layer_for,
    offer_prepared,
    prepare_labels,
    session_of,
)
from napari_stofm.errors import Cancelled, StofmInputError
from napari_stofm.heads.regions import DEFAULT_RESOLUTION
from napari_stofm.keys import REGION as REGION_KEY
from napari_stofm.pipeline.predict import DEFAULT_N_REGIONS
from napari_stofm.progress import StagedProgress, check_cancelled
from napari_stofm.widgets._common import (
    SliceCombo,
    TaskProgress,
    report_failure,
    show_error,
    show_info,
    start_worker,
)

log = logging.getLogger(__name__)

WEIGHTS_BUNDLED = "bundled"
WEIGHTS_CHECKPOINT = "checkpoint folder"
SOURCE_NONE = "none"
SOURCE_REFERENCE = "reference slice"
SOURCE_COLUMN = "labels column of this slice"
RECLUSTER_DELAY_MS = 400
#: the delay before the next layer of a result is added: a timer, not a zero-delay call (Qt
#: delivers those with the event that scheduled them, before any paint or input in between)
_NEXT_TURN_MS = 1

#: the Run widget's adaptation time when the box is ticked
DEFAULT_ADAPT_SECONDS = 60
#: the last stage of a run in the widget: the label images, colours and tables of its layers
STAGE_LAYERS = "Layers"


def compute_for_display(session, *, progress=None, cancel=None, **params):
    """:meth:`SliceSession.compute`, then what napari will show of the result (a
    :class:`~napari_stofm._napari.layers.LabelsDisplay` per annotation), all in the calling
    (worker) thread; returns ``(result, displays)``. Nothing of the session changes."""
    overall = StagedProgress(progress) if progress is not None else None
    result = session.compute(**params, progress=overall, cancel=cancel)
    check_cancelled(cancel)
    terr = result.territories if result.territories is not None else session.territories
    if overall is not None:
        overall.add(STAGE_LAYERS, 1.0, final=True)
    displays = {}
    for i, (key, annotation) in enumerate(result.annotations.items()):
        if overall is not None:
            overall.update(STAGE_LAYERS, i, len(result.annotations))
        displays[key] = prepare_labels(terr, annotation)
        check_cancelled(cancel)
    if overall is not None:
        overall.finish("done")
    return result, displays


def regions_for_display(session, n_regions):
    """:meth:`SliceSession.compute_regions` and its display, in the calling (worker) thread."""
    annotation = session.compute_regions(n_regions)
    return annotation, prepare_labels(session.territories, annotation)


def _path_row(line: QLineEdit, button: QPushButton) -> QWidget:
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(line)
    lay.addWidget(button)
    return row


class RunWidget(QWidget):
    """Run SToFM on a slice: weights, number of regions, cell-type source, device."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self._recluster_worker = None
        self._cache_worker = None
        self._pending_layers: list = []  # (session, key) still to be shown after a run
        self.last_error: Optional[str] = None
        self.last_result = None
        bind_viewer(napari_viewer)

        self.slice_combo = SliceCombo(napari_viewer)
        self.slice_combo.currentIndexChanged.connect(self._on_slice_changed)

        self.weights_combo = QComboBox()
        self.weights_combo.addItems([WEIGHTS_BUNDLED, WEIGHTS_CHECKPOINT])
        self.weights_path = QLineEdit()
        self.weights_path.setPlaceholderText("published or saved checkpoint folder")
        self.weights_browse = QPushButton("Browse…")
        self.weights_browse.clicked.connect(self._browse_weights)
        self.weights_combo.currentTextChanged.connect(self._update_enabled)

        self.regions_spin = QSpinBox()
        self.regions_spin.setRange(0, 60)
        self.regions_spin.setValue(DEFAULT_N_REGIONS)
        self.regions_spin.setSpecialValueText("auto (Leiden)")
        self.regions_spin.setToolTip("Number of tissue regions; "
                                     "changing it after a run re-clusters without re-running the model.")
        self._recluster_timer = QTimer(self)
        self._recluster_timer.setSingleShot(True)
        self._recluster_timer.timeout.connect(self.recluster)
        self.regions_spin.valueChanged.connect(self._on_regions_changed)

        self.source_combo = QComboBox()
        self.source_combo.addItems([SOURCE_NONE, SOURCE_REFERENCE, SOURCE_COLUMN])
        self.source_combo.currentTextChanged.connect(self._update_enabled)
        self.reference_path = QLineEdit()
        self.reference_path.setPlaceholderText("labelled reference slice (.h5ad)")
        self.reference_path.editingFinished.connect(self._fill_reference_keys)
        self.reference_browse = QPushButton("Browse…")
        self.reference_browse.clicked.connect(self._browse_reference)
        self.label_key = QComboBox()
        self.label_key.setEditable(True)
        self.label_key.setToolTip("obs column holding the cell types (reference) or this slice's partial labels")

        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())

        self.adapt_check = QCheckBox("Adapt to this slice first")
        self.adapt_check.setToolTip("Label-free: continue the model's self-supervised SE(2) training on this slice "
                                    "for the given time before embedding it (a copy of the model; the weights on "
                                    "disk do not change). Off by default: see the model card for its gain.")
        self.adapt_seconds = QSpinBox()
        self.adapt_seconds.setRange(5, 3600)
        self.adapt_seconds.setValue(DEFAULT_ADAPT_SECONDS)
        self.adapt_seconds.setSuffix(" s")
        self.adapt_check.toggled.connect(self._update_enabled)

        self.run_button = QPushButton("Run SToFM")
        self.run_button.clicked.connect(self.run)
        self.task = TaskProgress(self)
        self.cancel_button = self.task.cancel_button
        self.progress_bar = self.task.bar
        self.status = self.task.message

        form = QFormLayout()
        form.addRow("Slice", self.slice_combo)
        form.addRow("Weights", self.weights_combo)
        form.addRow("", _path_row(self.weights_path, self.weights_browse))
        form.addRow("Regions", self.regions_spin)
        form.addRow("Cell types", self.source_combo)
        form.addRow("", _path_row(self.reference_path, self.reference_browse))
        form.addRow("Label column", self.label_key)
        form.addRow("Device", self.device_combo)
        adapt_row = QHBoxLayout()
        adapt_row.setContentsMargins(0, 0, 0, 0)
        adapt_row.addWidget(self.adapt_check)
        adapt_row.addWidget(self.adapt_seconds)
        adapt_box = QWidget()
        adapt_box.setLayout(adapt_row)
        form.addRow("", adapt_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.task)
        self._on_slice_changed()
        self._update_enabled()

    # ------------------------------------------------------------------ state
    @property
    def session(self):
        return self.slice_combo.current_session()

    @property
    def running(self) -> bool:
        return self.worker is not None

    @property
    def showing(self) -> bool:
        """Layers of the last result are still being added (one per turn of the event loop)."""
        return bool(self._pending_layers)

    def _update_enabled(self, *_):
        checkpoint = self.weights_combo.currentText() == WEIGHTS_CHECKPOINT
        self.weights_path.setEnabled(checkpoint)
        self.weights_browse.setEnabled(checkpoint)
        source = self.source_combo.currentText()
        self.reference_path.setEnabled(source == SOURCE_REFERENCE)
        self.reference_browse.setEnabled(source == SOURCE_REFERENCE)
        self.label_key.setEnabled(source != SOURCE_NONE)
        self.adapt_seconds.setEnabled(self.adapt_check.isChecked())
        if source == SOURCE_COLUMN:
            self._fill_column_keys()
        elif source == SOURCE_REFERENCE:
            self._fill_reference_keys()
        running = self.running
        self.run_button.setEnabled(not running and not self.showing and self.session is not None)

    def _on_slice_changed(self, *_):
        if self.source_combo.currentText() == SOURCE_COLUMN:
            self._fill_column_keys()
        self._update_enabled()

    def _fill_column_keys(self):
        session = self.session
        self.label_key.clear()
        if session is None:
            return
        import pandas as pd

        obs = session.adata.obs
        cols = [str(c) for c in obs.columns
                if isinstance(obs[c].dtype, pd.CategoricalDtype) and not str(c).startswith("stofm_")]
        self.label_key.addItems(cols)
        if "cell_type" in cols:
            self.label_key.setCurrentText("cell_type")

    def _fill_reference_keys(self):
        path = self.reference_path.text().strip()
        if not path or not Path(path).is_file():
            return
        cols = _obs_columns(path)
        current = self.label_key.currentText()
        self.label_key.clear()
        self.label_key.addItems(cols)
        if current in cols:
            self.label_key.setCurrentText(current)
        elif "cell_type" in cols:
            self.label_key.setCurrentText("cell_type")

    def _browse_weights(self):
        folder = QFileDialog.getExistingDirectory(self, "SToFM checkpoint folder")
        if folder:
            self.weights_path.setText(folder)

    def _browse_reference(self):
        path, _ = QFileDialog.getOpenFileName(self, "Labelled reference slice", "", "AnnData (*.h5ad)")
        if path:
            self.reference_path.setText(path)
            self._fill_reference_keys()

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict:
        """The keyword arguments of :meth:`SliceSession.compute` from the form (raises on bad input)."""
        params = {"device": self.device_combo.currentText()}
        if self.adapt_check.isChecked():
            params["adapt"] = float(self.adapt_seconds.value())
        if self.weights_combo.currentText() == WEIGHTS_CHECKPOINT:
            folder = self.weights_path.text().strip()
            if not folder:
                raise StofmInputError("choose the checkpoint folder (or pick the bundled weights).")
            if not Path(folder).is_dir():
                raise StofmInputError(f"the checkpoint folder {folder} does not exist.")
            params["weights"] = folder
        n = self.regions_spin.value()
        if n > 0:
            params["n_regions"] = n
        else:  # "auto (Leiden)": the data choose the count
            params["resolution"] = DEFAULT_RESOLUTION
        source = self.source_combo.currentText()
        key = self.label_key.currentText().strip()
        if source == SOURCE_REFERENCE:
            ref = self.reference_path.text().strip()
            if not ref:
                raise StofmInputError("choose a labelled reference slice (.h5ad) for the cell types, or pick 'none'.")
            if not Path(ref).is_file():
                raise StofmInputError(f"the reference slice {ref} does not exist.")
            if not key:
                raise StofmInputError("name the reference's obs column that holds the cell types.")
            params["reference"], params["label_key"] = ref, key
        elif source == SOURCE_COLUMN:
            if not key:
                raise StofmInputError("this slice has no categorical obs column to learn cell types from.")
            params["label_key"] = key
        return params

    # ------------------------------------------------------------------ run
    def run(self):
        """Start a run in a worker thread (returns the worker, or None when refused)."""
        self.last_error = None
        session = self.session
        if session is None:
            self._fail("open a slice first (File > Open, or File > Open Sample > SToFM sample slice).")
            return None
        if self.running:
            return None
        try:
            params = self.parameters()
        except StofmInputError as err:
            self._fail(str(err))
            return None
        progress, cancel = self.task.start(f"SToFM on {session.name}")
        self.worker = start_worker(
            compute_for_display, session, **params, progress=progress, cancel=cancel,
            on_return=lambda outcome, s=session: self._on_result(s, *outcome),
            on_error=self._on_error, on_finish=self._on_finished,
        )
        self._update_enabled()
        return self.worker

    @property
    def cancel_event(self):
        return self.task.cancel_event

    def cancel(self):
        """Stop the run at its next cancellation point (nothing of the slice changes)."""
        self.task.cancel()

    def _on_result(self, session, result, displays=None):
        """Install the result and show it: the visible layer now, the others one per turn of
        the event loop (adding a Labels layer takes napari a noticeable moment). Their
        pixels, colours and tables were made by the worker (``displays``)."""
        self.last_result = result
        try:
            if self.task.cancelling:  # Cancel pressed while the last step finished: keep nothing
                raise Cancelled("cancelled by the user; nothing was changed")
            first_time = not any(labels_layer_for(self.viewer, session, k) for k in result.annotations)
            offer_prepared(session, displays or {})
            session.apply(result, save_cache=False, autosave=False)
            keys = list(result.annotations)
            if keys:
                shown = self._show_layer(session, keys[0], first=True, reset_view=first_time)
                binding = binding_of(shown)
                if binding is not None:
                    binding.autosave_in_background()  # every labelling of the slice, off the UI thread
                else:
                    session.autosave()
                self._pending_layers = [(session, k) for k in keys[1:]]
                if self._pending_layers:
                    QTimer.singleShot(_NEXT_TURN_MS, self._show_pending)
                else:
                    discard_prepared(session)
            if not result.embedding_reused:
                self._save_cache(session)
            note = " (embedding reused)" if result.embedding_reused else ""
            self.task.finish("done", f"done{note}: " + ", ".join(
                f"{len(a.categories)} {('regions' if k == REGION_KEY else 'classes')}"
                for k, a in result.annotations.items()))
        except Exception as err:  # noqa: BLE001 - UI callback: never leave the UI half-updated without a word; reported
            discard_prepared(session)
            self.last_error = report_failure(err, "Showing the SToFM result", self.task)

    def _show_layer(self, session, key, *, first: bool, reset_view: bool = False):
        """Show labelling ``key``: the first of a result visible, on top and active (and the
        only visible SToFM labels of its slice); a later one hidden, below the visible one."""
        existed = labels_layer_for(self.viewer, session, key) is not None
        layer = add_or_update_labels(self.viewer, session, key)  # added shown: napari slices no hidden layer
        bind_viewer(self.viewer)
        layers = self.viewer.layers
        if first:
            for other in layers:
                if (other.metadata or {}).get("stofm_role") == ROLE_LABELS and session_of(other) is session:
                    if other.visible != (other is layer):  # napari redraws on every assignment
                        other.visible = other is layer
            self._shown_layer = layer
            if reset_view:
                self.viewer.reset_view()
        else:
            layer.visible = False
            shown = self._shown_layer
            if not existed and shown is not None and shown in layers and layers.index(layer) > layers.index(shown):
                layers.move(layers.index(layer), layers.index(shown))  # below the layer shown
        shown = self._shown_layer if self._shown_layer in layers else layer
        layers.selection.active = shown
        return layer

    _shown_layer = None

    def _show_pending(self):
        """Add the next layer of the last result (then come back for the rest)."""
        if not self._pending_layers:
            return
        session, key = self._pending_layers.pop(0)
        try:
            if key in session.annotations:
                self._show_layer(session, key, first=False)
        except Exception as err:  # noqa: BLE001 - UI callback: reported, the other layers are still shown
            self.last_error = report_failure(err, "Showing the SToFM result")
        if self._pending_layers:
            QTimer.singleShot(_NEXT_TURN_MS, self._show_pending)
        else:
            discard_prepared(session)
            self._update_enabled()

    def _save_cache(self, session):
        """Write the slice's embedding cache from a worker (a failure only says so)."""
        def failed(err):
            log.debug("the embedding cache was not written", exc_info=err)
            show_info(f"the embedding of {session.name} was not cached ({err}); a later run computes it again.")

        self._cache_worker = start_worker(session.save_embedding_cache, on_return=lambda path: None,
                                          on_error=failed,
                                          on_finish=lambda: setattr(self, "_cache_worker", None))

    def _on_error(self, err):
        self.last_error = report_failure(err, "SToFM", self.task)

    def _on_finished(self):
        self.worker = None
        if self.task.running:  # finished without a result or an error reaching the widget
            self.task.finish("failed", self.last_error or "the run ended without a result")
        self._update_enabled()

    def _fail(self, message: str):
        self.last_error = message
        self.status.setText(message)
        show_error(message)

    # ------------------------------------------------------------------ re-clustering
    def _on_regions_changed(self, *_):
        session = self.session
        if session is None or session.clusterer is None or self.running:
            return
        self._recluster_timer.start(RECLUSTER_DELAY_MS)

    def recluster(self):
        """Re-cut the regions at the spinbox's count with the cached clusterer (no model run)."""
        session = self.session
        if session is None or session.clusterer is None:
            return None
        try:
            session.check_recluster()
        except StofmInputError as err:
            answer = QMessageBox.question(self, "Replace corrected regions?", f"{err}\n\nRe-cluster anyway?")
            if answer != QMessageBox.StandardButton.Yes:
                return None
        n = self.regions_spin.value() or None
        self.status.setText(f"re-clustering into {n or 'auto'} regions…")
        self._recluster_worker = start_worker(
            regions_for_display, session, n,
            on_return=lambda outcome, s=session: self._on_regions(s, *outcome),
            on_error=lambda err: setattr(self, "last_error", report_failure(err, "Re-clustering")),
            on_finish=lambda: setattr(self, "_recluster_worker", None),
        )
        return self._recluster_worker

    def _on_regions(self, session, annotation, display=None):
        if display is not None:
            offer_prepared(session, {REGION_KEY: display})
        try:
            session.install(REGION_KEY, annotation)
            add_or_update_labels(self.viewer, session, REGION_KEY)
        finally:
            discard_prepared(session)
        bind_viewer(self.viewer)
        self.status.setText(f"{len(annotation.categories)} regions (re-clustered, model not re-run)")


def available_devices():
    devices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            devices.append("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
    except (ImportError, OSError, RuntimeError, AttributeError):  # no (usable) torch build: CPU only
        log.debug("cannot probe torch devices", exc_info=True)
    return devices


def _obs_columns(path: str):
    """Categorical / string obs columns of an .h5ad without loading its matrix."""
    try:
        import anndata as ad
        import h5py

        with h5py.File(path, "r") as f:
            read_elem = getattr(getattr(ad, "io", None), "read_elem", None) or ad.experimental.read_elem
            obs = read_elem(f["obs"])
    except Exception as err:  # noqa: BLE001 - a user-chosen file: h5py/anndata raise many types; shown to the user
        log.debug("cannot list the obs columns of %s", path, exc_info=True)
        show_info(f"could not list the columns of {path}: {err}")
        return []
    import pandas as pd

    return [str(c) for c in obs.columns
            if isinstance(obs[c].dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(obs[c])]
