"""FP16 / INT8 bundles: they load and run in the runtime, stay accurate, and record how they were made."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bridge_export import runtime
from bridge_export.exporter.quantize.calibration import CalibrationError, read_image_folder
from bridge_export.exporter.quantize.precision import fp16_block_list, int8_nodes, make_precision_bundle
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
def variants(tiny_bundle, calib_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prec")
    quiet = lambda s: None  # noqa: E731
    return {m: make_precision_bundle(tiny_bundle, root / m, m, calib=calib_dir if m == "int8" else None,
                                     progress=quiet) for m in ("fp16", "int8", "int8-cpu")}


_cos = min_row_cosine


@pytest.mark.parametrize("mode,min_cos", [("fp16", 0.999), ("int8", 0.99), ("int8-cpu", 0.99)])
def test_bundles_run_and_stay_close(variants, tiny_bundle, mode, min_cos):
    ref, new = runtime.load(tiny_bundle), runtime.load(variants[mode])
    x = np.random.default_rng(9).standard_normal((3, 3, 32, 32), dtype=np.float32)
    for m in ("InternVL-C", "InternVL-G"):
        assert _cos(ref.encode_image(x, m), new.encode_image(x, m)) >= min_cos
    ids = np.array([[1, 5, 9, 2, 0], [1, 7, 8, 9, 2]])
    assert _cos(ref.encode_text(ids), new.encode_text(ids)) >= min_cos
    toks = new.generate(x, np.array([[1, 5, 6]] * 3), max_new_tokens=4, num_beams=2)
    assert toks.shape[0] == 3


def test_manifest_records_precision_and_report(variants):
    for mode, path in variants.items():
        man = read_manifest(path)
        assert man.precision.mode == mode and man.precision.derived_from["precision"] == "fp32"
        assert all(g.precision == mode and "method" in g.how for g in man.graphs.values())
        rep = man.precision.accuracy
        assert set(rep["graphs"]) == {"vision_encoder", "query_bridge", "text_decoder"}
        assert {"image_embeds_C_cosine", "zero_shot_top1_agreement", "caption_token_agreement"} <= set(rep["end_to_end"])
    assert read_manifest(variants["int8"]).graphs["vision_encoder"].how["calibration_batches"] >= 1


def test_fp16_keeps_sensitive_ops_fp32(variants):
    m = onnx.load(str(variants["fp16"] / "text_decoder.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    past0 = read_manifest(variants["fp16"]).kv_layout.past(0)[0]
    assert inputs[past0] == onnx.TensorProto.FLOAT  # I/O stays fp32
    assert outputs["logits"] == onnx.TensorProto.FLOAT
    inits = {t.name: t.data_type for t in m.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in inits.values()  # weights became fp16
    vi = {v.name: v.type.tensor_type.elem_type for v in m.graph.value_info}
    for n in m.graph.node:  # softmax and RoPE angles compute in fp32
        if n.op_type in ("Softmax", "Cos", "Sin"):
            assert vi.get(n.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, n.name


def test_fp16_block_list_covers_norms_softmax_rope_logits(tiny_bundle):
    m = onnx.load(str(tiny_bundle / "text_decoder.onnx"), load_external_data=False)
    block = fp16_block_list(m)
    by_type = {}
    for n in m.graph.node:
        by_type.setdefault(n.op_type, set()).add(n.name)
    # streamed graphs gather precomputed RoPE tables (no Cos/Sin nodes); traced ones compute them
    assert by_type["Softmax"] <= block and by_type.get("Cos", set()) <= block and by_type.get("Sin", set()) <= block
    assert any("input_layernorm" in b for b in block) and any("lm_head" in b for b in block)
    assert not any(n.op_type == "MatMul" and "mlp" in n.name for n in m.graph.node if n.name in block)


def test_int8_is_symmetric_qdq(variants):
    for g in ("vision_encoder", "query_bridge", "text_decoder"):
        path = variants["int8"] / f"{g}.onnx"
        m = onnx.load(str(path), load_external_data=False)
        inits = {t.name: t for t in m.graph.initializer}
        qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq, g
        for n in qdq:
            if len(n.input) > 2 and n.input[2] in inits:
                assert not numpy_helper.to_array(inits[n.input[2]], base_dir=str(path.parent)).any(), n.name
        assert not {"MatMulInteger", "DynamicQuantizeLinear"} & {n.op_type for n in m.graph.node}


def test_int8_excludes_sensitive_nodes(tiny_bundle):
    m = onnx.load(str(tiny_bundle / "text_decoder.onnx"), load_external_data=False)
    quant, skipped = int8_nodes(m)
    assert any("lm_head" in s for s in skipped) and not any("lm_head" in q for q in quant)
    quant_all, _ = int8_nodes(m, exclude=[])
    assert len(quant_all) == len(quant) + len(skipped)


def test_int8_cpu_uses_integer_matmuls(variants):
    m = onnx.load(str(variants["int8-cpu"] / "text_decoder.onnx"), load_external_data=False)
    assert "MatMulInteger" in {n.op_type for n in m.graph.node}


def test_calibration_folder_errors(tmp_path, tiny_bundle):
    with pytest.raises(CalibrationError, match="holds no images"):
        read_image_folder(tmp_path)
    (tmp_path / "a.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="could be read"):
        read_image_folder(tmp_path)
    with pytest.raises(CalibrationError, match="not a folder"):
        read_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="--precision int8 needs --calib"):
        make_precision_bundle(tiny_bundle, tmp_path / "out", "int8")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(tiny_bundle, calib_dir, tmp_path, method):
    out = make_precision_bundle(tiny_bundle, tmp_path / method, "int8", calib=calib_dir, method=method,
                                progress=lambda s: None, report=False)
    man = read_manifest(out)
    assert method in man.graphs["vision_encoder"].how["method"]
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    ref = runtime.load(tiny_bundle).encode_image(x)
    assert _cos(ref, runtime.load(out).encode_image(x)) >= 0.99


def test_calibration_texts_a_tokenizer_cannot_read_fall_back_to_token_ids(tiny_text_bundle):
    """The built-in English texts on a model with a 16-word vocabulary: token ids instead (no text is
    refused mid-calibration); texts it mostly knows are used, minus any with no known word."""
    from bridge_export import runtime
    from bridge_export.exporter.quantize.calibration import builtin_texts, text_batches

    pipe = runtime.load(tiny_text_bundle)
    ids, source = text_batches(pipe, builtin_texts())
    assert source.startswith(f"{len(builtin_texts())} token ids (the tokenizer knows only") and ids
    assert all(b[:, 0].tolist() == [pipe.special.bos] * len(b) for b in ids)
    ids, source = text_batches(pipe, ["a photo of the digit seven", "a cat on the mat", "zebra quagga okapi"])
    assert source == "2 texts" and [len(b) for b in ids] == [2]
    assert pipe.codec.known_fraction(["zebra"]) == 0.0 and pipe.codec.known_fraction(["a cat"]) == 1.0
