"""Engine sidecars and compatibility checks (plain Python: tested without TensorRT)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


class EngineMismatch(UserError, RuntimeError):
    """An engine built by another TensorRT version or for another GPU than the one here."""


def read_sidecar(engine_path) -> dict:
    """The JSON sidecar written beside an engine by `bridge-export engine`."""
    p = Path(engine_path).with_suffix(".json")
    if not p.is_file():
        raise EngineMismatch(f"{p} is missing: engines must be built by `bridge-export engine`, which writes it")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatch(f"{p} is not valid JSON ({e}): rebuild the engine") from e


def check_engine_compat(side: dict, trt_version: str, gpu_name: str, compute_capability: str) -> None:
    """Raise EngineMismatch naming both sides when the engine cannot run here."""
    built_major_minor = ".".join(side["tensorrt_version"].split(".")[:2])
    here_major_minor = ".".join(trt_version.split(".")[:2])
    if built_major_minor != here_major_minor and not side.get("version_compatible"):
        raise EngineMismatch(
            f"engine {side['graph']} was built by TensorRT {side['tensorrt_version']} but this is TensorRT "
            f"{trt_version}: rebuild it here with `bridge-export engine` (or build with --version-compatible)"
        )
    if side["compute_capability"] != compute_capability and not side.get("hardware_compatible"):
        raise EngineMismatch(
            f"engine {side['graph']} was built for {side['gpu']} (compute capability {side['compute_capability']}) "
            f"but this GPU is {gpu_name} ({compute_capability}): rebuild it on this GPU (or build with "
            "--hardware-compatible for Ampere and newer)"
        )
