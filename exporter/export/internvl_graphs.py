"""The bundle's three graphs written node by node from the config (no weights, no tracing).

Each function mirrors the reference module it replaces (reference_model/vision.py, qllama.py,
heads.py) and its spec in specs.py (names, dtypes, symbolic dims). Initializers are checkpoint
keys (see graph_builder.WeightRef), so QLLaMA's tensors in the bridge and the decoder are the
same names and are stored once.

Lean by construction: reshapes use 0 (copy this dim) instead of Shape/Gather/Concat chains,
RoPE cos/sin are precomputed tables gathered by position ids (the q tables carry 1/sqrt(Dh)),
rotate-half is one Gather with a sign folded into the sin table.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
from onnx import TensorProto

from bridge_export.reference_model.config import InternVLConfig

from bridge_export.exporter.export.graph_builder import GraphBuilder, lm_head, swiglu_mlp
from bridge_export.exporter.export.rope import rope_tables
from bridge_export.exporter.export.specs import GraphSpec, all_specs

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
_ELEM = {"float32": F32, "int64": I64, "int32": TensorProto.INT32, "float16": TensorProto.FLOAT16}


def _rope(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x (B, H, T, Dh) rotated: x * cos + rotate_half(x) * sin, rotate_half as one Gather."""
    h = head_dim // 2
    perm = b.ints(list(range(h, head_dim)) + list(range(h)))
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [b.op("Gather", [x, perm], axis=3), sin])])


def _pooling_head(b: GraphBuilder, x: str, p: str, dim: int, num_heads: int, out_dim: int) -> str:
    """AttentionPoolingBlock: (B, N, D) -> (B, out_dim); query = token mean; no residual."""
    with b.scope(p):
        dh = dim // num_heads
        xq = b.op("ReduceMean", [x, b.ints([1])], keepdims=1)  # (B, 1, D)
        qn, kn, vn = (b.layer_norm(t, f"{p}.norm1_{s}", 1e-5) for t, s in ((xq, "q"), (x, "k"), (x, "v")))
        a = f"{p}.cross_attn"
        # fp32 in int8-cpu; in int4-cpu Int4Options.keep decides (by default it keeps "clip_projector")
        quantize = b.int4 is not None
        lin = lambda t, n: b.linear(t, f"{a}.{n}.weight", f"{a}.{n}_bias", quantize=quantize)  # noqa: E731
        q = b.op("Mul", [b.heads(lin(qn, "q"), num_heads, dh, [0, 2, 1, 3]), b.act_const(dh ** -0.5)])
        k = b.heads(lin(kn, "k"), num_heads, dh, [0, 2, 3, 1])  # (B, H, Dh, N)
        v = b.heads(lin(vn, "v"), num_heads, dh, [0, 2, 1, 3])
        o = b.op("MatMul", [b.softmax(b.op("MatMul", [q, k])), v])  # (B, H, 1, Dh)
        out = b.linear(b.merge_heads(o, dim), f"{a}.proj.weight", f"{a}.proj.bias", quantize=quantize)
        return b.op("Reshape", [out, b.ints([0, out_dim])])  # (B, out_dim)


# -- vision encoder ----------------------------------------------------------------------------
def _vision_norm(b: GraphBuilder, cfg, x: str, p: str) -> str:
    if cfg.norm_type == "rms_norm":
        return b.rms_norm(x, f"{p}.weight", cfg.layer_norm_eps)
    return b.layer_norm(x, p, cfg.layer_norm_eps)


def build_vision(config: InternVLConfig, precision: str, int4=None) -> GraphBuilder:
    """pixel_values -> vision_hidden (InternViT last hidden state), image_embeds_c."""
    v = config.vision
    b = GraphBuilder("vision_encoder", precision, int4)
    s, D, H, Dh = config.image_size, v.hidden_size, v.num_attention_heads, v.head_dim
    px = b.to_act(b.input("pixel_values", F32, ["batch", 3, s, s]))
    e = "vision_model.embeddings"
    with b.scope("vision_model/embeddings"):
        patches = b.op("Conv", [px, b.weight(f"{e}.patch_embedding.weight"), b.weight(f"{e}.patch_embedding.bias")],
                       kernel_shape=[v.patch_size] * 2, strides=[v.patch_size] * 2)  # (B, D, g, g)
        patches = b.op("Transpose", [b.op("Reshape", [patches, b.ints([0, 0, -1])])], perm=[0, 2, 1])  # (B, g*g, D)
        batch = b.op("Shape", ["pixel_values"], start=0, end=1)
        cls = b.op("Expand", [b.weight(f"{e}.class_embedding"), b.op("Concat", [batch, b.ints([1, 1])], axis=0)])
        x = b.op("Add", [b.op("Concat", [cls, patches], axis=1), b.weight(f"{e}.position_embedding")])
    for i in range(v.num_hidden_layers):
        p = f"vision_model.encoder.layers.{i}"
        with b.scope(f"vision_model/encoder/layers.{i}"):
            with b.scope("attn"):
                h = _vision_norm(b, v, x, f"{p}.norm1")
                qkv = b.linear(h, f"{p}.attn.qkv.weight", f"{p}.attn.qkv.bias" if v.qkv_bias else None)
                q, k, val = b.op("Split", [qkv, b.ints([D, D, D])], n_out=3, axis=-1)
                if v.qk_normalization:
                    q, k = _vision_norm(b, v, q, f"{p}.attn.q_norm"), _vision_norm(b, v, k, f"{p}.attn.k_norm")
                q = b.op("Mul", [b.heads(q, H, Dh, [0, 2, 1, 3]), b.act_const(Dh ** -0.5)])  # (B, H, N, Dh)
                k = b.heads(k, H, Dh, [0, 2, 3, 1])  # (B, H, Dh, N)
                val = b.heads(val, H, Dh, [0, 2, 1, 3])
                o = b.op("MatMul", [b.softmax(b.op("MatMul", [q, k])), val])
                o = b.linear(b.merge_heads(o, D), f"{p}.attn.proj.weight", f"{p}.attn.proj.bias")
                x = b.op("Add", [x, b.op("Mul", [o, b.weight(f"{p}.ls1")])])
            with b.scope("mlp"):
                h = b.linear(_vision_norm(b, v, x, f"{p}.norm2"), f"{p}.mlp.fc1.weight", f"{p}.mlp.fc1.bias")
                gelu = b.op("Mul", [b.op("Mul", [h, b.op("Add", [b.op("Erf", [b.op("Div", [h, b.act_const(
                    math.sqrt(2.0))])]), b.act_const(1.0)])]), b.act_const(0.5)])  # exact (erf) GELU
                o = b.linear(gelu, f"{p}.mlp.fc2.weight", f"{p}.mlp.fc2.bias")
                x = b.op("Add", [x, b.op("Mul", [o, b.weight(f"{p}.ls2")])])
    b.output(b.to_f32(x), "vision_hidden", F32, ["batch", config.num_image_tokens, D])
    c = _pooling_head(b, x, "clip_projector", D, config.attn_pool_num_heads, config.clip_embed_dim)
    b.output(b.to_f32(c), "image_embeds_c", F32, ["batch", config.clip_embed_dim])
    return b


# -- QLLaMA layers -------------------------------------------------------------------------------
def _self_attention(b: GraphBuilder, cfg, x: str, p: str, rope: tuple, mask: str | None, past=None,
                    split=None, packed: bool = False) -> tuple[str, str, str]:
    """Returns (attention output (B, T, D), K after RoPE (B, H, T, Dh), V (B, H, T, Dh)); `packed`: q, k, v
    from one linear over the three weights concatenated (the fused decoder's `qkv_proj`, stored once)."""
    D, H, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    cos_q, sin_q, cos_k, sin_k = rope
    if packed:
        qkv = b.linear(x, f"{p}.qkv_proj.weight", parts=tuple(f"{p}.{n}_proj.weight" for n in "qkv"))
        xq, xk, xv = b.op("Split", [qkv, b.ints([D, D, D])], n_out=3, axis=-1)
    else:
        xq, xk, xv = (b.linear(x, f"{p}.{n}_proj.weight") for n in "qkv")
    q = _rope(b, b.heads(xq, H, Dh, [0, 2, 1, 3]), cos_q, sin_q, Dh)  # (B, H, T, Dh)
    k = _rope(b, b.heads(xk, H, Dh, [0, 2, 1, 3]), cos_k, sin_k, Dh)  # cache layout
    v = b.heads(xv, H, Dh, [0, 2, 1, 3])
    # q carries 1/sqrt(Dh) (from its tables); a last-two-axes Transpose right before a MatMul is
    # fused by onnxruntime (FusedMatMul transB)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])  # (B, H, T, T)
    if past is None:
        o = b.op("MatMul", [b.softmax(scores, mask), v])
    else:  # attend over [past ; new] without concatenating the cache (reference: attend_with_past)
        pk, pv = past
        past_scores = b.op("MatMul", [q, b.op("Transpose", [pk], perm=[0, 1, 3, 2])])  # (B, H, T, P)
        probs = b.softmax(b.op("Concat", [past_scores, scores], axis=-1), mask)  # (B, H, T, P+T)
        p_past = b.op("Slice", [probs, b.ints([0]), split, b.ints([-1])])
        p_new = b.op("Slice", [probs, split, b.ints([np.iinfo(np.int64).max]), b.ints([-1])])
        o = b.op("Add", [b.op("MatMul", [p_past, pv]), b.op("MatMul", [p_new, v])])
    return b.linear(b.merge_heads(o, D), f"{p}.o_proj.weight"), k, v


def _cross_attention(b: GraphBuilder, cfg, x: str, vision: str, p: str) -> str:
    """Query rows attend to all vision tokens: RMSNorm both sides, no mask, no RoPE."""
    D, H, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    vis = b.rms_norm(vision, f"{p}.norm2.weight", cfg.rms_norm_eps)
    q = b.heads(b.linear(b.rms_norm(x, f"{p}.norm1.weight", cfg.rms_norm_eps), f"{p}.q_proj.weight"),
                H, Dh, [0, 2, 1, 3])
    q = b.op("Mul", [q, b.act_const(Dh ** -0.5)])
    k = b.heads(b.linear(vis, f"{p}.k_proj.weight"), H, Dh, [0, 2, 3, 1])  # (B, H, Dh, S)
    v = b.heads(b.linear(vis, f"{p}.v_proj.weight"), H, Dh, [0, 2, 1, 3])
    o = b.op("MatMul", [b.softmax(b.op("MatMul", [q, k])), v])
    return b.linear(b.merge_heads(o, D), f"{p}.o_proj.weight")


def build_bridge(config: InternVLConfig, precision: str, int4=None, packed: bool = False) -> GraphBuilder:
    """vision_hidden -> image_embeds_g and the visual prefix (per layer K, V of the query rows). `packed`
    (bundles with the fused decoder): QLLaMA's q/k/v and gate/up weights are read as the fused decoder
    concatenates them, so the bundle stores each once for both graphs."""
    q = config.qllama
    Q, Dh = config.num_query_token, q.head_dim
    b = GraphBuilder("query_bridge", precision, int4)
    b.input("vision_hidden", F32, ["batch", config.num_image_tokens, config.vision.hidden_size])
    vision = b.to_act("vision_hidden")
    batch = b.op("Shape", ["vision_hidden"], start=0, end=1)
    x = b.op("Expand", [b.weight("query_tokens"), b.op("Concat", [batch, b.ints([1, 1])], axis=0)])  # (B, Q, D)
    tables = rope_tables(Dh, Q)  # positions 0..Q-1 are constants here
    rope = tuple(b.to_act(b.const(tables[n][None, None])) for n in ("cos_q", "sin_q", "cos_k", "sin_k"))
    for i in range(q.num_hidden_layers):
        p = f"qllama.model.layers.{i}"
        with b.scope(f"qllama/layers.{i}"):
            with b.scope("self_attn"):
                h = b.rms_norm(x, f"{p}.input_layernorm.weight", q.rms_norm_eps)
                o, k, v = _self_attention(b, q, h, f"{p}.self_attn", rope, None, packed=packed)
                x = b.op("Add", [x, o])
            b.output(b.to_f32(k), f"prefix.{i}.key", F32, ["batch", q.num_attention_heads, Q, Dh])
            b.output(b.to_f32(v), f"prefix.{i}.value", F32, ["batch", q.num_attention_heads, Q, Dh])
            if q.has_cross_attn(i):
                with b.scope("cross_attn"):
                    x = b.op("Add", [x, _cross_attention(b, q, x, vision, f"{p}.cross_attn")])
            with b.scope("mlp"):
                h = b.rms_norm(x, f"{p}.post_attention_layernorm.weight", q.rms_norm_eps)
                x = b.op("Add", [x, swiglu_mlp(b, h, f"{p}.mlp", q.intermediate_size if packed else None)])
    with b.scope("qllama/norm"):
        x = b.rms_norm(x, "qllama.model.norm.weight", q.rms_norm_eps)
    g = _pooling_head(b, x, "clip_projector2", q.hidden_size, config.attn_pool_num_heads, config.clip_embed_dim)
    b.output(b.to_f32(g), "image_embeds_g", F32, ["batch", config.clip_embed_dim])
    # outputs in the spec's order: image_embeds_g first, then the prefix
    b.outputs.insert(0, b.outputs.pop())
    return b


def _decoder_mask(b: GraphBuilder) -> tuple[str, str]:
    """Additive fp32 mask (B, 1, T, P+T) from attention_mask (B, P+T), and P as a 1-D tensor.

    New position t (absolute P+t) sees keys <= P+t that are real (reference: heads.additive_mask).
    """
    with b.scope("mask"):
        T = b.op("Shape", ["input_ids"], start=1, end=2)
        S = b.op("Shape", ["attention_mask"], start=1, end=2)
        P = b.op("Sub", [S, T])
        s0, p0 = b.op("Squeeze", [S]), b.op("Squeeze", [P])
        cols = b.op("Unsqueeze", [b.op("Range", [b.ints(0), s0, b.ints(1)]), b.ints([0])])  # (1, S)
        rows = b.op("Unsqueeze", [b.op("Range", [p0, s0, b.ints(1)]), b.ints([1])])  # (T, 1)
        causal = b.op("LessOrEqual", [cols, rows])  # (T, S)
        real = b.op("Cast", [b.op("Unsqueeze", ["attention_mask", b.ints([1, 2])])], to=TensorProto.BOOL)
        allowed = b.op("And", [causal, real])  # (B, 1, T, S)
        mask = b.op("Where", [allowed, b.const(0.0), b.const(np.finfo(np.float32).min)])
    return mask, P


def build_decoder(config: InternVLConfig, precision: str, int4=None) -> GraphBuilder:
    """One QLLaMA step with past K/V: logits (last position), hidden_states, present K/V (new positions)."""
    q = config.qllama
    H, Dh, L = q.num_attention_heads, q.head_dim, q.num_hidden_layers
    b = GraphBuilder("text_decoder", precision, int4)
    b.input("input_ids", I64, ["batch", "seq"])
    b.input("position_ids", I64, ["batch", "seq"])
    b.input("attention_mask", I64, ["batch", "total"])
    for i in range(L):
        for kind in ("key", "value"):
            b.input(f"past_key_values.{i}.{kind}", F32, ["batch", H, "past", Dh])
    mask, P = _decoder_mask(b)
    present = []
    with b.scope("rope"):
        tables = rope_tables(Dh, q.max_position_embeddings)
        rope = tuple(b.to_act(b.op("Unsqueeze", [b.op("Gather", [b.const(tables[n]), "position_ids"]),
                                                 b.ints([1])]))  # (B, 1, T, Dh)
                     for n in ("cos_q", "sin_q", "cos_k", "sin_k"))
    with b.scope("qllama/embed_tokens"):
        x = b.embedding("qllama.model.embed_tokens.weight", "input_ids")  # (B, T, D)
    for i in range(L):
        p = f"qllama.model.layers.{i}"
        with b.scope(f"qllama/layers.{i}"):
            with b.scope("self_attn"):
                past = tuple(b.to_act(f"past_key_values.{i}.{kind}") for kind in ("key", "value"))
                h = b.rms_norm(x, f"{p}.input_layernorm.weight", q.rms_norm_eps)
                o, k, v = _self_attention(b, q, h, f"{p}.self_attn", rope, mask, past, P)
                x = b.op("Add", [x, o])
            with b.scope("mlp"):
                h = b.rms_norm(x, f"{p}.post_attention_layernorm.weight", q.rms_norm_eps)
                x = b.op("Add", [x, swiglu_mlp(b, h, f"{p}.mlp")])
        present += [(k, f"present.{i}.key"), (v, f"present.{i}.value")]
    with b.scope("qllama/norm"):
        x = b.rms_norm(x, "qllama.model.norm.weight", q.rms_norm_eps)
    with b.scope("lm_head"):
        last = b.to_f32(b.op("Gather", [x, b.ints(-1)], axis=1))  # (B, D): logits of the last position only
        logits = lm_head(b, last, precision)
    b.output(logits, "logits", F32, ["batch", q.vocab_size])
    b.output(b.to_f32(x), "hidden_states", F32, ["batch", "seq", q.hidden_size])
    for val, name in present:
        b.output(b.to_f32(val), name, F32, ["batch", H, "seq", Dh])
    return b


BUILDERS = {"vision_encoder": build_vision, "query_bridge": build_bridge, "text_decoder": build_decoder}


def build_graphs(config: InternVLConfig, precision: str, int4=None, target: str = "tensorrt") -> dict[str, GraphBuilder]:
    """All three graphs (in run order) as builders holding weight references (`int4`: the
    bridge_export.exporter.quantize.int4.Int4Options of an int4-cpu bundle). `target` "onnxruntime"
    writes the decoder with onnxruntime's fused operators (exporter.export.fused_decoder)."""
    builders = dict(BUILDERS)
    if target == "onnxruntime":
        from bridge_export.exporter.export.fused_decoder import build_fused_decoder

        builders["text_decoder"] = build_fused_decoder
        builders["query_bridge"] = partial(build_bridge, packed=True)  # shares the decoder's packed weights
    return {spec.name: builders[spec.name](config, precision, int4) for spec in all_specs(config)}


def check_against_spec(b: GraphBuilder, spec: GraphSpec) -> None:
    """The built graph's inputs/outputs must be exactly the spec's (names, order, dtypes, shapes)."""
    def sig(vis):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vis]

    want_in = [(t.name, _ELEM[t.dtype], list(t.shape)) for t in spec.inputs]
    want_out = [(t.name, _ELEM[t.dtype], list(t.shape)) for t in spec.outputs]
    if sig(b.inputs) != want_in or sig(b.outputs) != want_out:
        raise RuntimeError(f"{spec.name}: built graph's inputs/outputs differ from its spec")
