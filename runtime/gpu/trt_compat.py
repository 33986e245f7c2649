"""Engine sidecars and compatibility checks (plain Python: tested without TensorRT)."""
from __future__ import annotations

import json
from pathlib import Path

from bridge_export.runtime.errors import UserError

TEMPLATE_SUFFIX = ".json.in"  # a sidecar written with the trtexec script, stamped on the device after the build


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


def require_compute_capability(have: str, need: str, what: str, gpu_name: str = "this GPU") -> None:
    """EngineMismatch in one line unless compute capability `have` ('major.minor') is at least `need`."""
    def key(cc):
        major, _, minor = str(cc).partition(".")
        return int(major), int(minor or 0)

    if key(have) < key(need):
        raise EngineMismatch(f"{what} need a GPU of compute capability {need} or newer (Ada, Hopper); {gpu_name} "
                             f"is {have}: build the fp16 or int8 bundle for it instead")


def stamp_sidecar(template, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """Write `<graph>.json` beside `<graph>.engine` from the script's `<graph>.json.in`, with this device's
    TensorRT version and GPU (what `bridge-export engine` records), so the runtime accepts the engine."""
    template = Path(template)
    if not template.name.endswith(TEMPLATE_SUFFIX) or not template.is_file():
        raise EngineMismatch(f"{template} is not a sidecar template ({TEMPLATE_SUFFIX}): run the stamp step from "
                             "build_engines.sh, in the folder it was written to")
    try:
        side = json.loads(template.read_text())
        if not isinstance(side, dict):
            raise ValueError("not a JSON object")
        major = side.pop("tensorrt_major", None)
        major = None if major is None else int(major)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise EngineMismatch(f"{template} is not a valid sidecar template ({e}): write the script again with "
                             "`bridge-export engine BUNDLE --emit-trtexec`") from e
    engine = template.with_name(template.name[: -len(TEMPLATE_SUFFIX)] + ".engine")
    if not engine.is_file() or engine.stat().st_size == 0:
        raise EngineMismatch(f"{engine} is missing or empty: trtexec did not build it (see its output above)")
    if major is not None and int(trt_version.split(".")[0]) != major:
        raise EngineMismatch(f"the script was written for TensorRT {major}.x but this is TensorRT {trt_version}: "
                             f"write it again with `bridge-export engine --emit-trtexec --trt-major "
                             f"{trt_version.split('.')[0]}`")
    side.update(tensorrt_version=trt_version, gpu=gpu_name, compute_capability=compute_capability)
    out = engine.with_suffix(".json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(side, indent=1))
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    """`python -m bridge_export.runtime.gpu.trt_compat stamp GRAPH.json.in`: stamp a trtexec-built engine's sidecar
    here; `... require-cc 8.9 WHAT`: exit 1 with one line unless this GPU has that compute capability."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "require-cc":
        from bridge_export.runtime.gpu.cuda import CudaError, device_info

        try:
            name, cc = device_info(0)
            require_compute_capability(cc, args[1], f"{args[2]} engines", name)
        except (UserError, CudaError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if len(args) != 2 or args[0] != "stamp":
        print("usage: python -m bridge_export.runtime.gpu.trt_compat stamp GRAPH.json.in | require-cc 8.9 fp8",
              file=sys.stderr)
        return 2
    try:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise EngineMismatch("TensorRT's Python package is not importable here (JetPack and NVIDIA's wheels ship "
                                 "it): install it, or build with `bridge-export engine`") from e
        from bridge_export.runtime.gpu.cuda import device_info

        name, cc = device_info(0)
        print(f"wrote {stamp_sidecar(args[1], trt.__version__, name, cc)}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
