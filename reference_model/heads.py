"""Attention-pooling heads (`clip_projector`, `clip_projector2`) and the attention masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PoolingCrossAttention(nn.Module):
    """q/k/v Linear without bias plus separate q_bias/k_bias/v_bias parameters, then `proj`."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x_q, x_k, x_v):
        B, N, C = x_q.shape
        S = x_k.shape[1]
        q = F.linear(x_q, self.q.weight, self.q_bias).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B,H,N,Dh)
        k = F.linear(x_k, self.k.weight, self.k_bias).view(B, S, self.num_heads, -1).transpose(1, 2)  # (B,H,S,Dh)
        v = F.linear(x_v, self.v.weight, self.v_bias).view(B, S, self.num_heads, -1).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, S)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class AttentionPoolingBlock(nn.Module):
    """Pool tokens (B, N, D) -> (B, out_dim): the query is the token mean; LayerNorms eps 1e-5; no residual."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = PoolingCrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = x.mean(1, keepdim=True)  # (B, 1, D)
        out = self.cross_attn(self.norm1_q(x_q), self.norm1_k(x), self.norm1_v(x))
        return out.squeeze(1)


def additive_mask(key_mask: torch.Tensor, step_len: int, bidirectional_prefix: int = 0) -> torch.Tensor:
    """Additive fp32 mask (B, 1, T, P+T) for a step of `step_len` new positions.

    `key_mask` (B, P+T) marks real keys (1) and padding (0). New position t (absolute P+t) sees
    keys at absolute indices <= P+t that are real. The first `bidirectional_prefix` positions see
    each other both ways (the original's prefix-LM: queries bidirectional, blind to the text).
    """
    B, S = key_mask.shape
    P = S - step_len
    rows = torch.arange(step_len, device=key_mask.device)[:, None] + P
    cols = torch.arange(S, device=key_mask.device)[None, :]
    allowed = (cols <= rows)[None, None] & key_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    if bidirectional_prefix:
        Q = bidirectional_prefix
        allowed = allowed.clone()
        allowed[:, :, : max(0, Q - P), :Q] = True
    zero = torch.zeros((), dtype=torch.float32, device=key_mask.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)
