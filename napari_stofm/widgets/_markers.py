"""The "top genes" panel of the Review widget: marker genes of the selected class, and a click
on a gene colours the cells by its expression (one Points layer, ``expression: GENE``).

The markers are :func:`napari_stofm.heads.markers.markers` in a worker thread (cached per
labelling in :attr:`MarkerPanel.cache`); the panel only shows them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtWidgets import QLabel, QListWidget, QVBoxLayout, QWidget

from napari_stofm._napari.layers import world_yx
from napari_stofm.errors import StofmError
from napari_stofm.widgets._common import report_failure, show_error, start_worker

#: genes listed per class
N_GENES = 10
#: the role (layer metadata) of the expression layer
ROLE_EXPRESSION = "expression"
COLORMAP = "magma"


class MarkerPanel(QWidget):
    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.session = None
        self.key: Optional[str] = None
        self.class_name: Optional[str] = None
        self.table = None  # the last marker table (DataFrame)
        self.cache: dict = {}  # key -> (hash, n_genes, table), see heads.markers.markers
        self.worker = None
        self.last_error: Optional[str] = None
        self._stale = False

        self.label = QLabel("top genes: –")
        self.label.setWordWrap(True)
        self.genes = QListWidget()
        self.genes.setMaximumHeight(140)
        self.genes.setToolTip("marker genes of the selected class (Wilcoxon vs the other cells); "
                              "click one to colour the cells by its expression")
        self.genes.itemClicked.connect(lambda item: self.show_gene(item.text()))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.label)
        layout.addWidget(self.genes)
        layout.addStretch(1)

    # ------------------------------------------------------------------ markers
    def set_source(self, session, key) -> None:
        """Show the markers of labelling ``key`` of ``session`` (None: nothing)."""
        if session is self.session and key == self.key and self.table is not None:
            return  # the same labelling (e.g. another layer was added): keep what is shown
        if session is not self.session:
            self.cache = {}
        self.session, self.key = session, key
        self.table = None
        self.request()

    def request(self) -> None:
        """(Re)compute the markers in a worker (one at a time; a request during a run reruns it)."""
        session, key = self.session, self.key
        if session is None or key not in getattr(session, "annotations", {}):
            self.table = None
            self._show()
            return
        if self.worker is not None:
            self._stale = True
            return
        from napari_stofm.heads.markers import markers

        self._stale = False
        self.label.setText("top genes: computing…")
        ann = session.annotations[key].copy()  # a snapshot: edits go on while the worker runs
        self.worker = start_worker(markers, session.adata, key, N_GENES, annotation=ann, cache=self.cache,
                                   on_return=lambda table: self._on_markers(session, key, table),
                                   on_error=self._on_error, on_finish=self._on_finish)

    def _on_markers(self, session, key, table) -> None:
        if session is self.session and key == self.key:
            self.table = table
            self._show()

    def _on_error(self, err) -> None:
        self.last_error = report_failure(err, "Marker genes")
        self.label.setText("top genes: could not be computed")

    def _on_finish(self) -> None:
        self.worker = None
        if self._stale:
            self.request()

    def show_class(self, class_name: Optional[str]) -> None:
        self.class_name = None if class_name is None else str(class_name)
        self._show()

    def _show(self) -> None:
        from napari_stofm.heads.markers import top_genes

        self.genes.clear()
        if self.table is None or self.class_name is None:
            self.label.setText("top genes: –" if self.table is None else "top genes: select a class")
            return
        genes = top_genes(self.table, self.class_name, N_GENES)
        if not genes:
            note = next((n for n in self.table.attrs.get("notes", []) if f"'{self.class_name}'" in n), None)
            self.label.setText(f"top genes of {self.class_name}: {note or 'none'}")
            return
        self.label.setText(f"top genes of {self.class_name}: {', '.join(genes[:3])}")
        self.genes.addItems(genes)

    # ------------------------------------------------------------------ expression layer
    def show_gene(self, gene: str):
        """Colour the cells by ``gene`` (log-normalised): add or update the expression layer."""
        from napari.utils.colormaps import ensure_colormap

        from napari_stofm.heads.markers import gene_expression
        from napari_stofm.review.raster import spacing_of

        session = self.session
        if session is None:
            return None
        try:
            values = gene_expression(session.adata, gene)
        except StofmError as err:
            self.last_error = str(err)
            show_error(f"Expression of {gene}: {err}")
            return None
        top = float(np.nanmax(values)) if values.size else 0.0
        scaled = values / top if top > 0 else np.zeros_like(values)
        colors = ensure_colormap(COLORMAP).map(scaled.astype(np.float32))
        name = f"expression: {gene}"
        layer = next((l for l in self.viewer.layers if (l.metadata or {}).get("stofm_role") == ROLE_EXPRESSION
                      and (l.metadata or {}).get("stofm_slice") is session.adata), None)
        data = world_yx(session)  # as the slice's other layers show it (placed beside another or not)
        features = {"expression": values}
        if layer is None:
            layer = self.viewer.add_points(
                data, name=name, features=features, face_color=colors, border_width=0,
                size=max(spacing_of(session.xy) * 0.6, 1e-9), opacity=0.9,
                metadata={"stofm_role": ROLE_EXPRESSION, "stofm_slice": session.adata, "stofm_gene": gene})
        else:
            if layer.data.shape != data.shape:
                layer.data = data
            layer.features = features
            layer.face_color = colors
            layer.name = name
            layer.metadata["stofm_gene"] = gene
            layer.visible = True
        self.viewer.layers.selection.active = layer
        return layer
