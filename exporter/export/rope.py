"""RoPE tables exactly as the reference computes them, shared by the portable and the fused decoder."""
from __future__ import annotations

import math

import numpy as np
import torch

from bridge_export.reference_model.layers import rope_cos_sin


def rope_tables(head_dim: int, positions: int) -> dict[str, np.ndarray]:
    """cos/sin [positions, Dh] exactly as the reference computes them; sin signed for rotate-half,
    the q tables scaled by 1/sqrt(Dh) (the attention scale, folded in)."""
    pos = torch.arange(positions)[None]
    cos, sin = (t[0, 0].numpy() for t in rope_cos_sin(pos, head_dim, torch.float32))  # (P, Dh)
    h = head_dim // 2
    sin = np.concatenate([-sin[:, :h], sin[:, h:]], axis=1)
    s = np.float32(1.0 / math.sqrt(head_dim))
    return {"cos_k": cos, "sin_k": sin, "cos_q": cos * s, "sin_q": sin * s}
