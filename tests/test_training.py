"""The pretraining recipe on small generated slices (no shared data needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from builders import TINY_PRETRAIN as TINY

from napari_stofm.errors import StofmInputError
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.training.batches import make_training_batch
from napari_stofm.training.config import STATE_DIR, PretrainConfig
from napari_stofm.training.corpus import HELD_OUT_SLICES, SpatialSlice, find_slices, load_corpus, pack_corpus
from napari_stofm.training.report import CURVE_NAME, LOG_NAME
from napari_stofm.training.trainer import Trainer, pretrain


@pytest.fixture(scope="module")
def slices():
    return [("generated/a", make_sample_slice(n_cells=400, seed=1)),
            ("generated/b", make_sample_slice(n_cells=400, seed=2))]


@pytest.fixture(scope="module")
def run(slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "weights"
    cfg = PretrainConfig(stage1_steps=6, stage2_steps=5, niche_weight=1.0, self_weight=0.5, neighbour_weight=0.5,
                         **TINY)
    pretrain([], out, cfg, adatas=slices, show_progress=False)
    return out


def test_run_writes_a_loadable_checkpoint(run, slices):
    from napari_stofm.model.checkpoint import load_se2_transformer
    from napari_stofm.model.stofm import load_model
    from napari_stofm.pipeline.embed import embed

    log = json.loads((run / LOG_NAME).read_text())
    rows = log["history"]["stage1"] + log["history"]["stage2"]
    assert len(log["history"]["stage1"]) == 6 and len(log["history"]["stage2"]) == 5
    assert all(np.isfinite(r["loss"]) for r in rows)
    model = load_model(run)
    assert model.settings.split_mode == "spatial" and model.settings.max_genes == 63
    assert model.settings.info["training_slices"] == ["generated/a", "generated/b"]
    _, heads = load_se2_transformer(run, return_heads=True)
    assert any(k.startswith("lm_head.") for k in heads) and any(k.startswith("pair_head.") for k in heads)
    adata = slices[0][1].copy()
    embed(adata, model)
    assert np.isfinite(adata.obsm["X_stofm"]).all() and adata.obsm["X_stofm"].shape == (400, 32)
    pytest.importorskip("matplotlib")
    assert (run / CURVE_NAME).stat().st_size > 0


def test_resume_continues_from_saved_step(run, slices):
    cfg = PretrainConfig(stage1_steps=6, stage2_steps=8, **{**TINY, "train_split_num": 80, "se2_dim": 64})
    pretrain([], run, cfg, adatas=slices, resume=True, show_progress=False, resume_overrides=["train_split_num"])
    log = json.loads((run / LOG_NAME).read_text())
    assert len(log["history"]["stage1"]) == 6  # stage 1 was finished: not rerun
    assert [r["step"] for r in log["history"]["stage2"]] == list(range(1, 9))
    state = json.loads((run / STATE_DIR / "state.json").read_text())
    assert state["stage"] == 2 and state["step"] == 8
    # the batch setting asked for is taken, the model's shape is not
    assert state["config"]["train_split_num"] == 80 and state["config"]["se2_dim"] == 32


def test_new_run_refuses_existing_state(run, slices):
    with pytest.raises(StofmInputError, match="--resume"):
        pretrain([], run, PretrainConfig(**TINY), adatas=slices, show_progress=False)


def test_stage2_loss_decreases_on_a_fixed_batch(slices):
    import torch

    from napari_stofm.genes.tokenizer import tokenize_adata
    from napari_stofm.genes.vocabulary import build_vocabulary
    from napari_stofm.model.multiscale import normalize_coordinates

    cfg = PretrainConfig(stage2_steps=40, **{**TINY, "warmup_steps": 1, "lr2": 2e-3})
    adatas = [a for _, a in slices]
    vocab = build_vocabulary(adatas, min_cells=1)
    tr = Trainer("unused", cfg, vocab, ["generated/a"])
    tok = tokenize_adata(adatas[0], vocab, max_genes=cfg.max_genes)[0]
    emb = tr.encoder.encode(tok)
    xy = np.asarray(adatas[0].obsm["spatial"], dtype=float)
    assign = (normalize_coordinates(xy)[:, 0] // 10).astype(int)
    sl = SpatialSlice("generated/a", xy, emb, assign)
    batch = make_training_batch(sl, np.random.default_rng(0), cfg)
    torch.manual_seed(0)
    rows = [tr.train_on_batch(batch) for _ in range(40)]
    assert all(np.isfinite(r["loss"]) for r in rows)
    cos = [r["cosine"] for r in rows]
    assert np.mean(cos[-5:]) < 0.7 * np.mean(cos[:5])  # masked cells are recovered from their context


def test_held_out_slices_are_refused(tmp_path, slices):
    folder = tmp_path / "st_human_her2st"
    folder.mkdir()
    held, other = folder / "G2.h5ad", folder / "A1.h5ad"
    slices[0][1].write_h5ad(held)
    slices[1][1].write_h5ad(other)
    with pytest.raises(StofmInputError, match="held out"):
        find_slices([held])
    used, skipped = find_slices([tmp_path])
    assert used == [other] and skipped == [held]
    with pytest.raises(StofmInputError, match="held-out"):
        pretrain([], tmp_path / "out", PretrainConfig(**TINY), adatas=[("st_human_her2st/G2", slices[0][1])])
    assert len(HELD_OUT_SLICES) == 6


def test_packed_corpus_trains_like_the_slices_it_came_from(slices, tmp_path):
    """A pack holds the same vocabulary and tokens; training from it gives the same weights,
    and so do batches built ahead by loader threads."""
    from napari_stofm.model.stofm import load_model
    from napari_stofm.training.packed import load_packed_corpus

    files = []
    for name, adata in slices:
        f = tmp_path / "generated" / f"{name.split('/')[1]}.h5ad"
        f.parent.mkdir(exist_ok=True)
        adata.write_h5ad(f)
        files.append(f)
    pack_file = pack_corpus(files, tmp_path / "corpus.npz", max_genes=TINY["max_genes"], min_cells=1)
    pack = load_packed_corpus(pack_file)
    assert pack.names == ["generated/a", "generated/b"] and pack.max_genes == TINY["max_genes"]
    direct = load_corpus(files, None, True, None, TINY["max_genes"], min_cells=1)
    assert list(pack.vocabulary.tokens) == list(direct.vocabulary.tokens)
    for a, b in zip(pack.tokenized, direct.tokenized, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.offsets, b.offsets)
    cfg = dict(stage1_steps=3, stage2_steps=2, **TINY)
    w_pack = pretrain([pack_file], tmp_path / "from_pack", PretrainConfig(**cfg), show_progress=False)
    w_files = pretrain(files, tmp_path / "from_files", PretrainConfig(**cfg, loader_threads=2),
                          show_progress=False)
    sd_pack = load_model(w_pack).se2.state_dict()
    sd_files = load_model(w_files).se2.state_dict()
    for k in sd_files:
        np.testing.assert_allclose(sd_pack[k].numpy(), sd_files[k].numpy(), rtol=1e-5, atol=1e-6)


def test_damaged_or_foreign_pack_is_refused(tmp_path):
    from napari_stofm.training.packed import load_packed_corpus

    bad = tmp_path / "corpus.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(StofmInputError, match="pack it again"):
        load_packed_corpus(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(StofmInputError, match="not a packed corpus"):
        load_packed_corpus(tmp_path / "other.npz")


def test_niche_targets_are_the_mean_of_the_nearest_other_cells():
    from napari_stofm.training.batches import niche_targets

    xy = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    emb = np.eye(4, dtype=np.float32)
    out = niche_targets(xy, emb, np.array([0, 3]), (1, 2))
    assert out.shape == (2, 2, 4)
    out += 0.25  # centred on the slice mean (0.25 in every dimension here)
    np.testing.assert_allclose(out[0, 0], [0, 1, 0, 0])  # cell 0: its nearest other cell is 1
    np.testing.assert_allclose(out[0, 1], [0, 0.5, 0.5, 0])  # then 1 and 2, never itself
    np.testing.assert_allclose(out[1, 1], [0, 0.5, 0.5, 0])  # cell 3: cells 2 and 1
    # two cells at one position: each one's niche is the other, never itself, whichever the
    # k-d tree returns first
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [9.0, 0.0]])
    out = niche_targets(xy, emb, np.array([0, 1]), (1,)) + 0.25
    np.testing.assert_allclose(out[:, 0], [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_spatial_agreement_positives_are_near_cells_of_the_same_sub_slice(slices, monkeypatch):
    """Each cell token's positive is another cell token of its own sub-slice, one of its
    ``neighbour_k`` nearest cells there; a run without the term draws the batches it drew before."""
    from scipy.spatial import cKDTree

    from napari_stofm.training.batches import neighbour_positives

    rng = np.random.default_rng(0)
    xy = rng.random((60, 2)) * 100
    pos = neighbour_positives(xy, np.random.default_rng(1), 4)
    _, nbr = cKDTree(xy).query(xy, k=5)
    assert all(p != i and p in nbr[i, 1:] for i, p in enumerate(pos))
    assert np.array_equal(neighbour_positives(xy[:1], rng, 4), [0])
    # cells at one position (spots of a grid, duplicated rows): never their own positive
    same = np.zeros((5, 2))
    assert all(p != i for i, p in enumerate(neighbour_positives(same, np.random.default_rng(3), 2)))

    adata = slices[0][1]
    emb = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    sl = SpatialSlice("generated/a", adata.obsm["spatial"], emb / np.linalg.norm(emb, axis=1, keepdims=True),
                      (adata.obsm["spatial"][:, 0] // 200).astype(int))
    cfg = PretrainConfig(train_split_num=150, batch_subslices=2, neighbour_weight=1.0, neighbour_k=3)
    batch = make_training_batch(sl, np.random.default_rng(2), cfg)
    rows = batch["cells"].nonzero()
    assert batch["neighbour_pos"].shape[0] == rows.shape[0]
    for (b, i), j in zip(rows.tolist(), batch["neighbour_pos"].tolist(), strict=True):
        assert j != i and bool(batch["cells"][b, j])
        cells = batch["indices"][b][batch["cells"][b]].numpy()
        _, near = cKDTree(sl.xy[cells]).query(sl.xy[batch["indices"][b, i]], k=4)
        assert int(batch["indices"][b, j]) in cells[near[1:]]
    # the term off: no positives are drawn, so the random stream (masks, noise) is the one it was
    import napari_stofm.training.batches as batches

    def no_draw(*args, **kwargs):
        raise AssertionError("positives drawn for a run without the term")

    monkeypatch.setattr(batches, "neighbour_positives", no_draw)
    off = make_training_batch(sl, np.random.default_rng(2), PretrainConfig(train_split_num=150, batch_subslices=2))
    assert off["neighbour_pos"].shape[0] == int(off["cells"].sum())


def test_spatial_agreement_logits_contrast_a_cell_with_the_other_cells_only():
    import torch

    from napari_stofm.training.trainer import neighbour_logits

    last = torch.randn(2, 6, 4)
    cells = torch.tensor([[False, True, True, True, False, False], [False, False, True, True, True, True]])
    logits = neighbour_logits(last, cells, 0.5)
    assert logits.shape == (7, 6)
    finite = torch.isfinite(logits)
    # row 0 = sub-slice 0, token 1: the other cell tokens 2 and 3 only
    assert finite[0].tolist() == [False, False, True, True, False, False]
    assert finite[3].tolist() == [False, False, False, True, True, True]  # sub-slice 1, token 2
    z = torch.nn.functional.normalize(last[0], dim=-1)
    assert torch.isclose(logits[0, 2], (z[1] @ z[2]) / 0.5)
    alone = neighbour_logits(last[:1], torch.tensor([[False, False, True, False, False, False]]), 0.5)
    assert torch.isfinite(alone).tolist() == [[False, False, True, False, False, False]]


def test_niche_self_and_agreement_terms_are_trained_and_saved(run, slices):
    from napari_stofm.model.checkpoint import load_se2_transformer

    log = json.loads((run / LOG_NAME).read_text())
    rows = log["history"]["stage2"]
    assert all(0 < r["niche"] <= 2 and 0 < r["self"] <= 2 for r in rows)
    # InfoNCE over a sub-slice's other cells: between 0 and far below ln(cells) for any output
    assert all(0 < r["neighbour"] < np.log(400) for r in rows)
    _, heads = load_se2_transformer(run, return_heads=True)
    assert any(k.startswith("niche_head.") for k in heads)


def test_stage2_can_start_from_a_checkpoint_without_touching_it(run, slices, tmp_path):
    """--init-from: the checkpoint's sizes, vocabulary and weights; stage 1 skipped with 0 steps."""
    from napari_stofm.model.stofm import load_model

    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg = PretrainConfig(stage1_steps=0, stage2_steps=2, init_from=str(run),
                         **{**TINY, "se2_dim": 64, "bert_hidden": 64})  # sizes come from the checkpoint
    out = pretrain([], tmp_path / "cont", cfg, adatas=slices, show_progress=False)
    log = json.loads((out / LOG_NAME).read_text())
    assert log["history"]["stage1"] == [] and len(log["history"]["stage2"]) == 2
    start, cont = load_model(run), load_model(out)
    assert cont.se2.config.embedding_dim == 32 and list(cont.vocabulary.tokens) == list(start.vocabulary.tokens)
    for (k, a), b in zip(start.cell_encoder.state_dict().items(), cont.cell_encoder.state_dict().values(),
                         strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), k  # stage 1 did not run: the encoder is the checkpoint's
    assert any(not np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(start.se2.state_dict().values(), cont.se2.state_dict().values(), strict=True))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_stage2_continued_with_neighbour_attention_keeps_that_scope(run, slices, tmp_path):
    """--se2-attention neighbours on a continued run: finite losses, and the exported model
    attends within the scope it was trained with (its config.json says so); the start's gene
    windows (an inference setting of the gene scale, which stage 2 does not change) are kept."""
    import shutil

    from napari_stofm.model.stofm import load_model

    start = tmp_path / "start"
    shutil.copytree(run, start, ignore=shutil.ignore_patterns("state"))
    settings = json.loads((start / "stofm.json").read_text())
    (start / "stofm.json").write_text(json.dumps({**settings, "gene_windows": 3}))
    cfg = PretrainConfig(stage1_steps=0, stage2_steps=3, init_from=str(start), se2_attention="neighbours",
                         niche_weight=1.0, self_weight=0.5, **TINY)
    out = pretrain([], tmp_path / "local", cfg, adatas=slices, show_progress=False)
    assert json.loads((out / "stofm.json").read_text())["gene_windows"] == 3
    rows = json.loads((out / LOG_NAME).read_text())["history"]["stage2"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert json.loads((out / "config.json").read_text())["attention_scope"] == "neighbours"
    assert load_model(out).se2.config.attention_scope == "neighbours"
    assert load_model(run).se2.config.attention_scope == "all"


def test_adaptation_trains_a_copy_and_changes_the_embedding(run, slices):
    from napari_stofm.model.stofm import load_model
    from napari_stofm.pipeline.embed import compute_embedding

    model = load_model(run)
    weights = {k: v.clone() for k, v in model.se2.state_dict().items()}
    adata = slices[0][1].copy()
    plain = compute_embedding(adata, model)
    adapted = compute_embedding(adata, model, adapt=1.0)
    info = adapted.meta["adaptation"]
    assert info["steps"] >= 1 and np.isfinite(info["last_loss"]) and "niche" in info["terms"]
    assert np.isfinite(adapted.representations).all()
    assert not np.allclose(adapted.representations, plain.representations)
    assert all(np.array_equal(v.numpy(), weights[k].numpy()) for k, v in model.se2.state_dict().items())
    with pytest.raises(StofmInputError, match="adapt"):
        compute_embedding(adata, model, adapt=-1)
