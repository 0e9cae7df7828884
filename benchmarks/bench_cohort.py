"""A cohort on 1 and on 2 local worker processes: the speed-up of ``--scheduler local:N``.

Run ``python benchmarks/bench_cohort.py`` (``--slices 8 --cells 2000 --workers 1 2 --repeat 2``). The
slices are windows of a real slice from ``../shared/data`` (or ``STOFM_SHARED_DIR``; the one
``bench_display.py`` tiles), each the ``--cells`` cells around a different centre; without
that folder, generated sample slices. Every worker count embeds all slices with the bundled
weights (or ``--checkpoint``) into a fresh folder, in the same run, through
:func:`napari_stofm.embed_many` (what ``stofm embed ... -o OUTDIR --scheduler local:N`` runs).

Printed per run: the cluster's start (worker processes up), the embedding of the cohort (the
model sent to each worker once, one task per slice, outputs written) and cells/s. With
``--repeat R`` the worker counts alternate (1, 2, 2, 1, ...: a machine whose load drifts
favours neither); then the median per count, the speed-up over the first count, and the
largest difference between the runs' embeddings (float32 noise from the threads each run
gives torch).

``--joint`` adds the joint-regions figures quoted in :mod:`napari_stofm.cohort.joint`: the
four DLPFC slides of the shared data embedded (``embed_many``), then ``predict_many`` with
``joint_regions=7`` against ``n_regions=7`` (each slide alone), ARI against the layers per
slide and over the four slides pooled. ``--work DIR`` keeps those outputs: a rerun skips
what is complete.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_display import base_slice, shared_dir  # noqa: E402


def cohort_slices(folder: Path, n_slices: int, n_cells: int) -> tuple[list, str]:
    """``n_slices`` .h5ad files of ``n_cells`` contiguous cells each, around different centres."""
    from scipy.spatial import cKDTree

    base, what = base_slice()
    xy = np.asarray(base.obsm["spatial"], dtype=np.float64)[:, :2]
    tree = cKDTree(xy)
    rng = np.random.default_rng(0)
    take = min(n_cells, base.n_obs)
    paths = []
    for i in range(n_slices):
        _, idx = tree.query(xy[rng.integers(base.n_obs)], k=take)
        part = base[np.sort(np.atleast_1d(idx))].copy()
        path = folder / f"slice{i:02d}.h5ad"
        part.write_h5ad(path)
        paths.append(path)
    return paths, f"{n_slices} windows of {take} cells of {what}"


def run(paths, model, workers: int, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: nothing is skipped
    from distributed import Client, LocalCluster

    import napari_stofm as st

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    client.wait_for_workers(workers)
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        report = st.embed_many(paths, model, out_dir=out, client=client)
        seconds = time.perf_counter() - t1
    finally:
        client.close()
        cluster.close()
    if not report.ok:
        sys.exit(report.describe())
    cells = sum(r.n_cells for r in report.written)
    print(f"{workers} worker process{'es' if workers > 1 else '  '}: start {started:5.1f} s, embed {seconds:6.1f} s "
          f"({cells / seconds:5.0f} cells/s, {len(report.written)} slices)", flush=True)
    return {"seconds": seconds, "started": started, "cells": cells}


def joint_figures(model, work: Path) -> None:
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    import napari_stofm as st
    from napari_stofm import keys

    paths = sorted((shared_dir() / "data" / "visium_human_dlpfc").glob("*.h5ad"))
    if not paths:
        print("joint regions: skipped (no visium_human_dlpfc slides in the shared data)")
        return
    st.embed_many(paths, model, out_dir=work / "dlpfc")
    embedded = [work / "dlpfc" / p.name for p in paths]
    for label, kwargs in (("each slide alone (n_regions=7)", {"n_regions": 7}),
                          ("joint (joint_regions=7)", {"joint_regions": 7})):
        folder = work / ("dlpfc_joint" if "joint_regions" in kwargs else "dlpfc_alone")
        report = st.predict_many(embedded, model, out_dir=folder, **kwargs)
        if not report.ok:
            sys.exit(report.describe())
        truth, pred, per = [], [], []
        for p in paths:
            a = ad.read_h5ad(folder / p.name)
            known = a.obs["region"].notna().to_numpy()
            t = a.obs["region"].astype(str).to_numpy()[known]
            r = a.obs[keys.REGION].astype(str).to_numpy()[known]
            per.append(adjusted_rand_score(t, r))
            truth.append(t)
            pred.append(r)
        pooled = adjusted_rand_score(np.concatenate(truth), np.concatenate(pred))
        print(f"regions, {label}: ARI per slide {' / '.join(f'{x:.2f}' for x in per)}, pooled over the slides "
              f"{pooled:.2f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--cells", type=int, default=2000, help="cells per slice")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per worker count, alternating (default 2)")
    ap.add_argument("--checkpoint", default=None, help="weights (default: the bundled ones)")
    ap.add_argument("--joint", action="store_true", help="also the joint-regions figures on the DLPFC slides")
    ap.add_argument("--work", default=None, help="keep the --joint outputs in this folder (reruns skip them)")
    args = ap.parse_args(argv)

    import anndata as ad

    from napari_stofm import keys, load_model

    model = load_model(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="stofm-bench-cohort-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        paths, what = cohort_slices(tmp / "in", args.slices, args.cells)
        print(f"cohort: {what}; model {model}", flush=True)
        runs = {w: [] for w in args.workers}
        for r in range(args.repeat):
            for w in (args.workers if r % 2 == 0 else args.workers[::-1]):
                runs[w].append(run(paths, model, w, tmp / f"out{w}"))
        embed = {w: statistics.median(x["seconds"] for x in v) for w, v in runs.items()}
        total = {w: statistics.median(x["seconds"] + x["started"] for x in v) for w, v in runs.items()}
        for w in args.workers:
            print(f"{w} worker process{'es' if w > 1 else '  '}: median embed {embed[w]:6.1f} s over {len(runs[w])} "
                  f"runs ({runs[w][0]['cells'] / embed[w]:5.0f} cells/s)")
        first = args.workers[0]
        for w in args.workers[1:]:
            print(f"speed-up {first} -> {w} workers: {embed[first] / embed[w]:.2f}x on the embedding "
                  f"({total[first] / total[w]:.2f}x with the cluster's start)")
        worst = 0.0
        for p in paths:
            a = [ad.read_h5ad(tmp / f"out{w}" / p.name).obsm[keys.EMBEDDING] for w in args.workers]
            worst = max(worst, max(float(np.abs(a[0] - b).max()) for b in a[1:]) if len(a) > 1 else 0.0)
        print(f"largest |difference| of X_stofm between the runs: {worst:.2e}")
        if args.joint:
            joint_figures(model, Path(args.work) if args.work else tmp / "joint")


if __name__ == "__main__":
    main()
