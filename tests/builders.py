"""Small generated objects that several test modules build the same way."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stofm.heads.annotation import Annotation


def example_annotation(n=12, seed=0) -> Annotation:
    """Four named regions over ``n`` cells, one unassigned cell and one unknown confidence."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, n).astype(np.int32)
    codes[0] = -1
    confidence = rng.random(n).astype(np.float32)
    confidence[1] = np.nan
    return Annotation.from_prediction(
        "stofm_region", ["cortex", "white matter", "lesion", "meninges"], codes, confidence,
        provenance={"model": "SToFM", "weights_fingerprint": "sha256:abc",
                    "parameters": {"n_regions": 4, "resolution": 0.5}},
    )


def gene_adata(var_names, var=None, species=None, n=4):
    """An AnnData of ones over the given genes (``var`` columns, ``uns['source']['species']``)."""
    X = sp.csr_matrix(np.ones((n, len(var_names)), dtype=np.float32))
    a = ad.AnnData(X=X, var=pd.DataFrame(var or {}, index=list(var_names)))
    if species is not None:
        a.uns["source"] = {"species": species, "values": "raw_counts"}
    return a


def noisy_cell_types(session, seed=0):
    """A made-up embedding (the sample's cell types plus noise) and a noisy ``stofm_cell_type``
    prediction (30 % of the cells flipped, confidence 0.3-1) on a sample-slice session; no
    model runs. Returns the true codes."""
    from napari_stofm.keys import CELL_TYPE

    rng = np.random.default_rng(seed)
    truth = session.adata.obs["cell_type"].astype("category")
    names = [str(c) for c in truth.cat.categories]
    true_codes = truth.cat.codes.to_numpy().astype(np.int32)
    n = len(true_codes)
    onehot = np.eye(len(names), dtype=np.float32)[true_codes]
    session.adata.obsm["X_stofm"] = np.hstack([onehot * 2.0, rng.normal(size=(n, 6)).astype(np.float32)])
    noisy = true_codes.copy()
    flip = rng.random(n) < 0.3
    noisy[flip] = rng.integers(0, len(names), flip.sum())
    conf = rng.uniform(0.3, 1.0, n).astype(np.float32)
    session.annotations[CELL_TYPE] = Annotation.from_prediction(CELL_TYPE, names, noisy, conf,
                                                                provenance={"model": "SToFM"})
    return true_codes


#: the model and batch sizes of a pretraining run small enough for a test (PretrainConfig keywords)
TINY_PRETRAIN = dict(bert_hidden=32, bert_layers=1, bert_heads=2, bert_intermediate=64, se2_layers=2, se2_dim=32,
                     se2_ffn=64, se2_heads=4, se2_gaussians=16, batch_cells=16, train_split_num=100,
                     batch_subslices=2, warmup_steps=3, min_cells_per_gene=1, max_genes=63, threads=1,
                     checkpoint_minutes=0.0)
