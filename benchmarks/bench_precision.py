"""What bfloat16 in the cell encoder costs in accuracy and gains in time, on training slices.

For each slice (training slices of ``../shared/data`` only; none marked held out), in one
process, alternating the two precisions ``--repeats`` times (the fastest time is shown):

* gene-scale time (tokenise + cell encoder) in float32 and in bfloat16;
* the cosine between the two ``X_stofm_cell`` and between the two ``X_stofm`` (min / mean);
* tissue regions (``RegionClusterer`` at the true count) from each, scored against the
  slice's ``obs['region']`` (ARI), and the agreement of the two labellings.

Run: ``python benchmarks/bench_precision.py [--slices DATASET/FILE ...] [--threads 2]``.
bfloat16 is fast only where the CPU has bfloat16 matrix units (AVX-512 BF16, AMX) or on a
recent GPU; elsewhere it can be slower than float32, and this says so.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_display import shared_dir  # noqa: E402

DEFAULT_SLICES = [
    "starmap_mouse_visp/by3_1k.h5ad",
    "osmfish_mouse_sscortex/sscortex.h5ad",
    "visium_human_dlpfc/151673.h5ad",
    "merfish_mouse_poa/animal1_bregma-0.29.h5ad",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    return (a[ok] * b[ok]).sum(axis=1) / (na[ok] * nb[ok])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", nargs="+", default=DEFAULT_SLICES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from sklearn.metrics import adjusted_rand_score

    from napari_stofm.heads.regions import cluster_regions
    from napari_stofm.io.slices import read_slice
    from napari_stofm.model.stofm import load_model
    from napari_stofm.pipeline.embed import compute_cell_embedding, compute_embedding

    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    print(f"bfloat16 matrix units on this CPU: {', '.join(units) or 'none found'}; {args.threads} threads")
    model = load_model()
    for name in args.slices:
        path = shared_dir() / "data" / name
        if not path.is_file():
            print(f"{name}: not found in {path.parent} (skipped)")
            continue
        adata = read_slice(path)
        times = {"float32": [], "bfloat16": []}
        cells = {}
        for _ in range(args.repeats):
            for precision in times:
                t = time.perf_counter()
                cells[precision] = compute_cell_embedding(adata, model, use_cache=False, precision=precision)
                times[precision].append(time.perf_counter() - t)
        t32, t16 = min(times["float32"]), min(times["bfloat16"])
        cos_cell = cosines(cells["float32"].embeddings, cells["bfloat16"].embeddings)
        final = {p: compute_embedding(adata, model, use_cache=False, precision=p).representations for p in times}
        cos_final = cosines(final["float32"], final["bfloat16"])
        line = (f"{name}: {adata.n_obs} cells; gene scale float32 {t32:.2f} s, bfloat16 {t16:.2f} s "
                f"({t32 / t16:.2f}x); cosine X_stofm_cell min {cos_cell.min():.5f} mean {cos_cell.mean():.6f}, "
                f"X_stofm min {cos_final.min():.5f} mean {cos_final.mean():.6f}")
        if "region" in adata.obs:
            labelled = adata.obs["region"].notna().to_numpy()
            k = int(adata.obs["region"][labelled].nunique())
            xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
            regions = {p: cluster_regions(final[p], xy, n_regions=k).codes for p in times}
            truth = adata.obs["region"].astype(str).to_numpy()[labelled]
            a32 = adjusted_rand_score(truth, regions["float32"][labelled])
            a16 = adjusted_rand_score(truth, regions["bfloat16"][labelled])
            same = adjusted_rand_score(regions["float32"], regions["bfloat16"])
            line += f"; regions ARI float32 {a32:.3f}, bfloat16 {a16:.3f} (agreement {same:.3f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
