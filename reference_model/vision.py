"""InternViT: the vision tower (state-dict prefix `vision_model.`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridge_export.reference_model.config import VisionConfig
from bridge_export.reference_model.layers import RMSNorm


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, cfg.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    """Patch conv + CLS + learnable positions (no interpolation at run time)."""

    def __init__(self, cfg: VisionConfig, image_size: int):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        n = (image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, n, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(dtype)  # (B, N, D)


class VisionAttention(nn.Module):
    """Self-attention with whole-vector qk-norm (over all heads at once, before the split)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.scale = cfg.head_dim ** -0.5
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = _norm(cfg, d)
            self.k_norm = _norm(cfg, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, C) each
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, Dh)
        k = k.view(B, N, self.num_heads, -1).transpose(1, 2)
        v = v.view(B, N, self.num_heads, -1).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class VisionMLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm block with layer scale: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    """The stack of InternViT layers (`encoder.layers.{i}`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternViT(nn.Module):
    """InternViT: pixel_values (B, 3, H, W) -> last hidden state (B, 1 + patches, D); no final norm."""

    def __init__(self, cfg: VisionConfig, image_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.embeddings = VisionEmbeddings(cfg, cfg.image_size)
        self.encoder = VisionEncoder(cfg)
        if image_size and image_size != cfg.image_size:
            self.resize_pos_embeddings(cfg.image_size, image_size, cfg.patch_size)

    def resize_pos_embeddings(self, old_size: int, new_size: int, patch_size: int) -> None:
        """Bicubic resize of the position grid, CLS kept (the original's `force_image_size`)."""
        pos = self.embeddings.position_embedding
        d = pos.shape[-1]
        if pos.is_meta:  # shapes only (torch.cat on meta would import torch's slow decompositions)
            n = (new_size // patch_size) ** 2 + 1
            self.embeddings.position_embedding = nn.Parameter(torch.empty(1, n, d, device="meta", dtype=pos.dtype))
            self.image_size = new_size
            return
        cls, grid = pos[:, :1], pos[:, 1:]
        g_old, g_new = old_size // patch_size, new_size // patch_size
        grid = grid.reshape(1, g_old, g_old, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=g_new, mode="bicubic", align_corners=False)
        grid = grid.to(cls.dtype).reshape(1, d, -1).permute(0, 2, 1)  # (1, g*g, D)
        self.embeddings.position_embedding = nn.Parameter(torch.cat([cls, grid], dim=1).contiguous())
        self.image_size = new_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.image_size or pixel_values.shape[-2] != self.image_size:
            raise ValueError(
                f"pixel_values must be [B, 3, {self.image_size}, {self.image_size}], got {list(pixel_values.shape)}: "
                f"resize images to {self.image_size}x{self.image_size}"
            )
        return self.encoder(self.embeddings(pixel_values))
