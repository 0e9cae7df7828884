"""The generated sample slice: layout, determinism, spatial structure."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from napari_stofm.io.sample import CELL_TYPES, MARKERS, REGIONS, gene_panel, make_sample_slice
from napari_stofm.io.slices import validate_slice


@pytest.fixture(scope="module")
def sample():
    return make_sample_slice()


def test_layout_follows_the_real_slices(sample):
    assert sample.n_obs == 3000
    assert 140 <= sample.n_vars <= 170
    assert sample.var_names.is_unique and sample.obs_names.is_unique
    assert sample.X.format == "csr" and sample.X.dtype == np.float32
    assert np.array_equal(sample.X.data, np.round(sample.X.data))
    assert sample.obsm["spatial"].shape == (3000, 2) and sample.obsm["spatial"].dtype == np.float64
    for key in ("region", "cell_type"):
        assert isinstance(sample.obs[key].dtype, pd.CategoricalDtype)
        assert len(sample.uns[f"{key}_colors"]) == len(sample.obs[key].cat.categories)
    assert list(sample.obs["region"].cat.categories) == REGIONS
    assert list(sample.obs["cell_type"].cat.categories) == CELL_TYPES
    source = sample.uns["source"]
    assert source["species"] == "Homo sapiens"
    assert source["values"] == "raw_counts" and source["spatial_unit"] == "micron"
    report = validate_slice(sample)
    assert report.values == "counts"


def test_real_marker_genes_in_panel():
    genes = set(gene_panel())
    for gene in ("GFAP", "SLC17A7", "GAD1", "MBP", "PDGFRA", "CLDN5", "P2RY12", "RGS5", "CUX2", "RORB"):
        assert gene in genes


def test_deterministic_for_a_seed(sample):
    again = make_sample_slice(seed=0)
    assert (sample.X != again.X).nnz == 0
    assert np.array_equal(sample.obsm["spatial"], again.obsm["spatial"])
    assert sample.obs.equals(again.obs)
    other = make_sample_slice(seed=1)
    assert not np.array_equal(sample.obsm["spatial"], other.obsm["spatial"])


def test_fast():
    start = time.perf_counter()
    make_sample_slice(3000, seed=5)
    assert time.perf_counter() - start < 1.0


def test_cell_spacing_is_realistic(sample):
    xy = sample.obsm["spatial"]
    dist, _ = cKDTree(xy).query(xy, k=2)
    nearest = dist[:, 1]
    assert 8 < np.median(nearest) < 20  # microns
    assert np.quantile(nearest, 0.01) > 2  # no stacked cells


def _neighbour_agreement(xy, labels, k=8):
    _, idx = cKDTree(xy).query(xy, k=k + 1)
    return (labels[idx[:, 1:]] == labels[:, None]).mean()


def test_regions_and_types_are_spatially_structured(sample):
    xy = sample.obsm["spatial"]
    rng = np.random.default_rng(0)
    for key, minimum in (("region", 0.8), ("cell_type", 0.0)):
        labels = sample.obs[key].cat.codes.to_numpy()
        observed = _neighbour_agreement(xy, labels)
        shuffled = _neighbour_agreement(xy, rng.permutation(labels))
        assert observed > shuffled + 0.05, key
        assert observed > minimum
    # regions are contiguous bands in depth: the layers come in order from the pia (y = 0)
    depth = sample.obs.assign(y=xy[:, 1]).groupby("region", observed=True)["y"].median()
    layers = [r for r in REGIONS if r.startswith("Layer")] + ["White matter"]
    assert list(depth[layers].to_numpy()) == sorted(depth[layers].to_numpy())


def test_type_proportions_differ_by_region(sample):
    table = pd.crosstab(sample.obs["region"], sample.obs["cell_type"], normalize="index")
    assert table.loc["White matter", "Oligodendrocyte"] > 0.4
    assert table.loc["Layer 2/3", "Excitatory neuron"] > 0.4
    assert table.loc["Lesion", "Microglia"] > 3 * table.loc["Layer 2/3", "Microglia"]


def test_cell_types_express_their_markers(sample):
    X = sample.X.toarray()
    X = X / X.sum(1, keepdims=True)
    genes = list(sample.var_names)
    labels = sample.obs["cell_type"].to_numpy()
    for cell_type in CELL_TYPES:
        own = [genes.index(g) for g in MARKERS[cell_type]]
        inside = X[labels == cell_type][:, own].mean()
        outside = X[labels != cell_type][:, own].mean()
        assert inside > 2 * outside, cell_type


def test_small_slices():
    assert make_sample_slice(1).n_obs == 1
    assert make_sample_slice(50, seed=2).n_obs == 50


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_top_layer_and_the_lesion_are_as_distinct_as_neighbouring_layers(seed):
    """Both lack excitatory neurons; before they differed half as much as layer 1 and layer
    2/3 do, and the region map merged them at the default region count."""
    adata = make_sample_slice(seed=seed)
    X = adata.X.toarray()
    X = np.log1p(X / X.sum(axis=1, keepdims=True) * 1e3)
    _, idx = cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=9)
    profile = X[idx].mean(axis=1)  # a cell's neighbourhood, as a region is seen
    region = adata.obs["region"].to_numpy()
    mean = {r: profile[region == r].mean(axis=0) for r in ("Layer 1", "Layer 2/3", "Lesion")}
    apart = np.linalg.norm(mean["Layer 1"] - mean["Lesion"]) / np.linalg.norm(mean["Layer 1"] - mean["Layer 2/3"])
    assert apart > 0.75
