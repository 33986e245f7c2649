"""Loading: round trip, tying, meta presets, and a clear error for each broken checkpoint."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge_export import reference_model
from bridge_export.reference_model import CheckpointError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_identical_outputs(tiny_model, tiny_checkpoint):
    m2 = reference_model.load_pretrained(tiny_checkpoint)
    pv = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 5, 9, 2, 0], [1, 7, 8, 9, 2]])
    for mode in ("InternVL-C", "InternVL-G"):
        assert torch.equal(tiny_model.encode_image(pv, mode), m2.encode_image(pv, mode))
    assert torch.equal(tiny_model.encode_text(ids), m2.encode_text(ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_choice(tiny_checkpoint, dtype):
    m = reference_model.load_pretrained(tiny_checkpoint, dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())


def test_missing_key_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    del sd["qllama.model.norm.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys.*qllama.model.norm.weight"):
        reference_model.load_pretrained(d)


def test_extra_key_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    sd["qllama.model.bogus"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys.*qllama.model.bogus"):
        reference_model.load_pretrained(d)


def test_wrong_shape_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    sd["query_tokens"] = torch.zeros(1, 5, 48)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*query_tokens.*\[1, 5, 48\]"):
        reference_model.load_pretrained(d)


def test_missing_weights_file(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        reference_model.load_pretrained(d)


def test_config_field_of_wrong_type(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["qllama_config"]["hidden_size"] = "48"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="qllama_config.hidden_size must be int"):
        reference_model.load_pretrained(d)


def test_wrong_model_type(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not an InternVL-14B checkpoint"):
        reference_model.load_pretrained(d)


def test_sharded_checkpoint(tiny_checkpoint, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", d)
    sd = load_file(tiny_checkpoint / "model.safetensors")
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, d / name)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    m = reference_model.load_pretrained(d)
    assert torch.equal(m.query_tokens, sd["query_tokens"])


def test_tie_word_embeddings_default_true(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["tie_word_embeddings"]  # absent means true, as in transformers
    (d / "config.json").write_text(json.dumps(cfg))
    m = reference_model.load_pretrained(d)
    sd = load_file(d / "model.safetensors")
    assert m.qllama.lm_head.weight is m.qllama.model.embed_tokens.weight
    assert torch.equal(m.qllama.model.embed_tokens.weight, sd["qllama.lm_head.weight"])


def test_14b_preset_on_meta_counts_parameters():
    m = reference_model.from_preset("internvl-14b-224px", device="meta")
    total = sum(p.numel() for p in m.parameters())
    assert total == 13_834_975_747
    assert total - sum(p.numel() for p in m.itm_head.parameters()) == 13_834_967_553
    assert m.qllama.model.layers[0].cross_attn.k_proj.in_features == 3200
    assert m.query_tokens.shape == (1, 96, 4096)


def test_small_preset_size():
    m = reference_model.from_preset("small", device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert 50e6 <= n <= 100e6
    assert m.config.qllama.max_position_embeddings >= 2048


def test_force_image_size_resizes_positions(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["force_image_size"] = 48  # 6x6 grid from the 4x4 one
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(d / "model.safetensors")
    base = reference_model.load_pretrained(tiny_checkpoint)
    base.vision_model.resize_pos_embeddings(32, 48, 8)
    sd["vision_model.embeddings.position_embedding"] = base.vision_model.embeddings.position_embedding.detach()
    save_file(sd, d / "model.safetensors")
    m = reference_model.load_pretrained(d)
    assert m.vision_model.embeddings.position_embedding.shape == (1, 37, 64)
    out = m.encode_image(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 24)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 48, 48\]"):
        m.encode_image(torch.randn(1, 3, 32, 32))


def test_pytorch_bin_checkpoint(tiny_checkpoint, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", d)
    sd = load_file(tiny_checkpoint / "model.safetensors")
    torch.save(sd, d / "pytorch_model.bin")
    m = reference_model.load_pretrained(d)
    assert torch.equal(m.query_tokens, sd["query_tokens"])
