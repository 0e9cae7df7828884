"""The paths that make large slices fast and small in memory give the numbers of the
straightforward computations they replace (float32 tolerance), on generated slices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stofm.io.sample import make_sample_slice
from napari_stofm.model.multiscale import (
    _spatial_split,
    hypernodes_from_assignment,
    normalize_coordinates,
    split_subslices,
)


@pytest.fixture(scope="module")
def bundled_model():
    from napari_stofm.model.stofm import load_model

    return load_model()


def _reference_split(xy, split_num, mode):
    """The published square scan, written out: every cell tested against every square."""
    n = xy.shape[0]
    if n <= split_num:
        return [np.arange(n)]
    min_x, min_y = xy[:, 0].min(), xy[:, 1].min()
    x_len, y_len = xy[:, 0].max() - min_x, xy[:, 1].max() - min_y
    side = np.sqrt(x_len * y_len / (n // split_num + 1))
    out = []
    for i in range(int(x_len / side) + 1):
        for j in range(int(y_len // side) + 1):
            x0, x1 = min_x + i * side, min_x + (i + 1) * side
            y0, y1 = min_y + j * side, min_y + (j + 1) * side
            idx = np.flatnonzero((xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1))
            if idx.size == 0:
                continue
            parts = idx.size // split_num
            if parts >= 2:
                out.extend(np.array_split(idx, parts) if mode == "published" else _spatial_split(xy, idx, parts))
            else:
                out.append(idx)
    covered = np.zeros(n, dtype=bool)
    for part in out:
        covered[part] = True
    if not covered.all():
        out.append(np.flatnonzero(~covered))
    return out


@pytest.mark.parametrize("mode", ["published", "spatial"])
@pytest.mark.parametrize("layout", ["uniform", "clumped", "grid"])
def test_bucketed_split_is_the_square_scan(mode, layout):
    rng = np.random.default_rng(3)
    n = 6000
    if layout == "uniform":
        xy = rng.uniform(0, [900, 300], (n, 2))
    elif layout == "clumped":
        xy = np.round(rng.normal(size=(n, 2)) * 40)
    else:  # many cells exactly on square boundaries
        xy = rng.integers(0, 25, (n, 2)).astype(float)
    xy = normalize_coordinates(xy)
    for split_num in (150, 1000):
        got = split_subslices(xy, split_num, mode=mode)
        want = _reference_split(xy, split_num, mode)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_virtual_cell_means_match_the_elementwise_sums():
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(5000, 2))
    emb = rng.normal(size=(5000, 256)).astype(np.float32)
    groups = rng.integers(0, 37, 5000)
    hyper = hypernodes_from_assignment(xy, emb, groups)
    labels, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((labels.size, 256))
    np.add.at(sums, inverse, emb.astype(np.float64))
    counts = np.bincount(inverse)[:, None]
    np.testing.assert_allclose(hyper.embeddings, sums / counts, rtol=0, atol=1e-12)


def test_cls_only_last_layer_is_the_full_encoder(bundled_model):
    enc = bundled_model.cell_encoder.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, enc.config.vocab_size, (24, 70), generator=gen)
    mask = torch.ones_like(ids)
    mask[:9, 40:] = 0
    ids[:9, 40:] = 0
    with torch.inference_mode():
        full = torch.nn.functional.normalize(enc.cell_proj(enc.bert(ids, mask)[:, 0]), dim=-1)
        fast = enc(ids, mask)
    np.testing.assert_allclose(fast.numpy(), full.numpy(), rtol=0, atol=1e-5)


def test_streamed_gene_scale_equals_one_block(bundled_model, monkeypatch):
    from napari_stofm.pipeline import embed as embed_module

    adata = make_sample_slice(1500, seed=2)
    whole = embed_module.compute_cell_embedding(adata, bundled_model, use_cache=False)
    monkeypatch.setattr(embed_module, "STREAM_CELLS", 400)  # four blocks, the last one short
    blocks = embed_module.compute_cell_embedding(adata, bundled_model, use_cache=False)
    np.testing.assert_allclose(blocks.embeddings, whole.embeddings, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(blocks.empty, whole.empty)


def test_backed_slice_embeds_like_the_one_in_memory(bundled_model, tmp_path, monkeypatch):
    from napari_stofm.genes.expression import expression_fingerprint
    from napari_stofm.io import slices as slices_module
    from napari_stofm.io.slices import read_slice
    from napari_stofm.pipeline import embed as embed_module

    path = tmp_path / "slice.h5ad"
    make_sample_slice(1200, seed=4).write_h5ad(path)
    in_memory = read_slice(path)
    monkeypatch.setattr(slices_module, "_CHECK_ROWS", 500)  # validated block by block
    backed = read_slice(path, backed=True)
    assert hasattr(backed.X, "to_memory"), "the expression matrix should stay on disk"
    assert expression_fingerprint(backed) == expression_fingerprint(in_memory)
    monkeypatch.setattr(embed_module, "STREAM_CELLS", 500)
    a = embed_module.compute_embedding(in_memory, bundled_model)
    b = embed_module.compute_embedding(backed, bundled_model)
    np.testing.assert_allclose(b.cell.embeddings, a.cell.embeddings, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b.representations, a.representations, rtol=0, atol=1e-5)
    b.write(backed)
    out = tmp_path / "embedded.h5ad"
    backed.write_h5ad(out)
    np.testing.assert_allclose(read_slice(out).obsm["X_stofm"], a.representations, rtol=0, atol=1e-5)


def test_backed_slice_with_a_bad_value_names_the_cell(tmp_path, monkeypatch):
    import scipy.sparse as sp

    from napari_stofm.errors import StofmInputError
    from napari_stofm.io import slices as slices_module
    from napari_stofm.io.slices import read_slice

    adata = make_sample_slice(900, seed=5)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    row = 777  # in the second block
    X[row, int(X[row].indices[0])] = -1.0
    adata.X = X
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(slices_module, "_CHECK_ROWS", 500)
    with pytest.raises(StofmInputError, match=str(adata.obs_names[row])):
        read_slice(path, backed=True)


def test_batches_sized_to_the_gpu(bundled_model, monkeypatch):
    from types import SimpleNamespace

    from napari_stofm.model import stofm

    assert stofm.batch_sizes(bundled_model) == stofm.CPU_BATCHES
    fake = SimpleNamespace(device=torch.device("cuda", 0), se2=bundled_model.se2,
                           cell_encoder=bundled_model.cell_encoder)
    sizes = {}
    for free_gib in (2, 40, 130):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free_gib: (f * 2**30, 140 * 2**30))
        sizes[free_gib] = stofm.batch_sizes(fake)
    assert sizes[2][0] >= 4 and sizes[2][1] >= 64
    assert sizes[2] <= sizes[40] <= sizes[130]
    assert sizes[130][0] > stofm.CPU_BATCHES[0] and sizes[130][1] > stofm.CPU_BATCHES[1]
    assert sizes[130][0] <= 64 and sizes[130][1] <= 4096


def test_large_slice_virtual_cells_are_the_pca_ones(bundled_model, monkeypatch):
    from sklearn.decomposition import PCA

    from napari_stofm.model import multiscale
    from napari_stofm.pca import covariance_pca
    from napari_stofm.pipeline.embed import compute_cell_embedding

    adata = make_sample_slice(2500, seed=6)
    emb = compute_cell_embedding(adata, bundled_model).embeddings
    ours = covariance_pca(emb, 2)
    ref = PCA(n_components=2).fit_transform(emb.astype(np.float64))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    xy = normalize_coordinates(adata.obsm["spatial"])
    default = multiscale.build_hypernodes(xy, emb)
    monkeypatch.setattr(multiscale, "LARGE_SLICE", 0)
    from napari_stofm import leiden as leiden_module

    monkeypatch.setattr(leiden_module, "_EDGE_CHUNK", 1000)  # the graph handed to igraph in blocks
    large = multiscale.build_hypernodes(xy, emb)
    np.testing.assert_array_equal(large.assignment, default.assignment)
    np.testing.assert_allclose(large.embeddings, default.embeddings, rtol=0, atol=1e-12)


def test_leiden_of_a_large_graph_runs_in_a_child_process_with_the_same_partition(monkeypatch):
    """igraph holds the GIL while it clusters: a large graph is clustered by a child process
    (a GUI keeps drawing), with the partition this process would find."""
    import scipy.sparse as sp

    from napari_stofm import leiden as leiden_module
    from napari_stofm.model.multiscale import umap_connectivities

    xy = np.random.default_rng(3).uniform(size=(3000, 2))
    graph = umap_connectivities(xy, 10)
    upper = sp.triu(graph, k=1).tocoo()
    args = (3000, upper.row.astype(np.int64), upper.col.astype(np.int64), upper.data.astype(np.float64), 1.0, 4, 2, 0)
    in_line, res = leiden_module.leiden_edges(*args)
    assert in_line.max() > 5 and res == 1.0
    child, child_res = leiden_module._in_child(args)
    np.testing.assert_array_equal(child, in_line)
    assert child_res == res
    calls = []
    monkeypatch.setattr(leiden_module, "_in_child", lambda a: calls.append(a) or leiden_module.leiden_edges(*a))
    np.testing.assert_array_equal(leiden_module.leiden(graph, 1.0, 4), in_line)
    assert calls == []  # a small graph: in this process
    monkeypatch.setattr(leiden_module, "WORKER_PROCESS_NODES", 1000)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # from a worker thread (a GUI's), a smaller graph goes to the child
        np.testing.assert_array_equal(pool.submit(leiden_module.leiden, graph, 1.0, 4).result(), in_line)
    assert len(calls) == 1
    calls.clear()
    np.testing.assert_array_equal(leiden_module.leiden(graph, 1.0, 4), in_line)
    assert calls == []  # the main thread keeps the higher limit
    monkeypatch.setattr(leiden_module, "PROCESS_NODES", 1000)
    np.testing.assert_array_equal(leiden_module.leiden(graph, 1.0, 4), in_line)
    assert len(calls) == 1
    # the cap: halving on one graph (in the child) gives what halving call by call gives
    cap = int(in_line.max()) // 2
    capped, capped_res = leiden_module.leiden_at_most(graph, cap, resolution=1.0, seed=4)
    assert len(calls) == 2 and capped.max() + 1 <= cap and capped_res < 1.0
    by_hand = 1.0
    while leiden_module.leiden_edges(*args[:4], by_hand, 4, 2)[0].max() + 1 > cap:
        by_hand /= 2
    assert capped_res == by_hand
    np.testing.assert_array_equal(capped, leiden_module.leiden_edges(*args[:4], by_hand, 4, 2)[0])


def test_bfloat16_cell_encoder_is_close_and_cached_apart(bundled_model):
    from napari_stofm.errors import StofmInputError
    from napari_stofm.pipeline.embed import compute_cell_embedding, embed_cells

    adata = make_sample_slice(600, seed=7)
    full = embed_cells(adata, bundled_model)
    reduced = compute_cell_embedding(adata, bundled_model, precision="bfloat16")
    assert not reduced.reused, "a float32 cache must not answer for bfloat16"
    assert reduced.meta["precision"] == "bfloat16"
    np.testing.assert_allclose(np.linalg.norm(reduced.embeddings, axis=1), 1.0, atol=1e-5)
    cos = (full * reduced.embeddings).sum(axis=1)
    assert cos.min() > 0.999
    assert bundled_model.cell_encoder.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    with pytest.raises(StofmInputError, match="precision"):
        compute_cell_embedding(adata, bundled_model, precision="float16")


def test_cli_embed_backed_writes_what_in_memory_writes(tmp_path):
    import anndata as ad

    from napari_stofm.cli import main

    path = tmp_path / "slice.h5ad"
    make_sample_slice(800, seed=8).write_h5ad(path)
    assert main(["embed", str(path), "-o", str(tmp_path / "mem.h5ad"), "-q"]) == 0
    assert main(["embed", str(path), "-o", str(tmp_path / "backed.h5ad"), "--backed", "-q"]) == 0
    mem, backed = ad.read_h5ad(tmp_path / "mem.h5ad"), ad.read_h5ad(tmp_path / "backed.h5ad")
    np.testing.assert_allclose(backed.obsm["X_stofm"], mem.obsm["X_stofm"], rtol=0, atol=1e-5)
    assert (backed.X != mem.X).nnz == 0
    assert list(backed.obs_names) == list(mem.obs_names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backed.h5ad", "mem.h5ad", "slice.h5ad"]
