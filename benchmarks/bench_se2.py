"""Cost of the SE(2) stage against a plain transformer encoder of the same size.

Four sub-slices of 1,200 tokens, 4 layers, E = 256, 8 heads, K = 128 Gaussians, CPU,
inference. Three models are timed in the same run on the same inputs:

* ``plain``: ``torch.nn.TransformerEncoder`` (post-LN, GELU, same FFN width) without a
  padding mask (its fused fast path): the floor; ``plain+padmask`` the same with the
  key-padding mask a padded batch needs;
* ``se2``: napari-stofm's SE(2) transformer (distinct-distance Gaussian kernel);
* ``se2-dense``: the same model with the published dense (B, L, L, K) kernel.

Run: ``python benchmarks/bench_se2.py [--repeats 5] [--threads N]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from napari_stofm.model import (
    SE2Transformer,
    SToFMConfig,
    build_subslice_inputs,
    collate,
    hypernodes_from_assignment,
    normalize_coordinates,
)


def make_batch(n_sub=4, tokens=1200, n_hyper=30, dim=256, seed=0):
    rng = np.random.default_rng(seed)
    n_cells = tokens - 1 - n_hyper
    xy = rng.uniform(0, 2000, size=(n_sub * n_cells, 2))
    emb = rng.normal(size=(xy.shape[0], dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    nxy = normalize_coordinates(xy)
    groups = rng.integers(0, n_hyper, size=xy.shape[0])
    hyper = hypernodes_from_assignment(nxy, emb, groups)
    order = np.argsort(nxy[:, 0])  # 4 vertical strips
    subs = np.array_split(order, n_sub)
    return collate(list(build_subslice_inputs(nxy, emb, hyper, subs)))


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-dense", action="store_true", help="skip the (slow) dense-kernel model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SToFMConfig(num_hidden_layers=4, input_dim=256, embedding_dim=256, ffn_embedding_dim=256,
                      num_attention_heads=8, gaussian_hidden_dim=128)
    se2 = SE2Transformer(cfg).init_weights(seed=0).eval()
    layer = torch.nn.TransformerEncoderLayer(256, 8, dim_feedforward=256, dropout=0.0, activation="gelu",
                                             batch_first=True)
    plain = torch.nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).eval()
    proj = torch.nn.Linear(256, 256)
    batch = make_batch()
    emb, dist, types = batch["token_embeddings"], batch["attn_bias"], batch["token_types"]
    pad = types.eq(3)
    n_cells = int((types == 0).sum())
    print(f"input: {tuple(emb.shape[:2])} tokens, {n_cells} cells, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")

    runs = {}
    with torch.inference_mode():
        runs["plain"] = timeit(lambda: plain(proj(emb)), args.repeats)
        runs["plain+padmask"] = timeit(lambda: plain(proj(emb), src_key_padding_mask=pad), args.repeats)
        runs["se2"] = timeit(lambda: se2(emb, dist, types, return_pair_rep=False), args.repeats)
        runs["kernel-distinct"] = timeit(lambda: se2.gaussian(dist), args.repeats)
        if not args.skip_dense:
            runs["se2-dense"] = timeit(lambda: se2(emb, dist, types, return_pair_rep=False, dense_kernel=True),
                                       max(1, args.repeats // 2))
            runs["kernel-dense"] = timeit(lambda: se2.gaussian.dense_forward(dist), max(1, args.repeats // 2))
    floor = statistics.median(runs["plain"])
    print(f"{'model':<16}{'median s':>10}{'min s':>9}{'max s':>9}{'ms/cell':>9}{'x plain':>9}")
    for name, t in runs.items():
        med = statistics.median(t)
        print(f"{name:<16}{med:>10.3f}{min(t):>9.3f}{max(t):>9.3f}{1000 * med / n_cells:>9.3f}{med / floor:>9.2f}")


if __name__ == "__main__":
    main()
