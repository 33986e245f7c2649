"""Build on the meta device, load original-format checkpoints with assign=True, save them back."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from runtime.errors import UserError

from .config import ConfigError, InternVLConfig, preset_config
from .model import InternVLModel

log = logging.getLogger("reference_model")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
IGNORED_PREFIXES = ("itm_head.",)  # carried by checkpoints, unused at inference


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded as InternVL-14B: the message says why."""


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _weight_files(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: shards listed in {index} are missing: {missing}; re-download them")
            return [path / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(
        f"{path} has no weights: expected model.safetensors, pytorch_model.bin or a sharded *.index.json"
    )


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                out.update(load_file(str(f)))
            else:
                out.update(torch.load(str(f), map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # corrupt files raise many types; name the file either way
            raise CheckpointError(f"cannot read weights from {f}: {e}") from e
    return out


def load_state(model: InternVLModel, state: dict[str, torch.Tensor], dtype: torch.dtype) -> InternVLModel:
    """Fill a (meta) model from an original-format state dict; any key or shape mismatch raises."""
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(IGNORED_PREFIXES)}
    tie = model.config.tie_word_embeddings
    if tie:
        # The original ties lm_head and embed_tokens on load; lm_head, loaded last, wins.
        src = state.get("qllama.lm_head.weight", state.get("qllama.model.embed_tokens.weight"))
        if src is not None:
            state["qllama.model.embed_tokens.weight"] = state["qllama.lm_head.weight"] = src
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"mis-shaped keys {shapes[:8]}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    for k in model.state_dict():
        if k.startswith(IGNORED_PREFIXES):
            state[k] = torch.zeros(model.state_dict()[k].shape, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tie:
        model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
    log.info("lm_head and embed_tokens are %s (tie_word_embeddings=%s)", "tied" if tie else "separate", tie)
    return model.eval()


def load_pretrained(path, dtype=torch.float32) -> InternVLModel:
    """Load an original InternVL-14B model directory (config.json + safetensors/bin, sharded or not)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: give a checkpoint directory holding config.json")
    try:
        config = InternVLConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    files = _weight_files(path)
    with torch.device("meta"):
        model = InternVLModel(config)
    return load_state(model, _read_tensors(files), _dtype(dtype))


def init_weights(model: InternVLModel, seed: int = 0) -> InternVLModel:
    """Deterministic random weights (std 0.02 matrices, unit norms, small layer scales) for presets."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name == "logit_scale":
                p.fill_(float(torch.log(torch.tensor(1 / 0.07))))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif "norm" in name and name.endswith("bias") or name.endswith("_bias") or name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("ls1", "ls2")):
                p.fill_(0.1)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def from_preset(name: str, seed: int = 0, device=None, dtype=torch.float32) -> InternVLModel:
    """A preset with seeded random weights; `device="meta"` allocates nothing (inspect the 14B shapes)."""
    config = preset_config(name)
    if str(device) == "meta":
        with torch.device("meta"):
            return InternVLModel(config).eval()
    model = InternVLModel(config)
    init_weights(model, seed)
    if config.tie_word_embeddings:
        model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
    return model.to(device=device or "cpu", dtype=dtype).eval()


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
