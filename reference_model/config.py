"""Configuration dataclasses for InternVL-14B (InternVL-C / InternVL-G) and named presets.

The fields mirror the original `config.json` (`vision_config`, `qllama_config` and the top
level). Every size is read from the config; nothing is hard-coded (the original fixes the
cross-attention vision width at 3200 and the decoder's query count at 96).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge_export.runtime.errors import UserError


class ConfigError(UserError, ValueError):
    """A config.json that is not a valid InternVL-14B configuration."""


def _typed(cls, d: dict[str, Any], where: str):
    """Build dataclass `cls` from the keys of `d` it knows, checking each value's type."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d or d[f.name] is None and f.default is not None:
            continue
        v = d[f.name]
        want = f.type if isinstance(f.type, str) else f.type.__name__
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool),
            "float": isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": isinstance(v, (bool, int)),
            "str": isinstance(v, str),
        }.get(want.split(" ")[0], True)
        if want == "int | None":
            ok = v is None or (isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ConfigError(
                f"{where}.{f.name} must be {want}, got {type(v).__name__} {v!r}: fix config.json"
            )
        kwargs[f.name] = float(v) if want == "float" else v
    return cls(**kwargs)


@dataclass
class VisionConfig:
    """InternViT (`vision_config`, model_type `intern_vit_6b`)."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 3200
    num_hidden_layers: int = 48
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    qkv_bias: bool = False
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads


@dataclass
class QLlamaConfig:
    """QLLaMA (`qllama_config`, a LlamaConfig plus cross-attention fields)."""

    vocab_size: int = 49954
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    # The original ignores rope_theta and hard-codes 10000; we keep the field for the record only.
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads

    def has_cross_attn(self, layer: int) -> bool:
        """Whether decoder layer `layer` carries cross-attention (the original's `i % freq == 0`)."""
        return layer % self.cross_attention_frequency == 0


@dataclass
class InternVLConfig:
    """Top-level InternVL-14B config (model_type `internvl`)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qllama: QLlamaConfig = field(default_factory=QLlamaConfig)
    num_query_token: int = 96
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    force_image_size: int | None = None
    tie_word_embeddings: bool = True
    # LoRA rank r the original wraps each tower with before loading (0 = none): such checkpoints carry
    # peft key names; the loader merges the adapters (bridge_export.reference_model.checkpoint_reader).
    use_backbone_lora: int = 0
    use_qllama_lora: int = 0

    @property
    def image_size(self) -> int:
        """The image size the model runs at (force_image_size wins, as in the original)."""
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        """Vision tokens per image: patches + CLS."""
        return (self.image_size // self.vision.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InternVLConfig":
        """Read a config dict in the original `config.json` layout."""
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        if d.get("model_type") not in (None, "internvl"):
            raise ConfigError(
                f"model_type is {d.get('model_type')!r}, not 'internvl': this is not an "
                "InternVL-14B checkpoint (InternVL-C/G); point --checkpoint at one"
            )
        for key in ("vision_config", "qllama_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"config.json lacks the object {key!r}: not an InternVL-14B config")
        q = dict(d["qllama_config"])
        if "cross_attention_frequency" in d and d["cross_attention_frequency"] is not None:
            q["cross_attention_frequency"] = d["cross_attention_frequency"]
        top = {k: v for k, v in d.items() if k not in ("vision_config", "qllama_config")}
        top.setdefault("tie_word_embeddings", True)  # transformers' default when absent
        cfg = _typed(cls, top, "config")
        cfg.vision = _typed(VisionConfig, d["vision_config"], "vision_config")
        cfg.qllama = _typed(QLlamaConfig, q, "qllama_config")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError for sizes that cannot form a model."""
        v, q = self.vision, self.qllama
        checks = [
            (v.hidden_size % v.num_attention_heads == 0, "vision hidden_size % num_attention_heads"),
            (q.hidden_size % q.num_attention_heads == 0, "qllama hidden_size % num_attention_heads"),
            (v.hidden_size % self.attn_pool_num_heads == 0, "vision hidden_size % attn_pool_num_heads"),
            (q.hidden_size % self.attn_pool_num_heads == 0, "qllama hidden_size % attn_pool_num_heads"),
            (self.image_size % v.patch_size == 0, "image_size % patch_size"),
            (q.head_dim % 2 == 0, "qllama head_dim must be even for RoPE"),
            (self.num_query_token >= 1, "num_query_token >= 1"),
            (q.cross_attention_frequency >= 1, "cross_attention_frequency >= 1"),
        ]
        for ok, what in checks:
            if not ok:
                raise ConfigError(f"invalid config: {what} does not hold")

    def to_dict(self) -> dict[str, Any]:
        """The original `config.json` layout (what `load_pretrained` reads back)."""
        q = dataclasses.asdict(self.qllama)
        q.update(model_type="llama", num_query_token=self.num_query_token,
                 tie_word_embeddings=self.tie_word_embeddings, num_key_value_heads=q["num_attention_heads"])
        v = dataclasses.asdict(self.vision)
        v.update(model_type="intern_vit_6b", use_flash_attn=False)
        return {
            "architectures": ["InternVLModel"],
            "model_type": "internvl",
            "vision_config": v,
            "qllama_config": q,
            "num_query_token": self.num_query_token,
            "clip_embed_dim": self.clip_embed_dim,
            "attn_pool_num_heads": self.attn_pool_num_heads,
            "hidden_size": self.qllama.hidden_size,
            "force_image_size": self.force_image_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_backbone_lora": self.use_backbone_lora,
            "use_qllama_lora": self.use_qllama_lora,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "InternVLConfig":
        """Read `config.json` (or a directory holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p} not found: a checkpoint directory needs config.json")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON ({e}): re-download or fix it") from e
        return cls.from_dict(d)


PRESETS: dict[str, InternVLConfig] = {
    "internvl-14b-224px": InternVLConfig(tie_word_embeddings=False),
    "tiny": InternVLConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128),
        qllama=QLlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=128),
        num_query_token=6, clip_embed_dim=24, attn_pool_num_heads=4, tie_word_embeddings=False,
    ),
    # ~89M parameters, 2048 positions, the real tokenizer's vocabulary: for benchmarks.
    "small": InternVLConfig(
        vision=VisionConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=6,
                            num_attention_heads=6, intermediate_size=1536),
        qllama=QLlamaConfig(vocab_size=49954, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                            num_attention_heads=8, max_position_embeddings=2048),
        num_query_token=32, clip_embed_dim=256, attn_pool_num_heads=8, tie_word_embeddings=False,
    ),
    # InternVL-14B's real widths (vision 3200/25 heads/MLP 12800; QLLaMA 4096/32 heads/11008, vocab 49954,
    # 96 queries, cross-attention on every 2nd layer) with 2 vision + 2 QLLaMA layers: every tensor shape
    # of the 14B except the layer count. 1,212,586,627 parameters (4.85 GB fp32, 2.43 GB bf16); the largest
    # tensors are embed_tokens / lm_head (49954 x 4096 = 204.6 M). For scale tests of export and loading.
    "real-width": InternVLConfig(
        vision=VisionConfig(num_hidden_layers=2),
        qllama=QLlamaConfig(num_hidden_layers=2),
        tie_word_embeddings=False,
    ),
    # The shipped demo model (reference_model.DEMO_CHECKPOINT): 8x8 digits shown at 16 px.
    "digits": InternVLConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128),
        qllama=QLlamaConfig(vocab_size=24, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=64),
        num_query_token=4, clip_embed_dim=32, attn_pool_num_heads=4, tie_word_embeddings=False,
    ),
}


def preset_config(name: str) -> InternVLConfig:
    """A fresh copy of the named preset's config."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], vision=dataclasses.replace(PRESETS[name].vision),
                               qllama=dataclasses.replace(PRESETS[name].qllama))
