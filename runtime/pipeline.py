"""The runtime pipeline: array-level calls mirroring the reference, and user-level calls over them."""
from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from bridge_export.runtime.gpu.kv_cache import DeviceKVCache
from bridge_export.runtime.gpu.shared_kv import DeviceSharedKVCache
from bridge_export.runtime.errors import SessionClosed, UserError
from bridge_export.runtime.kv_cache import (CachedDecoder, FusedCachedDecoder, FusedStep, KVCache, SharedKVCache,
                                            fused_text_hidden)
from bridge_export.runtime.manifest import Manifest
from bridge_export.runtime.numeric import normalize
from bridge_export.runtime.numeric import normalize as _unit_length  # embed_*'s parameter shadows the name
from bridge_export.runtime.preprocess import preprocess
from bridge_export.runtime.results import Classification
from bridge_export.runtime.search import MAX_BEAMS, SearchConfig, iter_tokens, search
from bridge_export.runtime.sessions import Session, memory_bytes
from bridge_export.runtime.text import TextCodec

MODES = {"C": "InternVL-C", "G": "InternVL-G", "InternVL-C": "InternVL-C", "InternVL-G": "InternVL-G"}
MAX_BATCH = 1024  # images or texts per graph call; larger lists are processed in batches anyway
MAX_CAPTION_BATCH = 64  # images per generate call in captions()
log = logging.getLogger(__name__)


def _memory_budget() -> int:
    """Half the machine's physical memory, in bytes (the most one generate call's KV cache may take)."""
    return memory_bytes() // 2


PipelineClosed = SessionClosed  # a pipeline used after close(): the same error as its sessions raise


class GraphNotOpen(UserError, ValueError):
    """A call needs a graph that `runtime.load(..., graphs=...)` did not open."""


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi], else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _image_list(images) -> list:
    """A list of images from a list/tuple, a 4-D array (N, H, W, C) / (N, C, H, W), or one image."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def check_template(template) -> str:
    """A classify template holds exactly one `{}` (where the label goes) and no other fields."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string with one '{{}}' for the label, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e}): write it like "
                         "'a photo of a {}.' (double braces for literal ones)") from e
    if fields != [""]:
        raise ValueError(f"template {template!r} must contain '{{}}' exactly once, where the label goes, and no other "
                         f"fields (found {['{' + f + '}' for f in fields] or 'none'}): e.g. 'a photo of a {{}}.'")
    return template


def check_labels(labels) -> list[str]:
    """A list of non-empty label strings (a single string is refused: it would be split into characters)."""
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of names, got one string {labels[:40]!r}: pass a list "
                         "(e.g. labels.split(','))")
    if labels is None or not hasattr(labels, "__iter__"):
        raise ValueError(f"labels must be a list of names, got {type(labels).__name__}")
    labels = list(labels)
    if not labels:
        raise ValueError("no labels given: pass at least one")
    bad = [i for i, lb in enumerate(labels) if not isinstance(lb, str) or not lb.strip()]
    if bad:
        raise ValueError(f"labels must be non-empty strings: label {bad[0]} is {labels[bad[0]]!r}")
    dup = sorted({lb for lb in labels if labels.count(lb) > 1})
    if dup:
        raise ValueError(f"labels must be distinct, {dup[:5]} appear more than once")
    return labels


@dataclass
class Caption:
    """One caption: its text, the new token ids (EOS and padding dropped) and the sequence score."""

    text: str
    tokens: list[int]
    score: float


class TextPieces:
    """The new text of a caption as its tokens arrive: whole UTF-8 characters only; EOS or pad ends it."""

    def __init__(self, codec: TextCodec, stop: tuple[int, ...]):
        self.codec, self.stop = codec, stop
        self.ids: list[int] = []
        self.text = ""
        self.ended = False

    def add(self, token: int) -> str:
        """The text this token adds ("" while a character is incomplete, and from EOS on)."""
        if self.ended or token in self.stop:
            self.ended = True
            return ""
        self.ids.append(token)
        full = self.codec.decode(self.ids)
        if full == self.text or full.endswith("\ufffd"):  # wait for whole UTF-8 characters
            return ""
        piece = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return piece


class Pipeline:
    """Runs a bundle. Build it with `runtime.load(bundle)`; `close()` it (or use `with`) to free the
    sessions and, on a GPU, the device memory's stream."""

    def __init__(self, manifest: Manifest, sessions: dict[str, Session], codec: TextCodec, memory=None):
        self.manifest, self.sessions, self.codec, self.memory = manifest, sessions, codec, memory
        self.num_query = manifest.dims.num_query_token
        self.max_positions = manifest.dims.max_positions
        self.special = manifest.special_tokens
        self.preprocessing = manifest.preprocessing
        self.caption_defaults = manifest.prompts.caption
        self.text_projection = manifest.host_tensor("text_projection")
        self.logit_scale = float(manifest.host_tensor("logit_scale"))
        self.kv_names = manifest.kv_layout.layers()  # per layer (past k, past v, present k, present v)
        self.prefix_names = manifest.kv_layout.names("prefix")
        dec = sessions.get("text_decoder")  # absent when runtime.load(graphs=...) left it out
        limits = [s.max_batch for s in sessions.values() if s.max_batch]
        self.max_batch = min(limits) if limits else None  # TensorRT engines: their profiles' largest batch
        self._empty_past = {n: np.zeros((0,) + (dec.inputs[n].shape[1], 0, dec.inputs[n].shape[3]), np.float32)
                            for names in self.kv_names for n in names[:2]} if dec is not None else {}
        self.vocab_size = manifest.dims.vocab_size
        kv = manifest.kv_layout
        self._kv_bytes_per_position = 2 * kv.num_layers * kv.num_heads * kv.head_dim * 4  # K and V, fp32, per row
        # onnxruntime-target bundles: GroupQueryAttention over one shared buffer, driven in place (kv_cache.FusedStep)
        self.fused_step = FusedStep(dec, kv) if dec is not None and manifest.graph("text_decoder").fused else None
        self.closed = False

    def close(self) -> None:
        """Release every backend session, then the device memory they shared (idempotent);
        the pipeline cannot be used afterwards."""
        for s in self.sessions.values():
            s.close()
        if self.memory is not None:
            self.memory.close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self) -> None:
        """PipelineClosed after close()."""
        if self.closed:
            raise PipelineClosed("this pipeline was closed: call runtime.load(bundle) again")

    def _run(self, graph: str, feeds: dict, keep: tuple[str, ...] = ()) -> dict:
        """Run one graph; on a device session the outputs named by `keep` prefixes stay on the device."""
        sess = self._session(graph)
        return sess.run(feeds, on_device=keep) if keep and getattr(sess, "memory", None) else sess.run(feeds)

    def _session(self, graph: str) -> Session:
        """The open session of `graph`; PipelineClosed after close(), GraphNotOpen when load() left it out."""
        self._check_open()
        if graph not in self.sessions:
            raise GraphNotOpen(f"this needs the {graph} graph, which was not opened (runtime.load(graphs="
                               f"{sorted(self.sessions)})): load the bundle with {graph!r} among its graphs")
        return self.sessions[graph]

    def _ids(self, input_ids, name: str = "input_ids") -> np.ndarray:
        """Token ids as a non-empty int64 [B, T] array in [0, vocab), else a ValueError naming `name`."""
        a = np.asarray(input_ids)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
            raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}: round and cast with "
                             "astype(np.int64) only if they really are ids")
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty [B, T] array, got shape {list(a.shape)}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{name} must hold ids in [0, {self.vocab_size}) (the model's vocabulary), "
                             f"got values from {lo} to {hi}")
        return np.ascontiguousarray(a, dtype=np.int64)

    # -- array level (numpy in, numpy out; mirrors reference_model call for call) ---------------
    def _pixels(self, pixel_values) -> np.ndarray:
        x = np.asarray(pixel_values)
        if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"pixel_values must be a float array, got dtype {x.dtype}")
        if not np.issubdtype(x.dtype, np.floating):  # raw 0..255 pixels would run and give a wrong answer
            raise ValueError(f"pixel_values must be normalised float pixels, got {x.dtype} (raw image data?): make "
                             "them with bridge_export.runtime.preprocess.preprocess(images, pipe.preprocessing), "
                             "or pass the images to embed_images / classify / captions")
        x = x.astype(np.float32, copy=False)
        s = self.preprocessing.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"pixel_values must be [B, 3, {s}, {s}], got {list(x.shape)}: resize images to "
                             f"{s}x{s} (embed_images/caption do it for you)")
        if x.shape[0] == 0:
            raise ValueError("empty batch: pass at least one image")
        if not np.isfinite(x).all():
            raise ValueError("pixel_values holds NaN or infinite values: check the images or your normalisation")
        return np.ascontiguousarray(x)

    def vision(self, pixel_values) -> tuple[np.ndarray, np.ndarray]:
        """vision_hidden [B,Nv,Dv] and the InternVL-C embedding [B,E]."""
        out = self._run("vision_encoder", {"pixel_values": self._pixels(pixel_values)})
        return out["vision_hidden"], out["image_embeds_c"]

    def bridge(self, vision_hidden: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """clip_projector2 output [B,E] and the visual prefix (per layer K, V [B,H,Q,Dh])."""
        vision_hidden = np.asarray(vision_hidden, np.float32)
        if not np.isfinite(vision_hidden).all():
            raise ValueError("vision_hidden holds NaN or infinite values")
        out = self._run("query_bridge", {"vision_hidden": vision_hidden})
        return out["image_embeds_g"], [out[n] for n in self.prefix_names]

    def encode_image(self, pixel_values, mode: str = "InternVL-C") -> np.ndarray:
        """C: clip_projector(ViT). G: normalize(C) + normalize(G head), as the original."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of InternVL-C / InternVL-G (or C / G), got {mode!r}")
        hidden, c = self.vision(pixel_values)
        if MODES[mode] == "InternVL-C":
            return c
        g, _ = self.bridge(hidden)
        return normalize(c) + normalize(g)

    def encode_text(self, input_ids) -> np.ndarray:
        """Last non-pad token's final-norm state @ text_projection (right padding, pad 0)."""
        ids = self._ids(input_ids)
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_position_embeddings {self.max_positions}")
        mask = (ids > 0).astype(np.int64)
        last = mask.sum(1) - 1
        if (last < 0).any():
            raise ValueError("a row of input_ids has no tokens (all pad)")
        B, T = ids.shape
        if self.fused_step is not None:
            self._check_open()
            if ((ids[:, :-1] == 0) & (ids[:, 1:] > 0)).any():  # the tokenizer never writes one (byte fallback)
                log.warning("input_ids hold the pad id 0 before a later token: the original masks that slot, the "
                            "fused decoder attends to it, so these text embeddings differ from the original's; "
                            "drop the 0s or use a bundle exported with --target tensorrt")
            cache = self._fused_cache(B, T)
            try:
                hidden = fused_text_hidden(self.fused_step, ids, mask, self.manifest.kv_layout, cache=cache)
            finally:
                cache.close()
            return hidden[np.arange(B), last] @ self.text_projection
        feeds = {"input_ids": ids, "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(T), (B, T))),
                 "attention_mask": mask}
        heads_dim = {n: a.shape for n, a in self._empty_past.items()}
        feeds.update({n: np.zeros((B, s[1], 0, s[3]), np.float32) for n, s in heads_dim.items()})
        stay = (*self.manifest.kv_layout.names("present"), "logits")  # only hidden_states comes down
        hidden = self._run("text_decoder", feeds, stay)["hidden_states"]
        return hidden[np.arange(B), last] @ self.text_projection

    def _fused_cache(self, rows: int, capacity: int):
        """An empty shared KV buffer for the fused decoder: in the decoder session's device memory on a
        device session (DeviceSharedKVCache), else a host SharedKVCache; in the graph's KV dtype."""
        dec = self._session("text_decoder")
        kv, memory = self.manifest.kv_layout, getattr(dec, "memory", None)
        shape = (kv.num_layers, rows, kv.num_heads, capacity, kv.head_dim, dec.inputs[self.kv_names[0][0]].dtype)
        return DeviceSharedKVCache(memory, *shape) if memory is not None else SharedKVCache(*shape)

    def _decoder(self, pixel_values, input_ids, attention_mask, max_new_tokens, num_beams: int = 1) -> CachedDecoder:
        self._check_open()
        ids = self._ids(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else self._mask(attention_mask, ids.shape)
        need = self.num_query + ids.shape[1] + max_new_tokens
        if need > self.max_positions:
            raise ValueError(
                f"{self.num_query} queries + prompt {ids.shape[1]} + max_new_tokens {max_new_tokens} = {need} "
                f"positions exceeds max_position_embeddings {self.max_positions}: shorten the prompt or "
                "lower max_new_tokens"
            )
        rows = ids.shape[0] * num_beams
        kv = rows * need * self._kv_bytes_per_position
        if kv > _memory_budget():
            raise ValueError(f"{ids.shape[0]} prompts x {num_beams} beams x {need} positions need {kv / 2**30:.1f} GiB "
                             f"of KV cache, more than half this machine's memory: caption fewer images at once "
                             "(captions() batches for you) or use fewer beams")
        if self.max_batch and ids.shape[0] * num_beams > self.max_batch:
            raise ValueError(f"{ids.shape[0]} prompts x {num_beams} beams exceeds the engines' largest batch "
                             f"{self.max_batch}: caption fewer images at once or rebuild with a larger --max-batch")
        dec = self._session("text_decoder")
        memory = getattr(dec, "memory", None)  # device sessions: the cache and its prefix stay on the device
        keep = ("vision_hidden", *self.prefix_names) if memory is not None else ()
        hidden = self._run("vision_encoder", {"pixel_values": self._pixels(pixel_values)}, keep)["vision_hidden"]
        if hidden.shape[0] != ids.shape[0]:
            raise ValueError(f"{hidden.shape[0]} images but {ids.shape[0]} prompts: give one prompt per image")
        out = self._run("query_bridge", {"vision_hidden": hidden}, keep)  # once per image, for every beam and step
        prefix = [out[n] for n in self.prefix_names]
        if self.fused_step is not None:  # one buffer for every beam, the prefix written once per image
            cache = self._fused_cache(rows, need)  # device sessions: the prefix is copied device to device
            try:
                cache.write_prefix(prefix)
            except BaseException:
                cache.close()
                raise
            return FusedCachedDecoder(self.fused_step, cache, ids, mask)
        cache = DeviceKVCache(prefix, need, memory) if memory is not None else KVCache(prefix, capacity=need)
        return CachedDecoder(dec, self.kv_names, cache, ids, mask)

    @staticmethod
    def _mask(attention_mask, shape) -> np.ndarray:
        m = np.asarray(attention_mask)
        if m.shape != tuple(shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {list(shape)}, got {list(m.shape)}")
        if m.dtype == object or not (np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_
                                     or np.issubdtype(m.dtype, np.floating)):
            raise ValueError(f"attention_mask must hold 0/1 values, got dtype {m.dtype}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        if not m.any(axis=1).all():
            raise ValueError("attention_mask has a row of zeros: every prompt needs at least one token")
        return m.astype(np.int64)

    def _search_config(self, **kw) -> SearchConfig:
        return SearchConfig(eos_token_id=self.special.eos, pad_token_id=self.special.pad, **kw)

    def generate(self, pixel_values, input_ids, attention_mask=None, max_new_tokens: int = 20,
                 min_new_tokens: int = 0, num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 return_scores: bool = False):
        """New tokens [B, n] (pad after EOS), as reference_model.generate; optionally the scores."""
        cfg = self._search_config(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  num_beams=num_beams, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                  top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        cfg.validate()
        with self._decoder(pixel_values, input_ids, attention_mask, max_new_tokens, num_beams) as dec:
            result = search(dec, cfg)
        return (result.tokens, result.scores) if return_scores else result.tokens

    def iter_generate(self, pixel_values, input_ids, attention_mask=None, **kw) -> Iterator[np.ndarray]:
        """Greedy/sampled generation yielding each step's tokens [B] as they arrive."""
        cfg = self._search_config(**kw)
        if cfg.num_beams != 1:
            raise ValueError("streaming yields tokens as they are chosen, which beam search cannot: use num_beams=1")
        cfg.validate()
        with self._decoder(pixel_values, input_ids, attention_mask, cfg.max_new_tokens) as dec:
            yield from iter_tokens(dec, cfg)

    # -- user level ---------------------------------------------------------------------------
    def embed_images(self, images, mode: str = "C", batch_size: int = 8, crop: bool = False,
                     normalize: bool = False) -> np.ndarray:
        """Image embeddings [N, E] from paths, PIL images or arrays; unit length with `normalize=True`.

        Not normalised by default, as the original returns them.
        Images are read and run `batch_size` at a time. An unreadable image raises ImageError naming it
        (the CLI reports it and goes on with the others).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of C / G (or InternVL-C / InternVL-G), got {mode!r}")
        images = _image_list(images)
        if not images:
            raise ValueError("no images given: pass at least one")
        batch_size = min(_check_int(batch_size, "batch_size", 1, MAX_BATCH), self.max_batch or MAX_BATCH)
        parts = [self.encode_image(preprocess(images[i:i + batch_size], self.preprocessing, crop), MODES[mode])
                 for i in range(0, len(images), batch_size)]
        out = np.concatenate(parts)
        return _unit_length(out) if normalize else out

    def embed_texts(self, texts, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        """Text embeddings [N, E]: `summarize:` prefix and EOS added as the original; unit length with `normalize`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given: pass at least one")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"texts must be non-empty strings: text {i} is {t!r}")
        batch_size = min(_check_int(batch_size, "batch_size", 1, MAX_BATCH), self.max_batch or MAX_BATCH)
        out = np.concatenate([self.encode_text(self.codec.embedding_ids(texts[i:i + batch_size]))
                              for i in range(0, len(texts), batch_size)])
        return _unit_length(out) if normalize else out

    def similarity(self, images, texts, mode: str = "C") -> np.ndarray:
        """exp(logit_scale) * normalized image @ normalized text.T, [N_images, N_texts]."""
        img = normalize(self.embed_images(images, mode))
        txt = normalize(self.embed_texts(texts))
        return np.exp(self.logit_scale) * img @ txt.T

    def classify(self, images, labels, template: str = "a photo of a {}.", mode: str = "C") -> Classification:
        """Zero-shot probabilities of each image over `labels` (images center-cropped, as for classification).

        `labels` is a list of distinct names; `template` holds one `{}` where each label goes. The result
        is a runtime.results.Classification: `result[i].label`, `result[i].top(3)`, `result.best_labels`;
        `np.asarray(result)` is the [N, len(labels)] probability matrix.
        """
        labels = check_labels(labels)
        check_template(template)
        txt = normalize(self.embed_texts([template.format(lb) for lb in labels]))
        img = normalize(self.embed_images(images, mode, crop=True))
        logits = np.exp(self.logit_scale) * img @ txt.T
        e = np.exp(logits - logits.max(1, keepdims=True))
        return Classification(tuple(labels), e / e.sum(1, keepdims=True))

    def _caption_args(self, prompt, max_new_tokens, min_new_tokens, num_beams=None):
        """Fill unset caption options from the manifest's defaults (the original's: 5 beams, 8..30 tokens).

        An unset min_new_tokens never exceeds max_new_tokens (a small max lowers it); set ones are checked.
        """
        d = self.caption_defaults
        prompt = d.prompt if prompt is None else prompt
        max_new_tokens = _check_int(d.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                    "max_new_tokens", 1)  # its upper bound (the positions left) is checked later
        if min_new_tokens is None:
            min_new_tokens = min(d.min_new_tokens, max_new_tokens)
        min_new_tokens = _check_int(min_new_tokens, "min_new_tokens", 0, max_new_tokens)
        num_beams = _check_int(d.num_beams if num_beams is None else num_beams, "num_beams", 1, MAX_BEAMS)
        return prompt, max_new_tokens, min_new_tokens, num_beams

    def captions(self, images, prompt: str | None = None, max_new_tokens: int | None = None,
                 min_new_tokens: int | None = None, num_beams: int | None = None, batch_size: int = 4,
                 **kw) -> list[Caption]:
        """Captions of several images (one prompt for all), `batch_size` images decoding at once.

        On the CPU a list longer than `batch_size` goes through the step-level scheduler
        (`bridge_export.runtime.serve.scheduler`): `batch_size` x num_beams cache rows, and an image
        takes rows as soon as another's caption ends; each caption is what `generate` makes alone.

        Unset options are the manifest's (the original's: 5 beams, 8..30 new tokens); an unset
        min_new_tokens is lowered to max_new_tokens when that is smaller.
        """
        prompt, max_new_tokens, min_new_tokens, num_beams = self._caption_args(prompt, max_new_tokens,
                                                                               min_new_tokens, num_beams)
        images = _image_list(images)
        if not images:
            raise ValueError("no images given: pass at least one")
        chunk = _check_int(batch_size, "batch_size", 1, MAX_CAPTION_BATCH)
        if self.max_batch:  # stay within TensorRT's largest batch
            chunk = min(chunk, max(1, self.max_batch // num_beams))
        prompt_ids = self.codec.prompt_ids(prompt)
        if self.memory is None and len(images) > chunk:  # host cache: keep chunk x beams rows busy
            return self._scheduled_captions(images, prompt_ids, chunk * num_beams, max_new_tokens=max_new_tokens,
                                            min_new_tokens=min_new_tokens, num_beams=num_beams, **kw)
        out = []
        for i in range(0, len(images), chunk):  # bounded KV memory: one chunk's cache at a time
            pix = preprocess(images[i:i + chunk], self.preprocessing)
            ids = np.repeat(prompt_ids, len(pix), axis=0)
            tokens, scores = self.generate(pix, ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                           num_beams=num_beams, return_scores=True, **kw)
            out += [self._caption(t, sc) for t, sc in zip(tokens, scores)]
        return out

    def _scheduled_captions(self, images: list, prompt_ids: np.ndarray, rows: int, **kw) -> list[Caption]:
        """Captions through the step-level scheduler: an image takes rows as soon as another's caption ends
        (a long list keeps every row busy), each caption as generate() would make it alone."""
        from bridge_export.runtime.serve.scheduler import Scheduler

        cfg = self._search_config(**kw)
        need = self.num_query + prompt_ids.shape[1] + cfg.max_new_tokens
        if need > self.max_positions:
            raise ValueError(f"{self.num_query} queries + prompt {prompt_ids.shape[1]} + max_new_tokens "
                             f"{cfg.max_new_tokens} = {need} positions exceeds max_position_embeddings "
                             f"{self.max_positions}: shorten the prompt or lower max_new_tokens")
        self._check_open()
        sch = Scheduler(self, rows=rows, max_length=need)
        futures = [sch.submit(im, prompt_ids, cfg) for im in images]  # read when it takes its rows
        sch.run(futures)
        return [self._caption(r.tokens[0], r.scores[0]) for r in (f.result() for f in futures)]

    def caption(self, image, prompt: str | None = None, max_new_tokens: int | None = None,
                min_new_tokens: int | None = None, num_beams: int | None = None, **kw) -> Caption:
        """Caption one image: text, token ids and score (the manifest's defaults: beam search as the original)."""
        return self.captions([image], prompt, max_new_tokens, min_new_tokens, num_beams, **kw)[0]

    def caption_stream(self, image, prompt: str | None = None, max_new_tokens: int | None = None,
                       min_new_tokens: int | None = None, **kw) -> Iterator[str]:
        """Yield the caption's new text as each token arrives (greedy or sampled decoding)."""
        prompt, max_new_tokens, min_new_tokens, _ = self._caption_args(prompt, max_new_tokens, min_new_tokens)
        pix = preprocess([image], self.preprocessing)
        pieces = self.text_pieces()
        for tok in self.iter_generate(pix, self.codec.prompt_ids(prompt), max_new_tokens=max_new_tokens,
                                      min_new_tokens=min_new_tokens, **kw):
            piece = pieces.add(int(tok[0]))
            if pieces.ended:
                break
            if piece:
                yield piece

    def text_pieces(self) -> "TextPieces":
        """A fresh TextPieces over this bundle's tokenizer (a streamed caption's text, piece by piece)."""
        return TextPieces(self.codec, (self.special.eos, self.special.pad))

    def _caption(self, tokens: np.ndarray, score: float) -> Caption:
        ids = [int(t) for t in tokens]
        if self.special.eos in ids:
            ids = ids[: ids.index(self.special.eos)]
        ids = [t for t in ids if t != self.special.pad]
        return Caption(self.codec.decode(ids), ids, float(score))
