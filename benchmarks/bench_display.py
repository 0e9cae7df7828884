"""Open + rasterise a slice, and map a brush stroke back to cells, at 10k, 100k and 1M cells.

Run ``python benchmarks/bench_display.py`` (``--cells 10000 100000 1000000``). The large
slices are tiles of a real slice from ``../shared/data`` (or ``STOFM_SHARED_DIR``) laid side
by side with offsets; without that folder, the generated sample slice is tiled instead.
Each size is measured in fresh Python processes (one for the library, one for napari, as
a user's napari is), so each peak resident memory is that process's alone.

Printed per size:

* ``open+rasterise``: read the ``.h5ad`` from disk (:func:`read_slice`, validation
  included), build the cell territories and render one class image (what the reader
  hands napari);
* ``stroke -> cells``: :meth:`Territories.cells_changed` for a brush dab of 15 pixels
  radius (median over 50 positions);
* with ``--napari`` (needs a display, e.g. ``xvfb-run``): ``viewer.open`` through the
  plugin until the layers are bound and drawn; pan / zoom: the time to draw one frame
  after moving or zooming the camera (median and max over 40 frames); the whole stroke in
  napari — ``layer.paint`` plus the plugin mapping the edit to cells and repainting
  territories, drawn (median over 20 dabs), then undoing every dab (annotation restored
  or not); and the autosave the edits schedule (it runs on the UI thread);
* ``peak RSS``: the process's peak resident memory (``getrusage``).

Targets on a 2-core CPU: stroke mapped < 100 ms; open+rasterise < 10 s at 100k and < 30 s
at 1M cells; peak memory <= 4 GB at 1M cells; pan/zoom fluid.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TILE_SOURCE = ("merfish_mouse_hypothalamus", "animal1_bregma0.26.h5ad")


def shared_dir() -> Path:
    env = os.environ.get("STOFM_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def base_slice():
    """A real slice when ``../shared/data`` has one, else the generated sample."""
    import anndata as ad

    path = shared_dir() / "data" / TILE_SOURCE[0] / TILE_SOURCE[1]
    if path.is_file():
        return ad.read_h5ad(path), f"{TILE_SOURCE[0]}/{TILE_SOURCE[1]}"
    from napari_stofm.io.sample import make_sample_slice

    return make_sample_slice(5000, seed=0), "generated sample (5000 cells)"


def tiled(base, n_cells: int):
    """``n_cells`` cells: copies of ``base`` side by side (gap of 5% of its extent)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    xy = np.asarray(base.obsm["spatial"], dtype=np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    step = (hi - lo) * 1.05
    n_tiles = -(-n_cells // base.n_obs)
    cols = int(np.ceil(np.sqrt(n_tiles)))
    parts_x, parts_xy, names = [], [], []
    X = sp.csr_matrix(base.X)
    for t in range(n_tiles):
        take = min(base.n_obs, n_cells - t * base.n_obs)
        offset = np.array([(t % cols) * step[0], (t // cols) * step[1]])
        parts_xy.append(xy[:take] + offset)
        parts_x.append(X[:take])
        names.extend(f"t{t}_{n}" for n in base.obs_names[:take])
    out = ad.AnnData(X=sp.vstack(parts_x).tocsr(), var=base.var[[]].copy(),
                     obs=pd.DataFrame(index=pd.Index(names)))
    out.obsm["spatial"] = np.vstack(parts_xy)
    codes = np.random.default_rng(0).integers(0, 8, out.n_obs)
    out.obs["cell_type"] = pd.Categorical.from_codes(codes, [f"type {i}" for i in range(8)])
    return out


def dab(shape, rc, radius):
    r0, c0 = rc
    yy, xx = np.ogrid[-radius: radius + 1, -radius: radius + 1]
    mask = yy ** 2 + xx ** 2 <= radius ** 2
    rs = slice(max(r0 - radius, 0), min(r0 + radius + 1, shape[0]))
    cs = slice(max(c0 - radius, 0), min(c0 + radius + 1, shape[1]))
    mask = mask[rs.start - (r0 - radius): rs.stop - (r0 - radius), cs.start - (c0 - radius): cs.stop - (c0 - radius)]
    return (rs, cs), mask


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (GB; ``ru_maxrss`` is in KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def _a_pixel_of(terr, cell: int):
    """One pixel (row, col) of the cell's territory, found in its bounding box only."""
    box = terr.cell_bbox([cell])
    rr, cc = np.nonzero(terr.instance_map[box] == cell + 1)
    return int(rr[0]) + box[0].start, int(cc[0]) + box[1].start


def bench_library(path: Path, n_cells: int) -> dict:
    from napari_stofm._napari.layers import slice_layer_data
    from napari_stofm.review.session import SliceSession

    t0 = time.perf_counter()
    session = SliceSession.open(path)  # read + validate, the labels it has
    t_read = time.perf_counter() - t0
    terr = session.territories
    t_raster = time.perf_counter() - t0 - t_read
    layers = slice_layer_data(session)  # what the reader hands napari: cells, label images
    t_open = time.perf_counter() - t0
    image = next(data for data, kw, kind in layers if kind == "labels" and kw["metadata"]["stofm_key"] == "cell_type")
    ann = session.annotations["cell_type"]
    print(f"{n_cells:>7} cells: open+rasterise {t_open:6.2f} s (read+validate {t_read:.2f} s, "
          f"territories {t_raster:.2f} s, layer data {t_open - t_read - t_raster:.2f} s; raster "
          f"{terr.shape[0]}x{terr.shape[1]} = {terr.instance_map.size / 1e6:.1f} Mpx, labels of {image.dtype}, "
          f"{terr.hidden_cells.size} cells without a pixel)", flush=True)

    rng = np.random.default_rng(1)
    cells = rng.choice(n_cells, 50, replace=False)
    times = []
    n_changed = []
    for cell in cells:
        rc = _a_pixel_of(terr, int(cell))
        bbox, mask = dab(terr.shape, rc, 15)
        edited = image.copy() if n_cells <= 20_000 else image  # in place for the large slice
        before = edited[bbox].copy()
        edited[bbox][mask] = (ann.codes[cell] + 1) % 8 + 1
        t = time.perf_counter()
        changed, _ = terr.cells_changed(ann.codes, edited, bbox)
        times.append(time.perf_counter() - t)
        n_changed.append(changed.size)
        edited[bbox] = before
    print(f"           stroke -> cells: median {statistics.median(times) * 1000:6.1f} ms, "
          f"max {max(times) * 1000:6.1f} ms ({int(np.median(n_changed))} cells changed per dab of radius 15 px)",
          flush=True)
    return {"open_s": t_open, "stroke_ms": statistics.median(times) * 1000}


def _draw(app, canvas=None) -> float:
    """Process the pending events, the canvas's repaint among them; seconds taken."""
    t = time.perf_counter()
    app.processEvents()
    return time.perf_counter() - t


def bench_napari(path: Path, n_cells: int) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_stofm._napari.binding import bind_viewer, binding_of
    from napari_stofm._napari.compat import canvas_widget, qt_window

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)  # drawn, so textures are real (needs a display / Xvfb)
    qt_window(viewer).resize(1400, 900)
    try:
        app.processEvents()
        canvas = canvas_widget(viewer)
        t0 = time.perf_counter()
        layers = viewer.open(str(path), plugin="napari-stofm")
        bind_viewer(viewer)  # what the reader's first event-loop turn does
        _draw(app, canvas)
        t_open = time.perf_counter() - t0
        layer = next(lay for lay in layers if lay.metadata.get("stofm_key") == "cell_type")
        binding = binding_of(layer)
        session = binding.session
        terr = session.territories
        ann = session.annotations["cell_type"]
        codes_before = ann.codes.copy()
        multiscale = bool(getattr(layer, "multiscale", False))
        print(f"           napari: viewer.open + bind + first draw {t_open:6.2f} s "
              f"(labels {layer.data.shape if not multiscale else layer.data[0].shape} "
              f"{'multiscale' if multiscale else 'single-scale'}, editable {layer.editable})", flush=True)
        frames_pan, frames_zoom = _pan_zoom(viewer, layer, app)
        print(f"           napari pan: frame median {statistics.median(frames_pan) * 1000:.1f} ms, max "
              f"{max(frames_pan) * 1000:.1f} ms; zoom: frame median {statistics.median(frames_zoom) * 1000:.1f} ms, "
              f"max {max(frames_zoom) * 1000:.1f} ms", flush=True)

        layer.brush_size = 31
        layer.mode = "paint"
        rng = np.random.default_rng(2)
        times, mapped = [], []
        for cell in rng.choice(n_cells, 20, replace=False):
            rc = _a_pixel_of(terr, int(cell))
            t = time.perf_counter()
            layer.paint(rc, (ann.codes[cell] + 1) % 8 + 1)
            binding.flush()
            mapped.append(time.perf_counter() - t)
            _draw(app, canvas)  # includes drawing the updated texture
            times.append(time.perf_counter() - t)
        n_curated = int(ann.curated.sum())
        undo = []
        for _ in range(20):
            t = time.perf_counter()
            layer.undo()
            _draw(app, canvas)
            undo.append(time.perf_counter() - t)
        restored = np.array_equal(ann.codes, codes_before) and not ann.curated.any()
        print(f"           napari stroke: paint + map to cells + repaint median "
              f"{statistics.median(mapped) * 1000:.1f} ms, max {max(mapped) * 1000:.1f} ms; with the draw median "
              f"{statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms; {n_curated} cells "
              f"curated; undo median {statistics.median(undo) * 1000:.1f} ms, max {max(undo) * 1000:.1f} ms, "
              f"annotation restored: {'yes' if restored else 'NO'}", flush=True)
        t = time.perf_counter()
        binding.autosave_now()  # what the autosave timer runs on the UI thread after an edit
        print(f"           napari autosave after an edit (UI thread): {(time.perf_counter() - t) * 1000:.0f} ms",
              flush=True)
    finally:
        viewer.close()


def _pan_zoom(viewer, layer, app):
    """Frame times (s) of 40 small pans, then of zooming in to 16x and back out."""
    layer.mode = "pan_zoom"
    viewer.reset_view()
    _draw(app)
    cam = viewer.camera
    centre, zoom = np.asarray(cam.center, dtype=float), float(cam.zoom)
    extent = np.asarray(layer.extent.world[1] - layer.extent.world[0], dtype=float)[-2:]
    frames_pan, frames_zoom = [], []
    for i in range(40):
        cam.center = tuple(centre[-2:] + extent * 0.004 * np.array([np.sin(i / 4), np.cos(i / 4)]))
        frames_pan.append(_draw(app))
    for i in range(40):
        cam.zoom = zoom * 2 ** (4 * (1 - abs(i - 20) / 20))
        frames_zoom.append(_draw(app))
    viewer.reset_view()
    _draw(app)
    return frames_pan, frames_zoom


def measure(path: Path, n_cells: int, with_napari: bool) -> None:
    print(f"           (load average {os.getloadavg()[0]:.1f} at the start)", flush=True)
    if with_napari:
        bench_napari(path, n_cells)
        print(f"           peak RSS (napari process) {peak_rss_gb():.2f} GB", flush=True)
    else:
        bench_library(path, n_cells)
        print(f"           peak RSS (library process) {peak_rss_gb():.2f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--napari", action="store_true", help="also time the napari viewer (needs a display)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the per-size child process
    args = parser.parse_args()
    if args.measure is not None:
        measure(args.measure, args.cells[0], args.napari)
        return
    base, name = base_slice()
    print(f"tiles of {name}; python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=str(Path(tmp) / "cache"))
        for n in args.cells:
            path = Path(tmp) / f"tiled_{n}.h5ad"
            tiled(base, n).write_h5ad(path)
            cmd = [sys.executable, __file__, "--measure", str(path), "--cells", str(n)]
            subprocess.run(cmd, env=env, check=True)
            if args.napari:
                subprocess.run(cmd + ["--napari"], env=env, check=True)
            path.unlink()


if __name__ == "__main__":
    main()
