"""Per-slice adaptation: gain and cost, each slice's "off" run as the baseline in the same run.

Training slices only (the held-out ones never decide anything): regions read off X_stofm
(KMeans) and through RegionClusterer, K = the true region count, and the embed time.

    python benchmarks/bench_adapt.py bundled 30            # four default slices, 30 s
    python benchmarks/bench_adapt.py CHECKPOINT 30,60 dlpfc/151673
"""
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402

from napari_stofm import load_model  # noqa: E402
from napari_stofm.pipeline.embed import compute_embedding  # noqa: E402

warnings.simplefilter("ignore")


def main(argv):
    model = load_model(argv[0] if argv and argv[0] != "bundled" else None)
    secs = [float(x) for x in (argv[1].split(",") if len(argv) > 1 else ["30"])]
    wanted = argv[2:] or ["starmap_mouse_visp/by3_1k", "st_human_her2st/A1", "st_human_her2st/E1", "osmfish"]
    res = {s: [] for s in [0.0] + secs}
    for s in [x for x in ev.find_slices(ev.data_dir(None), wanted) if not x.held_out]:
        adata, labels = s.load(), s.labels("region")
        if labels is None:
            continue
        line = []
        for sec in [0.0] + secs:
            t0 = time.perf_counter()
            emb = compute_embedding(adata, model, adapt=sec).representations
            seconds = time.perf_counter() - t0
            km = ev.embedding_kmeans(emb, labels)["ari"]
            regions = ev.unsupervised_regions(emb, s.xy, labels)["ari"]
            res[sec].append((km, regions, seconds))
            line.append(f"adapt {sec:g} s: KMeans {km:.3f} regions {regions:.3f} ({seconds:.0f} s)")
        print(s.key, " | ".join(line), flush=True)
    for sec, rows in res.items():
        v = np.array(rows)
        print(f"adapt {sec:g} s: mean KMeans ARI {v[:, 0].mean():.3f}, RegionClusterer ARI {v[:, 1].mean():.3f}, "
              f"mean embed time {v[:, 2].mean():.1f} s (n={len(v)})")


if __name__ == "__main__":
    main(sys.argv[1:])
