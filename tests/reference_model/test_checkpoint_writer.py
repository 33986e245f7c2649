"""The streamed random-checkpoint writer: published layout, readable by safetensors and the loader, seeded."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from bridge_export import reference_model
from bridge_export.reference_model.checkpoint_writer import (CheckpointWriteError, TensorSpec, parse_size, random_tensor_chunks,
                                               write_random_checkpoint)


def _all_tensors(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


def test_tiny_random_checkpoint_loads_sharded(tmp_path):
    d = write_random_checkpoint(tmp_path / "ck", "tiny", dtype="fp32", seed=3, shard_size="150KB", progress=False)
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = _all_tensors(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    meta = reference_model.from_preset("tiny", device="meta").state_dict()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in meta.items()}
    m = reference_model.load_pretrained(d)
    for k, v in m.state_dict().items():
        if not k.startswith("itm_head."):  # unused at inference: the loader zero-fills it
            assert torch.equal(v, tensors[k]), k
    # scales as the reference's random init: unit norms, small layer scales, std-0.02 matrices
    assert torch.all(tensors["qllama.model.norm.weight"] == 1)
    assert torch.all(tensors["vision_model.encoder.layers.0.ls1"] == 0.1)
    std = tensors["qllama.model.embed_tokens.weight"].std().item()
    assert 0.018 < std < 0.022
    out = m.encode_image(torch.randn(2, 3, 32, 32), "InternVL-G")
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_seeded_and_order_independent(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", "tiny", dtype="bf16", seed=5, progress=False, workers=1)
    b = write_random_checkpoint(tmp_path / "b", "tiny", dtype="bf16", seed=5, shard_size="100KB", progress=False,
                                workers=3)  # other shards, parallel draws: same tensors
    c = write_random_checkpoint(tmp_path / "c", "tiny", dtype="bf16", seed=6, progress=False)
    ta, tb, tc = load_file(a / "model.safetensors"), _all_tensors(b), load_file(c / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all(ta[k].dtype == torch.bfloat16 and torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["query_tokens"], tc["query_tokens"])
    # a tensor's values depend on (seed, name) only, not on what was written before it
    spec = TensorSpec("query_tokens", tuple(ta["query_tokens"].shape), torch.bfloat16)
    alone = torch.cat(list(random_tensor_chunks(spec, 5))).reshape(spec.shape)
    assert torch.equal(alone, ta["query_tokens"])


def test_refuses_existing_out_and_bad_sizes(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointWriteError, match="already exists"):
        write_random_checkpoint(tmp_path / "x", "tiny", progress=False)
    assert (tmp_path / "x" / "mine.txt").read_text() == "keep"
    with pytest.raises(CheckpointWriteError, match="not a size"):
        parse_size("five gigs")
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 << 30
    assert not list(tmp_path.glob(".x.partial-*"))


def test_cli_random_checkpoint(tmp_path):
    from bridge_export.exporter.cli import main

    r = CliRunner().invoke(main, ["random-checkpoint", "--preset", "tiny", "--dtype", "fp16", "--out",
                                  str(tmp_path / "ck"), "--seed", "1"])
    assert r.exit_code == 0, r.output
    m = reference_model.load_pretrained(tmp_path / "ck", dtype=torch.float16)
    assert m.query_tokens.dtype == torch.float16
    r = CliRunner().invoke(main, ["random-checkpoint", "--preset", "nope", "--out", str(tmp_path / "ck2")])
    assert r.exit_code != 0 and "'nope' is not a preset: choose one of" in r.output


def test_real_width_preset_on_meta():
    m = reference_model.from_preset("real-width", device="meta")
    assert sum(p.numel() for p in m.parameters()) == 1_212_586_627
    full = reference_model.from_preset("internvl-14b-224px", device="meta").state_dict()
    # every tensor of the 14B has its real shape here; only the layer count differs
    for k, v in m.state_dict().items():
        assert full[k].shape == v.shape, k
    assert len(m.vision_model.encoder.layers) == 2 and len(m.qllama.model.layers) == 2


def test_multi_chunk_tensors_in_parallel(tmp_path, monkeypatch):
    import bridge_export.reference_model.checkpoint_writer as cw

    monkeypatch.setattr(cw, "CHUNK", 1000)  # embed_tokens (128 x 48) is drawn in 7 chunks
    a = write_random_checkpoint(tmp_path / "a", "tiny", dtype="fp32", seed=2, progress=False, workers=1)
    b = write_random_checkpoint(tmp_path / "b", "tiny", dtype="fp32", seed=2, progress=False, workers=4)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    emb = ta["qllama.model.embed_tokens.weight"]
    assert emb.shape == (128, 48) and not torch.equal(emb.flatten()[:1000], emb.flatten()[1000:2000])
