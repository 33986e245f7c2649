"""Published variants: LoRA fine-tunes saved with peft names (merged on load), force_image_size, bf16/fp16 shards.

tests/data/lora_peft was written by tests/data/make_lora_fixture.py with real peft (the original's
get_peft_model + LoraConfig on both towers, force_image_size 24 from 16, bf16 shards) together with
the peft-wrapped model's outputs; these tests need no peft.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge_export import reference_model
from bridge_export.reference_model import CheckpointError
from bridge_export.reference_model.checkpoint_reader import iter_checkpoint_tensors

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "lora_peft"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


def _outputs(m, e):
    pv, ids = torch.from_numpy(e["pixel_values"]), torch.from_numpy(e["text_ids"])
    return {"image_c": m.encode_image(pv, "InternVL-C"), "image_g": m.encode_image(pv, "InternVL-G"),
            "text": m.encode_text(ids), "logits": m.forward(pv, ids, "InternVL-G")[0],
            "tokens": m.generate(pv, torch.from_numpy(e["prompt_ids"]), max_new_tokens=8)}


def _assert_matches(m, e):
    out = _outputs(m, e)
    for k in ("image_c", "image_g", "text", "logits"):
        ref = torch.from_numpy(e[k])
        cos = torch.nn.functional.cosine_similarity(out[k].flatten(1), ref.flatten(1)).min().item()
        assert cos > 0.999999, (k, cos)
        torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(out["tokens"], torch.from_numpy(e["tokens"]))


def _rewrite(src: Path, dst: Path, fn) -> Path:
    """Copy a sharded checkpoint, passing each shard's {key: tensor} through fn."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        state = fn(load_file(dst / shard))
        save_file(state, dst / shard)
        weight_map.update({k: shard for k in state})
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_peft_checkpoint_reproduces_peft_model(expected):
    cfg = json.loads((FIXTURE / "config.json").read_text())
    assert cfg["use_backbone_lora"] == cfg["use_qllama_lora"] == 4 and cfg["force_image_size"] == 24
    m = reference_model.load_pretrained(FIXTURE)
    _assert_matches(m, expected)
    assert m.config.use_backbone_lora == 0  # merged: the weights now include the adapters
    assert m.vision_model.embeddings.position_embedding.shape == (1, 37, 32)  # 6x6 grid + CLS
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 24, 24\]"):
        m.encode_image(torch.randn(1, 3, 16, 16))


def test_wrong_lora_scale_is_detected(expected):
    m = reference_model.load_pretrained(FIXTURE, lora_alpha=4.0)  # scale 1 instead of the original's 2
    with pytest.raises(AssertionError):
        _assert_matches(m, expected)


def test_older_peft_names_without_base_layer(expected, tmp_path):
    d = _rewrite(FIXTURE, tmp_path / "old", lambda s: {k.replace(".base_layer.", "."): v for k, v in s.items()})
    assert not any("base_layer" in k for k in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
    _assert_matches(reference_model.load_pretrained(d), expected)


def test_fp16_source(expected, tmp_path):
    d = _rewrite(FIXTURE, tmp_path / "fp16", lambda s: {k: v.to(torch.float16) for k, v in s.items()})
    m = reference_model.load_pretrained(d)
    stored = load_file(d / "model-00001-of-00002.safetensors")
    assert torch.equal(m.query_tokens, stored["query_tokens"].float())
    out = _outputs(m, expected)
    for k in ("image_g", "text", "logits"):  # fp16 rounds differently from bf16: close, not equal
        cos = torch.nn.functional.cosine_similarity(out[k].flatten(1), torch.from_numpy(expected[k]).flatten(1))
        assert cos.min() > 0.9999, k


def test_iter_checkpoint_tensors_yields_merged_original_names():
    names, merged = [], {}
    for name, t in iter_checkpoint_tensors(FIXTURE):
        names.append(name)
        merged[name] = t
    assert len(names) == len(set(names)) and not any("lora_" in n or "base_model" in n for n in names)
    assert "itm_head.weight" not in merged
    qkv = "vision_model.encoder.layers.0.attn.qkv.weight"
    assert merged[qkv].dtype == torch.float32  # merged in fp32
    assert merged["query_tokens"].dtype == torch.bfloat16  # untouched tensors as stored
    raw = {}
    for shard in FIXTURE.glob("model-*.safetensors"):
        raw.update(load_file(shard))
    p = "vision_model.base_model.model.encoder.layers.0.attn.qkv."
    w, a, b = (raw[p + s].float() for s in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"))
    torch.testing.assert_close(merged[qkv], w + 2.0 * b @ a)  # alpha/r = 2r/r
    m = reference_model.load_pretrained(FIXTURE)
    for k, v in m.state_dict().items():
        if not k.startswith("itm_head."):
            assert torch.equal(v, merged[k].float()), k


def test_lora_keys_with_lora_off_in_config(tmp_path):
    d = shutil.copytree(FIXTURE, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_qllama_lora"] = 0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="use_qllama_lora=0: set it to the adapters' rank"):
        reference_model.load_pretrained(d)


def test_adapter_on_an_untargeted_module(tiny_checkpoint, tmp_path):
    d = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_qllama_lora"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(d / "model.safetensors")
    sd["qllama.model.layers.0.cross_attn.q_proj.lora_A.default.weight"] = torch.zeros(2, 48)
    sd["qllama.model.layers.0.cross_attn.q_proj.lora_B.default.weight"] = torch.zeros(48, 2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="cross_attn.q_proj, which the original does not target"):
        reference_model.load_pretrained(d)


def test_unmerged_forward_equals_merged_with_any_alpha(tiny_model, tmp_path):
    """Without peft: the checkpoint's adapters applied as peft's eval forward does (base(x) + s * B(A(x)))
    through hooks on the unmerged model equal the loader's merged model, for an explicit lora_alpha."""
    r, alpha = 2, 5.0
    g = torch.Generator().manual_seed(4)
    state, adapters = {}, {}
    for k, v in tiny_model.state_dict().items():
        module = k.rsplit(".", 1)[0]
        tower = "vision_model." if k.startswith("vision_model.") else "qllama." if k.startswith("qllama.") else ""
        targets = {"vision_model.": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
                   "qllama.": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj")}.get(tower, ())
        peft_name = k if not tower else tower + "base_model.model." + k[len(tower):]
        if module.endswith(targets):
            peft_name = peft_name.rsplit(".", 1)[0] + ".base_layer." + k.rsplit(".", 1)[1]
            if k.endswith(".weight"):
                a, b = torch.randn(r, v.shape[1], generator=g) * 0.3, torch.randn(v.shape[0], r, generator=g) * 0.3
                adapters[module] = (a, b)
                stem = peft_name[: -len(".base_layer.weight")]
                state[stem + ".lora_A.default.weight"], state[stem + ".lora_B.default.weight"] = a, b
        state[peft_name] = v.detach().clone()
    d = tmp_path / "lora"
    d.mkdir()
    cfg = tiny_model.config.to_dict()
    cfg.update(use_backbone_lora=r, use_qllama_lora=r)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(state, d / "model.safetensors")
    merged = reference_model.load_pretrained(d, lora_alpha=alpha)

    hooks = []
    for name, mod in tiny_model.named_modules():
        if name in adapters:
            a, b = adapters[name]
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, a=a, b=b: out + (inp[0] @ a.t() @ b.t()) * (alpha / r)))
    try:
        pv = torch.randn(2, 3, 32, 32, generator=g)
        ids = torch.tensor([[1, 5, 9, 2, 0], [1, 7, 8, 9, 2]])
        for mode in ("InternVL-C", "InternVL-G"):
            torch.testing.assert_close(merged.encode_image(pv, mode), tiny_model.encode_image(pv, mode),
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.encode_text(ids), tiny_model.encode_text(ids), rtol=1e-4, atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
    unadapted_diff = (merged.encode_text(ids) - tiny_model.encode_text(ids)).abs().max().item()
    assert unadapted_diff > 1e-3  # the adapters do change the model: the comparison above could fail


def test_force_image_size_resize_matches_the_original_code():
    """The original's InternVisionModel.resize_pos_embeddings, transcribed, against ours (bf16 weights)."""
    import torch.nn.functional as F

    from bridge_export.reference_model.config import VisionConfig
    from bridge_export.reference_model.vision import InternViT

    cfg = VisionConfig(image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16)
    vit = InternViT(cfg).to(torch.bfloat16)
    with torch.no_grad():
        vit.embeddings.position_embedding.normal_(generator=torch.Generator().manual_seed(0))
    pos_emb = vit.embeddings.position_embedding.detach().clone()
    old_size, new_size, patch_size = 16, 28, 4
    _, num_positions, embed_dim = pos_emb.shape
    cls_emb = pos_emb[:, :1, :]
    pos_emb = pos_emb[:, 1:, :].reshape(1, old_size // patch_size, old_size // patch_size, -1).permute(0, 3, 1, 2)
    pos_emb = F.interpolate(pos_emb.float(), size=new_size // patch_size, mode="bicubic", align_corners=False)
    pos_emb = pos_emb.to(cls_emb.dtype).reshape(1, embed_dim, -1).permute(0, 2, 1)
    original = torch.cat([cls_emb, pos_emb], dim=1)

    vit.resize_pos_embeddings(old_size, new_size, patch_size)
    assert torch.equal(vit.embeddings.position_embedding.detach(), original)
    assert vit.embeddings.position_embedding.dtype == torch.bfloat16
    assert vit(torch.randn(1, 3, 28, 28)).shape == (1, 50, 8)


def test_lora_checkpoint_exports_merged_and_reproduces_peft(expected, tmp_path):
    """The bundle exported from the peft-saved, 24-px-forced checkpoint gives the peft model's outputs."""
    from click.testing import CliRunner

    from bridge_export import runtime
    from bridge_export.exporter.cli import main

    r = CliRunner().invoke(main, ["onnx", "--checkpoint", str(FIXTURE), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    with runtime.load(tmp_path / "b") as pipe:
        assert pipe.preprocessing.image_size == 24  # force_image_size, not vision_config.image_size (16)
        pv = expected["pixel_values"]
        for mode, key in (("InternVL-C", "image_c"), ("InternVL-G", "image_g")):
            got = pipe.encode_image(pv, mode)
            cos = (got * expected[key]).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected[key], axis=1)
            assert cos.min() > 0.99999, (mode, cos)
        got = pipe.encode_text(expected["text_ids"])
        np.testing.assert_allclose(got, expected["text"], rtol=1e-3, atol=1e-4 * np.abs(expected["text"]).max())
        tokens = pipe.generate(pv, expected["prompt_ids"], max_new_tokens=8)
        np.testing.assert_array_equal(tokens, expected["tokens"])
