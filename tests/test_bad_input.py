"""Bad input of every kind gives one clear StofmError (or a warning that says what was assumed),
never a silent wrong answer, a raw TypeError / ZeroDivisionError or an attempt to allocate
terabytes. Generated slices and the small random test model only."""
from __future__ import annotations

import json
import logging
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stofm import keys
from napari_stofm.cli.app import main as cli_main
from napari_stofm.errors import CheckpointError, StofmInputError
from napari_stofm.io.sample import make_sample_slice
from napari_stofm.model.stofm import load_model

SPLIT = 300  # cells per sub-slice in these small runs


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A writable copy of the test checkpoint (the session one is read-only)."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")


def _rename(adata, genes, prefix="UNKNOWNGENE"):
    """A copy of ``adata`` whose ``genes`` get names no vocabulary knows."""
    out = adata.copy()
    rename = set(genes)
    out.var_names = [f"{prefix}{i}" if g in rename else g for i, g in enumerate(map(str, out.var_names))]
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- 1. shared genes


def test_reference_sharing_no_gene_is_refused_before_anything_runs(model):
    from napari_stofm.pipeline.predict import predict

    query = make_sample_slice(n_cells=300, seed=1)
    ref = _rename(make_sample_slice(n_cells=300, seed=2), make_sample_slice(n_cells=10, seed=2).var_names)
    with pytest.raises(StofmInputError, match="share 0") as err:
        predict(query, model, reference=ref, label_key="cell_type", split_num=SPLIT)
    assert "no gene name" in str(err.value) and "label_key= without reference=" in str(err.value)
    assert keys.EMBEDDING not in query.obsm and keys.CELL_TYPE not in query.obs  # nothing ran


def test_reference_sharing_two_of_100_genes_is_refused(model):
    from napari_stofm.pipeline.predict import predict, transfer_gene_limits

    query = make_sample_slice(n_cells=300, seed=1)
    ref = make_sample_slice(n_cells=300, seed=2)
    ref = ref[:, ref.var_names[:100]].copy()
    ref = _rename(ref, ref.var_names[2:])  # 2 of the reference's 100 genes are the query's
    assert transfer_gene_limits(100) == (20, 50)
    with pytest.raises(StofmInputError, match="share 2 .*fewer than the 20 needed"):
        predict(query, model, reference=ref, label_key="cell_type", split_num=SPLIT)


def test_reference_sharing_few_genes_warns_and_the_count_is_recorded(model):
    from napari_stofm.pipeline.predict import predict, transfer_gene_limits

    query = make_sample_slice(n_cells=300, seed=1)
    ref = make_sample_slice(n_cells=300, seed=2)
    n = query.n_vars
    refuse, warn = transfer_gene_limits(n)
    n_shared = (refuse + warn) // 2  # allowed, but under the warning threshold
    ref = _rename(ref, ref.var_names[n_shared:])
    with pytest.warns(UserWarning, match=f"share {n_shared}"):
        result = predict(query, model, reference=ref, label_key="cell_type", split_num=SPLIT)
    assert result.prediction["transfer_genes"] == n_shared
    assert query.uns[keys.UNS][keys.PREDICTION]["transfer_genes"] == n_shared
    assert query.uns[keys.UNS][keys.PROVENANCE][keys.CELL_TYPE]["transfer_genes"] == n_shared
    assert any("few genes" in m for m in result.messages)


def test_transfer_genes_always_present_with_a_reference(model):
    from napari_stofm.pipeline.predict import run_annotations

    query = make_sample_slice(n_cells=300, seed=1)
    ref = make_sample_slice(n_cells=300, seed=2)
    result = run_annotations(query, model, reference=ref, label_key="cell_type", split_num=SPLIT)
    assert result.prediction["transfer_genes"] == query.n_vars
    assert result[keys.CELL_TYPE].provenance["transfer_genes"] == query.n_vars
    assert not result.messages
    # without a reference nothing is recorded
    alone = run_annotations(query, model, n_regions=3, split_num=SPLIT)
    assert "transfer_genes" not in alone.prediction


# ----------------------------------------------------------------------------- 2. log-normalised X


def _log_normalized(adata):
    """scanpy's normalize_total(target_sum=1e4) + log1p, with uns['source']['values'] and
    uns['log1p'] both gone (as another tool might write it)."""
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    norm = sp.diags(scale) @ counts
    norm.data = np.log1p(norm.data)
    out = adata.copy()
    out.X = sp.csr_matrix(norm, dtype=np.float32)
    source = dict(out.uns.get("source", {}))
    source.pop("values", None)
    out.uns["source"] = source
    out.uns.pop("log1p", None)
    return out


def test_values_kind_is_read_off_the_matrix():
    from napari_stofm.genes.expression import expression_values_kind, infer_values_kind

    counts = make_sample_slice(n_cells=200, seed=3)
    counts.uns["source"].pop("values")
    assert infer_values_kind(counts) == ("raw_counts", "detected: whole numbers")
    logged = _log_normalized(counts)
    kind, basis = infer_values_kind(logged)
    assert kind == "log_normalized" and basis.startswith("detected")
    linear = counts.copy()
    linear.X = sp.csr_matrix(linear.X, dtype=np.float64) * 3.7  # volume-normalised-like: non-integer, > 20
    assert expression_values_kind(linear) == "volume_normalized"
    logged.uns["log1p"] = {"base": None}
    assert infer_values_kind(logged) == ("log_normalized", "uns['log1p']")
    assert infer_values_kind(counts, values="log_normalized") == ("log_normalized", "values=")
    with pytest.raises(StofmInputError, match="values='evil'"):
        infer_values_kind(counts, values="evil")


def test_log_normalized_x_without_log1p_is_read_as_log_values(model, caplog):
    from napari_stofm.genes.tokenizer import tokenize_adata
    from napari_stofm.pipeline.embed import compute_cell_embedding, embed

    counts = make_sample_slice(n_cells=300, seed=3)
    logged = _log_normalized(counts)
    # read exactly as declared log1p data, hence (float32 rounding aside) the counts' tokens
    declared = logged.copy()
    declared.uns["source"]["values"] = "log_normalized"
    kw = dict(max_genes=model.settings.max_genes)
    t_log, match = tokenize_adata(logged, model.vocabulary, **kw)
    assert match.values == "log_normalized" and match.values_basis.startswith("detected")
    np.testing.assert_array_equal(t_log.input_ids, tokenize_adata(declared, model.vocabulary, **kw)[0].input_ids)
    t_counts, _ = tokenize_adata(counts, model.vocabulary, **kw)
    t_as_counts, _ = tokenize_adata(logged, model.vocabulary, values="raw_counts", **kw)
    assert np.mean(t_log.input_ids == t_counts.input_ids) > 0.98
    assert np.mean(t_as_counts.input_ids == t_counts.input_ids) < 0.9  # what the old reading gave

    with caplog.at_level(logging.WARNING, logger="napari_stofm"):
        embed(logged, model, split_num=SPLIT)
    assert any("look log-normalised" in r.getMessage() and "values='raw_counts'" in r.getMessage()
               for r in caplog.records)
    meta = logged.uns[keys.UNS]
    assert meta["values_assumed"] == "log_normalized" and meta["values_basis"].startswith("detected")
    np.testing.assert_allclose(logged.obsm[keys.CELL_EMBEDDING],
                               compute_cell_embedding(declared, model).embeddings, atol=1e-6)

    # values= overrides what was detected (and is not served the other reading's cache)
    forced = compute_cell_embedding(logged, model, values="raw_counts")
    assert (not forced.reused and forced.meta["values_assumed"] == "raw_counts"
            and forced.meta["values_basis"] == "values=")
    assert not np.array_equal(forced.embeddings, logged.obsm[keys.CELL_EMBEDDING])
    with pytest.raises(StofmInputError, match="values="):
        compute_cell_embedding(logged, model, values="logged")


def test_cli_values_option(tiny_checkpoint, tmp_path, capsys):
    path, out = tmp_path / "logged.h5ad", tmp_path / "out.h5ad"
    _log_normalized(make_sample_slice(n_cells=300, seed=3)).write_h5ad(path)
    assert cli_main(["embed", str(path), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--split-num",
                     str(SPLIT), "--values", "raw_counts", "-q"]) == 0
    assert ad.read_h5ad(out).uns[keys.UNS]["values_assumed"] == "raw_counts"
    with pytest.raises(SystemExit):
        cli_main(["embed", str(path), "-o", str(tmp_path / "x.h5ad"), "--values", "logs"])
    assert "--values" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- 3. predict on a curated export


def test_predict_on_a_curated_export_starts_clean_and_says_so(tiny_checkpoint, tmp_path, capsys):
    from napari_stofm.heads.annotation import Annotation

    src, first, curated, again = (tmp_path / f"{n}.h5ad" for n in ("slice", "first", "curated", "again"))
    make_sample_slice(n_cells=400, seed=6).write_h5ad(src)
    common = ["--checkpoint", str(tiny_checkpoint), "--split-num", str(SPLIT), "-q"]
    assert cli_main(["predict", str(src), "-o", str(first), "--regions", "6", *common]) == 0
    # a person curates 40 cells, then exports (the export records the curated cells in uns too)
    adata = ad.read_h5ad(first)
    ann = Annotation.from_obs(adata, keys.REGION)
    ann.assign(np.arange(40), 5)
    ann.to_obs(adata)
    adata.write_h5ad(tmp_path / "edited.h5ad")
    assert cli_main(["export", str(tmp_path / "edited.h5ad"), "--h5ad", str(curated)]) == 0
    assert int(ad.read_h5ad(curated).obs[keys.curated_key(keys.REGION)].sum()) == 40
    capsys.readouterr()

    # predicting again, with fewer regions: every cell gets the new labels, and stderr says so
    assert cli_main(["predict", str(curated), "-o", str(again), "--regions", "3", *common]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "40 curated cells" in err and "Traceback" not in err
    out = ad.read_h5ad(again)
    assert len(out.obs[keys.REGION].cat.categories) == 3
    assert not out.obs[keys.curated_key(keys.REGION)].any()
    assert out.obs[keys.predicted_key(keys.REGION)].astype(str).equals(out.obs[keys.REGION].astype(str))
    assert keys.REGION not in (out.uns[keys.UNS].get("curated_cells") or {})
    # ... and the result exports, with no cell marked curated
    csv = tmp_path / "labels.csv"
    assert cli_main(["export", str(again), "--csv", str(csv), "--h5ad", str(tmp_path / "final.h5ad")]) == 0
    table = pd.read_csv(csv, index_col="cell_id")
    curated_col = [c for c in table.columns if c.startswith(keys.REGION) and "curated" in c]
    assert curated_col and not table[curated_col[0]].astype(bool).any()


def test_run_result_write_warns_when_replacing_curated_cells(model):
    from napari_stofm.pipeline.predict import predict

    adata = make_sample_slice(n_cells=300, seed=6)
    predict(adata, model, n_regions=4, split_num=SPLIT)
    adata.obs[keys.curated_key(keys.REGION)] = np.arange(adata.n_obs) < 7
    with pytest.warns(UserWarning, match="7 curated cells"):
        result = predict(adata, model, n_regions=2, split_num=SPLIT)
    assert any("7 curated cells" in m for m in result.messages)
    assert not adata.obs[keys.curated_key(keys.REGION)].any()


# ----------------------------------------------------------------------------- 4. split_num


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "1000"])
def test_split_num_must_be_a_positive_integer(model, bad):
    from napari_stofm.pipeline.embed import compute_embedding

    adata = make_sample_slice(n_cells=200, seed=1)
    with pytest.raises(StofmInputError, match="split_num"):
        compute_embedding(adata, model, split_num=bad)


def test_split_num_given_as_whole_float_or_numpy_int_works(model):
    from napari_stofm.pipeline.embed import compute_embedding

    adata = make_sample_slice(n_cells=200, seed=1)
    assert compute_embedding(adata, model, split_num=np.int64(150)).meta["split_num"] == 150
    assert compute_embedding(adata, model, split_num=150.0).meta["split_num"] == 150


@pytest.mark.parametrize("value", ["0", "-5", "2.5", "many"])
def test_cli_split_num_is_checked_by_argparse(sample_file, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", str(sample_file), "-o", str(tmp_path / "o.h5ad"), "--split-num", value])
    assert exit_.value.code == 2
    line = _one_line_error(capsys)
    assert "--split-num" in line and "positive integer" in line


def test_other_cli_numbers_are_checked(sample_file, tmp_path, capsys):
    for args in (["--regions", "3.7"], ["--regions", "0"], ["--resolution", "-1"], ["--resolution", "nan"],
                 ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            cli_main(["predict", str(sample_file), "-o", str(tmp_path / "o.h5ad"), *args])
        assert args[0] in _one_line_error(capsys)
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--data", str(sample_file), "-o", str(tmp_path / "w"), "--se2-heads", "0"])
    assert "--se2-heads" in _one_line_error(capsys)


def test_other_embedding_numbers_are_checked(model):
    from napari_stofm.pipeline.embed import compute_embedding

    adata = make_sample_slice(n_cells=200, seed=1)
    for kwargs, name in ((dict(batch_size=0), "batch_size"), (dict(cell_batch_size=-1), "cell_batch_size"),
                         (dict(seed=-3), "seed"), (dict(split_mode="evil"), "split_mode"),
                         (dict(device="evil"), "device")):
        with pytest.raises(StofmInputError, match=name):
            compute_embedding(adata, model, split_num=SPLIT, **kwargs)


# ----------------------------------------------------------------------------- 5. config.json


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, match", [
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(embedding_dim="128"), "embedding_dim .*'128'"),
    (dict(embedding_dim=-128), "embedding_dim"),
    (dict(embedding_dim=2**20), "embedding_dim"),
    (dict(embedding_dim=16384, ffn_embedding_dim=16384, num_hidden_layers=64, num_attention_heads=16),
     "parameters"),
    (dict(embedding_dim=30), "not divisible"),
    (dict(dropout="0.1"), "dropout"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(pad_type_id=7), "pad_type_id"),
])
def test_bad_se2_config_is_a_checkpoint_error(checkpoint_copy, changes, match):
    _edit_json(checkpoint_copy / "config.json", **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(checkpoint_copy)
    assert str(checkpoint_copy / "config.json") in str(err.value)


@pytest.mark.parametrize("changes, match", [
    (dict(num_hidden_layers="two"), "num_hidden_layers .*'two'"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size=2**20), "hidden_size"),
    (dict(vocab_size=10**7, hidden_size=4096), "parameters"),
    (dict(max_position_embeddings=-1), "max_position_embeddings"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
])
def test_bad_bert_config_is_a_checkpoint_error(checkpoint_copy, changes, match):
    path = checkpoint_copy / "cell_encoder" / "cell_bert" / "config.json"
    _edit_json(path, **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(checkpoint_copy)
    assert str(path) in str(err.value)


def test_stofm_info_prints_one_line_for_a_bad_config(checkpoint_copy, capsys):
    _edit_json(checkpoint_copy / "config.json", num_attention_heads=0)
    assert cli_main(["info", "--checkpoint", str(checkpoint_copy)]) == 1
    assert "num_attention_heads" in _one_line_error(capsys)
    _edit_json(checkpoint_copy / "config.json", num_attention_heads=4)
    _edit_json(checkpoint_copy / "cell_encoder" / "cell_bert" / "config.json", num_hidden_layers="two")
    assert cli_main(["info", "--checkpoint", str(checkpoint_copy)]) == 1
    assert "num_hidden_layers" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- 6. Geneformer dictionaries


class _Call:
    """Pickles as ``fn(*args)`` (what a hand-made or corrupt pickle may hold)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _geneformer_checkpoint(folder, tokens, medians, fmt="pkl", protocol=pickle.HIGHEST_PROTOCOL):
    """A checkpoint folder whose vocabulary is Geneformer's two dictionaries."""
    (folder / "vocabulary.tsv").unlink(missing_ok=True)
    for name, data in (("token_dictionary", tokens), ("gene_median_dictionary", medians)):
        path = folder / f"{name}.{fmt}"
        if fmt == "pkl":
            path.write_bytes(pickle.dumps(data, protocol=protocol))
        else:
            path.write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


GOOD_TOKENS = {"<pad>": 0, "<mask>": 1, "ENSG00000141510": 2}
GOOD_MEDIANS = {"ENSG00000141510": 2.5}


@pytest.mark.parametrize("tokens, medians, match", [
    ({**GOOD_TOKENS, "ENSG00000000003": _Call(int, "notanint")}, GOOD_MEDIANS, "int\\('notanint'\\)"),
    (_Call(dict, 5), GOOD_MEDIANS, "dict\\(5\\)"),
    (GOOD_TOKENS, {"ENSG00000141510": _Call(float, "x")}, "float\\('x'\\)"),
    ({**GOOD_TOKENS, "ENSG00000000003": "3"}, GOOD_MEDIANS, "'ENSG00000000003'"),
    ({**GOOD_TOKENS, "ENSG00000000003": 2.5}, GOOD_MEDIANS, "not an integer"),
    ({**GOOD_TOKENS, "ENSG00000000003": 10**15}, GOOD_MEDIANS, "outside"),
    ({**GOOD_TOKENS, "ENSG00000000003": 5_000}, GOOD_MEDIANS, "ids up to 5000"),
])
def test_bad_geneformer_pickle_is_a_checkpoint_error(checkpoint_copy, tokens, medians, match):
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        _geneformer_checkpoint(checkpoint_copy, tokens, medians, protocol=protocol)
        with pytest.raises(CheckpointError, match=match) as err:
            load_model(checkpoint_copy)
        assert "dictionary" in str(err.value) and str(checkpoint_copy) in str(err.value)


def test_geneformer_json_nan_is_a_checkpoint_error(checkpoint_copy):
    tokens = '{"<pad>": 0, "<mask>": 1, "ENSG00000141510": 2, "ENSG00000000003": NaN}'
    _geneformer_checkpoint(checkpoint_copy, tokens, GOOD_MEDIANS, fmt="json")
    with pytest.raises(CheckpointError, match="token_dictionary.json.*'ENSG00000000003'.*nan"):
        load_model(checkpoint_copy)
    (checkpoint_copy / "token_dictionary.json").write_text(json.dumps(GOOD_TOKENS))
    (checkpoint_copy / "gene_median_dictionary.json").write_text('{"ENSG00000141510": Infinity}')
    with pytest.raises(CheckpointError, match="gene_median_dictionary.json.*'ENSG00000141510'"):
        load_model(checkpoint_copy)


def test_vocabulary_tsv_numbers_are_checked(tmp_path):
    from napari_stofm.genes.vocabulary import GeneVocabulary

    head = "token_id\tgene\tnorm_factor\tn_cells_seen\n0\t<pad>\t\t0\n1\t<mask>\t\t0\n"
    for row, match in (("2\tACTB\tinf\t5\n3\t<cls>\t\t0\n", "infinite"),
                       ("99999999999999999999\tACTB\t1.0\t5\n3\t<cls>\t\t0\n", "outside"),
                       ("2\tACTB\t1.0\t99999999999999999999\n3\t<cls>\t\t0\n", "n_cells_seen")):
        with pytest.raises(CheckpointError, match=match):
            GeneVocabulary.from_tsv(head + row)


# ----------------------------------------------------------------------------- 7. stofm.json


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"split_num": 0}), "split_num"),
    (json.dumps({"max_genes": 0}), "max_genes"),
    (json.dumps({"split_mode": "evil"}), "split_mode='evil'"),
    (json.dumps({"split_num": "1000"}), "split_num"),
    (json.dumps({"hypernode_alpha": 2}), "hypernode_alpha"),
    (json.dumps({"max_hypernodes": 10**9}), "max_hypernodes"),
    (json.dumps([1, 2]), "JSON object"),
])
def test_bad_stofm_json_is_a_checkpoint_error(checkpoint_copy, text, match, capsys):
    (checkpoint_copy / "stofm.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(checkpoint_copy)
    assert "stofm.json" in str(err.value)
    assert cli_main(["info", "--checkpoint", str(checkpoint_copy)]) == 1
    assert "stofm.json" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- 8. n_regions


def _clusterer():
    from napari_stofm.heads.regions import RegionClusterer

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (400, 2))
    emb = np.hstack([xy / 50, rng.normal(size=(400, 6))]).astype(np.float32)
    return RegionClusterer(emb, xy, seed=0)


def test_n_regions_must_be_a_whole_number(model):
    from napari_stofm.pipeline.predict import predict

    clusterer = _clusterer()
    for bad in (3.7, True, "4", float("nan")):
        with pytest.raises(StofmInputError, match="n_regions"):
            clusterer.regions(n_regions=bad)
    assert len(clusterer.regions(n_regions=4.0).categories) == 4
    assert len(clusterer.regions(n_regions=np.int64(4)).categories) == 4
    with pytest.raises(StofmInputError, match="resolution"):
        clusterer.regions(resolution=float("inf"))
    adata = make_sample_slice(n_cells=200, seed=1)
    with pytest.raises(StofmInputError, match="3.7"):
        predict(adata, model, n_regions=3.7, split_num=SPLIT)
    assert keys.EMBEDDING not in adata.obsm  # refused before the model ran


def test_head_and_clusterer_arguments_are_checked():
    from napari_stofm.heads.classifier import LabelHead
    from napari_stofm.heads.regions import RegionClusterer

    for kwargs in (dict(n_neighbors=2.5), dict(C=0), dict(C=float("nan")), dict(max_iter=0), dict(seed=-1)):
        with pytest.raises(StofmInputError):
            LabelHead(**kwargs)
    xy = np.random.default_rng(0).uniform(size=(50, 2))
    for kwargs in (dict(n_neighbors=0), dict(n_micro=1.5), dict(spatial_weight=2.0), dict(n_pcs="30")):
        with pytest.raises(StofmInputError):
            RegionClusterer(xy.astype(np.float32), xy, **kwargs)


def test_library_sizes_are_checked():
    from napari_stofm.genes.vocabulary import build_vocabulary
    from napari_stofm.model.multiscale import build_hypernodes, split_subslices
    from napari_stofm.model.stofm import PipelineSettings

    xy = np.random.default_rng(0).uniform(size=(50, 2))
    for bad in (0, -1, 2.5, "10"):
        with pytest.raises(StofmInputError, match="split_num"):
            split_subslices(xy, bad)
    with pytest.raises(StofmInputError, match="max_hypernodes"):
        build_hypernodes(xy, xy, max_hypernodes=0)
    with pytest.raises(CheckpointError, match="split_num"):
        PipelineSettings(split_num=0)
    with pytest.raises(StofmInputError, match="min_cells"):
        build_vocabulary([make_sample_slice(n_cells=50, seed=0)], min_cells=0)


# ----------------------------------------------------------------------------- 9. few vocabulary genes


def test_few_vocabulary_genes_are_warned_about_and_recorded(model, caplog):
    from napari_stofm.pipeline.embed import compute_embedding

    adata = make_sample_slice(n_cells=300, seed=1)
    adata = adata[:, adata.var_names[:100]].copy()
    keep = "SNAP25" if "SNAP25" in adata.var_names else str(adata.var_names[0])
    adata = _rename(adata, [g for g in adata.var_names if g != keep])
    with caplog.at_level(logging.WARNING, logger="napari_stofm"):
        result = compute_embedding(adata, model, split_num=SPLIT)
    messages = [r.getMessage() for r in caplog.records]
    assert any("only 1 of the slice's 100 genes" in m for m in messages), messages
    assert result.cell.meta["few_genes_matched"] is True
    assert "only 1 of" in result.cell.meta["gene_match_warning"]
    assert result.cell.meta["genes_matched"] == 1

    enough = make_sample_slice(n_cells=300, seed=1)
    assert compute_embedding(enough, model, split_num=SPLIT).cell.meta["few_genes_matched"] is False
