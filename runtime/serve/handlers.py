"""Request handling shared by every Triton front end (PyTriton's `serve`, the Python-backend models of
`triton-repo`): numpy request tensors in, numpy response tensors or a per-request error out.

Each request is a dict of arrays whose first axis is the batch (a client may send several items in
one request). BYTES tensors hold encoded image files or UTF-8 text. Unset optional inputs take the
pipeline's own defaults (the manifest's), so a served caption equals `Pipeline.caption`.
No torch and no Triton imports here: both front ends wrap these functions.
"""
from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from typing import AsyncIterator, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from bridge_export.runtime.pipeline import MODES, Pipeline

Request = dict  # input name -> np.ndarray with the batch axis first
Response = dict  # output name -> np.ndarray with the batch axis first


class RequestError(ValueError):
    """One request was malformed: the message says which input and what to send instead."""


def _items(req: Request, name: str, required: bool = True) -> list | None:
    """The per-item values of input `name` ([n] or [n, 1] arrays), or None when an optional one is unset."""
    if name not in req or req[name] is None:
        if required:
            raise RequestError(f"missing input {name!r}")
        return None
    a = np.asarray(req[name])
    if a.ndim == 0 or (a.ndim == 2 and a.shape[1] != 1) or a.ndim > 2:
        raise RequestError(f"input {name!r} must have shape [batch, 1], got {list(a.shape)}")
    return list(a.reshape(-1))


def _bytes(v, name: str) -> bytes:
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("utf-8")
    raise RequestError(f"input {name!r} must be BYTES, got {type(v).__name__}")


def _text(v, name: str) -> str:
    try:
        return _bytes(v, name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"input {name!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _int(v, name: str, low: int) -> int:
    if not isinstance(v, (int, np.integer)) or int(v) < low:
        raise RequestError(f"input {name!r} must be an integer >= {low}, got {v!r}")
    return int(v)


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """An encoded image file's bytes -> RGB PIL image; RequestError when they are not an image."""
    if not data:
        raise RequestError(f"input {name!r} is empty: send the bytes of a PNG/JPEG/... file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"input {name!r} ({len(data)} bytes) is not a readable image file ({e}): "
                           "send the bytes of a PNG/JPEG/... file") from e


def _mode(v) -> str:
    m = _text(v, "mode").strip() or "C"
    if m not in MODES:
        raise RequestError(f"input 'mode' must be C or G, got {m!r}")
    return m


class Handlers:
    """The served entry points over one Pipeline: `embed_image`, `embed_text`, `caption`, `caption_stream`.

    The batch calls take a list of requests and return, per request, its response dict or the
    RequestError that made it fail; errors of the server itself propagate as exceptions.
    With a `scheduler` (bridge_export.runtime.serve.scheduler.Scheduler, already started) every
    caption item is its own request in the shared decode batch: it is answered when its own rows
    finish, and `caption_stream_steps` streams from that batch. Without one, a batch of items with
    the same options runs as one generate call (static batching) and streams run one at a time.
    """

    def __init__(self, pipe: Pipeline, batch_size: int = 8, scheduler=None):
        self.pipe = pipe
        self.batch_size = batch_size
        self.scheduler = scheduler

    # -- embeddings ---------------------------------------------------------------------------
    def embed_image(self, requests: list[Request]) -> list[Response | RequestError]:
        """image BYTES [n,1] (+ optional mode BYTES [n,1], C or G) -> embedding FP32 [n,E]."""
        parsed = []  # per request: list of (image, mode) or the error
        for req in requests:
            try:
                images = [decode_image(_bytes(v, "image")) for v in _items(req, "image")]
                modes = _items(req, "mode", required=False)
                modes = [_mode(m) for m in modes] if modes is not None else ["C"] * len(images)
                if len(modes) != len(images):
                    raise RequestError(f"{len(images)} images but {len(modes)} modes: give one mode per image")
                parsed.append(list(zip(images, modes)))
            except RequestError as e:
                parsed.append(e)
        by_mode = defaultdict(list)  # one batched pipeline call per mode across all requests
        for r, items in enumerate(parsed):
            if not isinstance(items, RequestError):
                for k, (im, m) in enumerate(items):
                    by_mode[MODES[m]].append((r, k, im))
        results: dict[tuple[int, int], np.ndarray] = {}
        for mode, entries in by_mode.items():
            emb = self.pipe.embed_images([im for _, _, im in entries], mode, batch_size=self.batch_size)
            results.update({(r, k): e for (r, k, _), e in zip(entries, emb)})
        return [items if isinstance(items, RequestError) else
                {"embedding": np.stack([results[(r, k)] for k in range(len(items))]).astype(np.float32)}
                for r, items in enumerate(parsed)]

    def embed_text(self, requests: list[Request]) -> list[Response | RequestError]:
        """text BYTES [n,1] -> embedding FP32 [n,E]."""
        parsed = []
        for req in requests:
            try:
                texts = [_text(v, "text") for v in _items(req, "text")]
                if any(not t.strip() for t in texts):
                    raise RequestError("input 'text' holds an empty string: send some text")
                parsed.append(texts)
            except RequestError as e:
                parsed.append(e)
        flat = [t for p in parsed if not isinstance(p, RequestError) for t in p]
        emb = self.pipe.embed_texts(flat, batch_size=self.batch_size) if flat else None
        out, at = [], 0
        for p in parsed:
            if isinstance(p, RequestError):
                out.append(p)
            else:
                out.append({"embedding": emb[at:at + len(p)].astype(np.float32)})
                at += len(p)
        return out

    # -- captions -----------------------------------------------------------------------------
    def _caption_items(self, req: Request) -> list[tuple]:
        images = [decode_image(_bytes(v, "image")) for v in _items(req, "image")]
        n = len(images)

        def per_item(name, conv):
            vals = _items(req, name, required=False)
            if vals is None:
                return [None] * n
            if len(vals) != n:
                raise RequestError(f"{n} images but {len(vals)} values of {name!r}: give one per image")
            return [conv(v) for v in vals]

        prompts = per_item("prompt", lambda v: _text(v, "prompt"))
        max_new = per_item("max_new_tokens", lambda v: _int(v, "max_new_tokens", 1))
        beams = per_item("num_beams", lambda v: _int(v, "num_beams", 1))
        return [(im, {k: v for k, v in (("prompt", p), ("max_new_tokens", m), ("num_beams", b)) if v is not None})
                for im, p, m, b in zip(images, prompts, max_new, beams)]

    def caption(self, requests: list[Request]) -> list[Response | RequestError]:
        """image BYTES [n,1] (+ optional prompt BYTES, max_new_tokens INT32, num_beams INT32) -> text BYTES [n,1]."""
        parsed = []
        for req in requests:
            try:
                parsed.append(self._caption_items(req))
            except RequestError as e:
                parsed.append(e)
        groups = defaultdict(list)  # items with the same options run as one batched search
        for r, items in enumerate(parsed):
            if not isinstance(items, RequestError):
                for k, (im, opts) in enumerate(items):
                    groups[tuple(sorted(opts.items()))].append((r, k, im))
        texts: dict[tuple[int, int], str] = {}
        failed: dict[int, RequestError] = {}
        if self.scheduler is not None:
            self._caption_steps(groups, texts, failed)
            groups = {}
        for key, entries in groups.items():
            try:
                caps = self.pipe.captions([im for _, _, im in entries], batch_size=min(len(entries), 64),
                                          **dict(key))
            except ValueError as e:  # options the pipeline refuses (too many tokens for the positions, ...)
                for r, _, _ in entries:
                    failed[r] = RequestError(str(e))
                continue
            texts.update({(r, k): c.text for (r, k, _), c in zip(entries, caps)})
        out = []
        for r, items in enumerate(parsed):
            if isinstance(items, RequestError) or r in failed:
                out.append(items if isinstance(items, RequestError) else failed[r])
            else:
                out.append({"text": np.array([[texts[(r, k)].encode("utf-8")] for k in range(len(items))],
                                             dtype=object)})
        return out

    def _submit(self, image, opts: dict, on_tokens=None):
        """Submit one caption item to the scheduler; RequestError for options it refuses."""
        pipe = self.pipe
        try:
            prompt, max_new, min_new, beams = pipe._caption_args(opts.get("prompt"), opts.get("max_new_tokens"),
                                                                 None, opts.get("num_beams"))
            cfg = pipe._search_config(max_new_tokens=max_new, min_new_tokens=min_new, num_beams=beams)
            return self.scheduler.submit(image, pipe.codec.prompt_ids(prompt), cfg, on_tokens)
        except ValueError as e:
            raise RequestError(str(e)) from e

    def _caption_steps(self, groups, texts: dict, failed: dict) -> None:
        """Every item through the step-level scheduler; an item's error fails its own request only."""
        futures = {}
        for key, entries in groups.items():
            for r, k, im in entries:
                try:
                    futures[(r, k)] = self._submit(im, dict(key))
                except RequestError as e:
                    failed[r] = e
        for (r, k), f in futures.items():
            try:
                res = f.result()
            except ValueError as e:  # the image or options of this item (ImageError, NaN pixels, ...)
                failed[r] = RequestError(str(e))
                continue
            texts[(r, k)] = self.pipe._caption(res.tokens[0], res.scores[0]).text

    def _stream_item(self, request: Request) -> tuple:
        """(image, options without num_beams) of a streamed caption request: one image, greedy."""
        items = self._caption_items(request)
        if len(items) != 1:
            raise RequestError(f"streaming captions one image per request, got {len(items)}")
        image, opts = items[0]
        if opts.pop("num_beams", 1) != 1:
            raise RequestError("streaming yields tokens as they are chosen, which beam search cannot: "
                               "leave num_beams unset (or 1), or use the `caption` model")
        return image, opts

    async def caption_stream_steps(self, request: Request) -> AsyncIterator[Response]:
        """`caption_stream` from the scheduler's shared batch: one response per new piece of text, as the
        steps that decode it (together with every other active request) produce them."""
        image, opts = self._stream_item(request)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        opts["num_beams"] = 1
        fut = self._submit(image, opts, lambda tok: loop.call_soon_threadsafe(queue.put_nowait, int(tok[0])))
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, None))
        pieces = self.pipe.text_pieces()
        while (tok := await queue.get()) is not None:
            piece = pieces.add(tok)
            if piece:
                yield {"text": np.array([[piece.encode("utf-8")]], dtype=object)}
        if fut.exception() is not None:
            e = fut.exception()
            raise RequestError(str(e)) if isinstance(e, ValueError) else e

    def caption_stream(self, request: Request) -> Iterator[Response]:
        """One image's caption as it is generated (greedy): one response per new piece of text."""
        image, opts = self._stream_item(request)
        try:
            stream = self.pipe.caption_stream(image, **opts)
            first = next(stream, None)  # surface option errors before the first response
        except ValueError as e:
            raise RequestError(str(e)) from e
        if first is not None:
            yield {"text": np.array([[first.encode("utf-8")]], dtype=object)}
        for piece in stream:
            yield {"text": np.array([[piece.encode("utf-8")]], dtype=object)}
