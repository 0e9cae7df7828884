"""igraph's Leiden on a cell graph, seeded: the virtual cells' clustering.

igraph's C code holds Python's GIL for the whole optimisation (about 5 s on 300k cells on
a laptop core), so a GUI that runs SToFM in a worker thread would stop drawing for that
long. On a graph of at least :data:`PROCESS_NODES` nodes (:data:`WORKER_PROCESS_NODES` when
called from a thread other than the main one, as a GUI's worker is) the same call therefore
runs in a child Python process; this module imports neither torch nor napari, so the child starts
quickly. The child runs exactly the code this process would (same edges, weights,
resolution and seed), so the partition is the same; where no child can be started the
call runs here.
"""
from __future__ import annotations

import logging
import random
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

#: edges handed to igraph per block: a Python list of every edge at once costs ~100 bytes an edge
_EDGE_CHUNK = 1_000_000
#: graphs with at least this many nodes are clustered in a child process (None: never)
PROCESS_NODES = 100_000
#: off the main thread the limit is lower: in line, Leiden on 20k nodes holds the GIL for
#: about a third of a second, a visible stall of a GUI (the child costs ~1 s more, off the UI)
WORKER_PROCESS_NODES = 20_000


def leiden(graph, resolution: float = 1.0, seed: int = 0, n_iterations: int = 2) -> np.ndarray:
    """igraph's Leiden (modularity, weighted, undirected) on a symmetric CSR graph, seeded."""
    return leiden_at_most(graph, None, resolution=resolution, seed=seed, n_iterations=n_iterations)[0]


def leiden_at_most(graph, max_clusters: Optional[int], resolution: float = 1.0, seed: int = 0,
                   n_iterations: int = 2) -> tuple[np.ndarray, float]:
    """:func:`leiden`, with the resolution halved until at most ``max_clusters`` clusters come
    out (or it falls under 1e-6); returns the partition and the resolution used. The graph
    is built once for all the resolutions tried (in the child process, for a large one)."""
    import scipy.sparse as sp

    upper = sp.triu(graph, k=1).tocoo()
    args = (int(graph.shape[0]), upper.row.astype(np.int64), upper.col.astype(np.int64),
            upper.data.astype(np.float64), float(resolution), int(seed), int(n_iterations),
            0 if max_clusters is None else int(max_clusters))
    if _in_child_process(int(graph.shape[0])):
        try:
            return _in_child(args)
        except (OSError, RuntimeError, ValueError, EOFError) as err:  # no child process here: the same call in line
            log.debug("Leiden in a child process failed (%s); running it in this process", err)
    return leiden_edges(*args)


def _in_child_process(n_nodes: int) -> bool:
    import threading

    if PROCESS_NODES is None:
        return False
    limit = PROCESS_NODES
    if threading.current_thread() is not threading.main_thread():
        limit = min(limit, WORKER_PROCESS_NODES)
    return n_nodes >= limit


def leiden_edges(n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, resolution: float, seed: int,
                 n_iterations: int, max_clusters: int = 0) -> tuple[np.ndarray, float]:
    """:func:`leiden_at_most` on an edge list (each undirected edge once; ``max_clusters`` 0: no cap)."""
    import igraph as ig

    g = ig.Graph(n=n, directed=False)
    for start in range(0, rows.size, _EDGE_CHUNK):
        stop = start + _EDGE_CHUNK
        g.add_edges(np.column_stack([rows[start:stop], cols[start:stop]]).tolist())
    g.es["weight"] = weights.tolist()
    res = float(resolution)
    while True:
        ig.set_random_number_generator(random.Random(seed))
        try:
            part = g.community_leiden(
                objective_function="modularity", weights="weight", resolution=res, n_iterations=n_iterations
            )
        finally:
            ig.set_random_number_generator(random)
        membership = np.asarray(part.membership, dtype=np.int64)
        if not max_clusters or membership.max(initial=-1) + 1 <= max_clusters or res < 1e-6:
            return membership, res
        res /= 2


def _in_child(args: tuple) -> tuple[np.ndarray, float]:
    """:func:`leiden_edges` in a child Python process (``python -m napari_stofm.leiden``,
    the graph on its stdin, the partition on its stdout), while this thread waits on the
    pipe without the GIL. A plain child process rather than :mod:`multiprocessing`: that
    would import the caller's main script again in the child."""
    import io
    import os
    import subprocess
    import sys
    from pathlib import Path

    n, rows, cols, weights, resolution, seed, n_iterations, max_clusters = args
    buffer = io.BytesIO()
    np.savez(buffer, n=n, rows=rows, cols=cols, weights=weights, resolution=resolution, seed=seed,
             n_iterations=n_iterations, max_clusters=max_clusters)
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-m", "napari_stofm.leiden"], input=buffer.getvalue(),
                          capture_output=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or "no output")
    with np.load(io.BytesIO(done.stdout)) as out:
        return out["membership"], float(out["resolution"])


def _child_main() -> None:
    import io
    import sys

    with np.load(io.BytesIO(sys.stdin.buffer.read())) as f:
        membership, resolution = leiden_edges(int(f["n"]), f["rows"], f["cols"], f["weights"], float(f["resolution"]),
                                              int(f["seed"]), int(f["n_iterations"]), int(f["max_clusters"]))
    buffer = io.BytesIO()
    np.savez(buffer, membership=membership, resolution=resolution)
    sys.stdout.buffer.write(buffer.getvalue())
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _child_main()
