"""One run core: ``predict()``, ``stofm predict`` and the napari session give the same labels,
written the same way; the compute half of a session run changes nothing."""
from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stofm import keys
from napari_stofm.cli.app import main as cli_main
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.model.stofm import load_model
from napari_stofm.pipeline.predict import predict
from napari_stofm.review.session import SliceSession

LABEL_COLUMNS = [c for k in keys.PREDICTED_KEYS for c in keys.companion_keys(k)]


@pytest.fixture(scope="module")
def pair_with_different_panels(tmp_path_factory):
    """A labelled reference and a query that lacks 30 % of the reference's genes (and has 3 of its own)."""
    folder = tmp_path_factory.mktemp("pair")
    ref = make_sample_slice(n_cells=700, seed=4)
    query = make_sample_slice(n_cells=600, seed=5)
    keep = list(query.var_names[: int(query.n_vars * 0.7)])
    query = query[:, keep].copy()
    rng = np.random.default_rng(0)
    extra = ad.AnnData(rng.poisson(1.0, (query.n_obs, 3)).astype(np.float32), obs=query.obs[[]],
                       var=pd.DataFrame(index=["QONLY1", "QONLY2", "QONLY3"]))
    query = ad.concat([query, extra], axis=1, merge="first", uns_merge="first")
    query.obsm["spatial"] = np.asarray(make_sample_slice(n_cells=600, seed=5).obsm["spatial"])
    truth = query.obs.pop("cell_type")
    paths = folder / "ref.h5ad", folder / "query.h5ad"
    ref.write_h5ad(paths[0])
    query.write_h5ad(paths[1])
    return paths[0], paths[1], truth


def _labels(adata) -> pd.DataFrame:
    return adata.obs[[c for c in LABEL_COLUMNS if c in adata.obs]]


def _provenance(adata) -> dict:
    """uns['stofm'] provenance of each predicted key, timestamps left out."""
    prov = copy.deepcopy(dict(adata.uns[keys.UNS][keys.PROVENANCE]))
    for entry in prov.values():
        entry.pop("created_at", None)
        entry.pop("modified_at", None)
    return prov


def test_gui_cli_and_api_agree_on_a_pair_with_different_panels(tiny_checkpoint, pair_with_different_panels,
                                                                tmp_path):
    ref_path, query_path, truth = pair_with_different_panels
    settings = dict(n_regions=5, reference=str(ref_path), label_key="cell_type")

    api = ad.read_h5ad(query_path)
    predict(api, load_model(tiny_checkpoint), split_num=300, **settings)

    out = tmp_path / "cli.h5ad"
    assert cli_main(["predict", str(query_path), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--regions", "5",
                     "--reference", str(ref_path), "--label-key", "cell_type", "--split-num", "300", "-q"]) == 0
    cli = ad.read_h5ad(out)

    session = SliceSession.open(query_path, autosave_dir=tmp_path / "autosave")
    session.run(weights=str(tiny_checkpoint), split_num=300, **settings)
    gui = session.adata

    # the panels differ: the transfer used the shared genes on every path
    shared = ref_path and sum(g in set(ad.read_h5ad(ref_path).var_names) for g in api.var_names)
    for adata in (api, cli, gui):
        assert adata.uns[keys.UNS][keys.PREDICTION]["transfer_genes"] == shared
        assert set(LABEL_COLUMNS) <= set(adata.obs.columns)
        for key in keys.PREDICTED_KEYS:
            assert keys.colors_key(key) in adata.uns
    pd.testing.assert_frame_equal(_labels(api), _labels(cli))
    pd.testing.assert_frame_equal(_labels(api), _labels(gui))
    assert _provenance(api) == _provenance(cli) == _provenance(gui)
    for key in keys.PREDICTED_KEYS:
        assert list(api.uns[keys.colors_key(key)]) == list(gui.uns[keys.colors_key(key)])
        assert not api.obs[keys.curated_key(key)].any()
    # the transfer is better than chance on the query's hidden cell types
    accuracy = np.mean(api.obs[keys.CELL_TYPE].astype(str).to_numpy() == truth.astype(str).to_numpy())
    assert accuracy > truth.value_counts(normalize=True).max() + 0.1


def _state(session) -> dict:
    adata = session.adata
    return {
        "obs": adata.obs.copy(), "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)), "annotations": dict(session.annotations),
        "clusterer": session.clusterer, "territories": session._territories,
    }


def test_compute_changes_nothing_until_apply(tiny_checkpoint, pair_with_different_panels, tmp_path):
    ref_path, query_path, _ = pair_with_different_panels
    session = SliceSession.open(query_path, autosave_dir=tmp_path)
    model = load_model(tiny_checkpoint)
    device_before = model.device
    before = _state(session)
    result = session.compute(model=model, n_regions=4, reference=str(ref_path), label_key="cell_type",
                             split_num=300, device="cpu")
    after = _state(session)
    pd.testing.assert_frame_equal(before["obs"], after["obs"])
    assert before["obsm"].keys() == after["obsm"].keys()
    assert before["uns"].keys() == after["uns"].keys()
    assert after["annotations"] == before["annotations"]
    assert not set(keys.PREDICTED_KEYS) & set(after["annotations"])
    assert after["clusterer"] is None and after["territories"] is None
    assert model.device == device_before
    assert not session.store.exists()  # nothing autosaved either

    session.apply(result)
    assert session.clusterer is result.clusterer and session._territories is result.territories
    assert set(keys.PREDICTED_KEYS) <= set(session.annotations)
    assert keys.EMBEDDING in session.adata.obsm and session.store.exists()
    # re-cutting the regions is also a pure computation
    ann = session.compute_regions(6)
    assert ann.n_classes == 6 and session.annotations[keys.REGION].n_classes == 4


def test_label_source_shorthand_matches_keywords(tiny_checkpoint, pair_with_different_panels, tmp_path):
    ref_path, query_path, _ = pair_with_different_panels
    model = load_model(tiny_checkpoint)
    a = SliceSession.open(query_path, autosave_dir=tmp_path / "a")
    b = SliceSession.open(query_path, autosave_dir=tmp_path / "b")
    ra = a.compute(model=model, n_regions=4, label_source=("reference", str(ref_path), "cell_type"), split_num=300)
    rb = b.compute(model=model, n_regions=4, reference=str(ref_path), label_key="cell_type", split_num=300)
    for key in keys.PREDICTED_KEYS:
        np.testing.assert_array_equal(ra[key].codes, rb[key].codes)


@pytest.mark.realdata
def test_gui_and_cli_agree_on_real_slices_with_different_panels(shared_data_dir, tmp_path):
    """MERFISH POA (155 genes) labelled from MERFISH hypothalamus animal 1 (135 genes), bundled
    weights: the Run SToFM path and ``stofm predict`` give identical regions and cell types."""
    query = shared_data_dir / "merfish_mouse_poa" / "animal1_bregma-0.29.h5ad"
    ref = shared_data_dir / "merfish_mouse_hypothalamus_3slices" / "animal1_bregma-0.09.h5ad"
    out = tmp_path / "cli.h5ad"
    assert cli_main(["predict", str(query), "-o", str(out), "--regions", "7", "--reference", str(ref),
                     "--label-key", "cell_type", "-q", "--device", "cpu"]) == 0
    cli = ad.read_h5ad(out)
    session = SliceSession.open(query, autosave_dir=tmp_path / "autosave")
    session.run(n_regions=7, reference=str(ref), label_key="cell_type", device="cpu")
    pd.testing.assert_frame_equal(_labels(cli), _labels(session.adata))
    assert cli.uns[keys.UNS][keys.PREDICTION]["transfer_genes"] == \
        session.adata.uns[keys.UNS][keys.PREDICTION]["transfer_genes"] > 0
    from sklearn.metrics import f1_score

    truth = cli.obs["cell_type"].astype(object)
    known = truth.notna().to_numpy()
    pred = cli.obs[keys.CELL_TYPE].astype(str).to_numpy()[known]
    f1 = f1_score(truth[known].astype(str), pred, average="macro")
    print(f"POA cell-type macro-F1 (GUI == CLI): {f1:.3f}")
