"""FP16 and INT8 bundles: precision lives in the ONNX artifact (TensorRT 10, 11 and onnxruntime alike).

* fp16      onnxruntime's float16 converter with a block list: norms, softmax (with its mask and
            scaling), the RoPE angles and the logits stay fp32; graph inputs/outputs keep fp32.
* int8      explicit symmetric Q/DQ (zero point 0, per-channel weights) from onnxruntime's static
            quantizer, calibrated on the user's images (and texts), MatMul/Conv with constant
            weights only; norms, softmax, logits and the pooling heads left in float by default.
* int8-cpu  onnxruntime dynamic quantization (MatMulInteger, unsigned weights) for CPUs; not
            parseable by TensorRT.
"""
from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import onnx

from runtime.manifest import PrecisionInfo, read_manifest
from runtime.progress import get_logger, quiet_third_party, reporter

from .bundle import commit_output, prepare_output, write_manifest
from .checks import check_graph
from .onnx_export import relink_weights

MODES = ("fp16", "int8", "int8-cpu")
# Sensitive ops kept out of INT8 by default: names matched against node names / op types.
DEFAULT_INT8_EXCLUDE = ["norm", "Softmax", "lm_head", "clip_projector"]


log = get_logger(__name__)


# -- plans (pure functions over the graph; tested without running anything) --------------------
def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _upstream(model, start: list[onnx.NodeProto], stop) -> set[str]:
    """Names of `start` and every node above them, not crossing nodes for which stop(node) is true."""
    prod = _producers(model)
    seen, todo = set(), list(start)
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        for i in n.input:
            p = prod.get(i)
            if p is not None and not stop(p):
                todo.append(p)
    return seen


def fp16_block_list(model: onnx.ModelProto) -> set[str]:
    """Nodes that must stay fp32: norms, softmax with its scores/mask chain, RoPE angles, logits."""
    is_matmul = lambda n: n.op_type in ("MatMul", "Gemm", "FusedMatMul", "Conv")  # noqa: E731
    nodes = list(model.graph.node)
    block = {n.name for n in nodes if "norm" in n.name.lower() or n.op_type == "LayerNormalization"}
    block |= _upstream(model, [n for n in nodes if n.op_type == "Softmax"], is_matmul)
    block |= _upstream(model, [n for n in nodes if n.op_type in ("Cos", "Sin")], lambda n: False)
    outs = {o.name for o in model.graph.output}
    logits = [n for n in nodes if "logits" in n.output and "logits" in outs]
    block |= _upstream(model, logits, lambda n: not ("lm_head" in n.name or n.op_type == "Cast"))
    return block


def int8_nodes(model: onnx.ModelProto, exclude: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes excluded): MatMul/Conv/Gemm with a constant weight, minus `exclude` matches."""
    exclude = DEFAULT_INT8_EXCLUDE if exclude is None else exclude
    inits = {t.name for t in model.graph.initializer}
    quant, skipped = [], []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if any(x.lower() in n.name.lower() or x == n.op_type for x in exclude):
            skipped.append(n.name)
        else:
            quant.append(n.name)
    return quant, skipped


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder nodes topologically (onnxruntime's float16 converter appends its input Casts last)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or a dangling input; cannot sort it")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


# -- conversions ---------------------------------------------------------------------------------
def to_fp16(src: Path, dst: Path) -> dict:
    """Write an fp16 copy of graph `src` to `dst` (fp32 I/O); returns what was kept fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    block = fp16_block_list(model)
    out = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(block),
                                   disable_shape_infer=False)
    onnx.save_model(toposort(out), str(dst), save_as_external_data=True, location=dst.name + ".data")
    return {"method": "onnxruntime.transformers.float16 (keep_io_types)", "fp32_nodes": len(block)}


QUANT_OPS = ["MatMul", "Conv", "Gemm"]


def histogram_ranges(src: Path, feeds: list[dict], method, cache: Path, progress) -> None:
    """Entropy/percentile tensor ranges with onnxruntime's calibrator, one collect per feed shape.

    The histograms merge across collect_data calls; the ranges go to `cache` (onnxruntime's
    calibration cache), which quantize_static then reads instead of calibrating again.
    """
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from .calibration import FeedReader, shape_groups

    with tempfile.TemporaryDirectory(prefix="bridge-export-calib-") as tmp:
        cal = create_calibrator(src, QUANT_OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=method, use_external_data_format=True,
                                extra_options={"symmetric": True})
        for group in shape_groups(feeds):
            cal.collect_data(FeedReader(group, progress, src.stem))
            cal.clear_collected_data()
        save_tensors_data(cal.compute_data(), cache)


def to_int8_qdq(src: Path, dst: Path, feeds: list[dict], method: str, exclude, progress) -> dict:
    """Static symmetric Q/DQ INT8 of graph `src`, calibrated on recorded `feeds`.

    The tensor ranges are kept beside the graph as `<graph>.calibration.json` (onnxruntime's
    calibration cache format), so the bundle records exactly what calibration produced.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import FeedReader

    model = onnx.load(str(src), load_external_data=False)
    quant, skipped = int8_nodes(model, exclude)
    methods = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    cache = dst.with_suffix(".calibration.json")
    reader = FeedReader(feeds, progress, src.stem)
    if method != "max":
        histogram_ranges(src, feeds, methods[method], cache, progress)
        reader = None
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=quant, op_types_to_quantize=QUANT_OPS, use_external_data_format=True,
                    calibrate_method=methods[method], calibration_cache_path=cache,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "CalibMovingAverage": False, "DedicatedQDQPair": False})
    return {"method": f"onnxruntime.quantization.quantize_static QDQ, symmetric, per-channel weights, "
                      f"calibration {method}", "quantized_nodes": len(quant), "excluded_nodes": len(skipped),
            "calibration_batches": len(feeds), "calibration_ranges": cache.name,
            "exclude": DEFAULT_INT8_EXCLUDE if exclude is None else exclude}


def to_int8_dynamic(src: Path, dst: Path, exclude) -> dict:
    """Dynamic INT8 MatMuls (unsigned weights) for onnxruntime on CPUs without VNNI."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    quant, skipped = int8_nodes(model, [e for e in (exclude or ["norm", "clip_projector"])])
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8, nodes_to_quantize=quant, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})
    return {"method": "onnxruntime.quantization.quantize_dynamic, MatMulInteger, uint8 weights",
            "quantized_nodes": len(quant), "excluded_nodes": len(skipped), "tensorrt": False}


def make_precision_bundle(bundle, out, mode: str, calib=None, calib_texts=None, method: str = "max",
                          exclude: list[str] | None = None, overwrite: bool = False, progress=None,
                          report: bool = True) -> Path:
    """Write a new bundle at `out` whose graphs are `mode` (fp16 / int8 / int8-cpu), with an accuracy report."""
    import runtime

    from .accuracy import accuracy_report, format_report
    from .calibration import read_image_folder, read_texts, record_feeds, synthetic_images

    progress = reporter(progress, log)
    quiet_third_party()
    if mode not in MODES:
        raise ValueError(f"precision must be one of {MODES}, got {mode!r}")
    src = read_manifest(bundle)
    if src.precision.mode != "fp32":
        raise ValueError(f"{bundle} is already {src.precision.mode}: make precision bundles from an fp32 bundle")
    if mode == "int8" and calib is None:
        raise ValueError("--int8 needs --calib IMAGES_DIR: INT8 scales are calibrated on your images")
    size = src.preprocessing.image_size
    images = read_image_folder(calib) if calib else synthetic_images(12, size)
    texts = read_texts(calib_texts) if calib_texts else None
    # hold out a quarter of the images (at least one) for the accuracy report
    n_hold = max(1, len(images) // 4) if len(images) > 1 else 0
    calib_images, held_out = images[n_hold:] if n_hold else images, images[:n_hold] or images
    tmp = prepare_output(Path(out), overwrite)
    try:
        pipe = runtime.load(bundle)
        feeds = record_feeds(pipe, calib_images, texts) if mode == "int8" else {}
        manifest = copy.deepcopy(src)
        paths = []
        for name, g in manifest.graphs.items():
            t0 = time.perf_counter()
            progress(f"[precision] {name} -> {mode} ...")
            srcp, dst = src.graph_path(name), tmp / g.file
            if mode == "fp16":
                how = to_fp16(srcp, dst)
            elif mode == "int8":
                how = to_int8_qdq(srcp, dst, feeds[name], method, exclude, progress)
            else:
                how = to_int8_dynamic(srcp, dst, exclude)
            paths.append(dst)
            g.precision, g.how = mode, how
            progress(f"[precision] {name} done in {time.perf_counter() - t0:.1f}s")
        relink_weights(paths, tmp)
        for name, g in manifest.graphs.items():
            g.checks = check_graph(tmp / g.file, tensorrt=mode != "int8-cpu")
        rewritten = {g.file for g in manifest.graphs.values()} | {manifest.weights}
        for f in src.files:  # tokenizer, host tensors and anything else the source bundle holds
            if f not in rewritten and not (tmp / f).exists():
                shutil.copyfile(src.path(f), tmp / f)
        manifest.precision = PrecisionInfo(mode=mode, derived_from={
            "bundle": str(Path(bundle).absolute()), "precision": "fp32",
            "weights_sha256": src.files[src.weights].sha256})
        write_manifest(tmp, manifest)
        if report:
            progress("[precision] measuring accuracy against fp32 on held-out inputs ...")
            rep = accuracy_report(pipe, runtime.load(tmp), held_out, texts)
            progress(format_report(rep, mode))
            manifest.precision.accuracy = rep
            for name, g in manifest.graphs.items():
                g.report = rep["graphs"].get(name)
            write_manifest(tmp, manifest)
        commit_output(tmp, Path(out))
        progress(f"[precision] {mode} bundle written to {Path(out).absolute()}")
        return Path(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
