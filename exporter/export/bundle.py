"""Write a bundle: graphs, shared weights, tokenizer, host tensors and manifest, atomically."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bridge_export import reference_model
from bridge_export.runtime.manifest import Limits
from bridge_export.runtime.progress import get_logger, reporter

from bridge_export.exporter.errors import ExportError
from bridge_export.exporter.export.checks import check_graph
from bridge_export.exporter.export.manifest_build import (  # noqa: F401 (graph_info, operator_target: re-exported)
    build_manifest, caption_defaults, check_export_args, graph_info, operator_target, write_manifest)
from bridge_export.exporter.export.onnx_export import DEFAULT_OPSET, export_graph, relink_weights
from bridge_export.exporter.export.specs import all_specs
from bridge_export.exporter.export.tokenizer import write_tokenizer
from bridge_export.exporter.output import output_dir

log = get_logger(__name__)

def export_bundle(model: torch.nn.Module, out, *, checkpoint: Path | None = None, tokenizer: Path | None = None,
                  opset: int = DEFAULT_OPSET, limits: Limits | None = None, overwrite: bool = False,
                  dynamo: bool = False, progress: Callable[[str], None] | None = None, source: str = "",
                  exporter: str = "stream", precision: str = "fp32") -> Path:
    """Export `model` (a reference InternVLModel) into the bundle directory `out`.

    exporter "stream" (default) writes the graphs from the config and streams the model's state
    dict into weights.bin (stream_export); "torchscript" / "dynamo" (or dynamo=True) trace the
    model in memory (legacy; the model is converted to fp32 in place) and write fp32 only.
    """
    exporter = "dynamo" if dynamo else exporter
    if exporter == "stream":
        from bridge_export.exporter.export.stream_export import export_model

        return export_model(model, out, precision=precision, checkpoint=checkpoint, tokenizer=tokenizer,
                            opset=opset, limits=limits, overwrite=overwrite, progress=progress,
                            source_desc=source or "in-memory model")
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter must be stream, torchscript or dynamo, got {exporter!r}")
    if precision != "fp32":
        raise ExportError(f"the {exporter} exporter writes fp32 only: use exporter='stream' for {precision}")
    dynamo = exporter == "dynamo"
    say = reporter(progress, log)
    limits = limits or Limits()
    config = model.config
    check_export_args(opset, limits)
    caption = caption_defaults(checkpoint)
    out = Path(out).absolute()
    with output_dir(out, overwrite) as tmp:  # renamed into place when complete, removed on failure
        # the tokenizer first: a missing or corrupt one is refused before minutes of graph export
        tok = write_tokenizer(checkpoint, tokenizer, tmp, vocab_size=config.qllama.vocab_size)
        paths = []
        model = model.float().eval()
        (tmp / ".trace").mkdir()
        for spec in all_specs(config):
            t0 = time.perf_counter()
            say(f"[export] {spec.name} ...")
            # traced into a scratch folder: over 2 GB the exporter writes one file per tensor beside it
            paths.append(export_graph(model, spec, config, tmp / ".trace" / spec.filename, opset=opset,
                                      dynamo=dynamo))
            say(f"[export] {spec.name} done in {time.perf_counter() - t0:.1f}s")
        saved = relink_weights(paths, tmp)
        shutil.rmtree(tmp / ".trace")
        say(f"[export] weights shared across graphs ({saved / 1e6:.1f} MB stored once)")
        checks = {spec.name: check_graph(tmp / spec.filename) for spec in all_specs(config)}
        if tok is None:
            say("[export] no tokenizer found (give --tokenizer DIR): the bundle serves the array API only")
        np.save(tmp / "text_projection.npy", model.text_projection.detach().float().numpy())
        np.save(tmp / "logit_scale.npy", model.logit_scale.detach().float().numpy())
        manifest = build_manifest(config, limits=limits, tokenizer=tok, source=source, opset=opset,
                                  exporter="dynamo" if dynamo else "torchscript", checks=checks, caption=caption)
        write_manifest(tmp, manifest)
    say(f"[export] bundle written to {out}")
    return out


def load_source(checkpoint: Path | None, preset: str | None, seed: int = 0):
    """The reference model to export: a checkpoint directory or a preset with seeded weights."""
    if (checkpoint is None) == (preset is None):
        raise ExportError("give exactly one of --checkpoint DIR or --preset NAME")
    if checkpoint is not None:
        return reference_model.load_pretrained(checkpoint), f"checkpoint:{Path(checkpoint).absolute()}"
    return reference_model.from_preset(preset, seed=seed), f"preset:{preset}:seed={seed}"
