"""Fit and re-cluster times of the region head on synthetic embeddings.

Run ``python benchmarks/bench_regions.py`` (optionally ``--cells 10000 100000 --dim 128``).
Prints, per slice size: the fit time of :class:`RegionClusterer` (PCA, spatial neighbours,
smoothing, micro-clusters, region tree), the time of ``.regions()`` at several counts and at
a Leiden resolution after fit, and the ARI against the planted regions.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from napari_stofm.heads.regions import RegionClusterer


def synthetic_slice(n_cells: int, dim: int, n_regions: int = 7, n_types: int = 12, seed: int = 0):
    """Cells in a square with wavy layered regions; embedding = region + cell type + noise."""
    rng = np.random.default_rng(seed)
    side = np.sqrt(n_cells) * 20.0
    xy = rng.uniform(0, side, size=(n_cells, 2))
    depth = xy[:, 1] + 0.04 * side * np.sin(xy[:, 0] / (0.15 * side))
    edges = np.quantile(depth, np.linspace(0, 1, n_regions + 1)[1:-1])
    region = np.searchsorted(edges, depth)
    composition = rng.dirichlet(np.full(n_types, 0.7), size=n_regions)
    cum = composition.cumsum(axis=1)[region]
    cell_type = (rng.random(n_cells)[:, None] > cum).sum(axis=1).clip(max=n_types - 1)
    emb = (
        rng.normal(0, 0.4, size=(n_regions, dim))[region]
        + rng.normal(0, 1.0, size=(n_types, dim))[cell_type]
        + rng.normal(0, 1.0, size=(n_cells, dim))
    )
    return emb.astype(np.float32), xy, region


def bench(n_cells: int, dim: int) -> None:
    emb, xy, truth = synthetic_slice(n_cells, dim)
    t0 = time.perf_counter()
    clusterer = RegionClusterer(emb, xy)
    fit_s = time.perf_counter() - t0
    print(f"{n_cells:>7} cells x {dim} dims: fit {fit_s:6.2f} s ({clusterer.n_micro} micro-clusters)")
    for k in (7, 5, 10, 3):
        t0 = time.perf_counter()
        pred = clusterer.regions(n_regions=k)
        dt = time.perf_counter() - t0
        ari = adjusted_rand_score(truth, pred.codes)
        print(f"    regions(n_regions={k:>2}): {dt * 1000:7.1f} ms  ARI vs 7 planted {ari:.3f}")
    t0 = time.perf_counter()
    pred = clusterer.regions(resolution=0.5)
    dt = time.perf_counter() - t0
    ari = adjusted_rand_score(truth, pred.codes)
    print(f"    regions(resolution=0.5): {dt * 1000:6.1f} ms  {len(pred.categories)} regions, ARI {ari:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    for n in args.cells:
        bench(n, args.dim)


if __name__ == "__main__":
    main()
