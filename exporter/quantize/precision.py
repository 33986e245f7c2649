"""FP16 and INT8 bundles: precision lives in the ONNX artifact (TensorRT 10, 11 and onnxruntime alike).

* fp16      onnxruntime's float16 converter with a block list: norms, softmax (with its mask and
            scaling), the RoPE angles and the logits stay fp32; graph inputs/outputs keep fp32.
* int8      explicit symmetric Q/DQ (zero point 0, per-channel weights) from onnxruntime's static
            quantizer, calibrated on the user's images (and texts), MatMul/Conv with constant
            weights only; norms, softmax, logits and the pooling heads left in float by default.
            Full 8-bit weights for TensorRT (the default target); 7-bit weights (reduce_range) only
            with `--target onnxruntime`, for onnxruntime's CPU kernels (see `to_int8_qdq`).
* fp8       E4M3 Q/DQ (opset 19) on the same nodes from the same calibration, for TensorRT on
            GPUs of compute capability >= 8.9 (exporter/quantize/fp8.py).
* int8-cpu  onnxruntime dynamic quantization (MatMulInteger, unsigned weights) for CPUs; not
            parseable by TensorRT.
* int4-cpu  4-bit block-quantized weights (MatMulNBits, GatherBlockQuantized for the token
            embeddings) from onnxruntime's MatMulNBitsQuantizer (exporter/int4.py); onnxruntime
            CPU and CUDA only, not parseable by TensorRT.
"""
from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import onnx

from bridge_export.runtime.manifest import PrecisionInfo, read_manifest
from bridge_export.runtime.progress import get_logger, quiet_third_party, reporter

from bridge_export.exporter.export.bundle import write_manifest
from bridge_export.exporter.export.checks import check_graph
from bridge_export.exporter.export.graph_builder import QUANTIZED
from bridge_export.exporter.export.onnx_export import relink_weights
from bridge_export.exporter.output import OutputError, check_output_dir, output_dir
from bridge_export.exporter.quantize.qdq_common import (
    DEFAULT_INT8_EXCLUDE, QUANT_OPS, histogram_ranges, int8_nodes, toposort)
from bridge_export.exporter.quantize.source_view import load_with_weights, source_view

MODES = ("fp16", "int8", "int8-cpu", "int4-cpu", "fp8")
Q_DQ_MODES = ("int8", "fp8")  # static Q/DQ graphs, calibrated on the user's images
# How TensorRT computes a Q/DQ graph: dequantize, then a float (or exact int8 x int8 -> int32) MatMul. Run on
# onnxruntime with this entry, the Q/DQ pairs are not fused into integer kernels (QLinearMatMul and friends),
# whose u8s8 int16 accumulation saturates on x86 CPUs without VNNI: DequantizeLinear then MatMul in float
# (checked: identical to numpy's dequantize-then-matmul). The accuracy reports of TensorRT-target Q/DQ
# bundles are measured this way.
FLOAT_QDQ = {"session.disable_quant_qdq": "1"}
ONNXRUNTIME_ONLY = QUANTIZED  # contrib / integer ops TensorRT does not parse


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


# -- conversions ---------------------------------------------------------------------------------
def to_fp16(src: Path, dst: Path) -> dict:
    """Write an fp16 copy of graph `src` to `dst` (fp32 I/O); returns what was kept fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_with_weights(src)
    block = fp16_block_list(model)
    out = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(block),
                                   disable_shape_infer=False)
    onnx.save_model(toposort(out), str(dst), save_as_external_data=True, location=dst.name + ".data")
    # the names let `engine` pin these layers to fp32 where TensorRT cannot build strongly typed
    return {"method": "onnxruntime.transformers.float16 (keep_io_types)", "fp32_nodes": len(block),
            "fp32_node_names": sorted(block)}


def to_int8_qdq(src: Path, dst: Path, feeds: list[dict], method: str, exclude, progress,
                kept: list[str] = (), reduce_range: bool = False) -> dict:
    """Static symmetric Q/DQ INT8 of graph `src`, calibrated on recorded `feeds`; `kept` are extra
    node names left in fp32 (accuracy target).

    Weights are full 8-bit by default: TensorRT computes int8 x int8 exactly (int32 accumulation).
    `reduce_range` stores 7-bit weights instead (still symmetric, zero point 0), only for an
    onnxruntime CPU target: onnxruntime's x86 u8s8 kernels without VNNI saturate their int16
    partial sums with full 8-bit weights (on the tiny preset, all MatMuls quantized, on an AVX2 CPU:
    bridge image_embeds_g cosine 0.976 fused with 8-bit weights, 0.992 unfused, 0.994 with 7-bit).

    The tensor ranges are kept beside the graph as `<graph>.calibration.json` (onnxruntime's
    calibration cache format), so the bundle records exactly what calibration produced; a later
    call with the cache present reuses it instead of calibrating again.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from bridge_export.exporter.quantize.calibration import FeedReader

    model = onnx.load(str(src), load_external_data=False)
    quant, skipped = int8_nodes(model, exclude)
    total = len(quant) + len(skipped)
    quant = [q for q in quant if q not in set(kept)]
    methods = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    cache = dst.with_suffix(".calibration.json")
    reader = FeedReader(feeds, progress, src.stem)
    if cache.is_file():
        reader = None
    elif method != "max":
        histogram_ranges(src, feeds, methods[method], cache, progress)
        reader = None
    if not quant:  # an empty nodes_to_quantize would mean "every node" to quantize_static
        onnx.save_model(load_with_weights(src), str(dst), save_as_external_data=True,
                        location=dst.name + ".data")
    else:
        with source_view(src, dst.parent) as view:  # its -inferred.onnx lands beside the output, not the source
            quantize_static(str(view), str(dst), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=quant, op_types_to_quantize=QUANT_OPS, use_external_data_format=True,
                            calibrate_method=methods[method], calibration_cache_path=cache,
                            reduce_range=reduce_range,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "CalibMovingAverage": False, "DedicatedQDQPair": False})
    return {"method": f"onnxruntime.quantization.quantize_static QDQ, symmetric, per-channel "
                      f"{'7-bit (reduce_range)' if reduce_range else '8-bit'} weights, calibration {method}", "quantized_nodes": len(quant), "excluded_nodes": total - len(quant),
            "quantized_fraction": round(len(quant) / max(1, total), 4),
            "weight_qmax": 64 if reduce_range else 127, "calibration_batches": len(feeds), "calibration_ranges": cache.name,
            "exclude": DEFAULT_INT8_EXCLUDE if exclude is None else exclude, "nodes": quant}


def to_int8_dynamic(src: Path, dst: Path, exclude) -> dict:
    """Dynamic INT8 MatMuls (unsigned weights) for onnxruntime on CPUs without VNNI."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    quant, skipped = int8_nodes(model, [e for e in (exclude or ["norm", "clip_projector"])])
    with source_view(src, dst.parent) as view:  # its -inferred.onnx lands beside the output, not the source
        quantize_dynamic(str(view), str(dst), weight_type=QuantType.QUInt8, nodes_to_quantize=quant,
                         per_channel=True, op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    return {"method": "onnxruntime.quantization.quantize_dynamic, MatMulInteger, uint8 weights",
            "quantized_nodes": len(quant), "excluded_nodes": len(skipped), "tensorrt": False}


def to_int4(src: Path, dst: Path, opts) -> dict:
    """INT4 weight-only graph `src` -> `dst` (MatMulNBits) with onnxruntime's maintained quantizer."""
    from bridge_export.exporter.quantize.int4 import quantize_graph

    model, record = quantize_graph(load_with_weights(src), opts)
    onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return record


# Which graphs each end-to-end output passes through (to tighten their targets when it misses).
E2E_PATHS = {"image_embeds_C_cosine": ["vision_encoder"], "image_embeds_G_cosine": ["vision_encoder", "query_bridge"],
             "text_embeds_cosine": ["text_decoder"], "logits_cosine": ["vision_encoder", "query_bridge", "text_decoder"]}
WARN_BELOW = 0.99


def _inputs(src, calib, calib_texts):
    """(calibration images, held-out images, calibration texts, held-out texts): a quarter held out."""
    from bridge_export.exporter.quantize.calibration import builtin_texts, read_image_folder, read_texts, split_held_out, synthetic_images

    images = read_image_folder(calib) if calib else synthetic_images(12, src.preprocessing.image_size)
    texts = read_texts(calib_texts) if calib_texts else builtin_texts()
    return (*split_held_out(images), *split_held_out(texts))


def _convert_graphs(src, tmp: Path, manifest, mode: str, progress, *, feeds=None, held=None, method="max",
                    exclude=None, int4=None, targets=None, kept=None, caches=None, target="tensorrt") -> None:
    """Write every graph of `mode` into `tmp`, recording `how` in `manifest`, then share weights.bin."""
    from bridge_export.exporter.quantize.int8_target import targeted_int8

    paths = []
    for name, g in manifest.graphs.items():
        t0 = time.perf_counter()
        progress(f"[precision] {name} -> {mode} ...")
        srcp, dst = src.graph_path(name), tmp / g.file
        if mode == "fp16":
            how = to_fp16(srcp, dst)
        elif mode == "int8":
            def build(keep, srcp=srcp, dst=dst, name=name):
                return to_int8_qdq(srcp, dst, feeds[name], method, exclude, progress, kept=keep,
                                   reduce_range=target == "onnxruntime")

            how = targeted_int8(srcp, dst, feeds[name], held[name], (targets or {}).get(name), build, progress,
                                start_kept=(kept or {}).get(name),
                                cache=None if caches is None else caches.setdefault(name, {}),
                                session_config=report_session_config(mode, target))
            how.pop("nodes", None)
            how["made_for"] = target
        elif mode == "fp8":
            from bridge_export.exporter.quantize.fp8 import to_fp8_qdq

            how = to_fp8_qdq(srcp, dst, feeds[name], method, exclude, progress)
        elif name == "text_decoder" and mode in ONNXRUNTIME_ONLY and _fusable(manifest):
            dst, how = _fused_decoder(src, tmp, manifest, mode, int4)
        elif mode == "int4-cpu":
            from bridge_export.exporter.quantize.int4 import Int4Options

            how = to_int4(srcp, dst, int4 or Int4Options())
        else:
            how = to_int8_dynamic(srcp, dst, exclude)
        paths.append(dst)
        g.precision, g.how = mode, how
        progress(f"[precision] {name} done in {time.perf_counter() - t0:.1f}s")
    relink_weights(paths, tmp)
    shutil.rmtree(tmp / ".fused", ignore_errors=True)
    for g in manifest.graphs.values():
        g.checks = check_graph(tmp / g.file, tensorrt=mode not in ONNXRUNTIME_ONLY)
        if mode in ONNXRUNTIME_ONLY:
            g.target = "onnxruntime"


def _fusable(manifest) -> bool:
    """The decoder can be GroupQueryAttention's (head_dim a multiple of 8); else it is quantized as written."""
    from bridge_export.exporter.export.specs import fused_unsupported
    from bridge_export.reference_model.config import InternVLConfig

    return fused_unsupported(InternVLConfig.from_dict(manifest.model)) is None


def _fused_decoder(src, tmp: Path, manifest, mode: str, int4) -> tuple[Path, dict]:
    """int8-cpu/int4-cpu decoders are the fused one (onnxruntime target), rebuilt from the fp32 bundle's
    weights by the streamed exporter's own path; the manifest entry takes its inputs and outputs."""
    from bridge_export.exporter.export.manifest_build import graph_info
    from bridge_export.exporter.export.fused_rebuild import write_from_bundle
    from bridge_export.exporter.export.specs import fused_decoder_spec
    from bridge_export.exporter.export.stream_export import HOW
    from bridge_export.exporter.quantize.int4 import Int4Options
    from bridge_export.reference_model.config import InternVLConfig

    int4 = (int4 or Int4Options()) if mode == "int4-cpu" else None
    path = write_from_bundle(src, mode, tmp / ".fused", int4)
    config = InternVLConfig.from_dict(manifest.model)
    g = manifest.graphs["text_decoder"]
    info = graph_info(fused_decoder_spec(config, mode), config, manifest.limits, mode)
    g.inputs, g.outputs, g.tensorrt_profiles = info.inputs, info.outputs, []
    how = {**HOW[mode], "decoder": "fused (GroupQueryAttention, SkipSimplifiedLayerNormalization, one q/k/v "
                                   "MatMul), rebuilt from the fp32 bundle's weights"}
    if int4 is not None:
        how.update(int4.as_dict())
    return path, how


def report_session_config(mode: str, target: str) -> dict[str, str] | None:
    """onnxruntime entries for measuring a `mode` bundle written for `target`: Q/DQ for TensorRT unfused
    (FLOAT_QDQ: what TensorRT computes), everything else as the runtime runs it."""
    return FLOAT_QDQ if mode in Q_DQ_MODES and target == "tensorrt" else None


def _copy_assets(src, tmp: Path, manifest) -> None:
    """Tokenizer, host tensors and anything else the source bundle holds besides graphs and weights."""
    rewritten = {g.file for g in manifest.graphs.values()} | {manifest.weights}
    for f in src.files:
        if f not in rewritten and not (tmp / f).exists():
            shutil.copyfile(src.path(f), tmp / f)


def _missed(rep: dict, target: float) -> list[str]:
    """End-to-end cosines in `rep` below `target`."""
    return [k for k in E2E_PATHS if rep["end_to_end"].get(k, 1.0) < target]


def make_precision_bundle(bundle, out, mode: str, calib=None, calib_texts=None, method: str = "max",
                          exclude: list[str] | None = None, overwrite: bool = False, progress=None,
                          report: bool = True, int4=None, target_cosine: float | None = None,
                          max_rounds: int = 3, target: str | None = None) -> Path:
    """Write a new bundle at `out` whose graphs are `mode` (fp16 / int8 / int8-cpu / int4-cpu / fp8), with an
    accuracy report on held-out images and texts.

    `target` (operator target; default tensorrt for fp16/int8/fp8): int8 with `onnxruntime` stores 7-bit
    weights for onnxruntime's CPU kernels; the TensorRT Q/DQ bundles (int8, fp8) are measured on
    onnxruntime with Q/DQ fusion off (FLOAT_QDQ), as TensorRT computes them.

    `int4` is an `bridge_export.exporter.quantize.int4.Int4Options` (defaults when None). With `target_cosine` (int8), the
    most sensitive nodes stay fp32 until every graph output and every end-to-end output (image C/G
    and text embeddings, logits) reaches it on held-out inputs; when an end-to-end output misses, the
    graph that produces it gets a tighter target (halving 1 - target), and the graphs upstream of it
    too if it misses again, up to `max_rounds` passes.
    What was kept and the cosines reached go to the manifest: `precision.report` (summary),
    each graph's `how` (kept nodes, output cosines) and `report`.
    """
    from bridge_export import runtime

    from bridge_export.exporter.quantize.accuracy import accuracy_report, format_report
    from bridge_export.exporter.quantize.calibration import record_feeds

    progress = reporter(progress, log)
    quiet_third_party()
    if mode not in MODES:
        raise ValueError(f"precision must be one of {MODES}, got {mode!r}")
    target = target or ("onnxruntime" if mode in ONNXRUNTIME_ONLY else "tensorrt")
    if target == "onnxruntime" and mode not in ("int8",) + ONNXRUNTIME_ONLY:
        raise ValueError(f"--precision {mode} --target onnxruntime is not written by `precision`: drop --target "
                         "for portable ONNX (onnxruntime runs it too)")
    if target == "tensorrt" and mode in ONNXRUNTIME_ONLY:
        raise ValueError(f"--precision {mode} is onnxruntime-only: use --precision int8 or fp8 for TensorRT")
    src = read_manifest(bundle)
    if Path(out).absolute().resolve() == src.root.absolute().resolve():
        raise OutputError(f"--out {out} is the source bundle itself: write the {mode} bundle to another folder")
    check_output_dir(out, overwrite)  # before calibration: refused outputs cost no work
    if src.precision.mode != "fp32":
        raise ValueError(f"{bundle} is already {src.precision.mode}: make precision bundles from an fp32 bundle")
    if "text_decoder" in src.graphs and src.graph("text_decoder").fused:
        raise ValueError(f"{bundle} has the fused onnxruntime decoder: make precision bundles from the portable fp32 "
                         "bundle (exported without --target onnxruntime)")
    if mode in ONNXRUNTIME_ONLY and _fusable(src):  # the fused decoder is rebuilt from the weights' key names
        from bridge_export.exporter.export.fused_rebuild import bundle_keys

        bundle_keys(src, mode)
    if mode in Q_DQ_MODES and calib is None:
        raise ValueError(f"--precision {mode} needs --calib IMAGES_DIR: its scales are calibrated on your images")
    if target_cosine is not None and mode != "int8":
        raise ValueError(f"--target-cosine applies to --precision int8 (static Q/DQ), not {mode}")
    if target_cosine is not None and not 0 < target_cosine < 1:
        raise ValueError(f"--target-cosine must be between 0 and 1 (e.g. 0.999), got {target_cosine}")
    calib_images, held_images, calib_texts_, held_texts = _inputs(src, calib, calib_texts)
    with output_dir(Path(out), overwrite) as tmp:  # renamed into place when complete, removed on failure
        pipe = runtime.load(bundle)
        feeds = held = None
        if mode in Q_DQ_MODES:
            progress("[precision] recording calibration feeds (images, caption prefill + decode steps, texts) ...")
            feeds = record_feeds(pipe, calib_images, calib_texts_)
            held = record_feeds(pipe, held_images, held_texts, seed=1)
        manifest = copy.deepcopy(src)
        targets = {name: target_cosine for name in manifest.graphs} if target_cosine else None
        rep, misses, caches = None, {}, {}  # caches: per graph, what a later round need not measure again
        for _ in range(max_rounds if target_cosine else 1):
            kept = {n: (g.how or {}).get("kept_fp32_for_target", []) for n, g in manifest.graphs.items()
                    if g.precision == mode}
            _convert_graphs(src, tmp, manifest, mode, progress, feeds=feeds, held=held, method=method,
                            exclude=exclude, int4=int4, targets=targets, kept=kept, caches=caches, target=target)
            _copy_assets(src, tmp, manifest)
            manifest.precision = PrecisionInfo(mode=mode, derived_from={
                "bundle": str(Path(bundle).absolute()), "precision": "fp32",
                "weights_sha256": src.files[src.weights].sha256})
            write_manifest(tmp, manifest)
            if not (report or target_cosine):
                break
            progress("[precision] measuring accuracy against fp32 on held-out inputs ...")
            measured = runtime.load(tmp, session_config=report_session_config(mode, target))
            rep = accuracy_report(pipe, measured, held_images, held_texts, feeds=held)  # Q/DQ: recorded once
            rep["run_on"] = ("onnxruntime CPU, Q/DQ fusion off (session.disable_quant_qdq): dequantize then "
                             "float MatMul, as TensorRT computes" if report_session_config(mode, target)
                             else "onnxruntime CPU, as the runtime runs it")
            missed = _missed(rep, target_cosine) if target_cosine else []
            if not missed:
                break
            # the graph that makes an output first gets the tighter target; upstream ones only when the
            # same output misses again
            tighten = set()
            for k in missed:
                misses[k] = misses.get(k, 0) + 1
                tighten |= set(E2E_PATHS[k][-1:] if misses[k] == 1 else E2E_PATHS[k])
            for name in tighten:
                targets[name] = 1 - (1 - targets[name]) / 2
            progress(f"[precision] end to end {missed} below {target_cosine}: graph targets now "
                     + ", ".join(f"{n} {t:.6g}" for n, t in targets.items()))
        if rep is not None:
            progress(format_report(rep, mode))
            met = (not missed and all((g.how or {}).get("met", True)
                                                            for g in manifest.graphs.values())) if target_cosine else None
            rep["target_cosine"], rep["met_target"] = target_cosine, met
            manifest.precision.accuracy = rep
            manifest.precision.report = summary = precision_summary(manifest, rep)
            if mode == "int8":
                progress(f"[precision] quantized {summary['quantized_nodes']} of {summary['weighted_nodes']} weighted "
                         "nodes; kept in fp32 for the target: " + (", ".join(
                             f"{n} {len(k)}" for n, k in summary["kept_fp32_for_target"].items()) or "none"))
            for name, g in manifest.graphs.items():
                g.report = rep["graphs"].get(name)
            write_manifest(tmp, manifest, known={n: e.sha256 for n, e in manifest.files.items()})  # files unchanged
            where, worst = summary["lowest_cosine"]["output"], summary["lowest_cosine"]["cosine"]
            if target_cosine and not met:
                progress(f"[precision] warning: the target {target_cosine} was not met ({where} {worst:.6f}) "
                         "even after keeping nodes in fp32; see the manifest's precision section")
            elif not target_cosine and worst < WARN_BELOW:
                progress(f"[precision] warning: {where} cosine {worst:.6f} is below {WARN_BELOW}"
                         + ("; rerun with --target-cosine 0.99 (or higher) to keep sensitive nodes in fp32"
                            if mode == "int8" else ""))
    progress(f"[precision] {mode} bundle written to {Path(out).absolute()}")
    return Path(out)


def precision_summary(manifest, rep: dict) -> dict:
    """The manifest's `precision.report`: target, whether it was met, the nodes kept in fp32 per graph,
    the quantized share of the weighted nodes, and the lowest cosine reached."""
    from bridge_export.exporter.quantize.accuracy import worst_cosine

    where, worst = worst_cosine(rep)
    hows = {n: g.how or {} for n, g in manifest.graphs.items()}
    quant = sum(h.get("quantized_nodes", 0) for h in hows.values())
    total = quant + sum(h.get("excluded_nodes", 0) for h in hows.values())
    return {"target_cosine": rep.get("target_cosine"), "met_target": rep.get("met_target"),
            "kept_fp32_for_target": {n: h.get("kept_fp32_for_target", []) for n, h in hows.items()
                                     if "kept_fp32_for_target" in h},
            "quantized_nodes": quant, "weighted_nodes": total,
            "lowest_cosine": {"output": where, "cosine": worst}}
