"""Export: graph parity (several batches and lengths), bundle contents, verification, graph checks."""
import json

import numpy as np
import onnx
import pytest

from bridge_export import reference_model
from bridge_export.exporter.export.bundle import ExportError, export_bundle
from bridge_export.exporter.export.checks import FORBIDDEN, GraphCheckError, check_graph
from bridge_export.exporter.export.specs import Limits, all_specs, kv_layout
from bridge_export.exporter.verify.parity import verify_bundle
from bridge_export.runtime.manifest import FORMAT_VERSION, GRAPHS, read_manifest


def test_verify_passes_on_tiny(tiny_bundle, tiny_model):
    report = verify_bundle(tiny_bundle, tiny_model)
    assert report.passed, report.format()
    names = {(o.where.split("[")[0], o.name) for o in report.outputs}
    assert ("text_decoder", kv_layout(tiny_model.config).present(3)[1]) in names and ("end-to-end", "image_embeds G") in names
    assert {t.name for t in report.tokens} == {"greedy", "beam3"}
    assert set(report.polygraphy) == {"vision_encoder", "query_bridge", "text_decoder"}


def test_verify_fails_on_a_different_model(tiny_bundle):
    other = reference_model.from_preset("tiny", seed=1)
    report = verify_bundle(tiny_bundle, other, use_polygraphy=False)
    assert not report.passed


def test_golden_bundle_reproduces_original_arrays(golden_bundle, golden_dir):
    from bridge_export import runtime

    bundle, _ = golden_bundle
    g = np.load(golden_dir / "golden.npz")
    pipe = runtime.load(bundle)
    hidden, c = pipe.vision(g["pixel_values"])
    np.testing.assert_allclose(hidden, g["vision_last_hidden_state"], atol=1e-4)
    np.testing.assert_allclose(c, g["image_embeds_C"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pipe.encode_image(g["pixel_values"], "InternVL-G"), g["image_embeds_G"], atol=1e-5)
    np.testing.assert_allclose(pipe.encode_text(g["input_ids"]), g["text_embeds"], atol=1e-5, rtol=1e-5)
    toks = pipe.generate(g["pixel_values"][:1], g["gen_prompt_ids"], max_new_tokens=12, min_new_tokens=12)
    np.testing.assert_array_equal(toks, g["gen_greedy_new_tokens"])
    beam, score = pipe.generate(g["pixel_values"][:1], g["gen_prompt_ids"], max_new_tokens=8, min_new_tokens=8,
                                num_beams=3, return_scores=True)
    np.testing.assert_array_equal(beam, g["gen_beam3_new_tokens"])
    np.testing.assert_allclose(score, g["gen_beam3_sequence_score"], rtol=1e-5)


def test_manifest_contents(tiny_bundle):
    man = read_manifest(tiny_bundle)
    assert man.format_version == FORMAT_VERSION == 2 and man.precision.mode == "fp32"
    assert tuple(man.graphs) == GRAPHS
    dec = man.graphs["text_decoder"]
    assert [t.name for t in dec.inputs[:3]] == ["input_ids", "position_ids", "attention_mask"]
    assert dec.outputs[0].to_dict() == {"name": "logits", "dtype": "float32", "shape": ["batch", 128]}
    assert len(dec.tensorrt_profiles) == 2  # prefill and decode
    kv = man.kv_layout
    assert [t.name for t in dec.inputs[3:]] == kv.names("past")
    assert [t.name for t in dec.outputs[2:]] == kv.names("present") and kv.present(3)[1] == "present.3.value"
    assert [t.name for t in man.graphs["query_bridge"].outputs[1:]] == kv.names("prefix")
    assert man.prompts.text_embedding.prefix == "summarize:" and man.prompts.text_embedding.max_length == 80
    cap = man.prompts.caption
    assert (cap.prompt, cap.add_eos, cap.num_beams, cap.max_new_tokens, cap.min_new_tokens) == \
        ("English caption:", False, 5, 30, 8)
    assert man.preprocessing.mean == [0.485, 0.456, 0.406] and man.dims.num_query_token == 6
    assert set(man.files) >= {"vision_encoder.onnx", "query_bridge.onnx", "text_decoder.onnx", "weights.bin",
                              "text_projection.npy", "logit_scale.npy", }
    assert man.files["weights.bin"].size == (tiny_bundle / "weights.bin").stat().st_size
    assert man.versions["opset"] == 18 and "torch" in man.versions
    assert man.manifest_sha256 == man.digest()


def test_weights_stored_once(tiny_bundle, tiny_model):
    """The bridge and the decoder share QLLaMA's weights in one file; no per-graph data files."""
    files = {p.name for p in tiny_bundle.iterdir()}
    assert not any(f.endswith(".onnx.data") for f in files)
    n_params = sum(p.numel() for n, p in tiny_model.named_parameters() if not n.startswith("itm_head"))
    size = (tiny_bundle / "weights.bin").stat().st_size
    # every weight once (+ alignment padding), well under the two QLLaMA copies a naive export holds
    assert size < 4 * n_params + 4096 * 200
    layer = tiny_model.qllama.model.layers[1].mlp.up_proj.weight.detach().numpy()
    data = (tiny_bundle / "weights.bin").read_bytes()
    assert data.count(layer.tobytes()) + data.count(np.ascontiguousarray(layer.T).tobytes()) == 1


def test_graph_checks_pass_and_catch_if(tiny_bundle, tmp_path):
    for name in ("vision_encoder", "query_bridge", "text_decoder"):
        info = check_graph(tiny_bundle / f"{name}.onnx")
        assert not FORBIDDEN.intersection(info["ops"]) and info["opset"] >= 17
    # A graph with an If node is refused.
    from onnx import TensorProto, helper

    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y1"])], "t", [],
                             [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "e", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = tmp_path / "if.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), p)
    with pytest.raises(GraphCheckError, match="If"):
        check_graph(p)


def test_trt_op_table_rejects_cpu_int8_ops(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [4]),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                           helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    p = tmp_path / "dq.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), p)
    with pytest.raises(GraphCheckError, match="DynamicQuantizeLinear"):
        check_graph(p)
    assert check_graph(p, tensorrt=False)["ops"] == ["DynamicQuantizeLinear"]


def test_decoder_has_no_vocab_sized_sequence_output(tiny_bundle):
    m = onnx.load(str(tiny_bundle / "text_decoder.onnx"), load_external_data=False)
    logits = next(o for o in m.graph.output if o.name == "logits")
    assert len(logits.type.tensor_type.shape.dim) == 2  # [B, V], never [B, T, V]


def test_profiles_cover_limits(tiny_model):
    specs = {s.name: s for s in all_specs(tiny_model.config)}
    prefill, decode = specs["text_decoder"].profiles(tiny_model.config, Limits(max_batch=4, max_seq=100))
    mn, opt, mx = prefill["input_ids"]
    assert mn == [1, 1] and mx == [4, 100] and mn[1] <= opt[1] <= mx[1]
    assert decode["input_ids"] == ([1, 1], [2, 1], [4, 1])
    assert decode[kv_layout(tiny_model.config).past(0)[0]][0][2] == 0  # P = 0 allowed
    assert prefill["attention_mask"][2][1] <= 100


def test_dynamo_exporter_also_matches(tmp_path, tiny_model):
    """The torch.export path (slower) gives the same graphs' numbers for the vision encoder."""
    import torch

    from bridge_export.exporter.export.onnx_export import export_graph
    from bridge_export.runtime.sessions import OrtSession

    spec = all_specs(tiny_model.config)[0]
    p = export_graph(tiny_model, spec, tiny_model.config, tmp_path / "v.onnx", dynamo=True)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    out = OrtSession(p).run({"pixel_values": x})
    ref = tiny_model.encode_image(torch.from_numpy(x))
    np.testing.assert_allclose(out["image_embeds_c"], ref.numpy(), atol=1e-5)


class TestBadInput:
    def test_not_internvl(self, tmp_path):
        d = tmp_path / "ckpt"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        from bridge_export.exporter.export.bundle import load_source

        with pytest.raises(ValueError, match="not an InternVL-14B checkpoint"):
            load_source(d, None)

    def test_missing_files(self, tmp_path):
        from bridge_export.exporter.export.bundle import load_source

        with pytest.raises(ValueError, match="config.json"):
            load_source(tmp_path, None)

    def test_existing_output_refused(self, tiny_bundle, tiny_model):
        with pytest.raises(ExportError, match="already exists.*--overwrite"):
            export_bundle(tiny_model, tiny_bundle, progress=lambda s: None)

    def test_unwritable_directory(self, tmp_path, tiny_model):
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            import os

            if os.access(ro, os.W_OK):
                pytest.skip("running as a user who can write anywhere (root)")
            with pytest.raises(ExportError, match="not writable"):
                export_bundle(tiny_model, ro / "b", progress=lambda s: None)
        finally:
            ro.chmod(0o700)

    @pytest.mark.parametrize("exporter,module,step", [("stream", "bridge_export.exporter.export.stream_export", "materialize"),
                                                      ("torchscript", "bridge_export.exporter.export.bundle", "export_graph")])
    def test_interrupted_export_leaves_nothing(self, tmp_path, tiny_model, monkeypatch, exporter, module, step):
        import importlib

        mod = importlib.import_module(module)
        calls = []

        def boom(*a, **k):
            calls.append(1)
            if len(calls) == 2:  # interrupted in the middle: one tensor / graph already written
                raise KeyboardInterrupt
            return real(*a, **k)

        real = getattr(mod, step)
        monkeypatch.setattr(mod, step, boom)
        with pytest.raises(KeyboardInterrupt):
            export_bundle(tiny_model, tmp_path / "b", progress=lambda s: None, exporter=exporter)
        assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary sibling

    def test_overwrite_replaces_atomically(self, tmp_path, tiny_model):
        out = export_bundle(tiny_model, tmp_path / "b", progress=lambda s: None)
        (out / "marker").write_text("the user's")  # a file the manifest does not list: not ours to delete
        with pytest.raises(ExportError, match=r"also holds files bridge-export did not write there \(marker\)"):
            export_bundle(tiny_model, out, overwrite=True, progress=lambda s: None)
        assert (out / "marker").read_text() == "the user's"
        (out / "marker").unlink()
        old = (out / "manifest.json").stat().st_ino
        export_bundle(tiny_model, out, overwrite=True, progress=lambda s: None)
        assert (out / "manifest.json").stat().st_ino != old  # replaced by the new bundle
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
