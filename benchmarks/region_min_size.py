"""The min_region_size rule of RegionClusterer: ARI at the true region count and the number
of regions under 10 cells, per rule, on the training slices and three sample slices (the
rule "none" is the baseline, in the same run).

    python benchmarks/region_min_size.py            # bundled weights
    python benchmarks/region_min_size.py CHECKPOINT
"""
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402

from napari_stofm import load_model  # noqa: E402
from napari_stofm.heads.regions import RegionClusterer  # noqa: E402
from napari_stofm.io.sample import make_sample_slice  # noqa: E402
from napari_stofm.pipeline.embed import embed  # noqa: E402

warnings.simplefilter("ignore")

RULES = {"none": lambda n: 0, "5": lambda n: 5, "10": lambda n: 10, "20": lambda n: 20,
         "0.5%": lambda n: max(5, round(0.005 * n)), "1%": lambda n: max(5, round(0.01 * n))}


def main(argv):
    model = load_model(argv[0] if argv else None)
    items = []
    for s in [x for x in ev.find_slices(ev.data_dir(None), []) if not x.held_out]:
        labels = s.labels("region")
        if labels is not None:
            items.append((s.key, ev.stofm_embeddings(model, s, True)["final"], s.xy, labels))
    for seed in (0, 1, 2):
        adata = make_sample_slice(n_cells=3000, seed=seed)
        embed(adata, model)
        items.append((f"sample seed {seed}", adata.obsm["X_stofm"], np.asarray(adata.obsm["spatial"]),
                      np.asarray(adata.obs["region"].astype(object))))
    scores = {r: [] for r in RULES}
    specks = {r: 0 for r in RULES}
    for key, emb, xy, labels in items:
        mask = np.array([v is not None and v == v for v in labels])
        k = len(set(labels[mask]))
        clusterer = RegionClusterer(emb, xy, seed=0, min_region_size=0)
        line = []
        for rule, size in RULES.items():
            clusterer.min_region_size = size(len(labels))
            codes = clusterer.regions(n_regions=k).codes
            ari = ev.clustering_scores(labels[mask], codes[mask])["ari"]
            sizes = np.bincount(codes, minlength=k)
            scores[rule].append(ari)
            specks[rule] += int((sizes < 10).sum())
            line.append(f"{rule}={ari:.3f} (smallest {sizes.min()})")
        print(key, " ".join(line), flush=True)
    for rule in RULES:
        print(f"{rule}: mean ARI {np.mean(scores[rule]):.4f} over {len(scores[rule])} slices; "
              f"regions under 10 cells: {specks[rule]}")


if __name__ == "__main__":
    main(sys.argv[1:])
