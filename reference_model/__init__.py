"""The PyTorch reference: a faithful InternVL-14B (InternVL-C / InternVL-G), plus small presets."""
from pathlib import Path

from bridge_export.reference_model.config import PRESETS, ConfigError, InternVLConfig, QLlamaConfig, VisionConfig, preset_config
from bridge_export.reference_model.checkpoint_reader import iter_checkpoint_tensors
from bridge_export.reference_model.loading import CheckpointError, from_preset, load_pretrained, save_pretrained
from bridge_export.reference_model.model import InternVLModel

DEMO_CHECKPOINT = Path(__file__).parent / "demo_checkpoint"

__all__ = ["InternVLModel", "InternVLConfig", "VisionConfig", "QLlamaConfig", "PRESETS", "preset_config",
           "load_pretrained", "from_preset", "save_pretrained", "ConfigError", "CheckpointError", "DEMO_CHECKPOINT",
           "iter_checkpoint_tensors"]
