"""One export spec per graph: names, dtypes, symbolic shapes, dummy inputs, tolerance, TensorRT shapes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from bridge_export.reference_model.config import InternVLConfig
from bridge_export.runtime.manifest import KVLayout, Limits, ModelDims

from bridge_export.exporter.tensorrt.profiles import graph_profiles
from bridge_export.exporter.export.wrappers import QueryBridgeGraph, TextDecoderGraph, VisionEncoderGraph

__all__ = ["TensorSpec", "Limits", "GraphSpec", "model_dims", "kv_layout", "vision_spec", "bridge_spec",
           "decoder_spec", "all_specs"]


@dataclass
class TensorSpec:
    """One graph input or output: name, ONNX element type, shape with symbolic dims as strings."""

    name: str
    dtype: str
    shape: list


@dataclass
class GraphSpec:
    """Everything the generic exporter, the manifest and the engine builder need about one graph."""

    name: str
    module: Callable[[nn.Module], nn.Module]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dummy: Callable[[InternVLConfig], tuple]
    tolerance: dict = field(default_factory=lambda: {"atol": 1e-4, "rtol": 1e-3, "cosine": 0.99999})
    # profile(config, limits) -> list of {input: (min, opt, max)}; the decoder has two (prefill, decode).
    profiles: Callable[[InternVLConfig, Limits], list[dict]] = lambda c, l: []

    @property
    def filename(self) -> str:
        """The graph's file name inside a bundle."""
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: symbol}} for every symbolic dim."""
        out = {}
        for t in self.inputs + self.outputs:
            axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out


def model_dims(config: InternVLConfig) -> ModelDims:
    """The manifest's typed summary of a config."""
    return ModelDims(image_size=config.image_size, num_image_tokens=config.num_image_tokens,
                     vision_hidden_size=config.vision.hidden_size, embed_dim=config.clip_embed_dim,
                     text_hidden_size=config.qllama.hidden_size, vocab_size=config.qllama.vocab_size,
                     num_query_token=config.num_query_token, max_positions=config.qllama.max_position_embeddings)


def kv_layout(config: InternVLConfig) -> KVLayout:
    """The decoder's KV layout (sizes and the name templates every graph and the runtime use)."""
    q = config.qllama
    return KVLayout(num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads, head_dim=q.head_dim,
                    prefix_length=config.num_query_token, max_positions=q.max_position_embeddings)


def vision_spec(config: InternVLConfig) -> GraphSpec:
    """Spec of vision_encoder.onnx: pixel_values -> vision_hidden, image_embeds_c."""
    s, v = config.image_size, config.vision
    return GraphSpec(
        name="vision_encoder",
        module=VisionEncoderGraph,
        inputs=[TensorSpec("pixel_values", "float32", ["batch", 3, s, s])],
        outputs=[TensorSpec("vision_hidden", "float32", ["batch", config.num_image_tokens, v.hidden_size]),
                 TensorSpec("image_embeds_c", "float32", ["batch", config.clip_embed_dim])],
        dummy=lambda c: (torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0)),),
        profiles=lambda c, lim: graph_profiles("vision_encoder", model_dims(c), kv_layout(c), lim),
    )


def bridge_spec(config: InternVLConfig) -> GraphSpec:
    """Spec of query_bridge.onnx: vision_hidden -> image_embeds_g and the visual prefix."""
    q = config.qllama
    Q, H, Dh = config.num_query_token, q.num_attention_heads, q.head_dim
    n, dv = config.num_image_tokens, config.vision.hidden_size
    kv = kv_layout(config)
    return GraphSpec(
        name="query_bridge",
        module=QueryBridgeGraph,
        inputs=[TensorSpec("vision_hidden", "float32", ["batch", n, dv])],
        outputs=[TensorSpec("image_embeds_g", "float32", ["batch", config.clip_embed_dim])]
        + [TensorSpec(nm, "float32", ["batch", H, Q, Dh]) for nm in kv.names("prefix")],
        dummy=lambda c: (torch.randn(2, n, dv, generator=torch.Generator().manual_seed(1)),),
        profiles=lambda c, lim: graph_profiles("query_bridge", model_dims(c), kv_layout(c), lim),
    )


def decoder_spec(config: InternVLConfig) -> GraphSpec:
    """Spec of text_decoder.onnx: one QLLaMA step with past K/V (prefill and decode alike)."""
    q = config.qllama
    H, Dh = q.num_attention_heads, q.head_dim
    kv = kv_layout(config)

    def dummy(c):
        B, P, T = 2, 3, 4
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(1, q.vocab_size, (B, T), generator=g)
        pos = torch.arange(P, P + T)[None].expand(B, -1).contiguous()
        mask = torch.ones(B, P + T, dtype=torch.long)
        past = [torch.randn(B, H, P, Dh, generator=g) for _ in range(2 * q.num_hidden_layers)]
        return (ids, pos, mask, *past)

    return GraphSpec(
        name="text_decoder",
        module=TextDecoderGraph,
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"]),
                TensorSpec("position_ids", "int64", ["batch", "seq"]),
                TensorSpec("attention_mask", "int64", ["batch", "total"])]
        + [TensorSpec(nm, "float32", ["batch", H, "past", Dh]) for nm in kv.names("past")],
        outputs=[TensorSpec("logits", "float32", ["batch", q.vocab_size]),
                 TensorSpec("hidden_states", "float32", ["batch", "seq", q.hidden_size])]
        + [TensorSpec(nm, "float32", ["batch", H, "seq", Dh]) for nm in kv.names("present")],
        dummy=dummy,
        profiles=lambda c, lim: graph_profiles("text_decoder", model_dims(c), kv_layout(c), lim),
    )


def all_specs(config: InternVLConfig, target: str = "tensorrt", precision: str = "fp32") -> list[GraphSpec]:
    """The bundle's graphs in run order; the onnxruntime target's decoder is the fused one
    (bridge_export.exporter.export.fused_decoder)."""
    if target == "onnxruntime":
        return [vision_spec(config), bridge_spec(config), fused_decoder_spec(config, precision)]
    return [vision_spec(config), bridge_spec(config), decoder_spec(config)]


def fused_unsupported(config: InternVLConfig) -> str | None:
    """Why GroupQueryAttention cannot run this model's decoder (None when it can)."""
    if config.qllama.head_dim % 8:
        return (f"head_dim {config.qllama.head_dim} is not a multiple of 8 (onnxruntime's GroupQueryAttention "
                "needs one)")
    return None


def fused_decoder_spec(config: InternVLConfig, precision: str = "fp32") -> GraphSpec:
    """Spec of the onnxruntime-target text_decoder.onnx (see the module docstring); the KV buffer is
    float16 in an fp16 bundle, float32 otherwise."""
    kvt = "float16" if precision == "fp16" else "float32"
    q = config.qllama
    H, Dh = q.num_attention_heads, q.head_dim
    kv = kv_layout(config)
    portable = decoder_spec(config)

    def no_trace(c):
        raise NotImplementedError("the fused decoder is written by the graph builder, never traced")

    return GraphSpec(
        name="text_decoder", module=portable.module,
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"]),
                TensorSpec("seqlens_k", "int32", ["batch"]),
                TensorSpec("query_seqlens", "int32", ["batch"]),
                TensorSpec("total_sequence_length", "int32", [])]
        + [TensorSpec(nm, kvt, ["batch", H, "capacity", Dh]) for nm in kv.names("past")],
        outputs=[TensorSpec("logits", "float32", ["batch", q.vocab_size]),
                 TensorSpec("hidden_states", "float32", ["batch", "seq", q.hidden_size])]
        + [TensorSpec(nm, kvt, ["batch", H, "capacity", Dh]) for nm in kv.names("present")],
        dummy=no_trace, tolerance=dict(portable.tolerance),
        profiles=lambda c, lim: [],  # onnxruntime only: no TensorRT profiles
    )
