"""``predict()``: regions, partial labels and reference transfer (also across gene panels)."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stofm.io.sample import make_sample_slice
from napari_stofm.model.stofm import load_model
from napari_stofm.pipeline.predict import predict


def test_predict_regions_and_partial_labels(tiny_checkpoint, sample_file):
    adata = ad.read_h5ad(sample_file)
    model = load_model(tiny_checkpoint)
    result = predict(adata, model, n_regions=4, split_num=300)
    region = adata.obs["stofm_region"]
    assert isinstance(region.dtype, pd.CategoricalDtype) and len(region.cat.categories) == 4
    assert len(adata.uns["stofm_region_colors"]) == 4
    conf = adata.obs["stofm_region_confidence"].to_numpy()
    assert np.all((conf >= 0) & (conf <= 1))
    # re-clustering at another count needs no model
    assert len(set(result.clusterer.regions(n_regions=6).codes)) == 6

    partial = adata.obs["cell_type"].astype(object).copy()
    partial.iloc[::3] = np.nan
    adata.obs["partial"] = partial.astype("category")
    predict(adata, model, label_key="partial", split_num=300)
    given = adata.obs["partial"].notna().to_numpy()
    np.testing.assert_array_equal(
        adata.obs["stofm_cell_type"].astype(str).to_numpy()[given], adata.obs["partial"].astype(str).to_numpy()[given]
    )
    assert adata.obs["stofm_cell_type"].notna().all()


def test_reference_transfer_needs_label_key(tiny_checkpoint, sample_file):
    from napari_stofm.errors import StofmInputError

    adata = ad.read_h5ad(sample_file)
    with pytest.raises(StofmInputError, match="label_key"):
        predict(adata, load_model(tiny_checkpoint), reference=adata.copy())


def test_reference_with_another_gene_panel_is_matched_on_shared_genes(tiny_checkpoint):
    """Slices measuring different panels are embedded on their shared genes for the transfer;
    the query's own embedding (all its genes) is left as it was."""
    from napari_stofm.pipeline.embed import embed

    model = load_model(tiny_checkpoint)
    ref = make_sample_slice(n_cells=600, seed=4)
    query = make_sample_slice(n_cells=500, seed=5)
    query = query[:, query.var_names[: int(query.n_vars * 0.7)]].copy()  # the query lacks 30 % of the genes
    alone = query.copy()
    embed(alone, model, split_num=300)
    predict(query, model, reference=ref, label_key="cell_type", split_num=300)
    assert query.uns["stofm"]["prediction"]["transfer_genes"] == query.n_vars
    np.testing.assert_allclose(query.obsm["X_stofm"], alone.obsm["X_stofm"], rtol=1e-5, atol=1e-6)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = np.mean(query.obs["stofm_cell_type"].astype(str).to_numpy() == truth)
    chance = pd.Series(truth).value_counts(normalize=True).max()
    assert accuracy > chance + 0.1
    # the same panel: no restriction; the count of genes the transfer used is still recorded
    same = make_sample_slice(n_cells=500, seed=5)
    predict(same, model, reference=ref, label_key="cell_type", split_num=300)
    assert same.uns["stofm"]["prediction"]["transfer_genes"] == same.n_vars
