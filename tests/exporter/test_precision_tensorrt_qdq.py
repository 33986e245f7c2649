"""Q/DQ bundles for TensorRT: full 8-bit INT8 weights (7-bit only for --target onnxruntime), FP8 (E4M3) Q/DQ,
and accuracy reports measured as TensorRT computes (Q/DQ not fused into onnxruntime's integer kernels)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge_export import runtime
from bridge_export.exporter.quantize.fp8 import E4M3_MAX, insert_fp8_qdq, to_e4m3
from bridge_export.exporter.quantize.precision import FLOAT_QDQ, make_precision_bundle, report_session_config
from bridge_export.runtime.manifest import read_manifest
from bridge_export.runtime.numeric import min_row_cosine


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    from PIL import Image

    from bridge_export.exporter.quantize.calibration import synthetic_images

    d = tmp_path_factory.mktemp("calib")
    for i, im in enumerate(synthetic_images(8, 40, seed=3)):
        Image.fromarray((im * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def qdq(tiny_bundle, calib_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qdq")
    quiet = lambda s: None  # noqa: E731
    return {
        "int8": make_precision_bundle(tiny_bundle, root / "int8", "int8", calib=calib_dir, progress=quiet),
        "int8-ort": make_precision_bundle(tiny_bundle, root / "int8-ort", "int8", calib=calib_dir, progress=quiet,
                                          target="onnxruntime"),
        "fp8": make_precision_bundle(tiny_bundle, root / "fp8", "fp8", calib=calib_dir, progress=quiet),
    }


def _weight_qmax(path):
    """Largest |int8| stored in any weight DequantizeLinear's quantized input."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    return max(int(np.abs(numpy_helper.to_array(inits[n.input[0]], base_dir=str(path.parent)).astype(np.int32)).max())
               for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)


def test_int8_weights_full_range_for_tensorrt_7_bit_for_onnxruntime(qdq):
    for g in ("vision_encoder", "text_decoder"):
        assert _weight_qmax(qdq["int8"] / f"{g}.onnx") == 127
        assert _weight_qmax(qdq["int8-ort"] / f"{g}.onnx") <= 64
    trt, ort_ = read_manifest(qdq["int8"]), read_manifest(qdq["int8-ort"])
    assert trt.graphs["text_decoder"].how["weight_qmax"] == 127 and trt.graphs["text_decoder"].how["made_for"] == "tensorrt"
    assert ort_.graphs["text_decoder"].how["weight_qmax"] == 64
    assert "Q/DQ fusion off" in trt.precision.accuracy["run_on"]
    assert "as the runtime runs it" in ort_.precision.accuracy["run_on"]


def test_report_runs_qdq_unfused_for_tensorrt_targets():
    assert report_session_config("int8", "tensorrt") == FLOAT_QDQ == report_session_config("fp8", "tensorrt")
    assert report_session_config("int8", "onnxruntime") is None and report_session_config("fp16", "tensorrt") is None


def test_unfused_qdq_is_dequantize_then_float_matmul():
    """The reports' onnxruntime setting computes exactly numpy's dequantize-then-matmul (what TensorRT does)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    k, n = 64, 16
    x, w = rng.standard_normal((5, k)).astype(np.float32) * 3, rng.standard_normal((k, n)).astype(np.float32)
    sx, sw = np.float32(np.abs(x).max() / 127), (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / sw), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"), numpy_helper.from_array(np.array(sx), "sx"),
             numpy_helper.from_array(np.array(0, np.int8), "zx")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    opts = ort.SessionOptions()
    for key, v in FLOAT_QDQ.items():
        opts.add_session_config_entry(key, v)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    y = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expect = (np.clip(np.round(x / sx), -127, 127) * sx) @ (wq.astype(np.float32) * sw)
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-5)


def test_fp8_bundle_is_e4m3_qdq_at_opset_19(qdq):
    man = read_manifest(qdq["fp8"])
    assert man.precision.mode == "fp8" and all(g.precision == "fp8" for g in man.graphs.values())
    for name in ("vision_encoder", "query_bridge", "text_decoder"):
        path = qdq["fp8"] / f"{name}.onnx"
        m = onnx.load(str(path), load_external_data=False)
        assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 19
        inits = {t.name: t for t in m.graph.initializer}
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert dq and man.graphs[name].how["quantized_nodes"] > 0
        for n in dq:
            zp = inits[n.input[2]]
            assert zp.data_type == TensorProto.FLOAT8E4M3FN
            # one scale per tensor (weights too): FP8 GEMMs on every FP8 GPU from TensorRT 10.0
            assert int(np.prod(inits[n.input[1]].dims)) == 1 and not n.attribute
            assert not numpy_helper.to_array(zp, base_dir=str(path.parent)).astype(np.float32).any()
        assert (qdq["fp8"] / man.graphs[name].how["calibration_ranges"]).is_file()
    rep = man.precision.accuracy
    assert "Q/DQ fusion off" in rep["run_on"]
    assert rep["end_to_end"]["image_embeds_C_cosine"] > 0.95  # E4M3: 3 mantissa bits


def test_fp8_runs_in_the_runtime_and_stays_close(qdq, tiny_bundle):
    ref, new = runtime.load(tiny_bundle), runtime.load(qdq["fp8"], session_config=FLOAT_QDQ)
    x = np.random.default_rng(9).standard_normal((2, 3, 32, 32), dtype=np.float32)
    for m in ("InternVL-C", "InternVL-G"):
        c = min_row_cosine(ref.encode_image(x, m), new.encode_image(x, m))
        assert 0.95 < c < 1.0, (m, c)  # close, and really quantized


@pytest.mark.parametrize("per_channel", [False, True])
def test_insert_fp8_qdq_matches_numpy(per_channel):
    """One MatMul: per-tensor activation scale and per-tensor (or per-channel) weight scales from max / 448."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    k, n = 16, 8
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    assert insert_fp8_qdq(model, ["mm"], {"x": (np.float32(-2.0), np.float32(4.0))}, base_dir=".",
                          per_channel=per_channel) == ["mm"]
    onnx.checker.check_model(model)
    assert "w" not in {t.name for t in model.graph.initializer}  # the fp32 weight is stored as fp8 only
    x = rng.standard_normal((3, k)).astype(np.float32) * 3
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sx, sw = 4.0 / E4M3_MAX, (np.abs(w).max(0) if per_channel else np.abs(w).max()) / E4M3_MAX
    expect = (to_e4m3(x / sx).astype(np.float32) * sx) @ (to_e4m3(w / sw).astype(np.float32) * sw)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
    assert np.isfinite(to_e4m3(np.array([1e6], np.float32)).astype(np.float32)).all()  # saturates, no NaN


def test_fp8_and_int8_need_calibration_images(tiny_bundle, tmp_path):
    for mode in ("int8", "fp8"):
        with pytest.raises(ValueError, match=f"--precision {mode} needs --calib"):
            make_precision_bundle(tiny_bundle, tmp_path / mode, mode)
    with pytest.raises(ValueError, match="fp16 --target onnxruntime is not written by `precision`"):
        make_precision_bundle(tiny_bundle, tmp_path / "x", "fp16", target="onnxruntime")
    assert not any(tmp_path.iterdir())


def test_registry_names_fp8_and_the_int8_onnxruntime_variant():
    from bridge_export.runtime.precisions import PrecisionError, resolve

    assert resolve("fp8")[1] == "tensorrt" and resolve("int8", "onnxruntime")[1] == "onnxruntime"
    with pytest.raises(PrecisionError, match="fp8 is written for tensorrt only"):
        resolve("fp8", "onnxruntime")
