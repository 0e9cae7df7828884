"""A legend drawn over the napari canvas: the colour and name of every class of the SToFM
Labels layers that are visible (the top one first), kept in step with renames, recolours,
merges, re-clustering and layer visibility.

The content is :func:`napari_stofm.review.legend.legend_of`; this module only draws it, as a
small translucent Qt panel in the canvas's top-right corner that lets the mouse through.
:func:`ensure_legend` adds one per viewer (called by :func:`~napari_stofm._napari.binding.bind_viewer`);
``legend_for(viewer).set_enabled(False)`` hides it.
"""
from __future__ import annotations

import logging
import weakref
from typing import List, Optional

from napari_stofm._napari import compat
from napari_stofm._napari.compat import unwrap_proxy as unwrap

log = logging.getLogger(__name__)

_LEGENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: layers shown in the legend at most (the top visible ones)
MAX_LAYERS = 2
MARGIN = 10


def legend_for(viewer) -> Optional["CanvasLegend"]:
    """The canvas legend of ``viewer`` (None when it has none)."""
    return _LEGENDS.get(unwrap(viewer)) if viewer is not None else None


def ensure_legend(viewer) -> Optional["CanvasLegend"]:
    """The canvas legend of ``viewer``, made on first call (None without a Qt canvas)."""
    viewer = unwrap(viewer)
    legend = _LEGENDS.get(viewer)
    if legend is not None:
        return legend
    canvas = compat.canvas_widget(viewer)
    if canvas is None:
        return None
    legend = CanvasLegend(viewer, canvas)
    _LEGENDS[viewer] = legend
    return legend


def shown_label_layers(viewer) -> list:
    """The visible SToFM Labels layers of ``viewer`` whose annotation is loaded, top first."""
    from napari_stofm._napari.layers import ROLE_LABELS, session_of

    out = []
    for layer in reversed(list(viewer.layers)):
        meta = layer.metadata or {}
        if meta.get("stofm_role") != ROLE_LABELS or not layer.visible:
            continue
        session = session_of(layer)
        if session is not None and meta.get("stofm_key") in session.annotations:
            out.append(layer)
    return out


def legend_html(legends) -> str:
    """The panel's content as Qt rich text: per legend a bold title, then one row per class
    (a colour swatch, the name), then "+ N more". One label draws it all: a widget per
    swatch and name costs napari's event loop a visible moment when a result is shown."""
    rows = []
    for legend in legends:
        rows.append(f'<tr><td colspan="2"><b>{_escape(legend.title)}</b></td></tr>')
        for entry in legend.entries:
            rows.append(f'<tr><td bgcolor="{_escape(entry.color)}" width="12">&nbsp;&nbsp;&nbsp;</td>'
                        f"<td>{_escape(entry.name)}</td></tr>")
        if legend.n_more:
            rows.append(f"<tr><td></td><td>+ {legend.n_more} more</td></tr>")
    return '<table cellspacing="2" cellpadding="0">' + "".join(rows) + "</table>"


def _legend_widget_class():
    from qtpy.QtCore import QEvent, QObject, Qt
    from qtpy.QtWidgets import QFrame, QLabel, QVBoxLayout

    class _Panel(QFrame):
        def __init__(self, parent):
            super().__init__(parent)
            self.setObjectName("stofm_canvas_legend")
            self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents, True)
            self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
            self.setStyleSheet("#stofm_canvas_legend { background-color: rgba(20, 20, 24, 200); border-radius: 6px; }"
                               " QLabel { color: #f0f0f0; background: transparent; font-size: 11px; }")
            layout = QVBoxLayout(self)
            layout.setContentsMargins(8, 6, 8, 6)
            self.label = QLabel(self)
            self.label.setTextFormat(Qt.TextFormat.RichText)
            layout.addWidget(self.label)

        def show_legends(self, legends) -> List[str]:
            self.label.setText(legend_html(legends))
            self.adjustSize()
            texts = []
            for legend in legends:
                texts.append(legend.title)
                texts.extend(entry.name for entry in legend.entries)
            return texts

    class _Follower(QObject):
        """Keeps the panel in the canvas's top-right corner when the canvas is resized."""

        def __init__(self, legend):
            super().__init__(legend.panel)
            self._legend = weakref.ref(legend)

        def eventFilter(self, obj, event):  # noqa: N802 - Qt's name
            if event.type() in (QEvent.Type.Resize, QEvent.Type.Show):
                legend = self._legend()
                if legend is not None:
                    legend.place()
            return False

    return _Panel, _Follower


def _drawn(legends) -> list:
    """What the panel draws of ``legends`` (titles, names, colours, "+ N more"; not the counts)."""
    return [(lg.title, [(e.name, e.color) for e in lg.entries], lg.n_more) for lg in legends]


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class CanvasLegend:
    """The legend panel over one viewer's canvas (see the module docs)."""

    def __init__(self, viewer, canvas):
        panel_class, follower_class = _legend_widget_class()
        self._viewer_ref = weakref.ref(viewer)
        self.canvas = canvas
        self.panel = panel_class(canvas)
        self.enabled = True
        self.shown: List[str] = []  # what the legend shows (titles and class names), for scripts and tests
        self._drawn: Optional[list] = None  # what the panel draws (see _drawn)
        self._sessions = weakref.WeakSet()
        self._layers = weakref.WeakSet()
        self._follower = follower_class(self)
        canvas.installEventFilter(self._follower)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.layers.events.moved.connect(self._on_layers_changed)
        self._on_layers_changed()

    @property
    def viewer(self):
        return self._viewer_ref()

    @property
    def visible(self) -> bool:
        """Whether the panel is shown over the canvas (when the window is)."""
        return not self.panel.isHidden()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.refresh()

    # ------------------------------------------------------------------ events
    def _on_layers_changed(self, event=None) -> None:
        viewer = self.viewer
        if viewer is None:
            return
        for layer in list(viewer.layers):
            if (layer.metadata or {}).get("stofm_role") and layer not in self._layers:
                layer.events.visible.connect(self._on_layer_event)
                layer.events.name.connect(self._on_layer_event)
                self._layers.add(layer)
        self.refresh()

    def _on_layer_event(self, event=None) -> None:
        self.refresh()

    def _on_session_change(self, key: str, what: str) -> None:
        self.refresh()

    # ------------------------------------------------------------------ drawing
    def refresh(self) -> None:
        """Show the legends of the visible SToFM Labels layers (hidden when there is none)."""
        from napari_stofm._napari.layers import session_of
        from napari_stofm.review.legend import legend_of

        viewer = self.viewer
        try:
            layers = shown_label_layers(viewer) if viewer is not None and self.enabled else []
            legends = []
            for layer in layers[:MAX_LAYERS]:
                session = session_of(layer)
                if session not in self._sessions:
                    session.subscribe(self._on_session_change)
                    self._sessions.add(session)
                ann = session.annotations[layer.metadata["stofm_key"]]
                legends.append(legend_of(ann, layer.name))
            drawn = _drawn(legends)
            if drawn != self._drawn:  # rebuilding the Qt panel is what costs: only when what it shows changed
                self.shown = self.panel.show_legends(legends)
                self._drawn = drawn
            self.panel.setVisible(bool(legends))
            self.place()
        except RuntimeError as err:  # the Qt panel was deleted with its viewer
            if "deleted" not in str(err):
                raise
            log.debug("the canvas legend is gone", exc_info=True)

    def place(self) -> None:
        self.panel.adjustSize()
        x = max(self.canvas.width() - self.panel.width() - MARGIN, 0)
        self.panel.move(x, MARGIN)
        self.panel.raise_()
