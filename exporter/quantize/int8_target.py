"""Accuracy-targeted INT8: keep the most sensitive MatMuls in fp32 until every output meets a cosine target.

Per graph:
1. quantize every candidate node (symmetric Q/DQ, `precision.to_int8_qdq`) and measure each graph
   output's smallest row cosine against fp32 on held-out feeds;
2. if an output misses the target, rank the quantized nodes by their own error: each node's
   input activations (captured with onnxruntime's `qdq_loss_debug` helpers on one calibration and
   one held-out feed per path: image, caption prefill, decode step, text; held-out values beyond
   the calibrated range are clipped, as deployment would clip them)
   and weight are quantized as the quantizer will (activation scale = calibrated max|x| / 127,
   weight scale per output channel) and run through onnxruntime's own integer kernel in a one-node
   graph; the node's output SQNR in dB is its sensitivity (lowest = most sensitive). Running the
   kernel matters: on CPUs without VNNI, onnxruntime's u8s8 kernels saturate int16 partial sums, an
   error a float simulation does not show (measured: one decoder MatMul at 40.8 dB simulated
   dropped the final hidden-state cosine to 0.9991);
3. keep the k most sensitive nodes in fp32, doubling k until the target is met, then bisect for the
   smallest k that meets it. The calibration ranges are cached, so each try is one quantize pass.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from bridge_export.exporter.quantize.accuracy import output_cosines
from bridge_export.exporter.quantize.calibration import shape_groups

INT8_MAX = 127.0  # symmetric int8 (zero point 0): onnxruntime quantizes to [-127, 127]


def fake_quant(x: np.ndarray, scale) -> np.ndarray:
    """Round `x` to the symmetric int8 grid of `scale` (broadcast) and back."""
    scale = np.where(np.asarray(scale) > 0, scale, 1.0)
    return np.clip(np.round(x / scale), -INT8_MAX, INT8_MAX) * scale


def sqnr_db(ref: np.ndarray, noisy: np.ndarray) -> float:
    """Signal to quantization noise ratio in dB (inf when equal)."""
    noise = float(np.sum((ref.astype(np.float64) - noisy) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def qdq_matmul_session(w: np.ndarray, x_scale: float, w_qmax: float = INT8_MAX, session_config=None):
    """A one-node onnxruntime session computing fake-quantized x @ w as the quantized graph will:
    symmetric int8 Q/DQ on x (scale `x_scale`) and per-output-channel int8 weights, with onnxruntime's
    optimizations on, so its integer kernels (and, on CPUs without VNNI, their int16 saturation) are used;
    `session_config` entries (e.g. precision.FLOAT_QDQ for a TensorRT target) go to the session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    sw = np.where(np.abs(w).max(0) > 0, np.abs(w).max(0), 1.0).astype(np.float32) / w_qmax
    wq = np.clip(np.round(w / sw), -w_qmax, w_qmax).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
             numpy_helper.from_array(np.array(x_scale, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int8), "zx")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in (session_config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def node_sensitivity(model: onnx.ModelProto, nodes: list[str], activations: dict[str, list[np.ndarray]],
                     ranges: dict[str, tuple[float, float]], base_dir: Path, w_qmax: float = INT8_MAX,
                     session_config=None) -> dict[str, float]:
    """Output SQNR (dB) of each node in `nodes` when only that node is quantized; lower = more sensitive.

    MatMul/Gemm run through `qdq_matmul_session` on their captured inputs (so the runtime's integer
    kernel is part of the measurement); Conv is estimated from its input and weight SQNRs combined
    as independent noises.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for name in nodes:
        n = by_name[name]
        x_name, w_name = n.input[0], n.input[1]
        xs = activations.get(x_name)
        if not xs or x_name not in ranges:
            continue
        w = numpy_helper.to_array(inits[w_name], base_dir=str(base_dir)).astype(np.float32)
        lo, hi = ranges[x_name]
        sx = float(np.max(np.abs(np.concatenate([np.ravel(lo), np.ravel(hi)])))) / INT8_MAX
        if n.op_type in ("MatMul", "Gemm") and w.ndim == 2:
            if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
                w = w.T
            sess = qdq_matmul_session(w, sx, w_qmax, session_config)
            snr = []
            for x in xs:
                x2 = np.ascontiguousarray(x.reshape(-1, w.shape[0]), np.float32)
                if x2.size:
                    snr.append(sqnr_db(x2 @ w, sess.run(None, {"x": x2})[0]))
            if snr:
                out[name] = float(min(snr))
        else:  # Conv: weight per output channel (axis 0)
            axes = tuple(range(1, w.ndim))
            wq = fake_quant(w, np.abs(w).max(axes, keepdims=True) / w_qmax)
            noise = sum(10 ** (-sqnr_db(a, b) / 10) for a, b in [(w, wq)] + [(x, fake_quant(x, sx)) for x in xs[:1]])
            out[name] = float(-10 * np.log10(max(noise, 1e-30)))
    return out


def capture_inputs(src: Path, feeds: list[dict], op_types=("MatMul", "Conv", "Gemm")) -> dict[str, list[np.ndarray]]:
    """Every input/output tensor of `op_types` nodes of graph `src` on `feeds` (onnxruntime's qdq_loss_debug)."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    from bridge_export.exporter.quantize.calibration import FeedReader

    with tempfile.TemporaryDirectory(prefix="bridge-export-sens-") as tmp:
        aug = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(src), str(aug), list(op_types), save_as_external_data=True)
        return collect_activations(str(aug), FeedReader(feeds))


def meets(cosines: dict[str, float], target: float) -> bool:
    """Every output at or above `target`."""
    return all(v >= target for v in cosines.values())


class _Recorded:
    """A session stand-in that answers each of `feeds` with the outputs `session` gave it once."""

    def __init__(self, session, feeds: list[dict]):
        self.outputs = {id(f): session.run(f) for f in feeds}

    def run(self, feeds: dict) -> dict:
        """The recorded outputs for this feed."""
        return self.outputs[id(feeds)]


def targeted_int8(src: Path, dst: Path, calib_feeds: list[dict], held_feeds: list[dict], target: float | None,
                  build, progress, start_kept: list[str] | None = None, cache: dict | None = None,
                  session_config: dict[str, str] | None = None) -> dict:
    """Quantize graph `src` to `dst` with `build(kept_fp32) -> how`, keeping the fewest most-sensitive
    nodes in fp32 for every output on `held_feeds` to reach `target` (just measure when None).

    `start_kept` (from an earlier round) is the smallest set to keep. `cache`: a dict kept across the
    rounds of one graph (same feeds, same calibration ranges): the fp32 outputs and the node
    sensitivities already measured are reused, not run again. Returns the record for the manifest:
    kept nodes, the sensitivity order used, and each output's cosine. `session_config`: onnxruntime
    entries for running the quantized graph (precision.FLOAT_QDQ: as TensorRT computes, see there).
    """
    from onnxruntime.quantization.calibrate import load_tensors_data

    from bridge_export.runtime.sessions import OrtSession

    cache = {} if cache is None else cache
    if "ref" not in cache:  # the fp32 graph's outputs on the held-out feeds, run once
        cache["ref"] = _Recorded(OrtSession(src), held_feeds)
    ref = cache["ref"]
    kept = list(start_kept or [])

    def attempt(keep: list[str]) -> tuple[dict, dict[str, float]]:
        how = build(keep)
        cos, _ = output_cosines(ref, OrtSession(dst, session_config=session_config), held_feeds)
        return how, cos

    how, cos = attempt(kept)
    record = {"target_cosine": target, "kept_fp32_for_target": kept, "tries": 1}
    if target is None or meets(cos, target):
        return {**how, **record, "output_cosines": _rounded(cos)}
    progress(f"[precision] {src.stem}: worst output {min(cos, key=cos.get)} cosine {min(cos.values()):.5f} "
             f"< {target}; ranking nodes by sensitivity ...")
    model = onnx.load(str(src), load_external_data=False)
    ranges = {k: v.range_value for k, v in load_tensors_data(dst.with_suffix(".calibration.json")).items()}
    probe = [g[0] for g in shape_groups(calib_feeds + held_feeds)]  # one feed per path: prefill, decode, text
    candidates = [q for q in how["nodes"] if q not in kept]
    measured, known = cache.setdefault("measured", set()), cache.setdefault("sens", {})
    todo = [q for q in candidates if q not in measured]
    if todo:  # each node is measured alone, so earlier rounds' figures stand
        known.update(node_sensitivity(model, todo, capture_inputs(src, probe), ranges, src.parent,
                                      how.get("weight_qmax", INT8_MAX), session_config))
        measured.update(todo)
    sens = {q: known[q] for q in candidates if q in known}
    order = sorted(sens, key=sens.get)
    order += [q for q in how["nodes"] if q not in kept and q not in sens]  # unmeasured ones last
    steps = sorted({min(2 ** i, len(order)) for i in range(len(order).bit_length() + 1)})
    best, last, lo = None, None, 0  # best: (k, how, cos) for the smallest k known to meet the target
    for k in steps:
        how, cos = attempt(kept + order[:k])
        record["tries"], last = record["tries"] + 1, k
        progress(f"[precision] {src.stem}: {k} most sensitive node(s) in fp32 -> worst cosine {min(cos.values()):.5f}")
        if meets(cos, target):
            best = (k, how, cos)
            break
        lo = k
    if best is None:
        record.update(kept_fp32_for_target=kept + order, met=False)
        return {**how, **record, "output_cosines": _rounded(cos), "sensitivity_db": _rounded(sens, 2)}
    while best[0] - lo > 1:
        mid = (lo + best[0]) // 2
        how, cos = attempt(kept + order[:mid])
        record["tries"], last = record["tries"] + 1, mid
        if meets(cos, target):
            best = (mid, how, cos)
        else:
            lo = mid
    k, how, cos = best
    if last != k:  # leave the chosen build in dst
        attempt(kept + order[:k])
        record["tries"] += 1
    record.update(kept_fp32_for_target=kept + order[:k], met=True)
    return {**how, **record, "output_cosines": _rounded(cos),
            "sensitivity_db": {n: round(sens[n], 2) for n in order[:k + 4]}}


def _rounded(d: dict[str, float], digits: int = 6) -> dict[str, float]:
    return {k: round(float(v), digits) for k, v in d.items()}
