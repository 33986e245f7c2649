"""Graph checks every bundle passes: onnx.checker with full shape inference, no If/Loop, TensorRT ops."""
from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import onnx

from bridge_export.runtime.errors import UserError

FORBIDDEN = {"If", "Loop", "Scan"}  # TensorRT cannot build If-merged decoders
CPU_ONLY = {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger"}  # onnxruntime CPU int8, not TensorRT


class GraphCheckError(UserError, ValueError):
    """A graph that TensorRT or onnxruntime would reject."""


def trt_supported_ops() -> set[str]:
    """Operators TensorRT 10.0's ONNX parser supports (opsets 9-20), from the shipped table."""
    text = resources.files("bridge_export.exporter").joinpath("data/tensorrt-10.0-onnx-operators.tsv").read_text()
    return {row["operator"] for row in csv.DictReader(text.splitlines(), delimiter="\t") if row["supported"] == "Y"}


def check_graph(path: Path, tensorrt: bool = True) -> dict:
    """Run the checks on one graph; returns {'ops': [...], 'opset': n}; raises GraphCheckError."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # checker raises ValidationError / InferenceError
        raise GraphCheckError(f"{path.name}: onnx.checker failed: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    ops = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")})
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    bad = FORBIDDEN.intersection(ops)
    if bad:
        raise GraphCheckError(f"{path.name} contains {sorted(bad)} nodes, which TensorRT cannot build")
    if tensorrt:
        if opset > 20:
            raise GraphCheckError(f"{path.name} uses opset {opset}; TensorRT 10 (JetPack 6) parses up to 20")
        unsupported = sorted(set(ops) - trt_supported_ops())
        if unsupported:
            raise GraphCheckError(f"{path.name} uses ops outside TensorRT 10's ONNX parser list: {unsupported}")
        _check_qdq(model, path)
    return {"ops": ops, "opset": opset}


def _check_qdq(model: onnx.ModelProto, path: Path) -> None:
    """TensorRT accepts only symmetric Q/DQ: every zero point must be 0."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]], base_dir=str(path.parent))
            if zp.any():
                raise GraphCheckError(f"{path.name}: {n.name} has a non-zero zero point; TensorRT needs symmetric Q/DQ")
