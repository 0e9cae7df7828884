"""Regenerate the README screenshot: the plugin on the sample slice, after a run.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py
    python scripts/screenshot.py --weights path/to/checkpoint --out docs/images/napari-stofm.png

Opens File > Open Sample > SToFM sample slice, runs SToFM from the "Run SToFM" dock
(bundled weights unless ``--weights`` names a checkpoint folder; cell types transferred
from a second generated slice used as a labelled reference), opens "Review labels" on
the tissue regions and saves a screenshot of the whole window.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint folder (default: the bundled weights)")
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "napari-stofm.png"))
    parser.add_argument("--regions", type=int, default=6)
    parser.add_argument("--size", default="1600x1000", help="window size WxH")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the run")
    args = parser.parse_args()

    if args.weights is None:
        from napari_stofm.model.stofm import BUNDLED_DIR

        if not (BUNDLED_DIR / "config.json").is_file():
            print("this installation has no bundled SToFM weights: pass --weights <checkpoint folder>", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # no autosave of earlier sessions
        return _shoot(args, Path(tmp))


def _shoot(args, tmp: Path) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_stofm.io.sample import make_sample_slice

    reference = tmp / "reference.h5ad"
    make_sample_slice(seed=1).write_h5ad(reference)

    viewer = napari.Viewer(title="napari-stofm", show=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    from napari_stofm._napari.compat import qt_window

    qt_window(viewer).resize(width, height)
    app = QApplication.instance()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    for layer in layers[1:]:  # the sample's ground truth stays hidden
        layer.visible = False

    _, run = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    if args.weights:
        run.weights_combo.setCurrentText("checkpoint folder")
        run.weights_path.setText(str(args.weights))
    run.regions_spin.setValue(args.regions)
    run.source_combo.setCurrentText("reference slice")
    run.reference_path.setText(str(reference))
    run._fill_reference_keys()  # the widget's own step after a path is typed
    run.label_key.setCurrentText("cell_type")
    if run.run() is None:
        print(f"could not start: {run.last_error}", file=sys.stderr)
        return 1
    start = time.monotonic()
    while run.worker is not None and time.monotonic() - start < args.timeout:
        app.processEvents()
        time.sleep(0.05)
    if run.worker is not None or run.last_error:
        print(f"the run did not finish: {run.last_error or 'timeout'}", file=sys.stderr)
        return 1

    regions = [l for l in viewer.layers if l.name == "tissue regions"][0]
    types = [l for l in viewer.layers if l.name == "cell types"][0]
    types.visible = False
    viewer.layers.selection.active = regions
    _, review = viewer.window.add_plugin_dock_widget("napari-stofm", "Review labels")
    review.select_layer(regions)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
