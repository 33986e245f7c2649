"""Write a bundle: graphs, shared weights, tokenizer, host tensors and manifest, atomically."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

import reference_model
from runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file

from .checks import check_graph
from .onnx_export import DEFAULT_OPSET, export_graph, relink_weights
from .specs import Limits, all_specs
from .tokenizer import write_tokenizer

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ExportError(RuntimeError):
    """An export that cannot proceed; the message says what to do."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check `out` can be written and return a fresh temporary sibling to build into."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: choose another --out or pass --overwrite")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {parent}: {e.strerror}; choose a writable --out") from e
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{parent} is not writable: choose a writable --out")
    tmp = parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory into place (replacing an old bundle last)."""
    out = Path(out).absolute()
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_manifest(directory: Path, data: dict, known: dict[str, str] | None = None) -> None:
    """Record every file's sha256 and write manifest.json (last, so its presence means complete).

    `known` holds digests computed while the files were written (weights.bin: not read back).
    """
    import json

    known = known or {}
    data["files"] = {p.name: known.get(p.name) or sha256_file(p) for p in sorted(directory.iterdir())
                     if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(data, indent=2))


def export_bundle(model: torch.nn.Module, out, *, checkpoint: Path | None = None, tokenizer: Path | None = None,
                  opset: int = DEFAULT_OPSET, limits: Limits | None = None, overwrite: bool = False,
                  dynamo: bool = False, progress: Callable[[str], None] = _stderr, source: str = "",
                  exporter: str = "stream", precision: str = "fp32") -> Path:
    """Export `model` (a reference InternVLModel) into the bundle directory `out`.

    exporter "stream" (default) writes the graphs from the config and streams the model's state
    dict into weights.bin (stream_export); "torchscript" / "dynamo" (or dynamo=True) trace the
    model in memory (legacy; the model is converted to fp32 in place) and support fp32 only.
    """
    exporter = "dynamo" if dynamo else exporter
    if exporter == "stream":
        from .stream_export import export_model

        return export_model(model, out, precision=precision, checkpoint=checkpoint, tokenizer=tokenizer,
                            opset=opset, limits=limits, overwrite=overwrite, progress=progress,
                            source_desc=source or "in-memory model")
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter must be stream, torchscript or dynamo, got {exporter!r}")
    if precision != "fp32":
        raise ExportError(f"the {exporter} exporter writes fp32 only: use exporter='stream' for {precision}")
    dynamo = exporter == "dynamo"
    limits = limits or Limits()
    config = model.config
    out = Path(out).absolute()
    tmp = prepare_output(out, overwrite)
    try:
        (tmp / ".trace").mkdir()
        paths, graphs = [], {}
        model = model.float().eval()
        for spec in all_specs(config):
            t0 = time.perf_counter()
            progress(f"[export] {spec.name} ...")
            # traced into a scratch folder: over 2 GB the exporter writes one file per tensor beside it
            path = export_graph(model, spec, config, tmp / ".trace" / spec.filename, opset=opset, dynamo=dynamo)
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
        shutil.rmtree(tmp / ".trace")
        progress(f"[export] weights shared across graphs ({saved / 1e6:.1f} MB stored once)")
        for spec in all_specs(config):
            graphs[spec.name]["checks"] = check_graph(tmp / spec.filename)
        tok = write_tokenizer(checkpoint, tokenizer, tmp, vocab_size=config.qllama.vocab_size)
        if tok is None:
            progress("[export] no tokenizer found (give --tokenizer DIR): the bundle serves the array API only")
        np.save(tmp / "text_projection.npy", model.text_projection.detach().float().numpy())
        np.save(tmp / "logit_scale.npy", model.logit_scale.detach().float().numpy())
        manifest = manifest_data(config, graphs, limits, opset, source, tok, "fp32",
                                 "dynamo" if dynamo else "torchscript")
        write_manifest(tmp, manifest)
        commit_output(tmp, out)
        progress(f"[export] bundle written to {out}")
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_data(config, graphs: dict, limits: Limits, opset: int, source: str, tok, precision: str,
                  exporter: str) -> dict:
    """The manifest of a bundle (the runtime's only contract), without the file checksums."""
    q = config.qllama
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "model": config.to_dict(),
        "precision": precision,
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
                        "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8},
        },
        "preprocessing": {"image_size": config.image_size, "resize": "bicubic",
                          "retrieval": "resize to (size, size)",
                          "classification": "resize shorter side to size, center crop",
                          "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "channels": "RGB"},
        "tokenizer": tok,
        "host_tensors": {"text_projection": "text_projection.npy", "logit_scale": "logit_scale.npy"},
        "limits": asdict(limits),
        "versions": {"bridge_export": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "opset": opset, "exporter": exporter},
    }

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
