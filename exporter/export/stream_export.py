"""Streaming export: a bundle written from a checkpoint in memory bounded by its largest tensor.

Steps (each small and named): build the weightless graphs -> check them against the specs ->
stream every referenced tensor once into weights.bin (converted to the bundle's precision on
the way) -> point the graphs' initializers at it -> save and check the graphs -> tokenizer and
host tensors -> manifest. The graphs of a reduced-precision bundle are written directly in
that precision (graph_builder), so no fp32 bundle is made first.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from bridge_export.reference_model.config import InternVLConfig

from bridge_export.runtime.progress import get_logger, progress_iter, reporter

from bridge_export.exporter.export.manifest_build import (build_manifest, caption_defaults, check_export_args, operator_target,
                                                          write_manifest)
from bridge_export.exporter.errors import ExportError
from bridge_export.exporter.output import output_dir
from bridge_export.exporter.export.checks import check_graph
from bridge_export.exporter.export.specs import fused_unsupported
from bridge_export.exporter.export.graph_builder import INLINE_BYTES, QUANTIZED, WeightRef
from bridge_export.exporter.export.internvl_graphs import build_graphs, check_against_spec
from bridge_export.exporter.export.onnx_export import DEFAULT_OPSET, WEIGHTS_FILE
from bridge_export.exporter.export.specs import Limits, all_specs
from bridge_export.exporter.export.tokenizer import write_tokenizer
from bridge_export.reference_model.checkpoint_reader import read_config

from bridge_export.exporter.export.weight_stream import CheckpointSource, StateDictSource, WeightWriter, materialize, resolve_keys

log = get_logger(__name__)

HOW = {
    "fp32": {"method": "streamed fp32"},
    "fp16": {"method": "streamed fp16 weights and activations; norms, softmax chain, RoPE tables and logits "
                       "(lm_head) fp32; fp32 graph inputs/outputs"},
    "int8-cpu": {"method": "streamed dynamic INT8 (DynamicQuantizeLinear + MatMulInteger, uint8 weights per "
                           "output column, as onnxruntime.quantization.quantize_dynamic); norms and pooling heads "
                           "fp32", "tensorrt": False},
    "int4-cpu": {"method": "streamed INT4 weight-only: MatMulNBits and GatherBlockQuantized packed per tensor with "
                           "onnxruntime.quantization.matmul_nbits_quantizer's own routines (the initializers "
                           "MatMulNBitsQuantizer writes); norms and pooling heads fp32", "tensorrt": False},
}


def _how(precision: str, model: onnx.ModelProto, int4) -> dict:
    """The manifest's `how` for one streamed graph (int4-cpu: its settings and what was quantized)."""
    how = dict(HOW[precision])
    if precision == "int4-cpu":
        ops = [n.op_type for n in model.graph.node]
        how.update(int4.as_dict(), quantized_matmuls=ops.count("MatMulNBits"),
                   quantized_gathers=ops.count("GatherBlockQuantized"),
                   kept_fp32=[n.name for n in model.graph.node if n.op_type == "MatMul"
                              and any(i.endswith(".T") for i in n.input[1:])])
    return how


def check_target(precision: str, target: str | None) -> str:
    """The operator target to write `precision` for: int8-cpu/int4-cpu are onnxruntime only, fp32/fp16
    default to tensorrt (portable) and take onnxruntime (fused decoder) when asked."""
    if target is None:
        return "onnxruntime" if precision in QUANTIZED else "tensorrt"
    if target not in ("tensorrt", "onnxruntime"):
        raise ExportError(f"target must be tensorrt or onnxruntime, got {target!r}")
    if target == "tensorrt" and precision in QUANTIZED:
        raise ExportError(f"{precision} is written for onnxruntime only (TensorRT cannot parse its integer "
                          "MatMuls): drop --target tensorrt or choose --precision int8 / fp16")
    return target


def _ordered_refs(models: dict[str, onnx.ModelProto], refs: dict[str, dict[str, WeightRef]]) -> list[WeightRef]:
    seen, out = set(), []
    for name in models:
        for ref in refs[name].values():
            if ref not in seen:
                seen.add(ref)
                out.append(ref)
    return out


def _read(source, mapping: dict[str, str], ref: WeightRef) -> torch.Tensor:
    """The checkpoint tensor `ref` is made from (its parts concatenated along the output dimension:
    the fused q/k/v projection, quantized per output column or per row block exactly as the parts
    would be one by one)."""
    if not ref.parts:
        return source.get(mapping[ref.key])
    return torch.cat([source.get(mapping[k]) for k in ref.parts], dim=0)


def stream_weights(models: dict[str, onnx.ModelProto], refs: dict[str, dict[str, WeightRef]], source,
                   mapping: dict[str, str], path: Path, show_progress: bool = True) -> str:
    """Write every referenced tensor once into `path` and point the graphs' initializers at it.

    Literal constants of 1 KiB or more (RoPE tables) go to the same file, once by content.
    Returns the file's sha256 (computed while writing).
    """
    writer = WeightWriter(path)
    placed: dict[str, tuple[int, int]] = {}
    try:
        # resolved (source key, layout, storage): a tied lm_head/embed_tokens pair is one tensor
        by_phys: dict[tuple, list[tuple[str, int, int]]] = {}
        ordered = _ordered_refs(models, refs)
        if hasattr(source, "location"):  # read the shards front to back
            ordered.sort(key=lambda r: source.location(mapping[r.parts[0] if r.parts else r.key]))
        for ref in progress_iter(ordered, desc="weights", unit="tensor", enabled=show_progress):
            phys = (tuple(mapping[k] for k in ref.parts) or mapping[ref.key], ref.transpose, ref.storage)
            if phys not in by_phys:
                arrays = materialize(ref, _read(source, mapping, ref))
                by_phys[phys] = [writer.write(a) for a in arrays]
                del arrays
            for name, loc in zip(ref.names, by_phys[phys]):
                placed[name] = loc
        for model in models.values():
            for t in model.graph.initializer:
                if t.name in placed:
                    offset, length = placed[t.name]
                elif t.HasField("raw_data") and len(t.raw_data) >= INLINE_BYTES:
                    offset, length = writer.write_literal(onnx.numpy_helper.to_array(t))
                    t.ClearField("raw_data")
                else:
                    continue
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    t.external_data.add(key=k, value=v)
    finally:
        digest = writer.close()
    return digest


def export_streamed(source, config: InternVLConfig, out, *, precision: str = "fp32",
                    checkpoint: Path | None = None, tokenizer: Path | None = None, opset: int = DEFAULT_OPSET,
                    limits: Limits | None = None, overwrite: bool = False,
                    progress: Callable[[str], None] | None = None, source_desc: str = "", int4=None,
                    target: str | None = None, fused_decoder: bool | None = None) -> Path:
    """Write the bundle of `config` with weights from `source` (CheckpointSource / StateDictSource).

    `int4`: the bridge_export.exporter.quantize.int4.Int4Options of an int4-cpu bundle (its defaults when None).
    `target`: "onnxruntime" writes the decoder with onnxruntime's fused operators (GroupQueryAttention
    over a shared KV buffer; exporter.export.fused_decoder), "tensorrt" the portable one; None: the
    precision's own (int8-cpu/int4-cpu: onnxruntime, fp32/fp16: tensorrt). `fused_decoder=False`
    keeps the portable decoder in an onnxruntime-target bundle (the side-by-side benchmark and parity
    tests compare the two)."""
    target = check_target(precision, target)
    show_bar = progress is None
    progress = reporter(progress, log)
    limits = limits or Limits()
    check_export_args(opset, limits)
    caption = caption_defaults(checkpoint)  # the checkpoint's generation_config.json, else the original's
    out = Path(out).absolute()
    mapping, shapes = resolve_keys(source, config)
    with output_dir(out, overwrite) as tmp:  # renamed into place when complete, removed on failure
        t0 = time.perf_counter()
        if precision == "int4-cpu":
            from bridge_export.exporter.quantize.int4 import Int4Options

            int4 = int4 or Int4Options()
        fuse_vision = target == "onnxruntime"  # vision encoder and bridge (whatever the decoder falls back to)
        if target == "onnxruntime" and fused_decoder is not False and (why := fused_unsupported(config)):
            progress(f"[export] text_decoder: {why}: the portable decoder is written instead")
        if fused_decoder is False or fused_unsupported(config):
            target = "tensorrt"  # the decoder's structure; each graph's operator target goes to the manifest
        builders = build_graphs(config, precision, int4, target)
        specs = {s.name: s for s in all_specs(config, target, precision)}
        for name, b in builders.items():
            check_against_spec(b, specs[name])
        models = {name: b.model(opset, shapes) for name, b in builders.items()}
        if fuse_vision:
            from bridge_export.exporter.export.fused_vision import fuse_models

            fuse_models(models, progress)
        refs = {name: b.weights for name, b in builders.items()}
        progress(f"[export] graphs built in {time.perf_counter() - t0:.1f}s "
                 f"({', '.join(f'{n}: {len(m.graph.node)} nodes' for n, m in models.items())})")
        t0 = time.perf_counter()
        digest = stream_weights(models, refs, source, mapping, tmp / WEIGHTS_FILE,
                                show_progress=show_bar)
        progress(f"[export] weights streamed ({(tmp / WEIGHTS_FILE).stat().st_size / 1e9:.2f} GB, {precision}) "
                 f"in {time.perf_counter() - t0:.1f}s")
        checks, hows, targets = {}, {}, {}
        for name, model in models.items():
            onnx.save_model(model, str(tmp / specs[name].filename))
            targets[name] = operator_target(model, precision)
            checks[name] = check_graph(tmp / specs[name].filename, tensorrt=targets[name] == "tensorrt")
            hows[name] = _how(precision, model, int4)
        del models
        tok = write_tokenizer(checkpoint, tokenizer, tmp, vocab_size=config.qllama.vocab_size)
        if tok is None:
            progress("[export] no tokenizer found (give --tokenizer DIR): the bundle serves the array API only")
        for host in ("text_projection", "logit_scale"):
            np.save(tmp / f"{host}.npy", source.get(mapping[host]).to(torch.float32).numpy())
        manifest = build_manifest(config, limits=limits, tokenizer=tok, source=source_desc, opset=opset,
                                  exporter="stream", precision=precision, checks=checks, caption=caption,
                                  targets=targets, fused_decoder=target == "onnxruntime")
        for name, g in manifest.graphs.items():
            g.how = hows[name]
        write_manifest(tmp, manifest, known={WEIGHTS_FILE: digest})
    progress(f"[export] bundle written to {out}")
    return out


def export_checkpoint(checkpoint, out, lora_alpha: float | None = None, target: str | None = None, **kwargs) -> Path:
    """Stream an original-format checkpoint directory into a bundle (see export_streamed).

    LoRA fine-tunes (peft key names) are merged per tensor; `lora_alpha` as in load_pretrained."""
    config = read_config(checkpoint)
    source = CheckpointSource(checkpoint, config, lora_alpha)
    try:
        return export_streamed(source, config, out, checkpoint=Path(checkpoint), target=target,
                               source_desc=f"checkpoint:{Path(checkpoint).absolute()}", **kwargs)
    finally:
        source.close()


def export_model(model: torch.nn.Module, out, target: str | None = None, **kwargs) -> Path:
    """Stream an in-memory reference model's state dict into a bundle (presets, tests); `target` as in
    export_streamed."""
    kwargs.setdefault("source_desc", "in-memory model")
    return export_streamed(StateDictSource(model.state_dict()), model.config, out, target=target, **kwargs)
