"""FP8 (E4M3) Q/DQ graphs for TensorRT on GPUs with FP8 tensor cores (compute capability >= 8.9).

The same MatMul/Conv/Gemm nodes as INT8 (`qdq_common.int8_nodes`, same exclusions) get
QuantizeLinear/DequantizeLinear pairs with float8e4m3fn zero points (opset 19): activations per
tensor, scale = calibrated max|x| / 448 (the same calibration as INT8: `qdq_common.histogram_ranges`,
same feeds and method), weights per tensor too, scale = max|w| / 448, stored as float8e4m3fn.
Per-tensor weight scales because TensorRT runs FP8 GEMMs with per-channel weight scales only from
10.6 and on Hopper, while per-tensor ones run on every FP8 GPU (Ada and Hopper) from TensorRT 10.0;
E4M3 being a float format, one scale per tensor costs little (`per_channel=True` is available).
TensorRT 10 parses exactly this (FP8 Q/DQ, zero point 0), and onnxruntime's CPU provider runs it
(QuantizeLinear/DequantizeLinear for float8 types), which is how the accuracy report is measured.

Written here rather than with onnxruntime's quantize_static: its float8 mode accepts only the
Distribution calibration method (scales from a fitted spread, not the calibrated range), so the
scales would not come from the calibration the INT8 bundle uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

E4M3_MAX = 448.0  # largest finite float8e4m3fn
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear take float8 types from opset 19


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """`x` rounded to float8e4m3fn (ml_dtypes), saturated to +-448 as QuantizeLinear(saturate=1) does (a plain
    cast would give NaN beyond the range)."""
    import ml_dtypes

    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def _scale(amax) -> np.ndarray:
    amax = np.asarray(amax, np.float32)
    return np.where(amax > 0, amax, 1.0).astype(np.float32) / np.float32(E4M3_MAX)


def _weight_axis(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    """The output-channel axis of `node`'s constant weight, None when not one we quantize."""
    if node.op_type == "Conv":
        return 0
    if w.ndim != 2:
        return None
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return 0 if trans_b else 1


def insert_fp8_qdq(model: onnx.ModelProto, nodes: list[str], ranges: dict[str, tuple], base_dir: Path,
                   per_channel: bool = False) -> list[str]:
    """Put E4M3 Q/DQ on the activation input and the weight of each node in `nodes` (in place): weights with
    one scale, or one per output channel with `per_channel`; returns the nodes quantized (those with a
    calibrated activation range and a 2-D (Conv: any) constant weight)."""
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # inserted before the node that first needs them
    act_dq: dict[str, str] = {}  # one Q/DQ pair per activation tensor, shared by its consumers
    w_dq: dict[str, str] = {}  # one fp8 copy per weight (a weight shared by two nodes is stored once)
    done = []
    for name in nodes:
        n = by_name[name]
        x, w_name = n.input[0], n.input[1]
        if x not in ranges or w_name not in inits:
            continue
        w = numpy_helper.to_array(inits[w_name], base_dir=str(base_dir)).astype(np.float32)
        axis = _weight_axis(n, w)
        if axis is None:
            continue
        inserted = new_nodes.setdefault(name, [])
        if x not in act_dq:
            lo, hi = ranges[x]
            sx = _scale(max(float(np.max(np.abs(lo))), float(np.max(np.abs(hi)))))
            base = f"{x}_fp8"
            model.graph.initializer.extend([numpy_helper.from_array(sx, f"{base}_scale"),
                                            numpy_helper.from_array(to_e4m3(np.zeros((), np.float32)), f"{base}_zp")])
            inserted += [helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zp"], [f"{base}_q"],
                                          name=f"{base}_QuantizeLinear"),
                         helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"],
                                          [f"{base}_dq"], name=f"{base}_DequantizeLinear")]
            act_dq[x] = f"{base}_dq"
        if w_name in w_dq:
            n.input[0], n.input[1] = act_dq[x], w_dq[w_name]
            done.append(name)
            continue
        if per_channel:
            sw = _scale(np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)))
            shape = [1] * w.ndim
            shape[axis] = -1
            wq = to_e4m3(w / sw.reshape(shape))
        else:
            sw = _scale(np.abs(w).max())
            wq = to_e4m3(w / sw)
        base = f"{w_name}_fp8"
        model.graph.initializer.extend([numpy_helper.from_array(wq, f"{base}_q"),
                                        numpy_helper.from_array(sw, f"{base}_scale"),
                                        numpy_helper.from_array(to_e4m3(np.zeros(sw.shape, np.float32)), f"{base}_zp")])
        inserted.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"],
                                         [f"{base}_dq"], name=f"{base}_DequantizeLinear",
                                         **({"axis": axis} if per_channel else {})))
        w_dq[w_name] = f"{base}_dq"
        n.input[0], n.input[1] = act_dq[x], f"{base}_dq"
        done.append(name)
    ordered = []
    for n in model.graph.node:
        ordered += new_nodes.get(n.name, [])
        ordered.append(n)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]  # fp32 weights now stored as fp8 only
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def with_opset(model: onnx.ModelProto, opset: int = FP8_OPSET) -> onnx.ModelProto:
    """`model` converted to at least `opset` of the default domain (onnx's version converter, which rewrites
    the operators whose signature changed, e.g. Reduce* axes becoming an input at 18)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, opset)


def to_fp8_qdq(src: Path, dst: Path, feeds: list[dict], method: str, exclude, progress) -> dict:
    """E4M3 Q/DQ graph of `src` at `dst` (opset 19), calibrated on `feeds` like INT8; the ranges are kept
    beside the graph as `<graph>.calibration.json` (onnxruntime's calibration cache format)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import load_tensors_data

    from bridge_export.exporter.quantize.qdq_common import DEFAULT_INT8_EXCLUDE, histogram_ranges, int8_nodes, toposort

    methods = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    cache = dst.with_suffix(".calibration.json")
    if not cache.is_file():
        histogram_ranges(src, feeds, methods[method], cache, progress)
    ranges = {k: tuple(np.ravel(r) for r in v.range_value) for k, v in load_tensors_data(cache).items()}
    from bridge_export.exporter.quantize.source_view import load_with_weights

    model = load_with_weights(src)  # hard-linked bundles too (onnx's own loader refuses them)
    quant, skipped = int8_nodes(model, exclude)
    model = with_opset(model)
    done = insert_fp8_qdq(model, quant, ranges, src.parent)
    onnx.save_model(toposort(model), str(dst), save_as_external_data=True, location=dst.name + ".data")
    total = len(quant) + len(skipped)
    return {"method": "E4M3 (float8e4m3fn) Q/DQ, zero point 0: activations per tensor (calibrated max|x| / 448), "
                      f"weights per tensor (max|w| / 448), calibration {method}, opset {FP8_OPSET}",
            "quantized_nodes": len(done), "excluded_nodes": total - len(done),
            "quantized_fraction": round(len(done) / max(1, total), 4), "calibration_batches": len(feeds),
            "calibration_ranges": cache.name, "exclude": DEFAULT_INT8_EXCLUDE if exclude is None else exclude}


__all__ = ["E4M3_MAX", "FP8_OPSET", "to_e4m3", "insert_fp8_qdq", "with_opset", "to_fp8_qdq"]
