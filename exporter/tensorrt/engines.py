"""TensorRT engines from a bundle: profiles, precision plans, sidecars, trtexec scripts, and the build.

Everything but `build_engines` is plain Python over the manifest and is tested without TensorRT.
Precision lives in the ONNX graph (fp16 types with fp32 islands, explicit int8/fp8 Q/DQ), so on
TensorRT >= 10 every graph is built *strongly typed*: TensorRT keeps each tensor's ONNX type, and
the fp32 islands of an fp16 bundle (norms, the softmax chain with its mask, RoPE tables, logits)
stay fp32. A weakly typed build with `--fp16` would let TensorRT run those islands in half
precision, where LayerNorm/softmax overflow. Where a strongly typed build is not possible (TensorRT
older than 10, or a layer the strongly typed build rejects) the fallback is weakly typed with the
fp32 islands pinned (OBEY_PRECISION_CONSTRAINTS and per-layer precision/output types), recorded in
the build log and the engine's sidecar.

The build goes through Polygraphy's loaders (NetworkFromOnnxPath, CreateConfig, EngineFromNetwork,
SaveEngine): the path NVIDIA's own tools test. What stays hand-written, and why: the optimization
profiles (computed from the manifest's dims and limits, torch-free, so a Jetson can recompute them),
the sidecar (our own compatibility record, which TensorRT has no equivalent of), and the trtexec
script (for devices where the Python build is not wanted; trtexec is JetPack's own builder).
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
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8", "fp8")
STRONGLY_TYPED_SINCE = 10  # TensorRT 9 had strongly typed networks as an LLM-only release; JetPack 6 ships 10.x
WEAKLY_TYPED_UNTIL = 10  # TensorRT 11 removed the FP16/INT8/FP8 builder flags: strongly typed only
FP8_MIN_CC = "8.9"  # FP8 (E4M3) tensor cores: Ada (8.9) and Hopper (9.0) or newer


def refuse_onnxruntime_only(precision: str) -> None:
    """Raise for precisions TensorRT cannot parse (onnxruntime contrib/integer ops), saying what to build from."""
    if precision in ONNXRUNTIME_ONLY:
        raise ValueError(f"this {precision} bundle is onnxruntime-only ({ONNXRUNTIME_ONLY[precision]}, which TensorRT "
                         "does not parse): build engines from the fp32, fp16, int8 (Q/DQ) or fp8 (Q/DQ) bundle")
    if precision not in TENSORRT_PRECISIONS:
        raise ValueError(f"TensorRT cannot build a {precision!r} bundle: build from the fp32, fp16, int8 or fp8 bundle")


def check_graphs(man, opts: EngineOptions) -> None:
    """ValueError unless `opts.graphs` names at least one graph, each one of the bundle's and portable
    (a graph whose operator target is onnxruntime, e.g. the fused decoder, is refused in one line)."""
    if not opts.graphs:
        raise ValueError(f"no graphs to build: give --graphs with one or more of {', '.join(man.graphs)}")
    unknown = [g for g in opts.graphs if g not in man.graphs]
    if unknown:
        raise ValueError(f"the bundle has no graph {unknown[0]!r}: choose from {', '.join(man.graphs)}")
    ort_only = [g for g in opts.graphs if man.graphs[g].operator_target == "onnxruntime"]
    if ort_only:
        raise ValueError(f"{ort_only[0]} of this bundle uses onnxruntime's fused operators (operator target "
                         "onnxruntime), which TensorRT does not parse: export the bundle with --target tensorrt "
                         f"for engines, or leave {ort_only[0]} out of --graphs")


def precision_plan(trt_major: int, precision: str, fp32_layers=(), fallback: str | None = None) -> dict:
    """How to build a graph of `precision` on TensorRT `trt_major`: network typing and builder flags.

    Strongly typed on TensorRT >= 10 (the ONNX graph's types are the engine's: no FP16/INT8/FP8 flags, TF32
    off so fp32 stays fp32). `fallback` (why the strongly typed build cannot be used) or an older TensorRT
    gives the weakly typed plan: fp16 with `fp32_layers` (the bundle's fp32 islands) pinned to fp32 by
    precision constraints; int8 / fp8 with only their own flag, so unquantized layers stay fp32 as in the
    strongly typed build. Keys: typing, strongly_typed, builder_flags (trt.BuilderFlag names), pinned_fp32
    (layer names), trtexec_flags, fallback.
    """
    refuse_onnxruntime_only(precision)
    if precision == "fp8" and trt_major < 10:
        raise ValueError(f"fp8 (E4M3 Q/DQ) engines need TensorRT 10 or newer, not {trt_major}.x: build from the "
                         "fp16 or int8 bundle")
    if trt_major >= STRONGLY_TYPED_SINCE and fallback is None:
        return {"typing": "strong", "strongly_typed": True, "builder_flags": [], "pinned_fp32": [],
                "trtexec_flags": ["--stronglyTyped", "--noTF32"], "fallback": None}
    if trt_major > WEAKLY_TYPED_UNTIL:
        raise ValueError(f"TensorRT {trt_major}.x builds strongly typed networks only and that failed ({fallback}); "
                         "see the TensorRT log above")
    reason = fallback or f"TensorRT {trt_major}.x has no strongly typed networks"
    pinned = sorted(fp32_layers) if precision == "fp16" else []
    flags = {"fp32": [], "fp16": ["FP16", "OBEY_PRECISION_CONSTRAINTS"], "int8": ["INT8"], "fp8": ["FP8"]}[precision]
    trtexec = [f"--{f.lower()}" for f in flags if f != "OBEY_PRECISION_CONSTRAINTS"] + ["--noTF32"]
    listed = [n for n in pinned if "," not in n]  # trtexec splits its layer lists at commas
    if listed:
        trtexec += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in listed),
                    "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in listed)]
    return {"typing": "weak", "strongly_typed": False, "builder_flags": flags, "pinned_fp32": pinned,
            "trtexec_flags": trtexec, "fallback": reason}


def fp32_islands(man, graph: str) -> list[str]:
    """Node names an fp16 graph keeps in fp32, as `precision --precision fp16` recorded them (`how.fp32_node_names`).
    Empty for other precisions, and (with a warning) for fp16 bundles made before the names were recorded:
    reading them from the graph would need onnx, which `engine` does not (it runs on a bare Jetson)."""
    if man.graph(graph).precision != "fp16" and man.precision.mode != "fp16":
        return []
    names = (man.graph(graph).how or {}).get("fp32_node_names")
    if names is None:
        log.warning("%s: the bundle does not list its fp32 layers (make the fp16 bundle again to record them): "
                    "none pinned", graph)
        return []
    return list(names)


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
    (`python3 -m bridge_export.runtime.gpu.trt_compat stamp`: TensorRT version and GPU filled in on the device).

    An fp8 bundle's script first checks the device's compute capability (>= 8.9) and stops with one line
    naming it otherwise, before anything is built."""
    man = read_manifest(bundle, verify_checksums=False)
    mode = man.precision.mode
    refuse_onnxruntime_only(mode)
    check_graphs(man, opts)
    precision_plan(trt_major, mode)  # refuses what this TensorRT cannot build, before any write
    plans = {g: precision_plan(trt_major, mode, fp32_islands(man, g) if trt_major < STRONGLY_TYPED_SINCE else ())
             for g in opts.graphs}
    profiles_of = {g: engine_profiles(man, g, opts) for g in opts.graphs}  # what can fail, before any write
    out_dir = owned_folder(out_dir, "engines", legacy=_legacy_engine_dir)
    python = '"${PYTHON:-python3}"'
    lines = ["#!/usr/bin/env bash", "# Build the bundle's TensorRT engines on the target device (e.g. a Jetson).",
             f"# precision: {mode}; flags for TensorRT {trt_major}.x "
             f"({'strongly typed' if trt_major >= STRONGLY_TYPED_SINCE else 'weakly typed, fp32 islands pinned'})",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    if mode == "fp8":  # trtexec would fail late and unclearly on a GPU without FP8 tensor cores
        lines.append(f"{python} -m bridge_export.runtime.gpu.trt_compat require-cc {FP8_MIN_CC} fp8")
    for g in opts.graphs:
        profiles, plan = profiles_of[g], plans[g]
        cmd = trtexec_command(Path("..") / man.graph(g).file if out_dir == man.root / "engines"
                              else man.graph_path(g).absolute(), Path(f"{g}.engine"), profiles, plan, opts)
        # the sidecar minus what only the device knows; stamped after the build so runtime.load accepts the engine
        template = sidecar(man, g, None, None, None, profiles, plan, opts)
        template["tensorrt_major"] = trt_major
        with atomic_file(out_dir / f"{g}{TEMPLATE_SUFFIX}") as tmp:
            tmp.write_text(json.dumps(template, indent=1))
        lines += [f"echo 'building {g}'", cmd,
                  f"{python} -m bridge_export.runtime.gpu.trt_compat stamp {shlex.quote(g + TEMPLATE_SUFFIX)}"]
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
    """The JSON written beside each engine; the runtime checks it before deserializing. It records how the
    network was typed (`typing`, the fp32 layers pinned, and why a strongly typed build was not used)."""
    weights = man.files.get(man.weights)
    return {"graph": graph, "source_onnx": man.graph(graph).file,
            "source_sha256": man.files[man.graph(graph).file].sha256,
            "weights_sha256": weights.sha256 if weights else None,
            "precision": man.precision.mode, "tensorrt_version": trt_version, "gpu": gpu_name,
            "compute_capability": compute_capability, "version_compatible": opts.version_compatible,
            "hardware_compatible": opts.hardware_compatible, "strongly_typed": plan["strongly_typed"],
            "typing": plan["typing"], "typing_fallback": plan["fallback"],
            "builder_flags": plan["builder_flags"], "pinned_fp32_layers": len(plan["pinned_fp32"]),
            "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]}


def pin_fp32(names):
    """A Polygraphy PostprocessNetwork function pinning the named layers (the ONNX nodes of the fp32 islands;
    the parser names a node's layer after it) to fp32 compute and fp32 float outputs. Polygraphy's
    SetLayerPrecisions sets only the compute precision, and a half output would undo the island."""
    wanted = set(names)

    def pin(network):
        import tensorrt as trt

        floats = (trt.float32, trt.float16)
        for layer in network:
            if layer.name in wanted:
                layer.precision = trt.float32
                for i in range(layer.num_outputs):
                    if layer.get_output(i).dtype in floats:
                        layer.set_output_type(i, trt.float32)
    pin.__name__ = f"pin_fp32_{len(wanted)}_layers"
    return pin


def engine_loader(trt, onnx_path, engine_path, profiles, plan: dict, opts: EngineOptions):
    """Polygraphy's loader chain that builds one engine and saves it at `engine_path` (call it to build).

    `trt` is the imported tensorrt module (only its enums are read here; the loaders import TensorRT when
    called), so the chain can be built and inspected without a GPU.
    """
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessNetwork,
                                        Profile, SaveEngine)

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan["strongly_typed"])
    if plan["pinned_fp32"]:
        network = PostprocessNetwork(network, pin_fp32(plan["pinned_fp32"]), name="pin fp32 islands")
    trt_profiles = []
    for prof in profiles:
        p = Profile()
        for name, (mn, opt, mx) in prof.items():
            p.add(name, min=list(mn), opt=list(opt), max=list(mx))
        trt_profiles.append(p)
    flags = set(plan["builder_flags"])
    cache = str(opts.timing_cache) if opts.timing_cache else None
    config = CreateConfig(
        tf32=False, fp16="FP16" in flags, int8="INT8" in flags, fp8="FP8" in flags,
        precision_constraints="obey" if "OBEY_PRECISION_CONSTRAINTS" in flags else None,
        profiles=trt_profiles, memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(opts.workspace_gib * (1 << 30))},
        load_timing_cache=cache if cache and Path(cache).is_file() else None,
        version_compatible=opts.version_compatible or None,
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if opts.hardware_compatible else None)
    return SaveEngine(EngineFromNetwork(network, config, save_timing_cache=cache), path=str(engine_path))


def _build(trt, onnx_path, path: Path, profiles, plan, opts) -> None:
    """Run the loader chain into a temporary file renamed to `path` when complete; ExportError on failure."""
    from polygraphy.exception import PolygraphyException

    with atomic_file(path) as tmp:
        try:
            engine_loader(trt, onnx_path, tmp, profiles, plan, opts)()
        except PolygraphyException as e:
            raise ExportError(f"TensorRT failed to build {path.stem} ({plan['typing']}ly typed): "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'see the log above'}") from e
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ExportError(f"TensorRT wrote no engine for {path.stem}; see the log above")


def build_engines(bundle, out_dir, opts: EngineOptions, progress=None) -> list[Path]:
    """Build one engine per graph with Polygraphy's TensorRT loaders (the only code here that needs TensorRT).

    Strongly typed first (TensorRT >= 10); if that build fails on TensorRT 10, the graph is built weakly typed
    with its fp32 islands pinned, and the log and sidecar say so. fp8 is refused, in one line naming the
    compute capability it needs, on GPUs below 8.9.
    """
    progress = reporter(progress, log)
    man = read_manifest(bundle)
    mode = man.precision.mode
    refuse_onnxruntime_only(mode)
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable("TensorRT is not installed: pip install tensorrt on a machine with an NVIDIA "
                                  "GPU, or use --emit-trtexec and build on the device") from e
    from bridge_export.runtime.gpu.cuda import device_info
    from bridge_export.runtime.gpu.trt_compat import require_compute_capability

    check_graphs(man, opts)
    major = int(trt.__version__.split(".")[0])
    gpu_name, cc = device_info()
    if mode == "fp8":
        require_compute_capability(cc, FP8_MIN_CC, "fp8 engines (E4M3 Q/DQ)", gpu_name)
    first = precision_plan(major, mode)  # refuses what this TensorRT cannot build, before any write
    out_dir = owned_folder(out_dir, "engines", legacy=_legacy_engine_dir)
    built = []
    for g in opts.graphs:
        profiles = engine_profiles(man, g, opts)
        plan = first if first["strongly_typed"] else precision_plan(major, mode, fp32_islands(man, g))
        progress(f"[engine] {g}: TensorRT {trt.__version__}, {mode}, {plan['typing']}ly typed, "
                 f"{len(profiles)} profile(s) ...")
        path = out_dir / f"{g}.engine"
        try:
            _build(trt, man.graph_path(g), path, profiles, plan, opts)
        except ExportError as e:
            if not plan["strongly_typed"] or major > WEAKLY_TYPED_UNTIL:
                raise
            plan = precision_plan(major, mode, fp32_islands(man, g), fallback=f"strongly typed build failed: {e}")
            progress(f"[engine] {g}: warning: the strongly typed build failed ({e}); building weakly typed with "
                     f"{len(plan['pinned_fp32'])} fp32 layer(s) pinned by precision constraints")
            _build(trt, man.graph_path(g), path, profiles, plan, opts)
        side = sidecar(man, g, trt.__version__, gpu_name, cc, profiles, plan, opts)
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(side, indent=2))
        built.append(path)
        progress(f"[engine] {g}: {path} ({path.stat().st_size / 1e6:.1f} MB, {plan['typing']}ly typed)")
    return built


__all__ = ["EngineOptions", "engine_profiles", "precision_plan", "trtexec_command", "write_trtexec_script",
           "sidecar", "engine_loader", "build_engines", "check_engine_compat", "EngineMismatch", "TensorRTUnavailable"]
