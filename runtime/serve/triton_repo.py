"""`bridge-export triton-repo`: a standalone Triton model repository from a bundle.

Layout (every model: config.pbtxt + version 1):
  vision_encoder/, query_bridge/   the two image graphs as onnxruntime-backend (`model.onnx`) or
                                   TensorRT-backend (`model.plan`) models, dynamically batched; with
                                   `--backend python` as Python-backend models on onnxruntime (CPU
                                   variant for Triton builds that have only the Python backend)
  embed_image/, embed_text/,       Python-backend (BLS) entry points running bridge_export.runtime.serve.handlers's
  caption/, caption_stream/        handlers; the text decoder and its KV cache run in process
Bundle files are hard-linked into the repository where the filesystem allows (no extra disk),
copied otherwise; every config.pbtxt is parsed with Triton's own ModelConfig protobuf.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bridge_export.runtime.errors import MissingDependency, UserError
from bridge_export.runtime.write_guard import OutputLock, abandoned, temp_prefix

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
MARKER = "bridge-export-repo.json"  # at the repository root: what wrote it (Triton ignores files there)
BACKENDS = ("onnxruntime", "tensorrt", "python")
GRAPH_MODELS = ("vision_encoder", "query_bridge")
ENTRIES = ("embed_image", "embed_text", "caption", "caption_stream")
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}
# entry point -> ([(input, type, optional)], [(output, type, dims)]); dims "E" = the embedding width
ENTRY_TENSORS = {
    "embed_image": ([("image", "bytes", False), ("mode", "bytes", True)], [("embedding", "float32", "E")]),
    "embed_text": ([("text", "bytes", False)], [("embedding", "float32", "E")]),
    "caption": ([("image", "bytes", False), ("prompt", "bytes", True), ("max_new_tokens", "int32", True),
                 ("num_beams", "int32", True)], [("text", "bytes", "1")]),
    "caption_stream": ([("image", "bytes", False), ("prompt", "bytes", True), ("max_new_tokens", "int32", True),
                        ("num_beams", "int32", True)], [("text", "bytes", "1")]),
}


class RepoError(UserError, ValueError):
    """The repository cannot be written as asked: the message says what to change."""


@dataclass
class RepoOptions:
    """What the repository serves and how."""

    backend: str = "onnxruntime"  # graph models: onnxruntime | tensorrt | python (CPU variant)
    max_batch: int | None = None  # default: the bundle's export limit (TensorRT: the profiles' largest batch)
    instances: int = 1  # instances of each graph model per GPU (or on the CPU)
    entry_instances: int = 1  # instances of each Python entry model (each holds its own text decoder)
    queue_delay_us: int = 2000  # dynamic batcher's wait for more requests
    ort_tensorrt: bool = False  # onnxruntime backend: use its TensorRT execution provider with the profiles
    gpu: bool = True  # KIND_GPU instances (False: KIND_CPU)
    threads: int = 0  # onnxruntime intra-op threads in the Python models (0: onnxruntime's default)


def _q(s: str) -> str:
    return json.dumps(s)


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in shape) + " ]"


def _tensor(kind: str, name: str, dtype: str, dims, optional: bool = False) -> str:
    opt = "\n    optional: true" if optional else ""
    return f"  {{\n    name: {_q(name)}\n    data_type: {_TYPES[dtype]}\n    dims: {dims}{opt}\n  }}"


def _block(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _params(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}\n" for k, v in params.items())


def _instances(count: int, gpu: bool, profiles: list[str] | None = None) -> str:
    prof = "".join(f" profile: {_q(p)}" for p in profiles or [])
    return f"instance_group [ {{ count: {count} kind: {'KIND_GPU' if gpu else 'KIND_CPU'}{prof} }} ]\n"


def _shape_list(profile: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in profile.items())


def graph_config(name: str, graph, opts: RepoOptions, max_batch: int) -> str:
    """config.pbtxt of the vision encoder or query bridge graph model (`graph`: the manifest's GraphInfo)."""
    ins = [_tensor("input", t.name, t.dtype, _dims(t.shape[1:])) for t in graph.inputs]
    outs = [_tensor("output", t.name, t.dtype, _dims(t.shape[1:])) for t in graph.outputs]
    text = f"name: {_q(name)}\n"
    profiles = graph.tensorrt_profiles or []
    if opts.backend == "onnxruntime":
        text += 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n'
    elif opts.backend == "tensorrt":
        text += 'backend: "tensorrt"\ndefault_model_filename: "model.plan"\n'
    else:
        text += 'backend: "python"\n'
    text += f"max_batch_size: {max_batch}\n" + _block("input", ins) + _block("output", outs)
    text += f"dynamic_batching {{ max_queue_delay_microseconds: {opts.queue_delay_us} }}\n"
    trt_profiles = [str(i) for i in range(len(profiles))] if opts.backend == "tensorrt" else None
    text += _instances(opts.instances, opts.gpu and opts.backend != "python", trt_profiles)
    if opts.backend == "onnxruntime" and opts.ort_tensorrt and profiles:
        p = profiles[0]  # the image graphs have one profile: batch 1 .. max
        text += ("optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
                 '  name: "tensorrt"\n'
                 f'  parameters {{ key: "trt_profile_min_shapes" value: {_q(_shape_list(p, 0))} }}\n'
                 f'  parameters {{ key: "trt_profile_opt_shapes" value: {_q(_shape_list(p, 1))} }}\n'
                 f'  parameters {{ key: "trt_profile_max_shapes" value: {_q(_shape_list(p, 2))} }}\n'
                 '  parameters { key: "trt_engine_cache_enable" value: "1" }\n'
                 "} ] } }\n")
    if opts.backend == "python":
        text += _params({"graph": name, "threads": str(opts.threads)})
    return text


def entry_config(entry: str, embed_dim: int, opts: RepoOptions, max_batch: int, bls: dict[str, str],
                 decoder_target: str = "tensorrt") -> str:
    """config.pbtxt of a Python-backend entry point; a decoder whose operator target is onnxruntime (the
    fused decoder) runs on onnxruntime whatever the graph models' backend."""
    ins, outs = ENTRY_TENSORS[entry]
    stream = entry == "caption_stream"
    text = f'name: {_q(entry)}\nbackend: "python"\nmax_batch_size: {1 if stream else max_batch}\n'
    text += _block("input", [_tensor("input", n, t, "[ 1 ]", opt) for n, t, opt in ins])
    text += _block("output", [_tensor("output", n, t, f"[ {embed_dim if d == 'E' else d} ]") for n, t, d in outs])
    if stream:
        text += "model_transaction_policy { decoupled: true }\n"
    else:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {opts.queue_delay_us} }}\n"
    text += _instances(opts.entry_instances, opts.gpu and opts.backend != "python")
    decoder = "tensorrt" if opts.backend == "tensorrt" and decoder_target == "tensorrt" else "onnxruntime"
    text += _params({"entry": entry, "bls_models": json.dumps(bls), "bls_max_batch": str(max_batch),
                     "decoder_backend": decoder, "threads": str(opts.threads)})
    return text


def _model_config_pb2():
    """Triton's ModelConfig protobuf module as tritonclient ships it (loaded without its gRPC client)."""
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient without the [grpc] extra: load the generated file alone
        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
        if not path.is_file():
            return None
        mod_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod


def parse_config(text: str):
    """Parse config.pbtxt text into Triton's ModelConfig message; RepoError naming the problem if it fails.

    Needs `tritonclient` (any extra); RuntimeError saying so when it is absent.
    """
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    if pb2 is None:
        raise MissingDependency("validating config.pbtxt needs tritonclient: pip install tritonclient")
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise RepoError(f"generated config.pbtxt does not parse as Triton's ModelConfig: {e}") from e


def _check_options(opts: RepoOptions) -> None:
    """RepoError naming the first option out of range (before anything is read or written)."""
    for name, value, lo, hi in (("instances", opts.instances, 1, 64), ("entry_instances", opts.entry_instances, 1, 64),
                                ("max_batch", opts.max_batch, 1, 4096), ("threads", opts.threads, 0, 1024),
                                ("queue_delay_us", opts.queue_delay_us, 0, 10_000_000)):
        if value is None and name == "max_batch":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise RepoError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")


def _check_out(out: Path, overwrite: bool) -> None:
    """RepoError unless `out` is absent, or (with overwrite) a repository triton-repo wrote holding nothing else."""
    if out.is_symlink():
        raise RepoError(f"--out {out} is a symbolic link: give the real path (links are never replaced)")
    if not out.exists():
        return
    if not overwrite:
        raise RepoError(f"{out} exists: choose another --out or pass --overwrite")
    if not out.is_dir() or not (out / MARKER).is_file():
        raise RepoError(f"{out} exists and was not written by triton-repo: choose another --out (it is left as is)")
    try:
        models = set(json.loads((out / MARKER).read_text()).get("models") or [])
    except (OSError, ValueError, AttributeError):
        models = set()
    extra = sorted(p.name for p in out.iterdir() if p.name not in models | {MARKER})
    if extra:
        raise RepoError(f"{out} also holds files triton-repo did not write ({', '.join(extra[:8])}): --overwrite "
                        "would delete them; move them out or choose another --out")


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link src to dst (same filesystem) or copy it; True when linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def _place_bundle(bundle: Path, dst: Path, with_engines: bool, tally: dict, manifest=None) -> None:
    """The bundle's own files (manifest.json and what it lists, each confined to the bundle), not whatever
    else its folder holds: a user's files, special files or links leading out are never carried along."""
    from bridge_export.runtime.manifest import MANIFEST, read_manifest

    manifest = manifest or read_manifest(bundle)
    for f in [bundle / MANIFEST] + [manifest.path(rel) for rel in sorted(manifest.files)]:
        tally["linked" if _link_or_copy(f, dst / f.name) else "copied"] += f.stat().st_size
    if with_engines:
        for f in sorted((bundle / "engines").iterdir()):
            tally["linked" if _link_or_copy(f, dst / "engines" / f.name) else "copied"] += f.stat().st_size


def _copy_code(version_dir: Path, template: str) -> None:
    shutil.copy(TEMPLATES / template, version_dir / "model.py")
    from bridge_export import runtime

    shutil.copytree(Path(runtime.__file__).parent, version_dir / "bridge_export" / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_repo(bundle, out, opts: RepoOptions | None = None, entries=ENTRIES, overwrite: bool = False,
               validate: bool = True) -> Path:
    """Write the model repository for `bundle` into `out` (a new directory; written beside, then renamed)."""
    from bridge_export.runtime.manifest import read_manifest

    opts = opts or RepoOptions()
    if opts.backend not in BACKENDS:
        raise RepoError(f"backend must be one of {', '.join(BACKENDS)}, got {opts.backend!r}")
    unknown = sorted(set(entries) - set(ENTRIES))
    if unknown:
        raise RepoError(f"unknown entry points {unknown}: choose from {', '.join(ENTRIES)}")
    _check_options(opts)
    bundle, out = Path(bundle), Path(out).absolute()
    manifest = read_manifest(bundle, verify_checksums=False)
    graphs = manifest.graphs
    limit = manifest.limits.max_batch or 8
    engines = bundle / "engines"
    if opts.backend == "tensorrt":
        ort_only = [g for g in GRAPH_MODELS if graphs[g].operator_target == "onnxruntime"]
        if ort_only:
            raise RepoError(f"{ort_only[0]} of this bundle is onnxruntime-only (operator target onnxruntime), "
                            "which TensorRT does not build: use --backend onnxruntime, or a bundle exported "
                            "with --target tensorrt")
        portable = [g for g in ("text_decoder",) if graphs[g].operator_target == "tensorrt"]  # else: onnxruntime
        missing = [g for g in (*GRAPH_MODELS, *portable) if not (engines / f"{g}.engine").is_file()]
        if missing:
            raise RepoError(f"{engines} lacks {', '.join(m + '.engine' for m in missing)}: build the engines on a "
                            f"GPU of the serving kind first (bridge-export engine {bundle}), or use "
                            "--backend onnxruntime")
        limit = min(max(d[2][0] for d in p.values()) for g in GRAPH_MODELS for p in graphs[g].tensorrt_profiles)
    max_batch = opts.max_batch or limit
    if opts.backend == "tensorrt" and max_batch > limit:
        raise RepoError(f"--max-batch {max_batch} exceeds the engines' largest profile batch {limit}: "
                        "rebuild the engines with a larger --max-batch")
    _check_out(out, overwrite)
    lock = OutputLock(out).acquire()  # a second triton-repo run on the same --out refuses, naming this one
    for left in abandoned(out):  # temporaries of a killed run here (same host, PID gone)
        shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
    tmp = out.with_name(temp_prefix(out, "partial") + "repo")
    tmp.mkdir()
    tally = {"linked": 0, "copied": 0}
    embed_dim = next(t.shape[-1] for t in graphs["vision_encoder"].outputs if t.name == "image_embeds_c")
    configs = {}
    try:
        for g in GRAPH_MODELS:
            vdir = tmp / g / "1"
            vdir.mkdir(parents=True)
            if opts.backend == "onnxruntime":
                src = manifest.graph_path(g)
                tally["linked" if _link_or_copy(src, vdir / "model.onnx") else "copied"] += src.stat().st_size
                weights = manifest.weights or "weights.bin"
                if (bundle / weights).is_file():  # external data, referenced by its file name
                    tally["linked" if _link_or_copy(bundle / weights, vdir / weights) else "copied"] += \
                        (bundle / weights).stat().st_size
            elif opts.backend == "tensorrt":
                src = engines / f"{g}.engine"
                tally["linked" if _link_or_copy(src, vdir / "model.plan") else "copied"] += src.stat().st_size
            else:
                _copy_code(vdir, "graph_model.py")
                _place_bundle(bundle, vdir / "bundle", False, tally, manifest)
            configs[g] = graph_config(g, graphs[g], opts, max_batch)
        bls = {g: g for g in GRAPH_MODELS}
        for e in entries:
            vdir = tmp / e / "1"
            vdir.mkdir(parents=True)
            _copy_code(vdir, "entry_model.py")
            _place_bundle(bundle, vdir / "bundle", opts.backend == "tensorrt", tally, manifest)
            configs[e] = entry_config(e, embed_dim, opts, max_batch, bls,
                                      graphs["text_decoder"].operator_target)
        if validate and _model_config_pb2() is None:
            log.warning("tritonclient is not installed: config.pbtxt files written without validation "
                        "(pip install tritonclient to check them against Triton's ModelConfig)")
            validate = False
        for name, text in configs.items():
            if validate:
                parse_config(text)
            (tmp / name / "config.pbtxt").write_text(text)
        (tmp / MARKER).write_text(json.dumps({"bundle": str(bundle.absolute()), "backend": opts.backend,
                                              "models": sorted(configs)}, indent=2))
        if out.exists():
            _check_out(out, overwrite)  # still ours now that the new one is ready
            old = out.with_name(temp_prefix(out, "old") + "repo")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    log.info("wrote %s: %d models, %.1f MB hard-linked, %.1f MB copied", out, len(configs),
             tally["linked"] / 1e6, tally["copied"] / 1e6)
    return out
