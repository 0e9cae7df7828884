"""BERT cell encoder: reference numerics, checkpoint layouts, padding invariance, encode()."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

from napari_stofm.errors import Cancelled, CheckpointError, StofmInputError
from napari_stofm.genes.tokenizer import TokenizedCells
from napari_stofm.model.cell_encoder import BertConfig, CellEncoder

CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           max_position_embeddings=24, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    m = CellEncoder(BertConfig(**{**CFG, **over}))
    with torch.no_grad():  # non-trivial LayerNorm / bias values
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _tokens(lengths, vocab_size=40, cls_id=39, seed=1):
    rng = np.random.default_rng(seed)
    seqs = [[cls_id] + rng.integers(2, vocab_size - 1, n - 1).tolist() for n in lengths]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    ids = np.concatenate([np.array(s, dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
    return TokenizedCells(input_ids=ids, offsets=offsets, empty=np.array(lengths) <= 1, cls_id=cls_id)


def _reference_bert(sd, cfg, ids, mask):
    """Textbook post-LN BERT written from the formulas, reading Hugging Face parameter names."""
    h, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    d = h // nh

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    b, L = ids.shape
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:L] \
        + sd["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].double()) * -1e30
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").view(b, L, nh, d).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, L, h)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inter = lin(x, p + "intermediate.dense")
        inter = 0.5 * inter * (1 + torch.erf(inter / math.sqrt(2)))
        x = ln(lin(inter, p + "output.dense") + x, p + "output.LayerNorm")
    return x


def test_matches_a_hand_written_bert():
    m = _model()
    sd = {k: v.double() for k, v in m.bert.state_dict().items()}
    ids = torch.tensor([[39, 5, 7, 9, 0, 0], [39, 3, 4, 5, 6, 8]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = m.bert(ids, mask).double()
        emb = m(ids, mask).double()
    ref = _reference_bert(sd, CFG, ids, mask)
    valid = mask.bool()
    assert torch.allclose(ours[valid], ref[valid], atol=1e-5)
    proj = ref[:, 0] @ m.cell_proj.weight.double().T + m.cell_proj.bias.double()
    assert torch.allclose(emb, proj / proj.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_matches_transformers_bertmodel():
    transformers = pytest.importorskip("transformers")
    m = _model()
    hf = transformers.BertModel(transformers.BertConfig(**CFG), add_pooling_layer=False).eval()
    missing, unexpected = hf.load_state_dict(m.bert.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.tensor([[39, 5, 7, 9, 0, 0], [39, 3, 4, 5, 6, 8]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = m.bert(ids, mask)
    assert torch.allclose(ours[mask.bool()], ref[mask.bool()], atol=1e-5)


def test_save_load_round_trip(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "cell_encoder")
    assert (tmp_path / "cell_encoder" / "cell_bert" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "cell_encoder" / "cell_bert" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["hidden_size"] == 32
    for where in (tmp_path, tmp_path / "cell_encoder"):
        m2 = CellEncoder.from_pretrained(where)
        tok = _tokens([5, 3, 9])
        assert np.array_equal(m.encode(tok), m2.encode(tok))


def test_loads_the_published_torch_layout(tmp_path):
    """config.json + pytorch_model.bin (BertForMaskedLM-style keys) + cell_proj.bin."""
    m = _model()
    bert = tmp_path / "cell_encoder" / "cell_bert"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text(json.dumps({**CFG, "architectures": ["BertForMaskedLM"]}))
    sd = {"bert." + k: v for k, v in m.bert.state_dict().items()}
    sd["bert.embeddings.position_ids"] = torch.arange(24)[None]
    sd["cls.predictions.bias"] = torch.zeros(40)
    torch.save(sd, bert / "pytorch_model.bin")
    torch.save(m.cell_proj.state_dict(), tmp_path / "cell_encoder" / "cell_proj.bin")
    m2 = CellEncoder.from_pretrained(tmp_path)
    tok = _tokens([4, 7])
    assert np.array_equal(m.encode(tok), m2.encode(tok))


def test_padding_invariance():
    m = _model()
    tok = _tokens([3, 20, 7, 12])
    alone = np.stack([m.encode(TokenizedCells(tok.cell(i).copy(), np.array([0, tok.lengths[i]]),
                                              np.array([False]), tok.cls_id))[0] for i in range(4)])
    together = m.encode(tok, batch_size=4)
    assert np.allclose(alone, together, atol=1e-5)
    assert np.allclose(m.encode(tok, batch_size=1), together, atol=1e-5)


def test_encode_keeps_order_zero_rows_progress_and_cancel():
    m = _model()
    tok = _tokens([5, 1, 9, 2, 1, 4])
    calls = []
    out = m.encode(tok, batch_size=2, progress=lambda d, t, msg: calls.append((d, t)))
    assert out.shape == (6, 256) and out.dtype == np.float32
    assert np.all(out[[1, 4]] == 0)
    assert np.allclose(np.linalg.norm(out[[0, 2, 3, 5]], axis=1), 1, atol=1e-5)
    assert calls[-1] == (6, 6)
    # each row is the cell's own embedding
    single = m.encode(TokenizedCells(tok.cell(2).copy(), np.array([0, 9]), np.array([False]), tok.cls_id))
    assert np.allclose(out[2], single[0], atol=1e-5)
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        m.encode(tok, cancel=ev)
    with pytest.raises(StofmInputError, match="max_genes"):
        m.encode(_tokens([30]))


def test_wrong_shape_names_the_tensor(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    cfg_path = tmp_path / "cell_bert" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        CellEncoder.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "encoder.layer.0.intermediate.dense.weight" in msg and "(48, 32)" in msg and "(64, 32)" in msg


def test_missing_files_and_layers(tmp_path):
    with pytest.raises(CheckpointError, match="holds no cell encoder"):
        CellEncoder.from_pretrained(tmp_path)
    m = _model()
    m.save_pretrained(tmp_path)
    (tmp_path / "cell_proj.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cell_proj"):
        CellEncoder.from_pretrained(tmp_path)
    m.save_pretrained(tmp_path)
    cfg_path = tmp_path / "cell_bert" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="encoder.layer.1"):
        CellEncoder.from_pretrained(tmp_path)
