"""Building blocks shared by InternViT and QLLaMA: RMSNorm and rotary position embedding."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the original InternRMSNorm / LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


ROPE_BASE = 10000.0  # the original hard-codes it and ignores config.rope_theta


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos/sin tables for `position_ids` [B, T]: angles in fp32 (fp16 loses long positions)."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, Dh/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, Dh)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The LLaMA rotate-half convention (halves, not interleaved pairs)."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, Dh) by the angles whose cos/sin are given (B, 1, T, Dh)."""
    return x * cos + rotate_half(x) * sin
