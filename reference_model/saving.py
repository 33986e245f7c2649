"""Save a model in the original layout (config.json + model.safetensors).

Its own module so that the model (whose save_pretrained method calls it) and the loaders (which
re-export it) both import it without importing each other.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def save_pretrained(model: nn.Module, directory) -> None:
    """Write config.json + model.safetensors (original key names) atomically into `directory`."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = d / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
