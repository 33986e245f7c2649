"""The precision names, in one registry: what each means and which operator target it implies.

Torch-free so that the CLI's help and the runtime can list them on a base install. A new precision
is one entry here; the exporter's writers check the names they implement themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

from bridge_export.runtime.errors import UserError

TARGETS = ("tensorrt", "onnxruntime")


@dataclass(frozen=True)
class Precision:
    """One precision: its name, a one-line description, and the operator targets it can be written for.

    `targets[0]` is the default target: `tensorrt` means portable ONNX (standard operators; onnxruntime
    runs it too), `onnxruntime` means onnxruntime's fused contrib operators.
    """

    name: str
    description: str
    targets: tuple[str, ...]

    @property
    def default_target(self) -> str:
        """The operator target used when none is asked for."""
        return self.targets[0]


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "full precision: the reference for every accuracy figure", ("tensorrt", "onnxruntime")),
    Precision("fp16", "FP16 weights and compute, sensitive operators kept in fp32", ("tensorrt", "onnxruntime")),
    Precision("int8", "static Q/DQ INT8 calibrated on your images (TensorRT; --target onnxruntime: 7-bit weights "
              "for onnxruntime CPUs)", ("tensorrt", "onnxruntime")),
    Precision("int8-cpu", "dynamic INT8 MatMuls (onnxruntime CPU)", ("onnxruntime",)),
    Precision("int4-cpu", "4-bit block-quantized weights, MatMulNBits (onnxruntime CPU/CUDA): fastest decode",
              ("onnxruntime",)),
    Precision("fp8", "E4M3 FP8 Q/DQ calibrated on your images (TensorRT, GPUs of compute capability 8.9+)",
              ("tensorrt",)),
)}


class PrecisionError(UserError, ValueError):
    """An unknown precision name, or a precision asked for a target it cannot be written for."""


def resolve(name: str, target: str | None = None) -> tuple[Precision, str]:
    """(the precision, its operator target): `target` checked against what `name` allows, else its default."""
    if name not in PRECISIONS:
        raise PrecisionError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    p = PRECISIONS[name]
    if target is None:
        return p, p.default_target
    if target not in p.targets:
        raise PrecisionError(f"--precision {name} is written for {' or '.join(p.targets)} only, not --target "
                             f"{target}: drop --target or choose another precision")
    return p, target
