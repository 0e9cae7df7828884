"""The ``stofm predict / export / demo`` commands, round-tripped through files."""
from __future__ import annotations

import anndata as ad
import pandas as pd

from napari_stofm.cli.app import main as cli_main
from napari_stofm.io.sample import make_sample_slice


def test_cli_predict_then_export_round_trip(tiny_checkpoint, sample_file, tmp_path):
    ref = tmp_path / "ref.h5ad"
    make_sample_slice(n_cells=600, seed=4).write_h5ad(ref)
    out = tmp_path / "pred.h5ad"
    assert cli_main(["predict", str(sample_file), "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                     "--regions", "5", "--reference", str(ref), "--label-key", "cell_type", "--split-num", "300",
                     "-q"]) == 0
    pred = ad.read_h5ad(out)
    assert set(pred.obs["stofm_cell_type"].cat.categories) <= set(ad.read_h5ad(ref).obs["cell_type"].cat.categories)
    assert len(pred.obs["stofm_region"].cat.categories) == 5

    csv, zarr, h5 = tmp_path / "labels.csv", tmp_path / "labels.zarr", tmp_path / "copy.h5ad"
    assert cli_main(["export", str(out), "--csv", str(csv), "--zarr", str(zarr), "--h5ad", str(h5)]) == 0
    table = pd.read_csv(csv, index_col="cell_id")
    assert (table.loc[pred.obs_names, "stofm_region"].to_numpy()
            == pred.obs["stofm_region"].astype(str).to_numpy()).all()
    copy = ad.read_h5ad(h5)
    assert copy.obs["stofm_cell_type"].equals(pred.obs["stofm_cell_type"])
    from napari_stofm.io.slices import read_slice

    back = read_slice(zarr)
    assert (back.obs.loc[pred.obs_names, "stofm_region"].astype(str) == pred.obs["stofm_region"].astype(str)).all()
    # refusing to overwrite, then replacing on request
    before = csv.read_bytes()
    assert cli_main(["export", str(out), "--csv", str(csv)]) == 1
    assert csv.read_bytes() == before
    assert cli_main(["export", str(out), "--csv", str(csv), "--overwrite"]) == 0


def test_cli_demo_runs_whole_job(tiny_checkpoint, tmp_path, capsys):
    assert cli_main(["demo", "-o", str(tmp_path / "demo"), "--n-cells", "700",
                     "--checkpoint", str(tiny_checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "ARI vs ground truth" in printed and "macro-F1" in printed
    assert (tmp_path / "demo" / "sample_predicted.h5ad").is_file()
    assert (tmp_path / "demo" / "sample_labels.csv").is_file()
