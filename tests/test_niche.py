"""The SE(2) stage carries each cell's niche: on a generated slice where the commonest cell
type has the same expression in two regions and only its neighbours tell the regions apart,
the bundled model's ``X_stofm`` tells the regions apart for those cells (a linear probe)
and the gene-scale ``X_stofm_cell`` cannot.

What the bundled weights do not reach (the model card says so): KMeans with K = 2 on
``X_stofm`` splits by cell type, not by region (ARI 0.00 on the whole slice and on the
shared type alone); the v3 attempt in the model card reached 0.34 on the shared type."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from napari_stofm.io.sample import gene_panel


def niche_slice(n_side: int = 44, seed: int = 0) -> ad.AnnData:
    """Two regions side by side on a jittered lattice. Both are 60 % type A, whose expression
    is drawn from one distribution everywhere; the rest is type B on the left and type C on
    the right, scattered among the A cells. An A cell's own profile says nothing of its region;
    its neighbours do."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    xy = np.c_[gx.ravel(), gy.ravel()].astype(float) * 10.0 + rng.normal(0, 1.5, (n_side * n_side, 2))
    region = np.where(xy[:, 0] < xy[:, 0].mean(), "left", "right")
    other = np.where(region == "left", "B", "C")
    cell_type = np.where(rng.random(region.size) < 0.6, "A", other)
    genes = gene_panel()[:120]
    base = rng.gamma(1.0, 0.6, size=len(genes))
    profiles = {}
    for k, t in enumerate(("A", "B", "C")):
        p = base.copy()
        p[k * 30:(k + 1) * 30] *= 12.0  # 30 marker genes per type
        profiles[t] = p
    lam = np.stack([profiles[t] for t in cell_type])
    counts = rng.poisson(lam * rng.gamma(8.0, 1 / 8.0, size=(lam.shape[0], 1)))
    obs = pd.DataFrame({"region": pd.Categorical(region), "cell_type": pd.Categorical(cell_type)},
                       index=[f"cell{i}" for i in range(region.size)])
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    adata.uns["source"] = {"values": "raw_counts"}
    return adata


def kmeans_ari(emb: np.ndarray, labels) -> float:
    codes = KMeans(2, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(emb))
    return adjusted_rand_score(labels, codes)


@pytest.fixture(scope="module")
def embedded():
    from napari_stofm import load_model
    from napari_stofm.pipeline.embed import embed

    adata = niche_slice()
    embed(adata, load_model())
    return adata


def test_the_shared_type_is_the_same_in_both_regions(embedded):
    """The premise: A cells of the two regions are not told apart by their own profile."""
    a = embedded[embedded.obs["cell_type"] == "A"]
    assert kmeans_ari(a.obsm["X_stofm_cell"], a.obs["region"]) < 0.05


def region_accuracy(emb: np.ndarray, labels) -> float:
    """5-fold accuracy of a linear probe (standardised logistic regression) for the region."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    return float(cross_val_score(probe, emb, labels, cv=5).mean())


def test_x_stofm_tells_apart_cells_that_only_their_niche_distinguishes(embedded):
    """For the A cells (same expression on both sides) the region is in X_stofm and not in
    X_stofm_cell: probe accuracy 0.77 against chance (0.51) with the bundled weights."""
    a = (embedded.obs["cell_type"] == "A").to_numpy()
    region = embedded.obs["region"].to_numpy()[a]
    assert region_accuracy(embedded.obsm["X_stofm_cell"][a], region) < 0.6  # chance: 0.5
    assert region_accuracy(embedded.obsm["X_stofm"][a], region) > 0.7
