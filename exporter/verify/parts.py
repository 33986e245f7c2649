"""What `verify` holds in memory at once: only the reference weights and the one graph a check needs.

Verifying a real-width bundle used to hold the whole fp32 reference and all three onnxruntime
sessions at once (11.5 GB for 1.2 B parameters). Here each check builds the reference with only the
tensors it uses (everything else stays on the meta device: no memory), computes its outputs, frees
it, and only then opens the graph it compares against; the end-to-end pipeline keeps one session
open at a time. The peak is the largest single part, not the sum.
"""
from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from bridge_export.reference_model.checkpoint_reader import iter_checkpoint_tensors
from bridge_export.reference_model.config import InternVLConfig, preset_config
from bridge_export.reference_model.loading import init_rule
from bridge_export.reference_model.model import InternVLModel
from bridge_export.runtime.manifest import GRAPHS

Select = Callable[[str], bool]


def prefixes(*names: str, exclude: tuple[str, ...] = ()) -> Select:
    """A selector of the state-dict names starting with any of `names` and containing none of `exclude`."""
    return lambda n: n.startswith(names) and not any(x in n for x in exclude)


# The reference weights each graph uses (the wrappers in exporter/wrappers.py).
GRAPH_PARTS: dict[str, Select] = {
    "vision_encoder": prefixes("vision_model.", "clip_projector."),
    "query_bridge": prefixes("query_tokens", "qllama.model.layers.", "qllama.model.norm.", "clip_projector2."),
    "text_decoder": prefixes("qllama.", exclude=("cross_attn.",)),
}
VISION_PART = GRAPH_PARTS["vision_encoder"]
# Everything after the vision tower: queries, QLLaMA (with cross-attention), G head, text projection.
LANGUAGE_PART = prefixes("query_tokens", "qllama.", "clip_projector2.", "text_projection", "logit_scale")


class ReferenceSource:
    """Builds the fp32 reference with only selected tensors materialised (the rest on meta).

    `from_checkpoint` reads just those tensors from the shards; `from_preset` redraws the preset's
    seeded init and keeps the selected ones (same values as reference_model.from_preset); `from_model`
    wraps a model already in memory (nothing is freed then).
    """

    def __init__(self, config: InternVLConfig, load: Callable[[Select], dict[str, torch.Tensor]] | None = None,
                 model: InternVLModel | None = None):
        self.config, self._load, self._model = config, load, model

    @classmethod
    def from_checkpoint(cls, path) -> "ReferenceSource":
        """Parts read lazily from an original-format checkpoint directory (LoRA merged)."""
        path = Path(path)
        config = InternVLConfig.from_file(path)

        def load(select: Select) -> dict[str, torch.Tensor]:
            return dict(iter_checkpoint_tensors(path, torch.float32, config=config, select=select))

        return cls(config, load)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> "ReferenceSource":
        """Parts of a preset with seeded weights, equal to reference_model.from_preset(name, seed)."""
        config = preset_config(name)

        def load(select: Select) -> dict[str, torch.Tensor]:
            with torch.device("meta"):
                shapes = [(n, p.shape) for n, p in InternVLModel(config).named_parameters()]
            g = torch.Generator().manual_seed(seed)
            out = {}
            for n, shape in shapes:  # the draws of loading.init_weights, in its order
                kind, value = init_rule(n)
                if kind == "normal":
                    t = torch.empty(shape).normal_(0.0, value, generator=g)  # drawn even if dropped
                    if select(n):
                        out[n] = t
                elif select(n):
                    out[n] = torch.full(shape, value)
            return out  # with tied embeddings part() makes lm_head embed_tokens, as from_preset does

        return cls(config, load)

    @classmethod
    def from_model(cls, model: InternVLModel) -> "ReferenceSource":
        """A model already in memory (fp32); parts are the model itself."""
        return cls(model.config, model=model.float().eval())

    def part(self, select: Select) -> InternVLModel:
        """The reference with the selected tensors loaded and every other one left on meta."""
        if self._model is not None:
            return self._model
        state = self._load(select)
        with torch.device("meta"):
            model = InternVLModel(self.config)
        model.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
        return model.eval()

    def full(self) -> InternVLModel:
        """The whole reference (everything but the unused itm_head)."""
        return self.part(lambda n: not n.startswith("itm_head."))


def reference_source(checkpoint: Path | None, preset: str | None, seed: int = 0) -> ReferenceSource:
    """The CLI's --checkpoint DIR or --preset NAME (with --seed) as a ReferenceSource."""
    from bridge_export.reference_model.checkpoint_reader import CheckpointError

    if (checkpoint is None) == (preset is None):
        raise ValueError("give exactly one of --checkpoint DIR or --preset NAME")
    if checkpoint is None:
        return ReferenceSource.from_preset(preset, seed)
    if not Path(checkpoint).is_dir():
        raise CheckpointError(f"{checkpoint} is not a directory: give a checkpoint directory holding config.json")
    return ReferenceSource.from_checkpoint(checkpoint)


class _LazySession:
    """A Session stand-in that opens its graph when used, closing whichever graph was open before."""

    def __init__(self, owner: "OneSessionAtATime", name: str):
        self.owner, self.name = owner, name
        self.max_batch = None

    def _real(self):
        return self.owner.activate(self.name)

    @property
    def inputs(self):
        """The graph's input metadata (opens the graph)."""
        return self._real().inputs

    @property
    def output_names(self):
        """The graph's output names (opens the graph)."""
        return self._real().output_names

    def run(self, feeds, **kw):
        """Run the graph (opening it first if another one is open)."""
        return self._real().run(feeds, **kw)

    def ort_session(self):
        """The onnxruntime InferenceSession of the graph, opened (the fused decoder binds its buffers there)."""
        return self._real().sess

    def close(self) -> None:
        """Close the graph if it is the open one."""
        self.owner.release(self.name)


class OneSessionAtATime(Mapping):
    """The sessions mapping of a runtime.Pipeline that keeps at most one onnxruntime session open.

    Each graph is opened when the pipeline runs it; opening one closes the other, so the pipeline's
    memory is its largest graph rather than all three. Slower (graphs are re-opened), for verify.
    """

    def __init__(self, manifest, on_open: Callable[[str], None] = lambda n: None):
        self.manifest, self.on_open = manifest, on_open
        self.proxies = {n: _LazySession(self, n) for n in GRAPHS}
        self.open_name, self.session = None, None

    def activate(self, name: str):
        """The real session of `name`, opened now if needed (closing the open one first)."""
        from bridge_export.runtime.backends import open_session

        if self.open_name != name:
            self.release(self.open_name)
            self.on_open(name)
            self.session = open_session(self.manifest.graph_path(name), "onnxruntime")
            self.open_name = name
        return self.session

    def release(self, name: str | None) -> None:
        """Close `name`'s session if it is the open one."""
        if name is not None and name == self.open_name and self.session is not None:
            self.session.close()
            self.session, self.open_name = None, None
            gc.collect()

    def __getitem__(self, name: str) -> _LazySession:
        return self.proxies[name]

    def __iter__(self):
        return iter(GRAPHS)

    def __len__(self) -> int:
        return len(GRAPHS)

    def values(self):  # the Pipeline closes "every session": only the open one is real
        return [self.proxies[self.open_name]] if self.open_name else []
