"""Write a bundle: graphs, shared weights, tokenizer, host tensors and manifest, atomically."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

import reference_model
from runtime.manifest import DIGEST, FORMAT, FORMAT_VERSION, MANIFEST, manifest_digest, sha256_file

from .checks import check_graph
from .errors import ExportError  # noqa: F401 (re-exported)
from .onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, export_graph, relink_weights
from .output import OWNER_FILE, PARTIAL_MARKER, commit_output, discard, prepare_output  # noqa: F401 (re-exported)
from .specs import Limits, all_specs
from .tokenizer import write_tokenizer

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


MAX_EXPORT_BATCH = 4096


def check_export_args(opset: int, limits: Limits) -> None:
    """Refuse an opset, --max-batch or --max-seq that cannot work, before anything is exported."""
    if not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ExportError(f"--opset {opset} is not supported: use {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                          f"(default {DEFAULT_OPSET}; TensorRT 10 parses up to 20)")
    if not isinstance(limits.max_batch, int) or not 1 <= limits.max_batch <= MAX_EXPORT_BATCH:
        raise ExportError(f"--max-batch must be between 1 and {MAX_EXPORT_BATCH}, got {limits.max_batch}")
    if not isinstance(limits.max_seq, int) or limits.max_seq < 0:
        raise ExportError(f"--max-seq must be a positive number of positions (or omitted), got {limits.max_seq}")


def write_manifest(directory: Path, data: dict) -> None:
    """Record every file's sha256 and write manifest.json (last, so its presence means complete)."""
    import json

    data["files"] = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
                     if p.is_file() and p.name not in (MANIFEST, PARTIAL_MARKER, OWNER_FILE)}
    data[DIGEST] = manifest_digest(data)
    (directory / MANIFEST).write_text(json.dumps(data, indent=2))


def export_bundle(model: torch.nn.Module, out, *, checkpoint: Path | None = None, tokenizer: Path | None = None,
                  opset: int = DEFAULT_OPSET, limits: Limits | None = None, overwrite: bool = False,
                  dynamo: bool = False, progress: Callable[[str], None] = _stderr, source: str = "") -> Path:
    """Export `model` (a reference InternVLModel; converted to fp32 in place) into the bundle directory `out`."""
    limits = limits or Limits()
    config = model.config
    check_export_args(opset, limits)
    out = Path(out).absolute()
    tmp = prepare_output(out, overwrite)
    try:
        # the tokenizer first: a missing or corrupt one is refused before minutes of graph export
        tok = write_tokenizer(checkpoint, tokenizer, tmp, vocab_size=config.qllama.vocab_size)
        paths, graphs = [], {}
        model = model.float().eval()
        for spec in all_specs(config):
            t0 = time.perf_counter()
            progress(f"[export] {spec.name} ...")
            path = export_graph(model, spec, config, tmp / spec.filename, opset=opset, dynamo=dynamo)
            paths.append(path)
            graphs[spec.name] = {
                "file": spec.filename,
                "inputs": [asdict(t) for t in spec.inputs],
                "outputs": [asdict(t) for t in spec.outputs],
                "precision": "fp32",
                "tolerance": spec.tolerance,
                "tensorrt_profiles": [{k: [list(s) for s in v] for k, v in p.items()}
                                      for p in spec.profiles(config, limits)],
            }
            progress(f"[export] {spec.name} done in {time.perf_counter() - t0:.1f}s")
        saved = relink_weights(paths, tmp)
        progress(f"[export] weights shared across graphs ({saved / 1e6:.1f} MB stored once)")
        for spec in all_specs(config):
            graphs[spec.name]["checks"] = check_graph(tmp / spec.filename)
        if tok is None:
            progress("[export] no tokenizer found (give --tokenizer DIR): the bundle serves the array API only")
        np.save(tmp / "text_projection.npy", model.text_projection.detach().float().numpy())
        np.save(tmp / "logit_scale.npy", model.logit_scale.detach().float().numpy())
        q = config.qllama
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": source,
            "model": config.to_dict(),
            "precision": "fp32",
            "graphs": graphs,
            "weights": "weights.bin",
            "kv_layout": {
                "num_layers": q.num_hidden_layers, "num_heads": q.num_attention_heads, "head_dim": q.head_dim,
                "axes": ["batch", "heads", "positions", "head_dim"],
                "visual_prefix": {"graph": "query_bridge", "outputs": "prefix.{i}.key / prefix.{i}.value",
                                  "length": config.num_query_token, "positions": [0, config.num_query_token - 1]},
                "past_inputs": "past_key_values.{i}.key / past_key_values.{i}.value",
                "present_outputs": "present.{i}.key / present.{i}.value",
                "present_holds": "the K/V of this step's new positions only; the runtime writes them into its cache",
                "key_rope": "keys are stored after RoPE",
                "text_start_position": config.num_query_token,
                "max_positions": q.max_position_embeddings,
            },
            "special_tokens": {"bos": q.bos_token_id, "eos": q.eos_token_id, "pad": q.pad_token_id, "unk": 0},
            "prompts": {
                "text_embedding": {"prefix": "summarize:", "add_bos": True, "add_eos": True, "padding": "right",
                                   "max_length": 80, "truncation": "first tokens kept, then BOS and EOS added",
                                   "pad_id": q.pad_token_id, "mask": "ids > 0", "pool": "last non-pad token"},
                "caption": {"prompt": "English caption:", "add_bos": True, "add_eos": False,
                            **caption_defaults(checkpoint)},
            },
            "preprocessing": {"image_size": config.image_size, "resize": "bicubic",
                              "retrieval": "resize to (size, size)",
                              "classification": "resize shorter side to size, center crop",
                              "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "channels": "RGB"},
            "tokenizer": tok,
            "host_tensors": {"text_projection": "text_projection.npy", "logit_scale": "logit_scale.npy"},
            "limits": asdict(limits),
            "versions": {"bridge_export": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
                         "opset": opset, "exporter": "dynamo" if dynamo else "torchscript"},
        }
        write_manifest(tmp, manifest)
        commit_output(tmp, out)
        progress(f"[export] bundle written to {out}")
        return out
    except BaseException:
        discard(tmp)
        raise


def caption_defaults(checkpoint: Path | None) -> dict:
    """num_beams / max_new_tokens / min_new_tokens: the original's 5 / 30 / 8, or the checkpoint's generation_config.json.

    A small model that says all it knows in three tokens (the demo digits model) sets min_new_tokens 0
    there; forcing 8 would push it past its EOS into nonsense.
    """
    import json

    out = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
    f = Path(checkpoint) / "generation_config.json" if checkpoint else None
    if f and f.is_file():
        try:
            given = json.loads(f.read_text())
        except ValueError as e:
            raise ExportError(f"{f} is not valid JSON ({e}): fix or remove it") from e
        out.update({k: int(given[k]) for k in out if isinstance(given.get(k), int)})
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bridge-export")
    except Exception:  # running from a source tree without installing
        return "0+source"


def load_source(checkpoint: Path | None, preset: str | None, seed: int = 0):
    """The reference model to export: a checkpoint directory or a preset with seeded weights."""
    if (checkpoint is None) == (preset is None):
        raise ExportError("give exactly one of --checkpoint DIR or --preset NAME")
    if checkpoint is not None:
        return reference_model.load_pretrained(checkpoint), f"checkpoint:{Path(checkpoint).absolute()}"
    return reference_model.from_preset(preset, seed=seed), f"preset:{preset}:seed={seed}"
