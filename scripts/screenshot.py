"""Regenerate the README screenshots: the plugin on the sample slice, after a run.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py
    python scripts/screenshot.py --weights path/to/checkpoint --out-dir docs/images

Opens File > Open Sample > SToFM sample slice, runs SToFM from the "Run SToFM" dock
(bundled weights unless ``--weights`` names a checkpoint folder; the default number of
regions; cell types transferred from a second generated slice used as a labelled
reference) and saves three screenshots of the whole window into ``--out-dir``:

* ``napari-stofm.png``: the tissue regions with the canvas legend, "Review labels" on a
  selected region with its top marker genes;
* ``review-cell.png``: the least-confident review, zoomed on the ringed cell;
* ``agreement.png``: the regions against the sample's ground truth, side by side, with the
  confusion table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("napari-stofm.png", "review-cell.png", "agreement.png")


def main() -> int:
    from napari_stofm.pipeline.predict import DEFAULT_N_REGIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint folder (default: the bundled weights)")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "images"))
    parser.add_argument("--regions", type=int, default=DEFAULT_N_REGIONS)
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


def _wait(app, condition, timeout: float) -> bool:
    start = time.monotonic()
    while not condition() and time.monotonic() - start < timeout:
        app.processEvents()
        time.sleep(0.05)
    return condition()


def _settle(app, seconds: float = 1.0) -> None:
    _wait(app, lambda: False, seconds)


def _shoot(args, tmp: Path) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_stofm._napari.compat import qt_window
    from napari_stofm._napari.layers import labels_layer_for
    from napari_stofm.io.sample import make_sample_slice

    reference = tmp / "reference.h5ad"
    make_sample_slice(seed=1).write_h5ad(reference)

    viewer = napari.Viewer(title="napari-stofm", show=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    qt_window(viewer).resize(width, height)
    app = QApplication.instance()
    layers = viewer.open_sample("napari-stofm", "sample_slice")
    session = layers[0].metadata["stofm_session"]

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
    if not _wait(app, lambda: run.worker is None and not run.showing, args.timeout) or run.last_error:
        print(f"the run did not finish: {run.last_error or 'timeout'}", file=sys.stderr)
        return 1
    print(run.status.text())

    regions = labels_layer_for(viewer, session, "stofm_region")
    dock, review = viewer.window.add_plugin_dock_widget("napari-stofm", "Review labels", tabify=True)
    review.select_layer(regions)
    dock.raise_()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. regions + legend + the top genes of the region that holds the lesion
    lesion = session.adata.obs["region"].to_numpy() == "Lesion"
    ann = session.annotations["stofm_region"]
    code = int(max(range(ann.n_classes), key=lambda c: int(((ann.codes == c) & lesion).sum())))
    review.table.selectRow(code)
    review.tabs.setCurrentWidget(review.markers)
    _wait(app, lambda: review.markers.table is not None and review.markers.genes.count() > 0, 120)
    viewer.reset_view()
    _settle(app)
    _save(viewer, out / NAMES[0])

    # 2. the least-confident review: the ringed cell, its class and confidence
    review.table.clearSelection()
    review.next_least_confident()
    review.next_least_confident()
    _settle(app)
    _save(viewer, out / NAMES[1])

    # 3. agreement with the sample's ground truth, side by side
    for layer in viewer.layers:
        if (layer.metadata or {}).get("stofm_role") == "review_marker":
            layer.visible = False
    review.tabs.setCurrentWidget(review.agreement)
    review.agreement.truth_combo.setCurrentText("region")
    review.agreement.side_button.setChecked(True)
    _settle(app)
    _save(viewer, out / NAMES[2])
    print(review.agreement.summary.text())
    viewer.close()
    return 0


def _save(viewer, path: Path) -> None:
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
