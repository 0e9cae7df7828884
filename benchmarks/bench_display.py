"""Open + rasterise a slice, and map a brush stroke back to cells, at 10k and 100k cells.

Run ``python benchmarks/bench_display.py`` (``--cells 10000 100000``). The large slices
are tiles of a real slice from ``../shared/data`` (or ``STOFM_SHARED_DIR``) laid side by
side with offsets; without that folder, the generated sample slice is tiled instead.

Printed per size:

* ``open+rasterise``: read the ``.h5ad`` from disk (:func:`read_slice`, validation
  included), build the cell territories and render one class image (what the reader
  hands napari);
* ``stroke -> cells``: :meth:`Territories.cells_changed` for a brush dab of 15 pixels
  radius (median over 50 positions);
* with ``--napari`` (needs a display, e.g. ``xvfb-run``): ``viewer.open`` through the
  plugin, and the whole stroke in napari — ``layer.paint`` plus the plugin mapping the
  edit to cells and repainting territories (median over 20 dabs).

Targets on a 2-core CPU: stroke mapped < 100 ms at 100k cells; open+rasterise 100k < 10 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def bench_library(path: Path, n_cells: int) -> dict:
    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.io.slices import read_slice
    from napari_stofm.review.raster import territories_for_slice

    t0 = time.perf_counter()
    adata = read_slice(path)
    t_read = time.perf_counter() - t0
    terr = territories_for_slice(adata)
    t_raster = time.perf_counter() - t0 - t_read
    ann = Annotation.from_obs(adata, "cell_type")
    image = terr.class_image(ann.codes)
    t_open = time.perf_counter() - t0
    print(f"{n_cells:>7} cells: open+rasterise {t_open:6.2f} s (read+validate {t_read:.2f} s, "
          f"territories {t_raster:.2f} s, raster {terr.shape[0]}x{terr.shape[1]} = "
          f"{terr.instance_map.size / 1e6:.1f} Mpx, {terr.hidden_cells.size} cells without a pixel)")

    rng = np.random.default_rng(1)
    cells = rng.choice(n_cells, 50, replace=False)
    times = []
    n_changed = []
    for cell in cells:
        rc = terr.world_to_pixel(terr.pixel_to_world(np.argwhere(terr.instance_map == cell + 1)[0]))
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
          f"max {max(times) * 1000:6.1f} ms ({int(np.median(n_changed))} cells changed per dab of radius 15 px)")
    return {"open_s": t_open, "stroke_ms": statistics.median(times) * 1000}


def bench_napari(path: Path, n_cells: int) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)  # drawn, so textures are real (needs a display / Xvfb)
    try:
        QApplication.processEvents()
        t0 = time.perf_counter()
        layers = viewer.open(str(path), plugin="napari-stofm")
        QApplication.processEvents()
        t_open = time.perf_counter() - t0
        layer = [l for l in layers if l.name == "cell_type"][0]
        session = layer.metadata["stofm_session"]
        from napari_stofm._napari.binding import bind

        binding = bind(layer, session, "cell_type")
        terr = session.territories
        ann = session.annotations["cell_type"]
        layer.brush_size = 31
        rng = np.random.default_rng(2)
        times = []
        for cell in rng.choice(n_cells, 20, replace=False):
            rc = np.argwhere(terr.instance_map == cell + 1)[0]
            t = time.perf_counter()
            layer.paint(rc, (ann.codes[cell] + 1) % 8 + 1)
            binding.flush()
            QApplication.processEvents()  # includes drawing the updated texture
            times.append(time.perf_counter() - t)
        print(f"           napari: viewer.open {t_open:6.2f} s; paint + map + repaint + draw median "
              f"{statistics.median(times) * 1000:6.1f} ms, max {max(times) * 1000:6.1f} ms; "
              f"{int(ann.curated.sum())} cells curated")
    finally:
        viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--napari", action="store_true", help="also time the napari viewer (needs a display)")
    args = parser.parse_args()
    base, name = base_slice()
    print(f"tiles of {name}; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        for n in args.cells:
            path = Path(tmp) / f"tiled_{n}.h5ad"
            tiled(base, n).write_h5ad(path)
            bench_library(path, n)
            if args.napari:
                bench_napari(path, n)


if __name__ == "__main__":
    main()
