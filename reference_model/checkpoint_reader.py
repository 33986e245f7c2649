"""Read original InternVL-14B checkpoints tensor by tensor: key mapping, LoRA merging, validation.

`iter_checkpoint_tensors(path)` is the one way to read a checkpoint's weights: `load_pretrained`
builds the reference from it, and a streaming exporter can consume it directly, since it holds one
tensor (plus, for LoRA targets, that tensor's two small adapter matrices) at a time.

Checkpoints fine-tuned with the original's LoRA (`use_backbone_lora: r` / `use_qllama_lora: r` in
config.json) were saved from a peft-wrapped tower, so their keys carry peft's names:

    vision_model.base_model.model.encoder.layers.0.attn.qkv.base_layer.weight   (peft >= 0.7)
    vision_model.base_model.model.encoder.layers.0.attn.qkv.weight              (older peft)
    vision_model.base_model.model.encoder.layers.0.attn.qkv.lora_A.default.weight   (r, in)
    vision_model.base_model.model.encoder.layers.0.attn.qkv.lora_B.default.weight   (out, r)

These are mapped back to the original names and each adapter is merged into its base weight as
peft's LoRA Linear computes it in eval mode: W + (lora_alpha / r) * B @ A (dropout is off in eval).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from bridge_export.runtime.errors import UserError

from bridge_export.reference_model.config import InternVLConfig

log = logging.getLogger("reference_model")

IGNORED_PREFIXES = ("itm_head.",)  # carried by checkpoints, unused at inference
# The two towers the original wraps with peft, and the config field holding each one's rank.
LORA_TOWERS = {"vision_model.": "use_backbone_lora", "qllama.": "use_qllama_lora"}
# The original's target_modules (wrap_backbone_lora / wrap_qllama_lora); peft matches a module whose
# name ends with ".<target>", so QLLaMA's cross_attn.*_proj are not targeted.
LORA_TARGETS = {
    "vision_model.": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "qllama.": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"),
}
_PEFT_WRAPPER = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded as InternVL-14B: the message says why."""


@dataclass(frozen=True)
class SourceTensor:
    """Where one stored tensor lives: its key in the file, the file, and its shape and dtype."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Entry:
    """One tensor of the original (merged) state dict and the stored tensors it is made from."""

    name: str
    base: SourceTensor
    lora_a: SourceTensor | None = None
    lora_b: SourceTensor | None = None
    scale: float = 0.0

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape (adapters do not change it)."""
        return self.base.shape


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: the shards an index lists, or the single file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / index} is not a valid shard index ({e}): re-download it") from e
            shards = sorted(set(weight_map.values()))
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


def _file_tensors(f: Path) -> list[SourceTensor]:
    """Names, shapes and dtypes of a weight file, read from its header (safetensors) or mmap (.bin)."""
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            out = []
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    out.append(SourceTensor(k, f, tuple(sl.get_shape()), sl.get_dtype()))
            return out
        state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        return [SourceTensor(k, f, tuple(v.shape), str(v.dtype)) for k, v in state.items()]
    except Exception as e:  # corrupt files raise many types; name the file either way
        raise CheckpointError(f"cannot read weights from {f}: {e}") from e


def _canonical(key: str) -> tuple[str, str | None, str | None]:
    """(original module-or-tensor name, 'lora_A'/'lora_B' or None, adapter name) for a stored key."""
    for tower in LORA_TOWERS:
        if key.startswith(tower + _PEFT_WRAPPER):
            key = tower + key[len(tower + _PEFT_WRAPPER):]
            break
    m = _LORA_KEY.match(key)
    if m:
        return m.group("module"), m.group("which"), m.group("adapter")
    return key.replace(".base_layer.", "."), None, None


def _lora_rank(config: InternVLConfig, tower: str) -> int:
    return int(getattr(config, LORA_TOWERS[tower], 0) or 0)


def plan_checkpoint(path, config: InternVLConfig | None = None, lora_alpha: float | None = None) -> list[Entry]:
    """Map a checkpoint's stored keys to the original state-dict names, pairing LoRA adapters with
    their base weights, without reading any tensor data. Raises CheckpointError naming every problem.

    `lora_alpha`: the LoRA alpha the adapters were trained with. None means 2 * r, as the original's
    training code (internvl_g `internvl_stage2`) passes `lora_alpha=2 * r`; other copies of the original
    (e.g. `internvl_stage2_retrieval`) keep wrap_*_lora's default alpha 256 for any r. config.json does
    not record alpha, so pass it when your adapters were trained with r != 128 by such code.
    """
    path = Path(path)
    config = config or InternVLConfig.from_file(path)
    entries: dict[str, Entry] = {}
    adapters: dict[str, dict[str, SourceTensor]] = {}
    adapter_names: set[str] = set()
    for f in weight_files(path):
        for t in _file_tensors(f):
            name, which, adapter = _canonical(t.key)
            if which:
                adapters.setdefault(name, {})[which] = t
                adapter_names.add(adapter or "")
                continue
            if name in entries:
                raise CheckpointError(f"{path}: {name} is stored twice ({entries[name].base.key} and {t.key})")
            entries[name] = Entry(name, t)
    if len(adapter_names) > 1:
        raise CheckpointError(f"{path} holds several LoRA adapters {sorted(adapter_names)}: keep one (merge or "
                              "delete the others) before exporting")
    problems = []
    for module, pair in adapters.items():
        tower = next((t for t in LORA_TOWERS if module.startswith(t)), None)
        base = entries.get(module + ".weight")
        if tower is None or base is None or set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"LoRA adapter of {module} without its base weight or its lora_A/lora_B pair")
            continue
        r = _lora_rank(config, tower)
        if not r:
            problems.append(f"LoRA adapters on {tower.rstrip('.')} but config.json has {LORA_TOWERS[tower]}=0: set "
                            f"it to the adapters' rank ({pair['lora_A'].shape[0]})")
            continue
        if not module.endswith(tuple("." + t for t in LORA_TARGETS[tower])):
            problems.append(f"LoRA adapter on {module}, which the original does not target")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape != (r, base.shape[1]) or b.shape != (base.shape[0], r):
            problems.append(f"LoRA {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit rank {r} "
                            f"and weight {list(base.shape)}")
            continue
        base.lora_a, base.lora_b = a, b
        base.scale = (lora_alpha if lora_alpha is not None else 2.0 * r) / r
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    merged = sum(e.lora_a is not None for e in entries.values())
    if merged:
        log.info("%s: merging %d LoRA adapters into their weights", path, merged)
    return list(entries.values())


def raise_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    """Raise one CheckpointError naming (the first 8 of) the missing, unexpected and mis-shaped keys."""
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"mis-shaped keys {shapes[:8]}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))


def check_against(entries: list[Entry], expected: dict[str, tuple[int, ...]], tie: bool) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys (itm_head is optional)."""
    have = {e.name: e.shape for e in entries if not e.name.startswith(IGNORED_PREFIXES)}
    expected = {k: v for k, v in expected.items() if not k.startswith(IGNORED_PREFIXES)}
    if tie:  # either of the tied pair suffices
        for a, b in (("qllama.lm_head.weight", "qllama.model.embed_tokens.weight"),
                     ("qllama.model.embed_tokens.weight", "qllama.lm_head.weight")):
            if a not in have and b in have:
                have[a] = have[b]
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    shapes = [f"{k}: checkpoint {list(have[k])} vs model {list(v)}"
              for k, v in expected.items() if k in have and tuple(have[k]) != tuple(v)]
    raise_mismatch(missing, unexpected, shapes)


class _Files:
    """Open weight files lazily and keep them open (safetensors handles; mmapped .bin dicts)."""

    def __init__(self):
        self.open: dict[Path, object] = {}

    def get(self, t: SourceTensor) -> torch.Tensor:
        if t.file not in self.open:
            if t.file.suffix == ".safetensors":
                from safetensors import safe_open

                self.open[t.file] = safe_open(str(t.file), framework="pt")
            else:
                self.open[t.file] = torch.load(str(t.file), map_location="cpu", weights_only=True, mmap=True)
        h = self.open[t.file]
        return h[t.key] if isinstance(h, dict) else h.get_tensor(t.key)


def materialize(entry: Entry, read: Callable[[SourceTensor], torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor of the original state dict: `read`, LoRA merged in float32, converted to `dtype`."""
    w = read(entry.base)
    if entry.lora_a is not None:
        a, b = read(entry.lora_a).float(), read(entry.lora_b).float()
        w = torch.addmm(w.float(), b, a, alpha=entry.scale)  # W + scale * B @ A, as peft's merge
        if dtype is None:
            return w  # merged weights stay float32: rounding them to bf16 would add error
    if dtype is not None and w.is_floating_point() and w.dtype != dtype:
        w = w.to(dtype)
    return w


def model_shapes(config: InternVLConfig) -> dict[str, tuple]:
    """Every state-dict key of the model of `config` and its shape (a meta-device model: no memory)."""
    from bridge_export.reference_model.model import InternVLModel

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in InternVLModel(config).state_dict().items()}


def read_config(directory) -> InternVLConfig:
    """config.json of a checkpoint directory as an InternVLConfig (CheckpointError if unusable)."""
    from bridge_export.reference_model.config import ConfigError

    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: give a checkpoint directory holding config.json")
    try:
        return InternVLConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def iter_checkpoint_tensors(path, dtype: torch.dtype | None = None, *, config: InternVLConfig | None = None,
                            lora_alpha: float | None = None, include_ignored: bool = False,
                            select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (original_name, tensor) for every weight of a checkpoint directory, one tensor at a time.

    The streaming-friendly reader (for the exporter and for `load_pretrained`):
    * names are the original's state-dict names (`vision_model.encoder.layers.0.attn.qkv.weight`),
      whatever peft wrapping the checkpoint was saved with;
    * LoRA adapters are merged per tensor (see `plan_checkpoint` for the scale), so the result is
      the merged model; merged tensors are float32 unless `dtype` is given;
    * `dtype` converts floating tensors on the way (None: as stored);
    * keys are checked against config.json's model before any data is read (CheckpointError names
      missing / unexpected / mis-shaped keys);
    * with tie_word_embeddings, only `qllama.model.embed_tokens.weight` is yielded (taken from
      lm_head when present: the original ties on load and lm_head wins); the consumer ties lm_head;
    * `itm_head.*` (unused at inference) is skipped unless `include_ignored`;
    * `select(name)`: only those tensors are read (the others' bytes are never touched).
    Safetensors shards are read lazily (safe_open), .bin files memory-mapped. Yields in storage order
    (the tied embedding last).
    """
    path = Path(path)
    config = config or InternVLConfig.from_file(path)
    entries = plan_checkpoint(path, config, lora_alpha)
    check_against(entries, model_shapes(config), config.tie_word_embeddings)
    plan = [(e.name, e) for e in entries]
    if config.tie_word_embeddings:
        src = next((e for e in entries if e.name == "qllama.lm_head.weight"), None)
        src = src or next(e for e in entries if e.name == "qllama.model.embed_tokens.weight")
        plan = [(n, e) for n, e in plan if n not in ("qllama.lm_head.weight", "qllama.model.embed_tokens.weight")]
        plan.append(("qllama.model.embed_tokens.weight", src))
    files = _Files()
    for name, e in plan:
        if name.startswith(IGNORED_PREFIXES) and not include_ignored or select is not None and not select(name):
            continue
        yield name, materialize(e, files.get, dtype)
