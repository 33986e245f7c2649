"""Build on the meta device, load original-format checkpoints with assign=True, save them back."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bridge_export.reference_model.checkpoint_reader import CheckpointError  # noqa: F401 (re-exported)
from bridge_export.reference_model.checkpoint_reader import IGNORED_PREFIXES, iter_checkpoint_tensors, read_config
from bridge_export.reference_model.config import InternVLConfig, preset_config
from bridge_export.reference_model.model import InternVLModel
from bridge_export.reference_model.saving import save_pretrained  # noqa: F401 (re-exported)

log = logging.getLogger("reference_model")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_state(model: InternVLModel, state: dict[str, torch.Tensor], dtype: torch.dtype) -> InternVLModel:
    """Fill a (meta) model from `iter_checkpoint_tensors`' output (keys and shapes already checked,
    floats already `dtype`, itm_head left out, a tied embedding yielded once as embed_tokens)."""
    tie = model.config.tie_word_embeddings
    if tie:  # the original ties lm_head and embed_tokens on load (the reader took lm_head's when stored)
        state["qllama.lm_head.weight"] = state["qllama.model.embed_tokens.weight"]
    for k, v in model.state_dict().items():
        if k.startswith(IGNORED_PREFIXES):
            state[k] = torch.zeros(v.shape, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tie:
        model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
    log.info("lm_head and embed_tokens are %s (tie_word_embeddings=%s)", "tied" if tie else "separate", tie)
    return model.eval()


def load_pretrained(path, dtype=torch.float32, lora_alpha: float | None = None) -> InternVLModel:
    """Load an original InternVL-14B model directory (config.json + safetensors/bin, sharded or not).

    Tensors are read one at a time (`iter_checkpoint_tensors`), so the peak is the model at `dtype`
    plus one tensor. LoRA-adapted checkpoints (peft key names) load merged; `lora_alpha` as in
    `checkpoint_reader.plan_checkpoint` (default 2 * r). The returned model's config has
    use_backbone_lora / use_qllama_lora set to 0: the adapters are part of its weights now.
    """
    path = Path(path)
    config = read_config(path)
    dtype = _dtype(dtype)
    state = dict(iter_checkpoint_tensors(path, dtype, config=config, lora_alpha=lora_alpha))
    config.use_backbone_lora = config.use_qllama_lora = 0
    with torch.device("meta"):
        model = InternVLModel(config)
    return load_state(model, state, dtype)


INIT_STD = 0.02  # the original's initializer_range for matrices, embeddings and query tokens
LAYER_SCALE_INIT = 0.1  # small layer scales keep a random 48-layer InternViT's activations finite


def init_rule(name: str) -> tuple[str, float]:
    """How a random checkpoint fills the tensor called `name`: ("fill", value) or ("normal", std).

    One rule for `init_weights` (in-memory presets) and the streamed `random-checkpoint` writer, so a
    random model of any size has the same scales: std-0.02 matrices, unit norms, zero biases, small
    layer scales and the original's logit_scale = log(1/0.07).
    """
    if name == "logit_scale":
        return "fill", float(torch.log(torch.tensor(1 / 0.07)))
    if "norm" in name and name.endswith("weight"):
        return "fill", 1.0
    if "norm" in name and name.endswith("bias") or name.endswith("_bias") or name.endswith(".bias"):
        return "fill", 0.0
    if name.endswith(("ls1", "ls2")):
        return "fill", LAYER_SCALE_INIT
    return "normal", INIT_STD


def init_weights(model: InternVLModel, seed: int = 0) -> InternVLModel:
    """Deterministic random weights (std 0.02 matrices, unit norms, small layer scales) for presets."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        kind, value = init_rule(name)
        with torch.no_grad():
            if kind == "fill":
                p.fill_(value)
            else:
                p.normal_(0.0, value, generator=g)
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
