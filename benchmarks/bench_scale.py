"""End to end at scale: napari-stofm against Novae on tiled real slices, with each stage
against the arithmetic it must do.

A real slice from ``../shared/data`` (or ``STOFM_SHARED_DIR``; default: the MERFISH mouse
POA slice, 6,509 cells) is tiled side by side to each ``--cells`` size (without that folder
the generated sample slice is tiled). Every system runs in its own child process on the
same ``.h5ad`` (so each peak RSS is its own), one after another, in the same run:

* ``napari-stofm``: read the slice, ``compute_embedding`` with the bundled model (the path
  ``embed``/``predict`` take), then ``RegionClusterer(...).regions(n_regions=8)``. Stage
  times: gene scale (tokenise + cell encoder), virtual cells (macro scale), SE(2) stage
  (sub-slices + transformer), regions.
* the floors, measured in the same child: the cell encoder's multiply-adds on the slice's
  real token counts, timed as dense float32 matmuls of the same FLOPs; and a plain
  ``torch.nn.TransformerEncoder`` of the SE(2) transformer's size (no distance bias, no
  kernel) on the same padded sub-slice batches. ``stage / floor`` is how far each stage is
  from the arithmetic it cannot avoid.
* ``novae`` (when importable): Novae with a random initialisation (no weights downloaded,
  nothing trained), ``spatial_neighbors`` + ``compute_representations`` + ``assign_domains``
  with 8 domains: the same job (after ``normalize_total`` + ``log1p``, as Novae asks).

Each system's library imports happen before its clock starts. Printed per size: time,
cells/s and peak RSS of each, and napari-stofm's speed-up over
Novae. On a CUDA machine the model runs on the GPU (the default device) and that is
printed too.

An environment with Novae beside napari-stofm (Novae pins its own dependencies, so keep it
apart from the project's ``.venv``)::

    python3 -m venv .venv-novae
    .venv-novae/bin/pip install torch==2.13.0      # the CPU build first
    .venv-novae/bin/pip install -e . novae
    .venv-novae/bin/python benchmarks/bench_scale.py --cells 52072 104144

Without Novae the napari-stofm rows and floors are printed alone. Other options:
``--threads`` (default 2, as on a laptop), ``--skip-floors``, ``--source DATASET/FILE``,
``--regions``, ``--backed`` (napari-stofm leaves the expression matrix on disk: the memory
figure for a slice larger than memory, e.g. ``--cells 1000000 --backed --no-novae``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_display import shared_dir, tiled  # noqa: E402  (same tiling as the display benchmark)

DEFAULT_SOURCE = "merfish_mouse_poa/animal1_bregma-0.29.h5ad"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- children


class StageClock:
    """A progress callback that records when each stage first reports."""

    STAGES = (("Tokenizing", "gene scale"), ("Cell embeddings", "gene scale"),
              ("Macro scale", "virtual cells"), ("SE(2)", "SE(2) stage"))

    def __init__(self):
        self.starts = {}

    def __call__(self, done, total, message=""):
        for prefix, stage in self.STAGES:
            if message.startswith(prefix) and stage not in self.starts:
                self.starts[stage] = time.perf_counter()


def _cell_encoder_floor(model, adata) -> dict:
    """Dense float32 matmuls with the multiply-adds of the cell encoder on these cells."""
    import torch

    from napari_stofm.genes.tokenizer import tokenize_adata

    s = model.settings
    tokens, _ = tokenize_adata(adata, model.vocabulary, max_genes=s.max_genes * s.gene_windows)
    if s.gene_windows > 1:
        tokens, _ = tokens.interleaved(s.max_genes)
    lengths = np.asarray(tokens.lengths, dtype=np.float64)[~np.asarray(tokens.empty, dtype=bool)]
    cfg = model.cell_encoder.config
    h, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    full = 4 * h * h + 2 * h * inter  # q, k, v, out + feed-forward, per token and layer
    # every layer but the last for every token; the last: keys and values for every token,
    # the rest for the CLS token only (what the encoder computes); attention scores and sums
    macs = (lengths * (full * (n_layers - 1) + 2 * h * h) + full
            + 2 * h * lengths**2 * (n_layers - 1) + 2 * h * lengths).sum()
    a, b = torch.randn(4096, h), torch.randn(h, inter)
    per = 4096 * h * inter
    reps = max(1, int(round(macs / per)))
    with torch.inference_mode():
        a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t
    return {"gflop": 2 * macs / 1e9, "seconds": seconds}


def _se2_floor(model, adata, meta: dict, batch_size: int) -> dict:
    """A plain transformer encoder of the SE(2) transformer's size on the same batches."""
    import torch
    from torch import nn

    from napari_stofm.model.multiscale import normalize_coordinates, split_subslices

    cfg = model.se2.config
    xy = normalize_coordinates(np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2])
    sizes = sorted((len(s) for s in split_subslices(xy, meta["split_num"], mode=meta["split_mode"])), reverse=True)
    extra = 1 + int(meta["n_virtual_cells"])
    layer = nn.TransformerEncoderLayer(cfg.embedding_dim, cfg.num_attention_heads, cfg.ffn_embedding_dim,
                                       dropout=0.0, activation="gelu", batch_first=True)
    plain = nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=False).eval()
    lin = nn.Linear(cfg.input_dim, cfg.embedding_dim)
    with torch.inference_mode():
        plain(torch.zeros(1, 8, cfg.embedding_dim))
        t = time.perf_counter()
        for start in range(0, len(sizes), batch_size):
            chunk = sizes[start:start + batch_size]
            x = lin(torch.randn(len(chunk), chunk[0] + extra, cfg.input_dim))
            plain(x)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "batches": (len(sizes) + batch_size - 1) // batch_size}


def child_stofm(path: str, regions: int, floors: bool, backed: bool = False) -> dict:
    # The libraries napari-stofm imports lazily, imported before the clock as Novae's are
    # (``import novae`` loads its whole stack before its clock starts): ~2 s of imports
    # otherwise land in the virtual-cell and region stages of the first run in a process.
    import igraph  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import torch

    from napari_stofm.heads.regions import RegionClusterer
    from napari_stofm.io.slices import read_slice
    from napari_stofm.model.stofm import batch_sizes, load_model
    from napari_stofm.pipeline.embed import compute_embedding

    t0 = time.perf_counter()
    adata = read_slice(path, backed=backed)
    model = load_model()
    t_read = time.perf_counter()
    clock = StageClock()
    emb = compute_embedding(adata, model, progress=clock, use_cache=False)
    t_embed = time.perf_counter()
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    RegionClusterer(emb.representations, xy, seed=0).regions(n_regions=regions)
    t_end = time.perf_counter()
    st = clock.starts
    gene_start = st.get("gene scale", t_read)
    vc_start = st.get("virtual cells", t_embed)
    se2_start = st.get("SE(2) stage", t_embed)
    out = {
        "seconds": t_end - t_read,
        "read": t_read - t0,
        "stages": {
            "gene scale": vc_start - gene_start,
            "virtual cells": se2_start - vc_start,
            "SE(2) stage": t_embed - se2_start,
            "regions": t_end - t_embed,
        },
        "device": str(model.device),
        "peak_rss_mb": peak_rss_mb(),
    }
    if floors:
        out["floor_cell_encoder"] = _cell_encoder_floor(model, adata)
        out["floor_se2"] = _se2_floor(model, adata, emb.meta, batch_size=batch_sizes(model)[0])  # the run's batches
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def child_novae(path: str, regions: int) -> dict:
    import anndata as ad
    import novae
    import scanpy as sc

    t0 = time.perf_counter()
    adata = ad.read_h5ad(path)
    t_read = time.perf_counter()
    # Novae's recommended preprocessing (it refuses the volume-normalised values as they are)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    novae.spatial_neighbors(adata)
    t_graph = time.perf_counter()
    import torch

    torch.manual_seed(0)  # the same random initialisation in every run
    np.random.seed(0)
    model = novae.Novae(adata)  # random initialisation
    model.mode.trained = True  # what fit() sets: a random-init model costs what a trained one does
    model.compute_representations(adata, accelerator="cpu", num_workers=0)
    t_repr = time.perf_counter()
    domains_failed = None
    try:
        model.assign_domains(adata, n_domains=regions)
    except ValueError as err:  # a random prototype tree may have no level with exactly that many domains
        domains_failed = str(err)
    t_end = time.perf_counter()
    return {
        "domains_failed": domains_failed,
        "seconds": t_end - t_read,
        "read": t_read - t0,
        "stages": {"graph": t_graph - t_read, "representations": t_repr - t_graph, "domains": t_end - t_repr},
        "version": getattr(novae, "__version__", "?"),
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- parent


def run_child(system: str, path: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--input", path,
           "--regions", str(args.regions), "--threads", str(args.threads)]
    if args.skip_floors:
        cmd.append("--skip-floors")
    if args.backed:
        cmd.append("--backed")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def novae_available() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import novae"], capture_output=True)
    return proc.returncode == 0


def base_slice(source: str):
    import anndata as ad

    path = shared_dir() / "data" / source
    if path.is_file():
        return ad.read_h5ad(path), source
    from napari_stofm.io.sample import make_sample_slice

    return make_sample_slice(5000, seed=0), "generated sample (5000 cells)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[52072, 104144])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--regions", type=int, default=8)
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="DATASET/FILE.h5ad under ../shared/data")
    ap.add_argument("--skip-floors", action="store_true")
    ap.add_argument("--no-novae", action="store_true")
    ap.add_argument("--backed", action="store_true",
                    help="napari-stofm reads the expression matrix backed (left on disk, read in blocks)")
    ap.add_argument("--child", choices=["stofm", "novae"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        result = (child_stofm(args.input, args.regions, not args.skip_floors, args.backed) if args.child == "stofm"
                  else child_novae(args.input, args.regions))
        print(json.dumps(result))
        return

    base, name = base_slice(args.source)
    with_novae = not args.no_novae and novae_available()
    print(f"source: {name} ({base.n_obs} cells x {base.n_vars} genes); {args.threads} threads; "
          f"{args.regions} regions; Novae: {'yes' if with_novae else 'not importable (see the docstring)'}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cells:
            path = str(Path(tmp) / f"tiled_{n}.h5ad")
            tiled(base, n).write_h5ad(path)
            print(f"\n== {n:,} cells ==")
            stofm = run_child("stofm", path, args)
            if "error" in stofm:
                print(f"napari-stofm failed: {stofm['error']}")
                continue
            rate = n / stofm["seconds"]
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in stofm["stages"].items())
            print(f"napari-stofm ({stofm['device']}): {stofm['seconds']:.1f} s, {rate:,.0f} cells/s, "
                  f"peak RSS {stofm['peak_rss_mb'] / 1024:.2f} GB  [{stages}; reading {stofm['read']:.1f} s]")
            if "floor_cell_encoder" in stofm:
                fc, fs = stofm["floor_cell_encoder"], stofm["floor_se2"]
                gene, se2 = stofm["stages"]["gene scale"], stofm["stages"]["SE(2) stage"]
                print(f"  gene scale {gene:.1f} s vs dense matmul of the same {fc['gflop']:.0f} GFLOP "
                      f"{fc['seconds']:.1f} s: {gene / max(fc['seconds'], 1e-9):.2f}x the floor")
                print(f"  SE(2) stage {se2:.1f} s vs plain transformer encoder on the same {fs['batches']} "
                      f"batches {fs['seconds']:.1f} s: {se2 / max(fs['seconds'], 1e-9):.2f}x the floor")
            if with_novae:
                nov = run_child("novae", path, args)
                if "error" in nov:
                    print(f"Novae failed: {nov['error']}")
                    continue
                nstages = ", ".join(f"{k} {v:.1f} s" for k, v in nov["stages"].items())
                print(f"Novae {nov['version']} (random init): {nov['seconds']:.1f} s, {n / nov['seconds']:,.0f} "
                      f"cells/s, peak RSS {nov['peak_rss_mb'] / 1024:.2f} GB  [{nstages}]")
                if nov.get("domains_failed"):
                    print(f"  (Novae's assign_domains failed on its random init: {nov['domains_failed']}; "
                          "its time is that of the rest, a fraction of a second short)")
                print(f"napari-stofm / Novae speed-up: {nov['seconds'] / stofm['seconds']:.2f}x")


if __name__ == "__main__":
    main()
