"""Pretraining on several processes: ``torchrun --nproc_per_node=2`` (gloo, CPU, localhost) against
one process with the same global batch, and the pieces it is built from."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_stofm.errors import StofmInputError
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.training import distributed
from napari_stofm.training.config import STATE_DIR, PretrainConfig
from napari_stofm.training.report import LOG_NAME

SIZES = ["--device", "cpu", "--threads", "1", "--bert-hidden", "32", "--bert-layers", "1", "--se2-dim", "32",
         "--se2-layers", "2", "--se2-heads", "4", "--batch-cells", "16", "--batch-subslices", "2",
         # sub-slices of 250 cells: some stage-2 batches hold one sub-slice only, and one process then has none
         "--train-split-num", "250", "--warmup-steps", "3", "--niche-weight", "1", "--self-weight", "0.5",
         "--neighbour-weight", "0.5",
         # dropout off: with it, each process draws its own masks and the losses cannot match one process's
         "--dropout", "0", "--checkpoint-minutes", "0.0001", "-q"]
#: Float32 sums split over two processes and gradients averaged by DDP round differently from one
#: process's sums (observed: at most about 1e-6 over these steps); Adam's normalisation can make
#: that grow over many steps, not over these few. A real mismatch (another batch, a per-process
#: mean instead of the global one, dropout masks) moves these losses by 1e-3 or more.
TOL = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from napari_stofm.genes.vocabulary import build_vocabulary
    from napari_stofm.training.packed import pack_slices

    adatas = [make_sample_slice(n_cells=400, seed=1), make_sample_slice(n_cells=400, seed=2)]
    vocab = build_vocabulary(adatas, min_cells=1)
    path = tmp_path_factory.mktemp("corpus") / "corpus.npz"
    return pack_slices(["generated/a", "generated/b"], adatas, vocab, 63).save(path)


def _torchrun(args, cli=("-m", "napari_stofm.cli"), before_retry=None):
    """Run ``pretrain`` on two processes. A launch in which a process died of SIGABRT is run once
    more (after ``before_retry()``): gloo's TCP transport has been seen to abort a process (a C++
    exception in its own thread) on a heavily loaded machine; an error of the recipe ends a
    process with status 1 and is not retried."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli, "pretrain",
           *map(str, args)]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        aborted = "exitcode: -6" in proc.stderr or "(SIGABRT)" in proc.stderr
        if proc.returncode == 0 or not aborted or attempt == 2:
            break
        if before_retry is not None:
            before_retry()
    err = proc.stderr if len(proc.stderr) < 12000 else f"{proc.stderr[:6000]}\n...\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{err}"
    return proc


def _history(out: Path) -> dict:
    return json.loads((out / LOG_NAME).read_text())["history"]


def _max_difference(rows_a, rows_b) -> float:
    assert len(rows_a) == len(rows_b)
    worst = 0.0
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a["step"] == b["step"] and a.get("slice") == b.get("slice")  # the same batches
        for k, v in a.items():
            if k not in ("step", "slice", "seconds"):
                worst = max(worst, abs(v - b[k]))
    return worst


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_two_processes_match_one_and_resume(corpus, tmp_path):
    """Two processes (gloo) reach one process's losses with the same global batch, process 0 alone
    writes the one checkpoint folder, and a run stopped in stage 2 resumes under torchrun."""
    from napari_stofm.cli import main

    data = ["--data", str(corpus)]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["pretrain", *data, *SIZES, "--stage1-steps", "3", "--stage2-steps", "4", "-o", str(single)]) == 0

    # stage 1 on two processes, then stop at the start of stage 2
    _torchrun([*data, *SIZES, "--stage1-steps", "3", "--stage2-steps", "0", "-o", multi],
              before_retry=lambda: shutil.rmtree(multi, ignore_errors=True))
    ref = _history(single)
    assert _max_difference(_history(multi)["stage1"], ref["stage1"]) < TOL
    # Stage 2 reads the Leiden virtual cells of the encoder stage 1 trained, a discontinuous function
    # of it: rounding at 1e-7 can move a cell to another virtual cell. Stage 2 is compared from the
    # same inputs: the one-process run's (same key: same stage-1 steps, seed and slices).
    shutil.copyfile(single / STATE_DIR / "stage2_inputs.npz", multi / STATE_DIR / "stage2_inputs.npz")

    # two stage-2 steps (the stofm script under torchrun), then resumed to four: inside the warm-up,
    # the learning rates of those steps are those of the four-step run (a resumed launch is retried
    # as it is: it continues from its last checkpoint)
    stofm = Path(sys.executable).with_name("stofm")
    _torchrun([*data, *SIZES, "--stage1-steps", "3", "--stage2-steps", "2", "--resume", "-o", multi],
              cli=(str(stofm),) if stofm.is_file() else ("-m", "napari_stofm.cli"))
    assert [r["step"] for r in _history(multi)["stage2"]] == [1, 2]
    _torchrun([*data, *SIZES, "--stage1-steps", "3", "--stage2-steps", "4", "--resume", "-o", multi])

    got = _history(multi)
    assert _max_difference(got["stage1"], ref["stage1"]) < TOL
    assert _max_difference(got["stage2"], ref["stage2"]) < TOL
    state = json.loads((multi / STATE_DIR / "state.json").read_text())
    assert state["stage"] == 2 and state["step"] == 4
    # one checkpoint folder, the same files as one process writes, nothing left half-written
    assert _files(multi) == _files(single)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]
    assert json.loads((multi / "stofm.json").read_text())["info"]["processes"] == 2
    from napari_stofm.model.stofm import load_model

    assert load_model(multi).settings.info["stage2_steps"] == 4


def test_batch_sizes_must_split_over_the_processes(monkeypatch, tmp_path):
    from napari_stofm.training.trainer import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StofmInputError, match="--batch-cells 16"):
        pretrain([], tmp_path / "out", PretrainConfig(batch_cells=17))
    with pytest.raises(StofmInputError, match="--batch-subslices 2"):
        pretrain([], tmp_path / "out", PretrainConfig(batch_subslices=3))
    assert not (tmp_path / "out").exists()


def test_rank_device():
    assert distributed.rank_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(StofmInputError, match="LOCAL_RANK"):
        distributed.rank_device("cuda:0", 1)
    with pytest.raises(StofmInputError, match="cpu or cuda|--device cpu"):
        distributed.rank_device("mps", 0)


@pytest.mark.parametrize("world", [2, 3])
def test_shares_of_a_stage2_batch_cover_it(corpus, world):
    """The processes' shares of a stage-2 batch hold every sub-slice, target and pair once (a
    process left without a sub-slice gets one with nothing selected)."""
    from napari_stofm.training.batches import make_training_batch
    from napari_stofm.training.corpus import SpatialSlice
    from napari_stofm.training.packed import load_packed_corpus

    pack = load_packed_corpus(corpus)
    xy = pack.xy[0]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(xy.shape[0], 8)).astype(np.float32)
    sl = SpatialSlice("generated/a", xy, emb / np.linalg.norm(emb, axis=1, keepdims=True),
                      (xy[:, 0] // 200).astype(int))
    cfg = PretrainConfig(train_split_num=150, batch_subslices=2, niche_weight=1.0, neighbour_weight=1.0)
    batch = make_training_batch(sl, np.random.default_rng(1), cfg)
    shares = [distributed.shard_stage2(batch, r, world) for r in range(world)]
    b = batch["token_embeddings"].shape[0]
    assert sum(s["token_embeddings"].shape[0] for s in shares) == b + max(0, world - b)
    for key in ("target", "niche_target", "unmasked_target", "pair_target", "neighbour_pos"):
        torch.testing.assert_close(torch.cat([s[key] for s in shares]), batch[key])
    assert sum(int(s["selected"].sum()) for s in shares) == int(batch["selected"].sum())
    offset, pairs = 0, []
    for s in shares:
        pb, pi, pj = s["pairs"]
        pairs.append(torch.stack([pb + offset, pi, pj]))
        offset += int(s["selected"].any(1).sum())
    torch.testing.assert_close(torch.cat(pairs, 1), torch.stack(batch["pairs"]))
    assert all(s["counts"]["selected"] == int(batch["selected"].sum()) for s in shares)
