"""The text decoder for the onnxruntime target: onnxruntime's fused contrib operators, one shared KV buffer.

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one q/k/v MatMul (MatMulNBits
/ MatMulInteger in the CPU precisions) over the checkpoint's three projections concatenated while
streaming, GroupQueryAttention (RoPE inside, past and present one preallocated buffer of the
request's capacity, appended in place), o_proj, the SwiGLU MLP with gate/up as one MatMul made the
same way (graph_builder.swiglu_mlp, which the bridge of such a bundle shares). The layout follows what
onnxruntime-genai's model builder writes for LLaMA (its `make_group_query_attention`), written
here from our config; the portable decoder (internvl_graphs.build_decoder) stays for TensorRT.

Contract (`fused_decoder_spec`; the runtime drives it in bridge_export.runtime.kv_cache):
* `past_key_values.{i}.*` / `present.{i}.*` are [rows, heads, capacity, head_dim]: the runtime binds
  one buffer as both, so a step only writes its new slots;
* row b holds `seqlens_k[b] + 1` tokens after the step, of which `query_seqlens[b]` are this step's
  (right-padded chunk; 0 = idle row, its cache untouched); a token's position is its slot index,
  so the visual prefix (slots 0..Q-1, already rotated by the bridge) is simply the first text step's
  past, and a text embedding is a step over an empty buffer;
* `total_sequence_length` is an upper bound of every row's `seqlens_k + 1` (e.g. the capacity);
* `logits` are those of each row's last valid token; `hidden_states` [rows, seq, D] (final norm).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from bridge_export.reference_model.config import InternVLConfig

from bridge_export.exporter.export.graph_builder import GraphBuilder, lm_head, swiglu_mlp
from bridge_export.exporter.export.rope import rope_tables
from bridge_export.exporter.export.specs import kv_layout

F32, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
_NPDT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _rope_caches(head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's plain cos/sin caches [positions, Dh/2] (rotate-half layout), fp32."""
    t = rope_tables(head_dim, positions)
    h = head_dim // 2
    return np.ascontiguousarray(t["cos_k"][:, :h]), np.ascontiguousarray(t["sin_k"][:, h:])  # sin_k: [-sin, sin]


def build_fused_decoder(config: InternVLConfig, precision: str, int4=None) -> GraphBuilder:
    """The onnxruntime-target decoder step (fp32, fp16, int8-cpu, int4-cpu) as fused_decoder_spec says."""
    q = config.qllama
    D, H, Dh, L, eps = q.hidden_size, q.num_attention_heads, q.head_dim, q.num_hidden_layers, q.rms_norm_eps
    b = GraphBuilder("text_decoder", precision, int4)
    b.input("input_ids", I64, ["batch", "seq"])
    b.input("seqlens_k", I32, ["batch"])
    b.input("query_seqlens", I32, ["batch"])
    b.input("total_sequence_length", I32, [])
    kv = kv_layout(config)
    for name in kv.names("past"):  # the KV buffer is in the activation dtype (GroupQueryAttention's T)
        b.input(name, b.act, ["batch", H, "capacity", Dh])
    cos, sin = _rope_caches(Dh, q.max_position_embeddings)
    act = _NPDT[b.act]
    cos_c, sin_c = b.const(cos, act), b.const(sin, act)
    with b.scope("qllama/embed_tokens"):
        x = b.embedding("qllama.model.embed_tokens.weight", "input_ids")
    residual = x
    with b.scope("qllama/layers.0"):
        # written as the RMSNorm pattern, which onnxruntime fuses into SimplifiedLayerNormalization (that
        # operator is onnxruntime's own in the ONNX domain, which onnx.checker rejects)
        h = b.rms_norm(x, "qllama.model.layers.0.input_layernorm.weight", eps)
    for i in range(L):
        p = f"qllama.model.layers.{i}"
        pk, pv, ok, ov = kv.layers()[i]
        with b.scope(f"qllama/layers.{i}"):
            with b.scope("self_attn"):
                qkv = b.linear(h, f"{p}.self_attn.qkv_proj.weight",
                               parts=tuple(f"{p}.self_attn.{n}_proj.weight" for n in "qkv"))
                attn, k_out, v_out = b.op(
                    "GroupQueryAttention",
                    [qkv, "", "", pk, pv, "seqlens_k", "total_sequence_length", cos_c, sin_c]
                    + [""] * 7 + ["query_seqlens"],
                    n_out=3, domain="com.microsoft", num_heads=H, kv_num_heads=H, do_rotary=1,
                    rotary_interleaved=0, scale=float(Dh ** -0.5))
                o = b.linear(attn, f"{p}.self_attn.o_proj.weight")
            with b.scope("mlp"):
                h, residual = b.skip_norm(o, residual, f"{p}.post_attention_layernorm.weight", eps)
                # gate and up as one MatMul over the two projections concatenated (as q/k/v): one
                # weight stream and, in int4, one quantization of `h` instead of two
                m = swiglu_mlp(b, h, f"{p}.mlp", packed=q.intermediate_size)
        nxt = f"qllama.model.layers.{i + 1}.input_layernorm.weight" if i + 1 < L else "qllama.model.norm.weight"
        with b.scope(f"qllama/layers.{i + 1}" if i + 1 < L else "qllama/norm"):
            h, residual = b.skip_norm(m, residual, nxt, eps)
        b.output(k_out, ok, b.act, ["batch", H, "capacity", Dh])
        b.output(v_out, ov, b.act, ["batch", H, "capacity", Dh])
    with b.scope("lm_head"):
        # each row's last valid token: index max(query_seqlens - 1, 0) along seq (an idle row reads slot 0)
        last = b.op("Max", [b.op("Sub", [b.cast("query_seqlens", I64), b.ints(1)]), b.ints(0)])
        idx = b.op("Expand", [b.op("Reshape", [last, b.ints([-1, 1, 1])]),
                              b.op("Concat", [b.op("Shape", ["input_ids"], start=0, end=1), b.ints([1, D])], axis=0)])
        x_last = b.op("Reshape", [b.op("GatherElements", [h, idx], axis=1), b.ints([0, D])])  # (B, D)
        logits = lm_head(b, b.to_f32(x_last), precision)
    b.output(logits, "logits", F32, ["batch", q.vocab_size])
    b.output(b.to_f32(h), "hidden_states", F32, ["batch", "seq", q.hidden_size])
    # outputs in the spec's order: logits, hidden_states, then every layer's present
    n = 2 * L
    b.outputs[:] = b.outputs[n:] + b.outputs[:n]
    return b
