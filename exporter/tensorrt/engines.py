"""TensorRT engines from a bundle: profiles, precision plans, sidecars, trtexec scripts, and the build.

Everything but `build_engines` is plain Python over the manifest and is tested without TensorRT.
TensorRT 10 (JetPack 6) takes FP16/INT8 builder flags on a weakly typed network; TensorRT 11
removed them, so there the network is strongly typed and precision comes from the ONNX graph
(FP16 types, explicit Q/DQ) — which is where our precision bundles put it anyway.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.manifest import GRAPHS, Limits, read_manifest
from bridge_export.runtime.progress import get_logger, reporter
from bridge_export.runtime.gpu.trt_compat import TEMPLATE_SUFFIX, EngineMismatch, check_engine_compat  # noqa: F401 (re-exported)

from bridge_export.exporter.errors import ExportError
from bridge_export.exporter.output import atomic_file, owned_folder
from bridge_export.exporter.tensorrt.profiles import from_json, graph_profiles

log = get_logger(__name__)


class TensorRTUnavailable(UserError, RuntimeError):
    """TensorRT (or a GPU) is not available here."""


@dataclass
class EngineOptions:
    """What `bridge-export engine` builds and how."""

    graphs: list[str] = field(default_factory=lambda: list(GRAPHS))
    max_batch: int | None = None
    max_seq: int | None = None
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False


def engine_profiles(manifest, graph: str, opts: EngineOptions) -> list[dict[str, tuple]]:
    """Optimization profiles (input -> (min, opt, max)): the manifest's, or recomputed for the user's limits.

    Torch-free: recomputing needs only the manifest's dims and KV layout (bridge_export.exporter.tensorrt.profiles).
    """
    stored = manifest.limits
    limits = Limits(max_batch=opts.max_batch or stored.max_batch,
                    max_seq=stored.max_seq if opts.max_seq is None else opts.max_seq)
    info = manifest.graph(graph)
    if limits == stored and info.tensorrt_profiles:
        return from_json(info.tensorrt_profiles)
    return graph_profiles(graph, manifest.dims, manifest.kv_layout, limits)


ONNXRUNTIME_ONLY = {"int8-cpu": "MatMulInteger/DynamicQuantizeLinear", "int4-cpu": "MatMulNBits/GatherBlockQuantized"}


def refuse_onnxruntime_only(precision: str) -> None:
    """Raise for precisions TensorRT cannot parse (onnxruntime contrib/integer ops), saying what to build from."""
    if precision in ONNXRUNTIME_ONLY:
        raise ValueError(f"this {precision} bundle is onnxruntime-only ({ONNXRUNTIME_ONLY[precision]}, which TensorRT "
                         "does not parse): build engines from the fp32, fp16 or int8 (Q/DQ) bundle")
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"TensorRT cannot build a {precision!r} bundle: build from the fp32, fp16 or int8 bundle")


def check_graphs(man, opts: EngineOptions) -> None:
    """ValueError unless `opts.graphs` names at least one graph, each one of the bundle's."""
    if not opts.graphs:
        raise ValueError(f"no graphs to build: give --graphs with one or more of {', '.join(man.graphs)}")
    unknown = [g for g in opts.graphs if g not in man.graphs]
    if unknown:
        raise ValueError(f"the bundle has no graph {unknown[0]!r}: choose from {', '.join(man.graphs)}")


def precision_plan(trt_major: int, precision: str) -> dict:
    """How to build a graph of `precision` on TensorRT `trt_major`: network typing and builder flags."""
    refuse_onnxruntime_only(precision)
    if trt_major >= 11:
        return {"strongly_typed": True, "builder_flags": [], "trtexec_flags": ["--stronglyTyped"]}
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    return {"strongly_typed": False, "builder_flags": flags,
            "trtexec_flags": [f"--{f.lower()}" for f in flags]}


def _shape(s) -> str:
    return "x".join(str(d) for d in s)


def trtexec_command(onnx_path: Path, engine_path: Path, profiles: list[dict], plan: dict,
                    opts: EngineOptions) -> str:
    """The trtexec command that builds the same engine (for building on a Jetson)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--memPoolSize=workspace:{int(opts.workspace_gib * 1024)}M"]
    for prof in profiles:  # one set of shape flags per optimization profile
        for key, idx in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)):
            args.append(f"--{key}=" + ",".join(f"{n}:{_shape(v[idx])}" for n, v in prof.items()))
    args += plan["trtexec_flags"]
    if opts.timing_cache:
        args.append(f"--timingCacheFile={opts.timing_cache}")
    if opts.version_compatible:
        args.append("--versionCompatible")
    if opts.hardware_compatible:
        args.append("--hardwareCompatibilityLevel=ampere+")
    return " ".join(shlex.quote(a) for a in args)


def write_trtexec_script(bundle, out_dir, opts: EngineOptions, trt_major: int = 10) -> Path:
    """Write build_engines.sh with one trtexec command per graph (TensorRT 10 flags by default), and per
    graph a sidecar template `<graph>.json.in` that the script stamps after each build
    (`python3 -m bridge_export.runtime.gpu.trt_compat stamp`: TensorRT version and GPU filled in on the device)."""
    man = read_manifest(bundle, verify_checksums=False)
    refuse_onnxruntime_only(man.precision.mode)
    check_graphs(man, opts)
    plan = precision_plan(trt_major, man.precision.mode)
    profiles_of = {g: engine_profiles(man, g, opts) for g in opts.graphs}  # what can fail, before any write
    out_dir = owned_folder(out_dir, "engines", legacy=_legacy_engine_dir)
    lines = ["#!/usr/bin/env bash", "# Build the bundle's TensorRT engines on the target device (e.g. a Jetson).",
             f"# precision: {man.precision.mode}; flags for TensorRT {trt_major}.x", "set -euo pipefail",
             'cd "$(dirname "$0")"']
    for g in opts.graphs:
        profiles = profiles_of[g]
        cmd = trtexec_command(Path("..") / man.graph(g).file if out_dir == man.root / "engines"
                              else man.graph_path(g).absolute(), Path(f"{g}.engine"), profiles, plan, opts)
        # the sidecar minus what only the device knows; stamped after the build so runtime.load accepts the engine
        template = sidecar(man, g, None, None, None, profiles, plan, opts)
        template["tensorrt_major"] = trt_major
        with atomic_file(out_dir / f"{g}{TEMPLATE_SUFFIX}") as tmp:
            tmp.write_text(json.dumps(template, indent=1))
        lines += [f"echo 'building {g}'", cmd,
                  f'"${{PYTHON:-python3}}" -m bridge_export.runtime.gpu.trt_compat stamp {shlex.quote(g + TEMPLATE_SUFFIX)}']
    path = out_dir / "build_engines.sh"
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o755)
    return path


def _legacy_engine_dir(path: Path) -> bool:
    """A folder an earlier version filled: only engines, their JSON sidecars and the trtexec script."""
    return all(p.suffix in (".engine", ".json") or p.name == "build_engines.sh" or p.name.endswith(TEMPLATE_SUFFIX)
               for p in path.iterdir())


def sidecar(man, graph: str, trt_version: str, gpu_name: str, compute_capability: str, profiles, plan,
            opts: EngineOptions) -> dict:
    """The JSON written beside each engine; the runtime checks it before deserializing."""
    weights = man.files.get(man.weights)
    return {"graph": graph, "source_onnx": man.graph(graph).file,
            "source_sha256": man.files[man.graph(graph).file].sha256,
            "weights_sha256": weights.sha256 if weights else None,
            "precision": man.precision.mode, "tensorrt_version": trt_version, "gpu": gpu_name,
            "compute_capability": compute_capability, "version_compatible": opts.version_compatible,
            "hardware_compatible": opts.hardware_compatible, "strongly_typed": plan["strongly_typed"],
            "builder_flags": plan["builder_flags"],
            "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]}


def build_engines(bundle, out_dir, opts: EngineOptions, progress=None) -> list[Path]:
    """Build one engine per graph with the TensorRT Python API (the only code here that needs TensorRT)."""
    progress = reporter(progress, log)
    man = read_manifest(bundle)
    refuse_onnxruntime_only(man.precision.mode)
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable("TensorRT is not installed: pip install tensorrt on a machine with an NVIDIA "
                                  "GPU, or use --emit-trtexec and build on the device") from e
    from bridge_export.runtime.gpu.cuda import device_info

    check_graphs(man, opts)
    out_dir = owned_folder(out_dir, "engines", legacy=_legacy_engine_dir)
    major = int(trt.__version__.split(".")[0])
    gpu_name, cc = device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = opts.timing_cache.read_bytes() if opts.timing_cache and opts.timing_cache.is_file() else b""
    built = []
    plan = precision_plan(major, man.precision.mode)
    for g in opts.graphs:
        profiles = engine_profiles(man, g, opts)
        progress(f"[engine] {g}: TensorRT {trt.__version__}, {man.precision.mode}, {len(profiles)} profile(s) ...")
        flags = 0
        if plan["strongly_typed"] and major < 11:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(man.graph_path(g))):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse {man.graph_path(g)}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
        for f in plan["builder_flags"]:
            config.set_flag(getattr(trt.BuilderFlag, f))
        if opts.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if opts.hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        for prof in profiles:
            p = builder.create_optimization_profile()
            for name, (mn, opt, mx) in prof.items():
                p.set_shape(name, mn, opt, mx)
            config.add_optimization_profile(p)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ExportError(f"TensorRT failed to build {g}; see the log above")
        path = out_dir / f"{g}.engine"
        with atomic_file(path) as tmp:
            tmp.write_bytes(bytes(blob))
        cache_bytes = bytes(config.get_timing_cache().serialize())
        side = sidecar(man, g, trt.__version__, gpu_name, cc, profiles, plan, opts)
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(side, indent=2))
        built.append(path)
        progress(f"[engine] {g}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if opts.timing_cache:
        with atomic_file(opts.timing_cache) as tmp:
            tmp.write_bytes(cache_bytes)
    return built


__all__ = ["EngineOptions", "engine_profiles", "precision_plan", "trtexec_command", "write_trtexec_script",
           "sidecar", "build_engines", "check_engine_compat", "EngineMismatch", "TensorRTUnavailable"]
