"""Cohorts: many slices in one call, in this process and on a local dask cluster (localhost only)."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from napari_stofm import keys
from napari_stofm.cohort import embed_many, predict_many
from napari_stofm.cohort.runner import parse_scheduler
from napari_stofm.cohort.tasks import read_record
from napari_stofm.errors import StofmInputError

N_CELLS = 400


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The slices run here use one torch thread, as each local worker does (faster on a busy
    2-core machine, where two threads of one process mostly wait for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from napari_stofm.model.stofm import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """Three generated slices (a, b, c) and one without positions (broken)."""
    from napari_stofm.io.sample import make_sample_slice

    folder = tmp_path_factory.mktemp("cohort_in")
    paths = {}
    for seed, name in enumerate("abc"):
        paths[name] = folder / f"{name}.h5ad"
        make_sample_slice(n_cells=N_CELLS, seed=seed).write_h5ad(paths[name])
    broken = make_sample_slice(n_cells=N_CELLS, seed=9)
    del broken.obsm["spatial"]
    paths["broken"] = folder / "broken.h5ad"
    broken.write_h5ad(paths["broken"])
    return paths


@pytest.fixture(scope="module")
def in_process(model, slices, tmp_path_factory):
    """The reference: the three good slices embedded one after another in this process."""
    out = tmp_path_factory.mktemp("cohort_inproc")
    report = embed_many([slices[n] for n in "abc"], model, out_dir=out)
    assert report.ok and len(report.written) == 3
    return {n: ad.read_h5ad(out / f"{n}.h5ad") for n in "abc"}


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (napari-stofm[cluster])")
    import logging

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=logging.ERROR)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _same_embeddings(out_dir, reference) -> None:
    for name, expected in reference.items():
        got = ad.read_h5ad(out_dir / f"{name}.h5ad")
        np.testing.assert_allclose(got.obsm[keys.EMBEDDING], expected.obsm[keys.EMBEDDING], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.obsm[keys.CELL_EMBEDDING], expected.obsm[keys.CELL_EMBEDDING], atol=1e-5)


def test_local_cluster_matches_in_process_and_a_bad_slice_fails_alone(model, slices, in_process, client, tmp_path):
    out = tmp_path / "out"
    lines = []
    report = embed_many([slices[n] for n in ("a", "broken", "b", "c")], model, out_dir=out, client=client,
                        progress=lambda done, total, message: lines.append((done, total, message)))
    assert [r.name for r in report.failed] == ["broken"]
    assert "spatial" in report["broken"].error and "FAILED broken" in report.describe()
    assert sorted(r.name for r in report.written) == ["a", "b", "c"]
    assert not (out / "broken.h5ad").exists()
    _same_embeddings(out, in_process)
    assert [d for d, _, _ in lines] == [1, 2, 3, 4] and all(t == 4 for _, t, _ in lines)
    assert any("cells/s" in m for _, _, m in lines)
    assert len({r.worker for r in report.written}) == 2  # both worker processes took slices
    for name in "abc":  # the run's key is in every output, complete and in place (no temporary file left)
        assert read_record(out / f"{name}.h5ad")["key"] == report[name].key
    assert sorted(p.name for p in out.iterdir()) == ["a.h5ad", "b.h5ad", "c.h5ad"]

    again = embed_many([slices[n] for n in "abc"], model, out_dir=out, client=client)
    assert [r.status for r in again.results] == ["skipped"] * 3
    with pytest.raises(StofmInputError, match="both called 'a'"):
        embed_many([slices["a"], slices["a"]], model, out_dir=out)


def _kill_once_plugin(marker):
    """A worker plugin: the first worker to start embedding a slice dies 0.1 s later, in the
    middle of it (reading the slice alone takes longer); the marker file, holding its process
    id, says it happened, so its restarted replacement lives."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class KillOnce(WorkerPlugin):
        name = "stofm-test-kill-once"

        def __init__(self, marker):
            self.marker = str(marker)

        def transition(self, key, start, finish, **kwargs):
            import os
            import threading

            if finish == "executing" and "run_slice" in str(key) and not os.path.exists(self.marker):
                with open(self.marker, "w") as f:
                    f.write(str(os.getpid()))
                threading.Timer(0.1, os._exit, (1,)).start()

    return KillOnce(marker)


def test_a_killed_worker_is_replaced_and_every_output_is_complete(model, slices, in_process, client, tmp_path):
    marker = tmp_path / "killed"
    plugin = _kill_once_plugin(marker)
    client.register_plugin(plugin, name=plugin.name)
    try:
        report = embed_many([slices[n] for n in "abc"], model, out_dir=tmp_path / "out", client=client)
    finally:
        client.unregister_worker_plugin(plugin.name)
    killed = marker.read_text()  # a worker did die during the run ...
    assert report.ok and sorted(r.name for r in report.written) == ["a", "b", "c"]
    assert all(not r.worker.endswith(f":{killed}") for r in report.written)  # ... and its slice was done again
    _same_embeddings(tmp_path / "out", in_process)
    client.wait_for_workers(2, timeout=60)


def test_joint_regions_one_vocabulary_and_reference_transfer(model, slices, tmp_path):
    import shutil

    from napari_stofm.pipeline.predict import predict

    # a copy of slice a under another name: the same cells must get the same joint regions
    copy = tmp_path / "a_copy.h5ad"
    shutil.copy(slices["a"], copy)
    paths = [slices["a"], copy, slices["b"]]
    out = tmp_path / "out"
    report = predict_many(paths, model, out_dir=out, joint_regions=3, reference=slices["c"], label_key="cell_type")
    assert report.ok, report.describe()
    outs = {p: ad.read_h5ad(out / f"{p}.h5ad") for p in ("a", "a_copy", "b")}
    cats = [list(a.obs[keys.REGION].cat.categories) for a in outs.values()]
    assert cats == [["Region 1", "Region 2", "Region 3"]] * 3
    assert [a.uns[keys.colors_key(keys.REGION)].tolist() for a in outs.values()].count(
        outs["a"].uns[keys.colors_key(keys.REGION)].tolist()) == 3
    np.testing.assert_array_equal(outs["a"].obs[keys.REGION].to_numpy(), outs["a_copy"].obs[keys.REGION].to_numpy())
    prov = outs["b"].uns[keys.UNS][keys.PROVENANCE][keys.REGION]
    assert prov["joint"] and prov["cohort_slices"] == 3

    # cell types: exactly what `stofm predict` gives one slice with the same reference
    single = ad.read_h5ad(slices["b"])
    predict(single, model, reference=str(slices["c"]), label_key="cell_type")
    np.testing.assert_array_equal(outs["b"].obs[keys.CELL_TYPE].to_numpy(), single.obs[keys.CELL_TYPE].to_numpy())
    assert outs["b"].uns[keys.UNS][keys.PREDICTION]["reference"] == str(slices["c"])

    # the summary: cells per class per slice, beside the outputs
    table = report.summary
    assert (out / "cohort_summary.csv").is_file()
    regions = table[table["labelling"] == keys.REGION]
    assert regions.groupby("slice")["n_cells"].sum().to_dict() == {"a": N_CELLS, "a_copy": N_CELLS, "b": N_CELLS}

    # a rerun does nothing; a changed setting on existing outputs needs overwrite
    again = predict_many(paths, model, out_dir=out, joint_regions=3, reference=slices["c"], label_key="cell_type")
    assert [r.status for r in again.results] == ["skipped"] * 3
    changed = predict_many(paths[:1], model, out_dir=out, joint_regions=2)
    assert "pass --overwrite" in changed["a"].error


def test_cli_several_slices(tiny_checkpoint, slices, tmp_path, capsys):
    from napari_stofm.cli.app import main

    out = tmp_path / "emb"
    args = ["embed", str(slices["a"]), str(slices["broken"]), str(slices["b"]), "-o", str(out),
            "--checkpoint", str(tiny_checkpoint)]
    assert main(args) == 1  # one slice failed; the others are written
    err = capsys.readouterr().err
    assert "FAILED: " in err and "broken" in err and "Traceback" not in err and err.count("cells/s") >= 2
    assert sorted(p.name for p in out.iterdir()) == ["a.h5ad", "b.h5ad"]
    assert main(args[:2] + args[3:]) == 0
    assert capsys.readouterr().err.count("already complete, kept") == 2

    pred = tmp_path / "pred"
    assert main(["predict", str(slices["a"]), str(slices["b"]), "-o", str(pred), "--joint-regions", "3", "-q",
                 "--checkpoint", str(tiny_checkpoint)]) == 0
    err = capsys.readouterr().err
    assert "cells per tissue region" in err and "cohort_summary.csv" in err

    for bad, message in (
        (["embed", str(slices["a"]), str(slices["b"]), "-o", str(slices["c"])], "is a file"),
        (["embed", str(slices["a"]), str(slices["b"]), "-o", str(out), "--scheduler", "bogus"], "local:N"),
        (["embed", str(slices["a"]), "-o", str(tmp_path / "x.h5ad"), "--scheduler", "local"], "several slices"),
        (["predict", str(slices["a"]), str(slices["b"]), "-o", str(pred), "--joint-regions", "3",
          "--regions", "4"], "not both"),
    ):
        assert main(bad + ["--checkpoint", str(tiny_checkpoint)]) == 1, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith(f"stofm {bad[0]}: error:"), err


def test_parse_scheduler(tmp_path):
    assert parse_scheduler("local") == ("local", None)
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    assert parse_scheduler("head-node:8786") == ("address", "tcp://head-node:8786")
    file = tmp_path / "scheduler.json"
    file.write_text("{}")
    assert parse_scheduler(str(file)) == ("file", str(file))
    for bad in ("local:0", "local:x", "nowhere"):
        with pytest.raises(StofmInputError):
            parse_scheduler(bad)


def test_without_dask_slices_run_here_and_a_scheduler_names_the_extra(model, slices, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails, as without dask
    with pytest.raises(StofmInputError, match=r"pip install 'napari-stofm\[cluster\]'"):
        embed_many([slices["a"]], model, out_dir=tmp_path / "out", client="local:2")
    assert embed_many([slices["a"]], model, out_dir=tmp_path / "out").ok
