"""One export spec per graph: names, dtypes, symbolic shapes, dummy inputs, tolerance, TensorRT shapes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from reference_model.config import InternVLConfig

from .wrappers import QueryBridgeGraph, TextDecoderGraph, VisionEncoderGraph


@dataclass
class TensorSpec:
    """One graph input or output: name, ONNX element type, shape with symbolic dims as strings."""

    name: str
    dtype: str
    shape: list


@dataclass
class Limits:
    """User limits that decide the dynamic ranges (and TensorRT profiles)."""

    max_batch: int = 8
    max_seq: int = 0  # 0: max_position_embeddings

    def seq(self, config: InternVLConfig) -> int:
        """The longest sequence (queries + text) the profiles must admit."""
        return min(self.max_seq or config.qllama.max_position_embeddings, config.qllama.max_position_embeddings)


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


def _kv_names(config: InternVLConfig, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(config.qllama.num_hidden_layers) for kind in ("key", "value")]


def vision_spec(config: InternVLConfig) -> GraphSpec:
    """Spec of vision_encoder.onnx: pixel_values -> vision_hidden, image_embeds_c."""
    s, v = config.image_size, config.vision

    def profiles(c, lim):
        return [{"pixel_values": ([1, 3, s, s], [max(1, lim.max_batch // 2), 3, s, s], [lim.max_batch, 3, s, s])}]

    return GraphSpec(
        name="vision_encoder",
        module=VisionEncoderGraph,
        inputs=[TensorSpec("pixel_values", "float32", ["batch", 3, s, s])],
        outputs=[TensorSpec("vision_hidden", "float32", ["batch", config.num_image_tokens, v.hidden_size]),
                 TensorSpec("image_embeds_c", "float32", ["batch", config.clip_embed_dim])],
        dummy=lambda c: (torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0)),),
        profiles=profiles,
    )


def bridge_spec(config: InternVLConfig) -> GraphSpec:
    """Spec of query_bridge.onnx: vision_hidden -> image_embeds_g and the visual prefix."""
    q = config.qllama
    Q, H, Dh = config.num_query_token, q.num_attention_heads, q.head_dim
    n, dv = config.num_image_tokens, config.vision.hidden_size

    def profiles(c, lim):
        return [{"vision_hidden": ([1, n, dv], [max(1, lim.max_batch // 2), n, dv], [lim.max_batch, n, dv])}]

    return GraphSpec(
        name="query_bridge",
        module=QueryBridgeGraph,
        inputs=[TensorSpec("vision_hidden", "float32", ["batch", n, dv])],
        outputs=[TensorSpec("image_embeds_g", "float32", ["batch", config.clip_embed_dim])]
        + [TensorSpec(nm, "float32", ["batch", H, Q, Dh]) for nm in _kv_names(config, "prefix")],
        dummy=lambda c: (torch.randn(2, n, dv, generator=torch.Generator().manual_seed(1)),),
        profiles=profiles,
    )


def decoder_spec(config: InternVLConfig) -> GraphSpec:
    """Spec of text_decoder.onnx: one QLLaMA step with past K/V (prefill and decode alike)."""
    q = config.qllama
    H, Dh = q.num_attention_heads, q.head_dim

    def dummy(c):
        B, P, T = 2, 3, 4
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(1, q.vocab_size, (B, T), generator=g)
        pos = torch.arange(P, P + T)[None].expand(B, -1).contiguous()
        mask = torch.ones(B, P + T, dtype=torch.long)
        past = [torch.randn(B, H, P, Dh, generator=g) for _ in range(2 * q.num_hidden_layers)]
        return (ids, pos, mask, *past)

    def profiles(c, lim):
        B, S = lim.max_batch, lim.seq(c)
        ob = max(1, B // 2)
        kv = lambda p: ([1, H, p[0], Dh], [ob, H, p[1], Dh], [B, H, p[2], Dh])  # noqa: E731

        def one(t, p):
            prof = {"input_ids": ([1, t[0]], [ob, t[1]], [B, t[2]]),
                    "position_ids": ([1, t[0]], [ob, t[1]], [B, t[2]]),
                    "attention_mask": ([1, t[0] + p[0]], [ob, t[1] + p[1]], [B, min(S, t[2] + p[2])])}
            prof.update({nm: kv(p) for nm in _kv_names(c, "past_key_values")})
            return prof

        Q = c.num_query_token
        prefill = one((1, min(64, S // 2), S), (0, min(Q, S // 2), S - 1))
        decode = one((1, 1, 1), (0, min(S // 2, Q + 64), S - 1))
        return [prefill, decode]

    return GraphSpec(
        name="text_decoder",
        module=TextDecoderGraph,
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"]),
                TensorSpec("position_ids", "int64", ["batch", "seq"]),
                TensorSpec("attention_mask", "int64", ["batch", "total"])]
        + [TensorSpec(nm, "float32", ["batch", H, "past", Dh]) for nm in _kv_names(config, "past_key_values")],
        outputs=[TensorSpec("logits", "float32", ["batch", q.vocab_size]),
                 TensorSpec("hidden_states", "float32", ["batch", "seq", q.hidden_size])]
        + [TensorSpec(nm, "float32", ["batch", H, "seq", Dh]) for nm in _kv_names(config, "present")],
        dummy=dummy,
        profiles=profiles,
    )


def all_specs(config: InternVLConfig) -> list[GraphSpec]:
    """The bundle's graphs in run order."""
    return [vision_spec(config), bridge_spec(config), decoder_spec(config)]
