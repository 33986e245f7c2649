"""QLLaMA: LLaMA with cross-attention to the vision tokens on every `freq`-th layer.

State-dict prefix `qllama.` (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`).
Self-attention layers take an optional past (K, V) and return their new (K, V) separately, so
the same code serves full recomputation, a concatenating cache, and the export wrappers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bridge_export.reference_model.config import QLlamaConfig
from bridge_export.reference_model.layers import RMSNorm, apply_rope


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with the softmax in fp32; `mask` is additive (B, 1, T, S)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.float()
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1).to(q.dtype) @ v  # (B, H, T, Dh)


def attend_with_past(q, past_k, past_v, k, v, mask: torch.Tensor) -> torch.Tensor:
    """`attend` over [past ; new] keys without concatenating the cache: scores are joined instead.

    Mathematically equal to attend(q, cat(past_k, k), cat(past_v, v), mask); exported graphs thus
    never copy the whole KV cache per step (only the small score tensor is concatenated).
    """
    P = past_k.shape[2]
    scores = torch.cat([q @ past_k.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1) / math.sqrt(q.shape[-1])
    probs = (scores.float() + mask).softmax(dim=-1).to(q.dtype)  # (B, H, T, P+T)
    return probs[..., :P] @ past_v + probs[..., P:] @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE (no bias, no GQA: the original ignores num_key_value_heads)."""

    def __init__(self, cfg: QLlamaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask, past=None):
        """x (B, T, D) -> output (B, T, D) and this step's (K, V), each (B, H, T, Dh), K after RoPE."""
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, mask) if past is None else attend_with_past(q, past[0], past[1], k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.o_proj(out), (k, v)


class CrossAttention(nn.Module):
    """Query rows attend to all vision tokens: RMSNorm both sides, no mask, no RoPE, no bias."""

    def __init__(self, cfg: QLlamaConfig, vision_width: int):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(vision_width, d, bias=False)
        self.v_proj = nn.Linear(vision_width, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.norm1 = RMSNorm(d, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(vision_width, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        B, Q, D = x.shape
        S = vision.shape[1]
        vision = self.norm2(vision)
        q = self.q_proj(self.norm1(x)).view(B, Q, self.num_heads, -1).transpose(1, 2)  # (B, H, Q, Dh)
        k = self.k_proj(vision).view(B, S, self.num_heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        v = self.v_proj(vision).view(B, S, self.num_heads, -1).transpose(1, 2)
        out = attend(q, k, v, None).transpose(1, 2).reshape(B, Q, D)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: QLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Self-attention, then (cross layers, query rows only) cross-attention, then the MLP."""

    def __init__(self, cfg: QLlamaConfig, index: int, vision_width: int, num_query_token: int):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.num_query_token = num_query_token
        self.has_cross_attn = cfg.has_cross_attn(index)
        if self.has_cross_attn:
            self.cross_attn = CrossAttention(cfg, vision_width)

    def forward(self, x, cos, sin, mask, vision=None, past=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        # As the original: only when vision is given and the step holds the query rows.
        if self.has_cross_attn and vision is not None and x.shape[1] >= self.num_query_token:
            Q = self.num_query_token
            q = x[:, :Q] + self.cross_attn(x[:, :Q], vision)
            x = torch.cat([q, x[:, Q:]], dim=1)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class QLlamaModel(nn.Module):
    """The QLLaMA trunk: embeddings, layers, final RMSNorm."""

    def __init__(self, cfg: QLlamaConfig, vision_width: int, num_query_token: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, vision_width, num_query_token) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, mask, vision=None, past=None):
        """Run the trunk. Returns the final-norm hidden states (B, T, D) and each layer's new (K, V).

        `mask` is additive (B, 1, T, P + T) in fp32; `past` is a list of (K, V) of length P or None.
        """
        from bridge_export.reference_model.layers import rope_cos_sin

        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, inputs_embeds.dtype)
        x, new_kv = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, vision, None if past is None else past[i])
            new_kv.append(kv)
        return self.norm(x), new_kv


class QLlamaForCausalLM(nn.Module):
    """Trunk plus `lm_head` (tied to `embed_tokens` or not, as the config says)."""

    def __init__(self, cfg: QLlamaConfig, vision_width: int, num_query_token: int):
        super().__init__()
        self.model = QLlamaModel(cfg, vision_width, num_query_token)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
