"""The manifest a bundle writer records: its entries built from the config, written with every file's digest.

Shared by the traced writer (bundle) and the streamed one (stream_export), which import it and not
each other.
"""
from __future__ import annotations

from pathlib import Path

from bridge_export.runtime.manifest import (MANIFEST, CaptionPrompt, FileEntry, GraphInfo, Limits, Manifest, Preprocessing,
                              PrecisionInfo, Prompts, SpecialTokens, TensorInfo, TextEmbeddingPrompt,
                              TokenizerInfo, sample_sha256, sha256_file)
from bridge_export.runtime.progress import get_logger

from bridge_export.exporter.errors import ExportError
from bridge_export.exporter.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, WEIGHTS_FILE
from bridge_export.exporter.tensorrt.profiles import to_json as profiles_json
from bridge_export.exporter.export.specs import all_specs, kv_layout, model_dims

log = get_logger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


MAX_EXPORT_BATCH = 4096


def check_export_args(opset: int, limits: Limits) -> None:
    """Refuse an opset, --max-batch or --max-seq that cannot work, before anything is exported."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ExportError(f"--opset {opset} is not supported: use {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                          f"(default {DEFAULT_OPSET}; TensorRT 10 parses up to 20)")
    if isinstance(limits.max_batch, bool) or not isinstance(limits.max_batch, int) \
            or not 1 <= limits.max_batch <= MAX_EXPORT_BATCH:
        raise ExportError(f"--max-batch must be between 1 and {MAX_EXPORT_BATCH}, got {limits.max_batch}")
    if isinstance(limits.max_seq, bool) or not isinstance(limits.max_seq, int) or limits.max_seq < 0:
        raise ExportError(f"--max-seq must be a positive number of positions (or omitted), got {limits.max_seq}")


def caption_defaults(checkpoint: Path | None) -> CaptionPrompt:
    """The caption defaults: the original's (5 beams, 8..30 new tokens), or the checkpoint's generation_config.json.

    A small model that says all it knows in three tokens (the demo digits model) sets min_new_tokens 0
    there; forcing 8 would push it past its EOS into nonsense.
    """
    import json

    out = CaptionPrompt()
    f = Path(checkpoint) / "generation_config.json" if checkpoint else None
    if f and f.is_file():
        try:
            given = json.loads(f.read_text())
        except ValueError as e:
            raise ExportError(f"{f} is not valid JSON ({e}): fix or remove it") from e
        for k in ("num_beams", "max_new_tokens", "min_new_tokens"):
            if isinstance(given.get(k), int) and not isinstance(given.get(k), bool):
                setattr(out, k, given[k])
    return out


def operator_target(model, precision: str) -> str:
    """"onnxruntime" if the graph needs onnxruntime (a com.microsoft operator, or the CPU precisions'
    integer MatMuls, which TensorRT does not parse), else "tensorrt" (portable ONNX)."""
    if precision in ("int8-cpu", "int4-cpu") or any(n.domain == "com.microsoft" for n in model.graph.node):
        return "onnxruntime"
    return "tensorrt"


def external_bytes(graph_path: Path) -> int:
    """Bytes of external data a graph's initializers reference (read from the graph file alone)."""
    import onnx

    m = onnx.load(str(graph_path), load_external_data=False)
    return sum(int({e.key: e.value for e in t.external_data}.get("length", 0)) for t in m.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)


def write_manifest(directory: Path, manifest: Manifest, known: dict[str, str] | None = None) -> Manifest:
    """Record every file's size and sha256 (and each graph's external weight bytes) and write
    manifest.json (last, so its presence means complete).

    `known` holds sha256 digests computed while files were written (weights.bin is not read back).
    """
    directory = Path(directory)
    known = known or {}
    for g in manifest.graphs.values():
        if (directory / g.file).is_file():
            g.weight_bytes = external_bytes(directory / g.file)
    manifest.files = {p.name: FileEntry(size=p.stat().st_size, sha256=known.get(p.name) or sha256_file(p),
                                        sample=sample_sha256(p))
                      for p in sorted(directory.iterdir())
                      if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    manifest.save(directory)
    return manifest


def graph_info(spec, config, limits: Limits, precision: str = "fp32") -> GraphInfo:
    """The manifest entry of one graph from its export spec (checks are filled in after export)."""
    return GraphInfo(file=spec.filename,
                     inputs=[TensorInfo(t.name, t.dtype, list(t.shape)) for t in spec.inputs],
                     outputs=[TensorInfo(t.name, t.dtype, list(t.shape)) for t in spec.outputs],
                     precision=precision, tolerance=dict(spec.tolerance),
                     tensorrt_profiles=profiles_json(spec.profiles(config, limits)))


def build_manifest(config, *, limits: Limits | None = None, tokenizer: dict | TokenizerInfo | None = None,
                   source: str = "", opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                   precision: str = "fp32", checks: dict[str, dict] | None = None,
                   caption: CaptionPrompt | None = None, targets: dict[str, str] | None = None,
                   fused_decoder: bool = False) -> Manifest:
    """The whole manifest of a bundle of `config` (every writer of bundles builds it here).

    `checks` maps graph name -> what bridge_export.exporter.export.checks.check_graph found; `files` is filled by
    `write_manifest` when the bundle's files are final. `targets` maps graph name -> its operator target
    (`operator_target` of the written graph); unnamed graphs get the precision's default.
    `fused_decoder`: the decoder is exporter.export.fused_decoder's (its own inputs and outputs).
    """
    limits = limits or Limits()
    q = config.qllama
    graphs = {}
    targets = targets or {}
    default = "onnxruntime" if precision in ("int8-cpu", "int4-cpu") else "tensorrt"
    for spec in all_specs(config, "onnxruntime" if fused_decoder else "tensorrt", precision):
        graphs[spec.name] = graph_info(spec, config, limits, precision)
        graphs[spec.name].target = targets.get(spec.name, default)
        if checks and spec.name in checks:
            graphs[spec.name].checks = checks[spec.name]
    if isinstance(tokenizer, dict):
        tokenizer = TokenizerInfo.from_dict(tokenizer, "tokenizer")
    return Manifest(
        source=source,
        model=config.to_dict(),
        dims=model_dims(config),
        graphs=graphs,
        weights=WEIGHTS_FILE,
        kv_layout=kv_layout(config),
        special_tokens=SpecialTokens(bos=q.bos_token_id, eos=q.eos_token_id, pad=q.pad_token_id, unk=0),
        prompts=Prompts(text_embedding=TextEmbeddingPrompt(pad_id=q.pad_token_id), caption=caption or CaptionPrompt()),
        preprocessing=Preprocessing(image_size=config.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        tokenizer=tokenizer,
        host_tensors={"text_projection": "text_projection.npy", "logit_scale": "logit_scale.npy"},
        limits=limits,
        precision=PrecisionInfo(mode=precision),
        versions={"bridge_export": _version(), "torch": _version("torch"), "onnx": _version("onnx"),
                  "opset": opset, "exporter": exporter},
    )


def _version(package: str = "bridge-export") -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+source" if package == "bridge-export" else "absent"
