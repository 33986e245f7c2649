"""The PyTorch reference: a faithful InternVL-14B (InternVL-C / InternVL-G), plus small presets.

Names are imported on first use (PEP 562), so that `bridge_export.reference_model.config` (the
presets: plain dataclasses) can be read without torch, as the CLI's help does on a base install.
"""
from __future__ import annotations

import importlib
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "demo_checkpoint"

# public name -> the submodule that defines it
_LAZY = {
    "PRESETS": "config", "ConfigError": "config", "InternVLConfig": "config", "QLlamaConfig": "config",
    "VisionConfig": "config", "preset_config": "config",
    "iter_checkpoint_tensors": "checkpoint_reader",
    "CheckpointError": "loading", "from_preset": "loading", "load_pretrained": "loading", "save_pretrained": "loading",
    "InternVLModel": "model",
}

__all__ = ["InternVLModel", "InternVLConfig", "VisionConfig", "QLlamaConfig", "PRESETS", "preset_config",
           "load_pretrained", "from_preset", "save_pretrained", "ConfigError", "CheckpointError", "DEMO_CHECKPOINT",
           "iter_checkpoint_tensors"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
