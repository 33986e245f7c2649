"""What the Q/DQ precisions (int8, fp8) share: which nodes to quantize, calibrated ranges, node order.

Its own module so that precision (which dispatches to fp8) and fp8 (which reuses these) import it
and not each other.
"""
from __future__ import annotations

from pathlib import Path

import onnx

# Sensitive ops kept out of INT8 by default: names matched against node names / op types.
DEFAULT_INT8_EXCLUDE = ["norm", "Softmax", "lm_head", "clip_projector"]


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


QUANT_OPS = ["MatMul", "Conv", "Gemm"]


def histogram_ranges(src: Path, feeds: list[dict], method, cache: Path, progress) -> None:
    """Entropy/percentile tensor ranges with onnxruntime's calibrator, one collect per feed shape.

    The histograms merge across collect_data calls; the ranges go to `cache` (onnxruntime's
    calibration cache), which quantize_static then reads instead of calibrating again.
    """
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from bridge_export.exporter.quantize.calibration import FeedReader, shape_groups

    with tempfile.TemporaryDirectory(prefix="bridge-export-calib-") as tmp:
        cal = create_calibrator(src, QUANT_OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=method, use_external_data_format=True,
                                extra_options={"symmetric": True})
        for group in shape_groups(feeds):
            cal.collect_data(FeedReader(group, progress, src.stem))
            cal.clear_collected_data()
        save_tensors_data(cal.compute_data(), cache)
