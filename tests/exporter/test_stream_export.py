"""Streaming export: equal to the in-memory export, every source format, precisions written directly."""
import json

import numpy as np
import onnx
import pytest
import torch

from bridge_export import runtime
from bridge_export.exporter.export.stream_export import export_checkpoint, export_model
from bridge_export.exporter.export.weight_stream import CheckpointSource, quantize_columns
from bridge_export.reference_model.loading import CheckpointError

QUIET = dict(progress=lambda s: None)
BUNDLE_FILES = {"vision_encoder.onnx", "query_bridge.onnx", "text_decoder.onnx", "weights.bin",
                "text_projection.npy", "logit_scale.npy", "manifest.json"}


def _outputs(bundle, config):
    """Embeddings (C, G, text) and a short greedy caption of a bundle on fixed inputs."""
    pipe = runtime.load(bundle)
    rng = np.random.default_rng(0)
    s = config.image_size
    px = rng.standard_normal((2, 3, s, s), dtype=np.float32)
    ids = np.array([[1, 5, 9, 2], [1, 7, 2, 0]])
    out = {"C": pipe.encode_image(px, "InternVL-C"), "G": pipe.encode_image(px, "InternVL-G"),
           "text": pipe.encode_text(ids),
           "caption": pipe.generate(px[:1], np.array([[1, 3]]), max_new_tokens=5, min_new_tokens=5)}
    pipe.close()
    return out


def _initializers(bundle, graph):
    m = onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=True)
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


def _save_shards(model, directory, dtype, fmt="safetensors"):
    """The model as an original-style sharded checkpoint (two shards + index) in `dtype`."""
    from safetensors.torch import save_file

    directory.mkdir()
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    index = {}
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        shard = {k: state[k] for k in part}
        save_file(shard, str(directory / name)) if fmt == "safetensors" else torch.save(shard, directory / name)
        index.update({k: name for k in part})
    idx = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / idx).write_text(json.dumps({"weight_map": index}))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))


def test_streamed_checkpoint_equals_in_memory_export(tmp_path, tiny_model, tiny_checkpoint):
    a = export_checkpoint(tiny_checkpoint, tmp_path / "from_checkpoint", **QUIET)
    b = export_model(tiny_model, tmp_path / "from_memory", **QUIET)
    assert {p.name for p in a.iterdir()} == BUNDLE_FILES  # no stray per-tensor files
    assert (a / "weights.bin").stat().st_size == (b / "weights.bin").stat().st_size
    for g in ("text_decoder", "query_bridge", "vision_encoder"):
        assert _initializers(a, g) == _initializers(b, g), g  # same tensors, bit for bit (order may differ)
    oa, ob = _outputs(a, tiny_model.config), _outputs(b, tiny_model.config)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k])


def test_streamed_matches_the_traced_export(tmp_path, tiny_model):
    """The hand-written graphs compute what the TorchScript-traced ones compute."""
    a = export_model(tiny_model, tmp_path / "stream", **QUIET)
    from bridge_export.exporter.export.bundle import export_bundle

    b = export_bundle(tiny_model, tmp_path / "traced", exporter="torchscript", **QUIET)
    assert {p.name for p in b.iterdir()} == BUNDLE_FILES
    oa, ob = _outputs(a, tiny_model.config), _outputs(b, tiny_model.config)
    for k in ("C", "G", "text"):
        np.testing.assert_allclose(oa[k], ob[k], atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(oa["caption"], ob["caption"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bf16_shards_stream_like_the_rounded_model(tmp_path, tiny_model, fmt):
    _save_shards(tiny_model, tmp_path / "ckpt", torch.bfloat16, fmt)
    a = export_checkpoint(tmp_path / "ckpt", tmp_path / "a", **QUIET)
    rounded = {k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()}
    from bridge_export.exporter.export.stream_export import export_streamed
    from bridge_export.exporter.export.weight_stream import StateDictSource

    b = export_streamed(StateDictSource(rounded), tiny_model.config, tmp_path / "b", **QUIET)
    for g in ("text_decoder", "query_bridge", "vision_encoder"):
        assert _initializers(a, g) == _initializers(b, g), g


def test_tied_embeddings_stored_once(tmp_path):
    from bridge_export import reference_model
    from bridge_export.reference_model.config import preset_config

    cfg = preset_config("tiny")
    cfg.tie_word_embeddings = True
    model = reference_model.InternVLModel(cfg)
    reference_model.loading.init_weights(model, 0)
    model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    out = export_checkpoint(ckpt, tmp_path / "b", **QUIET)
    emb = model.qllama.model.embed_tokens.weight.detach().numpy()
    data = (out / "weights.bin").read_bytes()
    assert data.count(emb.tobytes()) == 1 and data.count(np.ascontiguousarray(emb.T).tobytes()) == 1
    ref = model.encode_text(torch.tensor([[1, 5, 9, 2]]))
    np.testing.assert_allclose(runtime.load(out).encode_text(np.array([[1, 5, 9, 2]])), ref.numpy(), atol=1e-5)


def test_mismatched_checkpoint_is_refused_before_writing(tmp_path, tiny_model):
    _save_shards(tiny_model, tmp_path / "ckpt", torch.float32)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["qllama_config"]["intermediate_size"] = 100
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mis-shaped keys.*mlp"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "b", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_source_reads_lazily(tiny_checkpoint):
    src = CheckpointSource(tiny_checkpoint)
    assert src.shape("qllama.lm_head.weight") == (128, 48)
    assert src.get("query_tokens").shape == (1, 6, 48)


def test_quantize_columns_matches_onnxruntime_quantize_dynamic(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = (np.random.default_rng(0).standard_normal((64, 48)) * 0.02).astype(np.float32)
    w[:, 3], w[:, 5] = np.abs(w[:, 3]), 0.0  # a one-signed column and an all-zero one
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "a.onnx")
    quantize_dynamic(tmp_path / "a.onnx", tmp_path / "b.onnx", weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    ort = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "b.onnx").graph.initializer}
    q, scale, zp = quantize_columns(torch.from_numpy(w.copy()))
    np.testing.assert_array_equal(q, ort["W_quantized"])
    np.testing.assert_array_equal(zp, ort["W_zero_point"])
    np.testing.assert_allclose(scale, ort["W_scale"], rtol=1e-6)


@pytest.mark.parametrize("precision,min_cos", [("fp16", 0.9999), ("int8-cpu", 0.999)])
def test_reduced_precision_written_directly(tmp_path, tiny_model, tiny_checkpoint, precision, min_cos):
    fp32 = export_model(tiny_model, tmp_path / "fp32", **QUIET)
    out = export_checkpoint(tiny_checkpoint, tmp_path / precision, precision=precision, **QUIET)
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    man = runtime.manifest.read_manifest(out)
    assert man.precision.mode == precision and all(g.precision == precision for g in man.graphs.values())
    dec = onnx.load(str(out / "text_decoder.onnx"), load_external_data=False)
    ops = {n.op_type for n in dec.graph.node}
    types = {t.name: t.data_type for t in dec.graph.initializer}
    if precision == "fp16":
        assert types["qllama.model.layers.0.mlp.up_proj.weight.T.fp16"] == onnx.TensorProto.FLOAT16
        # fp32 islands: norms and the logits
        assert types["qllama.model.layers.0.input_layernorm.weight"] == onnx.TensorProto.FLOAT
        assert types["qllama.lm_head.weight.T"] == onnx.TensorProto.FLOAT
        assert (out / "weights.bin").stat().st_size < 0.7 * (fp32 / "weights.bin").stat().st_size
    else:
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
        assert types["qllama.model.layers.0.mlp.up_proj.weight.T.quantized"] == onnx.TensorProto.UINT8
    oa, ob = _outputs(fp32, tiny_model.config), _outputs(out, tiny_model.config)
    for k in ("C", "G", "text"):
        cos = (oa[k] * ob[k]).sum(-1) / np.linalg.norm(oa[k], axis=-1) / np.linalg.norm(ob[k], axis=-1)
        assert cos.min() >= min_cos, (k, cos)


def test_decoder_is_lean(tiny_bundle):
    """Per decoder layer, at most ~50 nodes before onnxruntime's fusions (the traced graph had ~75 after)."""
    m = onnx.load(str(tiny_bundle / "text_decoder.onnx"), load_external_data=False)
    layer0 = [n for n in m.graph.node if n.name.startswith("/qllama/layers.0/")]
    assert 0 < len(layer0) <= 52
    assert not {"Shape", "If", "Loop"} & {n.op_type for n in layer0}


def test_lora_and_force_image_size_checkpoint_streams_merged(tmp_path):
    """The peft-made fixture (LoRA on both towers, force_image_size 24 from 16, bf16 shards) exports
    merged and reproduces the peft-wrapped original's outputs."""
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "data" / "lora_peft"
    if not (fixture / "expected.npz").is_file():
        pytest.skip(f"{fixture} is absent")
    e = dict(np.load(fixture / "expected.npz"))
    out = export_checkpoint(fixture, tmp_path / "b", **QUIET)
    pipe = runtime.load(out)
    got = {"image_c": pipe.encode_image(e["pixel_values"], "InternVL-C"),
           "image_g": pipe.encode_image(e["pixel_values"], "InternVL-G"), "text": pipe.encode_text(e["text_ids"])}
    for k, v in got.items():
        ref = e[k].reshape(v.shape)
        cos = (v * ref).sum(-1) / np.linalg.norm(v, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.99999, (k, cos)
        np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _entry(session, key):
    try:
        return session.sess.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # onnxruntime: no such entry
        return None


def test_session_config_reaches_onnxruntime(tiny_bundle):
    """Without prepacking (the full-size run's setting) the outputs are the same; the entries reach
    every graph, or only the graphs named."""
    key = "session.disable_prepacking"
    px = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    a = runtime.load(tiny_bundle).encode_image(px, "InternVL-G")
    every = runtime.load(tiny_bundle, session_config={key: "1"})
    assert all(_entry(s, key) == "1" for s in every.sessions.values())
    np.testing.assert_allclose(a, every.encode_image(px, "InternVL-G"), rtol=1e-5, atol=1e-6)
    one = runtime.load(tiny_bundle, session_config={"query_bridge": {key: "1"}})
    assert {n: _entry(s, key) for n, s in one.sessions.items()} == {
        "vision_encoder": None, "query_bridge": "1", "text_decoder": None}
    with pytest.raises(ValueError, match="unknown graphs"):
        runtime.load(tiny_bundle, session_config={"bridge": {key: "1"}})
    with pytest.raises(ValueError, match="mixes graph names"):
        runtime.load(tiny_bundle, session_config={"query_bridge": {key: "1"}, key: "1"})
