"""The onnxruntime-target decoder (GroupQueryAttention over one shared KV buffer) passes what the portable
one passes: the reference's tokens, beam scores and embeddings, through the runtime.

GroupQueryAttention needs head_dim % 8 == 0, so these run a tiny model with 3 heads of 16 (the tiny
preset's 4 x 12 is written with the portable decoder, which test_writes_portable_when_unsupported checks).
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge_export import runtime
from bridge_export.runtime.kv_cache import SharedKVCache
from bridge_export.runtime.numeric import row_cosines


@pytest.fixture(scope="module")
def model16():
    from bridge_export.reference_model import InternVLModel, preset_config
    from bridge_export.reference_model.loading import init_weights

    c = preset_config("tiny")
    c.qllama = dataclasses.replace(c.qllama, num_attention_heads=3)  # head_dim 16
    return init_weights(InternVLModel(c), 0).eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, model16):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import word_tokenizer

    d = tmp_path_factory.mktemp("tok16")
    word_tokenizer(model16.config.qllama.vocab_size, d / "tokenizer.json")
    return d


def _export(model, out, precision, tok_dir, **kw):
    from bridge_export.exporter.export.stream_export import export_model

    return export_model(model, out, precision=precision, tokenizer=tok_dir, progress=lambda s: None, **kw)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, model16, tok_dir):
    """{(precision, fused): bundle} for fp32 and int4-cpu, fused and portable decoders."""
    root = tmp_path_factory.mktemp("fused")
    out = {}
    for prec in ("fp32", "int4-cpu"):
        kw = {"target": "onnxruntime"} if prec == "fp32" else {}
        out[prec, True] = _export(model16, root / f"{prec}-fused", prec, tok_dir, **kw)
        out[prec, False] = _export(model16, root / f"{prec}-portable", prec, tok_dir, fused_decoder=False)
    return out


@pytest.fixture(scope="module")
def fused(bundles):
    p = runtime.load(bundles["fp32", True])
    yield p
    p.close()


def _pix(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def test_graph_and_manifest(bundles):
    import onnx

    man = runtime.read_manifest(bundles["fp32", True])
    dec = man.graph("text_decoder")
    assert dec.fused and dec.target == dec.operator_target == "onnxruntime"
    assert not dec.tensorrt_profiles
    ops = [n.op_type for n in onnx.load(str(man.graph_path("text_decoder")), load_external_data=False).graph.node]
    layers = man.kv_layout.num_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == layers * 2
    assert ops.count("MatMul") == 4 * layers + 1  # one q/k/v, o, gate/up, down per layer; lm_head
    assert ops.count("Split") == layers
    assert "Softmax" not in ops and "Transpose" not in ops
    int4 = runtime.read_manifest(bundles["int4-cpu", True])
    assert int4.graph("text_decoder").fused and all(g.target == "onnxruntime" for g in int4.graphs.values())
    assert not runtime.read_manifest(bundles["int4-cpu", False]).graph("text_decoder").fused


def test_int4_fused_qkv_and_gate_up_bytes_equal_the_projections(bundles):
    """The concatenated q/k/v (and gate/up) weights pack to exactly the projections' MatMulNBits blocks."""
    import onnx
    from onnx import numpy_helper

    def inits(b):
        m = onnx.load(str(Path(b) / "text_decoder.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    f, p = inits(bundles["int4-cpu", True]), inits(bundles["int4-cpu", False])
    key = "qllama.model.layers.1.self_attn.{}_proj.weight.T_Q4"
    np.testing.assert_array_equal(f[key.format("qkv")], np.concatenate([p[key.format(n)] for n in "qkv"]))
    mlp = "qllama.model.layers.1.mlp.{}_proj.weight.T_Q4"
    np.testing.assert_array_equal(f[mlp.format("gate_up")], np.concatenate([p[mlp.format(n)] for n in ("gate", "up")]))


def test_encode_text_with_padding(fused, model16):
    ids = np.array([[1, 5, 9, 2, 0, 0], [1, 7, 8, 9, 10, 2], [1, 3, 2, 0, 0, 0]])
    ref = model16.encode_text(torch.from_numpy(ids)).numpy()
    got = fused.encode_text(ids)
    assert row_cosines(ref, got).min() >= 0.99999
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_pad_inside_text_is_said(fused, caplog):
    with caplog.at_level("WARNING"):
        fused.encode_text(np.array([[1, 5, 9, 2, 0, 0]]))
    assert not caplog.records
    with caplog.at_level("WARNING"):
        fused.encode_text(np.array([[1, 5, 0, 9, 2, 0]]))
    assert any("pad id 0 before a later token" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_tokens_and_scores_identical(fused, model16, beams):
    x = _pix(2)
    prompt = np.array([[1, 5, 6, 7], [1, 5, 6, 7]])
    ref, ref_s = model16.generate(torch.from_numpy(x), torch.from_numpy(prompt), max_new_tokens=10,
                                  min_new_tokens=3, num_beams=beams, return_scores=True)
    got, got_s = fused.generate(x, prompt, max_new_tokens=10, min_new_tokens=3, num_beams=beams, return_scores=True)
    np.testing.assert_array_equal(got, ref.numpy())
    np.testing.assert_allclose(got_s, ref_s.numpy(), atol=1e-4)


def test_left_padded_prompts_match_reference(fused, model16):
    x = _pix(2)
    prompt = np.array([[0, 0, 1, 5], [1, 5, 6, 7]])
    mask = (np.arange(4)[None] >= np.array([[2], [0]])).astype(np.int64)
    ref = model16.generate(torch.from_numpy(x), torch.from_numpy(prompt), torch.from_numpy(mask), max_new_tokens=6,
                           num_beams=2)
    np.testing.assert_array_equal(fused.generate(x, prompt, mask, max_new_tokens=6, num_beams=2), ref.numpy())


def test_sampling_and_streaming(fused, model16):
    x = _pix(1)
    prompt = np.array([[1, 5, 6, 7]])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=123,
              repetition_penalty=1.2)
    ref = model16.generate(torch.from_numpy(x), torch.from_numpy(prompt), **kw).numpy()
    np.testing.assert_array_equal(fused.generate(x, prompt, **kw), ref)
    steps = list(fused.iter_generate(x, prompt, max_new_tokens=9))
    np.testing.assert_array_equal(np.stack(steps, 1), fused.generate(x, prompt, max_new_tokens=9))


def test_int4_fused_equals_int4_portable(bundles):
    """Same 4-bit weights, fused or portable graph: the same captions and embeddings."""
    f, p = runtime.load(bundles["int4-cpu", True]), runtime.load(bundles["int4-cpu", False])
    x, prompt = _pix(2, seed=4), np.array([[1, 5, 6, 7]] * 2)
    for beams in (1, 3):
        a, sa = f.generate(x, prompt, max_new_tokens=8, num_beams=beams, return_scores=True)
        b, sb = p.generate(x, prompt, max_new_tokens=8, num_beams=beams, return_scores=True)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(sa, sb, atol=1e-4)
    np.testing.assert_allclose(f.embed_texts(["a cat", "the digit seven"]), p.embed_texts(["a cat", "the digit seven"]),
                               atol=1e-5)


def test_step_rows_of_different_lengths(fused):
    """The scheduler's call: rows at different lengths step together; an idle row's cache is untouched
    and every active row gets the logits it gets alone."""
    kv = fused.manifest.kv_layout
    step = fused.fused_step
    _, prefix = fused.bridge(fused.vision(_pix(2, seed=7))[0])
    cache = SharedKVCache(kv.num_layers, 3, kv.num_heads, 40, kv.head_dim)
    cache.write_prefix([p[:1] for p in prefix], slice(0, 1))
    cache.write_prefix([p[1:] for p in prefix], slice(1, 2))
    cache.write_prefix([p[:1] for p in prefix], slice(2, 3))
    ids = np.array([[1, 5, 6, 7], [1, 9, 0, 0], [0, 0, 0, 0]])
    lens = np.array([4, 2, 0], np.int32)
    step.run(cache, ids, lens)
    assert cache.lengths.tolist() == [kv.prefix_length + 4, kv.prefix_length + 2, kv.prefix_length]
    snapshot = cache.data[:, :, 2].copy()
    together = step.run(cache, np.array([[11], [12], [0]]), np.array([1, 1, 0], np.int32)).copy()
    np.testing.assert_array_equal(cache.data[:, :, 2], snapshot)
    for r, prompt in ((0, [1, 5, 6, 7, 11]), (1, [1, 9, 12])):
        alone = SharedKVCache(kv.num_layers, 1, kv.num_heads, 40, kv.head_dim)
        alone.write_prefix([p[r:r + 1] for p in prefix])
        np.testing.assert_allclose(step.run(alone, np.array([prompt]), np.array([len(prompt)], np.int32)),
                                   together[r:r + 1], atol=1e-5)


def test_decode_step_writes_in_place(fused):
    """The buffer bound as past is the one the new K/V land in (no per-step cache copy)."""
    kv = fused.manifest.kv_layout
    cache = SharedKVCache(kv.num_layers, 1, kv.num_heads, 20, kv.head_dim)
    before = cache.data.ctypes.data
    fused.fused_step.run(cache, np.array([[1, 5, 6]]), np.array([3], np.int32))
    assert cache.data.ctypes.data == before and np.abs(cache.data[:, :, 0, :, :3]).sum() > 0
    assert not cache.data[:, :, 0, :, 3:].any()


def test_writes_portable_when_unsupported(tmp_path, tiny_model):
    """tiny's head_dim 12 cannot run GroupQueryAttention: its int4-cpu bundle keeps the portable decoder."""
    from bridge_export.exporter.export.stream_export import export_model

    lines = []
    out = export_model(tiny_model, tmp_path / "b", precision="int4-cpu", progress=lines.append)
    man = runtime.read_manifest(out)
    assert not man.graph("text_decoder").fused and man.graph("text_decoder").target == "onnxruntime"
    assert any("head_dim 12 is not a multiple of 8" in s for s in lines)


def test_fused_step_refuses_a_full_cache(fused):
    kv = fused.manifest.kv_layout
    cache = SharedKVCache(kv.num_layers, 1, kv.num_heads, 4, kv.head_dim)
    with pytest.raises(ValueError, match="KV cache full"):
        fused.fused_step.run(cache, np.array([[1, 5, 6, 7, 8]]), np.array([5], np.int32))


def test_run_rows_matches_rowwise_runs(fused):
    """The scheduler's call on rows 1 and 3 of 4 (rows between them idle) equals each row stepped alone."""
    kv = fused.manifest.kv_layout
    _, prefix = fused.bridge(fused.vision(_pix(4, seed=9))[0])
    cache = SharedKVCache(kv.num_layers, 4, kv.num_heads, 30, kv.head_dim)
    cache.load_prefix(np.arange(4), prefix)
    ids = np.array([[1, 5, 6], [1, 7, 8]])
    got = fused.fused_step.run_rows(cache, np.array([1, 3]), ids).copy()
    assert cache.lengths.tolist() == [kv.prefix_length, kv.prefix_length + 3, kv.prefix_length, kv.prefix_length + 3]
    cache.copy_rows(np.array([0]), np.array([3]))
    np.testing.assert_array_equal(cache.data[:, :, 0, :, :cache.lengths[0]], cache.data[:, :, 3, :, :cache.lengths[3]])
    for j, r in enumerate((1, 3)):
        alone = SharedKVCache(kv.num_layers, 1, kv.num_heads, 30, kv.head_dim)
        alone.write_prefix([p[r:r + 1] for p in prefix])
        np.testing.assert_allclose(fused.fused_step.run(alone, ids[j:j + 1], np.array([3], np.int32)), got[j:j + 1],
                                   atol=1e-5)


def test_engine_refuses_the_fused_decoder(bundles, tmp_path):
    """`bridge-export engine` refuses onnxruntime-target graphs in one line, before anything is written."""
    from bridge_export.exporter.tensorrt.engines import EngineOptions, write_trtexec_script

    b = bundles["fp32", True]
    with pytest.raises(ValueError, match="text_decoder of this bundle uses onnxruntime's fused operators") as e:
        write_trtexec_script(b, tmp_path / "eng", EngineOptions(graphs=["text_decoder"]))
    assert "\n" not in str(e.value) and not (tmp_path / "eng").exists()
    with pytest.raises(ValueError, match="onnxruntime's fused operators"):
        write_trtexec_script(b, tmp_path / "eng", EngineOptions())
    assert not (tmp_path / "eng").exists()


def test_precision_from_fp32_bundle_writes_the_fused_decoder(bundles, model16, tok_dir, tmp_path):
    """`bridge-export precision int4-cpu` from an fp32 bundle gives the same fused decoder as the streamed
    int4-cpu export (same tokens and scores); a fused fp32 bundle is refused as a source in one line."""
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    fp32 = _export(model16, tmp_path / "fp32", "fp32", tok_dir)
    out = make_precision_bundle(fp32, tmp_path / "int4", "int4-cpu", progress=lambda s: None, report=False)
    man = runtime.read_manifest(out)
    assert man.graph("text_decoder").fused and all(g.target == "onnxruntime" for g in man.graphs.values())
    a, b = runtime.load(out), runtime.load(bundles["int4-cpu", True])
    x, prompt = _pix(2, seed=2), np.array([[1, 5, 6, 7]] * 2)
    ta, sa = a.generate(x, prompt, max_new_tokens=6, num_beams=2, return_scores=True)
    tb, sb = b.generate(x, prompt, max_new_tokens=6, num_beams=2, return_scores=True)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    with pytest.raises(ValueError, match="has the fused onnxruntime decoder"):
        make_precision_bundle(bundles["fp32", True], tmp_path / "x", "int8-cpu", progress=lambda s: None)


def test_triton_repo_runs_the_fused_decoder_on_onnxruntime(bundles, tmp_path):
    """The repository writer gives an onnxruntime-target decoder the onnxruntime backend, even beside
    TensorRT graph models."""
    from bridge_export.runtime.serve.triton_repo import RepoOptions, entry_config, write_repo

    cfg = entry_config("caption", 24, RepoOptions(backend="tensorrt"), 8, {}, decoder_target="onnxruntime")
    assert 'key: "decoder_backend"' in cfg and 'string_value: "onnxruntime"' in cfg.split('key: "decoder_backend"')[1]
    assert '"tensorrt"' in entry_config("caption", 24, RepoOptions(backend="tensorrt"), 8, {}).split(
        'key: "decoder_backend"')[1].split("}")[0]
    repo = write_repo(bundles["int4-cpu", True], tmp_path / "repo", RepoOptions(backend="onnxruntime"))
    assert 'string_value: "onnxruntime"' in (repo / "caption" / "config.pbtxt").read_text()


@pytest.mark.parametrize("precision,atol", [("fp16", 2e-3), ("int8-cpu", 1e-3)])
def test_fp16_and_int8_fused_equal_portable(model16, tok_dir, tmp_path, precision, atol):
    """fp16 (KV buffer in fp16) and int8-cpu: the fused decoder makes the portable one's tokens; text
    embeddings agree within the precision's own noise (int8's activation scales are per tensor, so
    unpadded texts are compared)."""
    kw = {"target": "onnxruntime"} if precision == "fp16" else {}
    f = runtime.load(_export(model16, tmp_path / "f", precision, tok_dir, **kw))
    p = runtime.load(_export(model16, tmp_path / "p", precision, tok_dir, fused_decoder=False))
    assert f.fused_step is not None and p.fused_step is None
    x, prompt = _pix(2, seed=6), np.array([[1, 5, 6, 7]] * 2)
    for beams in (1, 3):
        np.testing.assert_array_equal(f.generate(x, prompt, max_new_tokens=8, num_beams=beams),
                                      p.generate(x, prompt, max_new_tokens=8, num_beams=beams))
    ids = np.array([[1, 5, 9, 2], [1, 7, 8, 2]])
    np.testing.assert_allclose(f.encode_text(ids), p.encode_text(ids), atol=atol)


class _ArrayRunner:
    """The demo's BundleRunner with classify as a probability matrix (evaluate takes argmax of it)."""

    def __init__(self, pipe):
        from bridge_export.exporter.demo import BundleRunner

        self.inner = BundleRunner(pipe)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def classify(self, images, labels, template, mode):
        return np.asarray(self.inner.classify(images, labels, template, mode))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4-cpu", "int8-cpu"])
def test_demo_model_fused_keeps_accuracy(tmp_path, precision):
    """The shipped digits model (head_dim 16: fused) at int4-cpu / int8-cpu: zero-shot >= 95% on both heads
    and captions within a point of the fp32 portable bundle."""
    from bridge_export import reference_model
    from bridge_export.exporter.export.stream_export import export_checkpoint
    from bridge_export.reference_model.digits import evaluate, load_test_split

    ckpt = reference_model.DEMO_CHECKPOINT
    fused = runtime.load(export_checkpoint(ckpt, tmp_path / "q", precision=precision, progress=lambda s: None))
    fp32 = runtime.load(export_checkpoint(ckpt, tmp_path / "f", precision="fp32", progress=lambda s: None))
    assert fused.fused_step is not None and fp32.fused_step is None
    images, labels = load_test_split(ckpt)
    r = evaluate(_ArrayRunner(fused), fused.codec, images, labels)
    ref = evaluate(_ArrayRunner(fp32), fp32.codec, images, labels)
    assert r["zero_shot_C"] >= 0.95 and r["zero_shot_G"] >= 0.95, r
    for k in ("zero_shot_C", "zero_shot_G", "caption"):
        assert r[k] >= ref[k] - 0.01, (k, r, ref)


def test_verify_passes_on_the_fused_bundle(bundles, model16):
    """`verify`: every graph against PyTorch (the decoder's cases through the shared buffer, padded positions
    left out) and end to end (embeddings, similarity, greedy and beam captions)."""
    from bridge_export.exporter.verify.parity import verify_bundle

    report = verify_bundle(bundles["fp32", True], model16, progress=lambda s: None)
    decoder = [o for o in report.outputs if o.where.startswith("text_decoder")]
    assert decoder and {o.name for o in decoder} >= {"logits", "hidden_states", "present.0.key"}
    assert report.passed, report.format()


def test_precision_refuses_a_traced_fp32_bundle_for_the_fused_decoder(model16, tmp_path):
    """A traced fp32 bundle has lost the weights' key names: int4-cpu from it is refused in one line, first."""
    from bridge_export.exporter.errors import ExportError
    from bridge_export.exporter.export.bundle import export_bundle
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    traced = export_bundle(model16, tmp_path / "traced", exporter="torchscript", progress=lambda s: None)
    with pytest.raises(ExportError, match="traced names") as e:
        make_precision_bundle(traced, tmp_path / "q", "int4-cpu", progress=lambda s: None)
    assert "\n" not in str(e.value) and not (tmp_path / "q").exists()
