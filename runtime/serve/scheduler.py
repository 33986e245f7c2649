"""Step-level (in-flight) batching of caption requests over one decoder KV buffer of N rows.

A request (one image and prompt, its own search options) takes free rows between two decode steps:
its image runs through the vision encoder and the query bridge (batched with the other requests
admitted at the same time), its prompt is prefilled on its row, and from then on every decode step
runs all active rows together; a request whose search has finished frees its rows at once. Greedy,
sampling and beam search run per request with `bridge_export.runtime.search`'s steppers (the same
code `Pipeline.generate` runs), and each row is written at its own length with its own mask, so a
request decoded among others chooses what it would choose alone.
This is how serving engines batch decoding (vLLM, TGI, TensorRT-LLM's in-flight batching): a decode
step reads every weight once, so N rows cost little more than one.

Memory is bounded by the rows: the cache is allocated once (N x max_length positions), refused up
front when it would not fit. Drive it from one thread: `start()` runs the loop on a thread of its own
(the server), or call `run(futures)` to step until they are done (`Pipeline.captions`).
No torch, no Triton here.

Where the cache lives: on a device session (`--device cuda:N`) a fused bundle's buffer is a
DeviceSharedKVCache in the device's memory (each request's visual prefix goes up once, row moves are
device-to-device copies, a decode step sends only the ids and lengths up and the logits down), and
its size is checked against the device's free memory when the DeviceMemory can tell
(`free_bytes()`, CUDA's cudaMemGetInfo), else against half the host's memory as on the CPU. A
portable bundle keeps RowKVCache in host memory on either device: its rows are fed to the decoder
as numpy arrays, so with `--device cuda:N` each step uploads the active rows' slots (correct, not
fast; `--scheduler static` keeps the portable decoder's cache on the device).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.gpu.shared_kv import DeviceSharedKVCache
from bridge_export.runtime.kv_cache import SharedKVCache
from bridge_export.runtime.preprocess import preprocess
from bridge_export.runtime.search import SearchConfig, SearchResult, stepper
from bridge_export.runtime.serve.row_cache import RowKVCache
from bridge_export.runtime.sessions import memory_bytes


class SchedulerClosed(UserError, RuntimeError):
    """The scheduler was closed before this request finished: send it again to a running server."""


@dataclass
class Stats:
    """What the scheduler is doing, for the serving metrics."""

    queue_length: int = 0  # requests waiting for rows
    active_rows: int = 0  # rows decoding now
    active_requests: int = 0
    rows: int = 0  # rows in the cache
    last_step_batch: int = 0  # rows the last decode step ran
    steps: int = 0  # decode steps run
    step_rows_total: int = 0  # sum of the decode steps' batch sizes (mean batch = this / steps)
    requests_done: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    ttft_seconds_sum: float = 0.0  # submit -> first token, summed over requests
    ttft_count: int = 0


@dataclass(eq=False)  # identity: a request is itself, whatever its fields hold
class _Request:
    image: Any  # PIL image, path, HWC array, or preprocessed pixel_values [1, 3, S, S]
    prompt_ids: np.ndarray  # [1, T]
    cfg: SearchConfig
    on_tokens: Callable[[np.ndarray], None] | None
    future: Future
    submitted: float
    need: int  # positions: queries + prompt + max_new_tokens
    rows: list[int] = field(default_factory=list)
    state: Any = None
    pending: np.ndarray | None = None  # tokens to feed in the next decode step
    first_token: bool = False


class Scheduler:
    """Step-level batching of generation requests over `pipe`'s vision, bridge and decoder sessions.

    `rows`: rows of the shared KV cache (a beam-search request takes num_beams of them).
    `max_length`: positions per row (visual queries + prompt + new tokens); requests needing more are
    refused alone. Default: the model's max_position_embeddings (size it down for memory: every
    decode step reads each active row's whole buffer).
    """

    def __init__(self, pipe, rows: int = 8, max_length: int | None = None):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
        if pipe.max_batch and rows > pipe.max_batch:
            raise ValueError(f"{rows} rows exceed the engines' largest batch {pipe.max_batch}: use fewer rows "
                             "or rebuild the engines with a larger --max-batch")
        q = pipe.num_query
        max_length = pipe.max_positions if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not q < max_length <= pipe.max_positions:
            raise ValueError(f"max_length must be an integer from {q + 1} (the {q} visual queries and a token) to "
                             f"{pipe.max_positions} (max_position_embeddings), got {max_length!r}")
        kv = pipe.manifest.kv_layout
        dec = pipe._session("text_decoder")
        # onnxruntime-target bundles: the fused decoder (GroupQueryAttention) appends in place to one shared
        # buffer whose per-row seqlens_k are these rows' lengths; else the portable graph's per-row masks
        self.fused = pipe.fused_step
        memory = getattr(dec, "memory", None) if self.fused is not None else None  # the device cache's memory
        shape = (rows, kv.num_layers, kv.num_heads, kv.head_dim, max_length)
        if self.fused is not None:
            dtype = np.dtype(dec.inputs[pipe.kv_names[0][0]].dtype)
            size = SharedKVCache.nbytes(*shape, itemsize=dtype.itemsize)
        else:
            size = RowKVCache.nbytes(*shape)
        free = memory.free_bytes() if memory is not None else None
        if free is not None and size > free * 0.9:  # the rest for onnxruntime's activations and workspace
            raise ValueError(f"{rows} rows x {max_length} positions need {size / 2**30:.1f} GiB of KV cache, more "
                             f"than 90% of the device's free memory ({free / 2**30:.1f} GiB): use fewer rows or a "
                             "smaller max_length")
        if free is None and size > memory_bytes() // 2:
            raise ValueError(f"{rows} rows x {max_length} positions need {size / 2**30:.1f} GiB of KV cache, more "
                             "than half this machine's memory: use fewer rows or a smaller max_length")
        self.pipe, self.max_length = pipe, max_length
        if memory is not None:
            self.cache = DeviceSharedKVCache(memory, kv.num_layers, rows, kv.num_heads, max_length, kv.head_dim,
                                             dtype, q)
        elif self.fused is not None:
            self.cache = SharedKVCache(kv.num_layers, rows, kv.num_heads, max_length, kv.head_dim, dtype, q)
        else:
            self.cache = RowKVCache(*shape)
        self.kv_names = pipe.kv_names
        self.owner: list[_Request | None] = [None] * rows  # row -> request; active rows are 0..n-1
        self.active: list[_Request] = []
        self.queue: deque[_Request] = deque()
        self.stats = Stats(rows=rows)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self.closed = False

    # -- requests -----------------------------------------------------------------------------
    def submit(self, image, prompt_ids, cfg: SearchConfig,
               on_tokens: Callable[[np.ndarray], None] | None = None) -> Future:
        """Queue one generation request; the future gets its SearchResult (tokens [1, n], score) or its error.

        `on_tokens(tokens [1])`: called from the scheduler's thread with each step's token (greedy or
        sampled requests), for streaming. Options that cannot work are refused here (ValueError).
        """
        cfg.validate()
        ids = self.pipe._ids(prompt_ids, "prompt_ids")
        if ids.shape[0] != 1:
            raise ValueError(f"one prompt per request, got {ids.shape[0]}")
        need = self.pipe.num_query + ids.shape[1] + cfg.max_new_tokens
        if need > self.max_length:
            raise ValueError(f"{self.pipe.num_query} queries + prompt {ids.shape[1]} + max_new_tokens "
                             f"{cfg.max_new_tokens} = {need} positions exceeds this server's {self.max_length} per "
                             "row: lower max_new_tokens or shorten the prompt (or serve with a larger --max-length)")
        if cfg.num_beams > self.cache.rows:
            raise ValueError(f"num_beams {cfg.num_beams} exceeds the scheduler's {self.cache.rows} rows: use fewer "
                             "beams (or serve with more --rows)")
        if on_tokens is not None and cfg.num_beams > 1:
            raise ValueError("streaming yields tokens as they are chosen, which beam search cannot: use num_beams=1")
        fut: Future = Future()
        req = _Request(image, ids, cfg, on_tokens, fut, time.perf_counter(), need)
        with self._lock:
            if self.closed:
                raise SchedulerClosed("the scheduler is closed: it takes no more requests")
            self.queue.append(req)
            self.stats.queue_length = len(self.queue)
            self._lock.notify()
        return fut

    # -- driving ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the scheduling loop on a daemon thread until `close()`."""
        self._thread = threading.Thread(target=self._loop, name="bridge-export-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.closed and not self.queue and not self.active:
                    self._lock.wait()
                if self.closed:
                    return
            self.step()

    def run(self, futures: list[Future]) -> None:
        """Step in this thread until every future in `futures` is done (no thread of its own)."""
        while not all(f.done() for f in futures):
            self.step()

    def close(self) -> None:
        """Stop the loop, fail every waiting and decoding request with SchedulerClosed (idempotent) and
        release the cache's bindings (and its device memory, for a device cache)."""
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            waiting = list(self.queue) + list(self.active)
            self.queue.clear()
        for req in waiting:
            self._fail(req, SchedulerClosed("the server stopped before this request finished: send it again"))
        if hasattr(self.cache, "close"):
            self.cache.close()

    # -- one iteration ------------------------------------------------------------------------
    def step(self) -> None:
        """Admit what fits in the free rows (vision + bridge batched), then one decoder call: every decoding
        row's next token and the new requests' prompts (the portable decoder prefills in a call of its own)."""
        decoding = [r for r in self.active if r.pending is not None]
        new = self._start(self._admit())
        entries = [(r, r.rows, r.pending[:, None]) for r in decoding] + [(r, r.rows[:1], r.prompt_ids) for r in new]
        if entries:
            self._feed(entries)
        self._compact()
        self._update_stats()

    def _free_rows(self) -> int:
        return self.cache.rows - sum(len(r.rows) for r in self.active)

    def _admit(self) -> list[_Request]:
        """Requests from the head of the queue that fit in the free rows now (first come, first served:
        a beam request that does not fit waits, and so does everything behind it)."""
        out, free = [], self._free_rows()
        with self._lock:
            while self.queue and self.queue[0].cfg.num_beams <= free:
                req = self.queue.popleft()
                if req.future.cancelled():
                    continue
                free -= req.cfg.num_beams
                out.append(req)
        return out

    def _start(self, admitted: list[_Request]) -> list[_Request]:
        """Vision + bridge for the admitted requests in one batch; each takes its rows with its visual prefix."""
        pix = []
        for req in admitted:  # a bad image fails its own request only
            try:
                pix.append(self._pixels(req.image))
            except Exception as e:  # noqa: BLE001 - any error of this input belongs to this request alone
                self._fail(req, e)
        admitted = [r for r in admitted if not r.future.done()]
        if not admitted:
            return []
        try:
            _, prefix = self._prefix(np.concatenate(pix))
        except Exception as e:  # noqa: BLE001 - the graphs failed: every request of this batch gets the error
            for req in admitted:
                self._fail(req, e)
            return []
        n = self.cache.rows - self._free_rows()
        for i, req in enumerate(admitted):  # rows n.. are free: active rows stay first
            req.rows = list(range(n, n + req.cfg.num_beams))
            n += len(req.rows)
            for r in req.rows:
                self.owner[r] = req
            # every row gets the prefix (beams too): a fused call's idle rows must hold a valid length
            self.cache.load_prefix(np.array(req.rows), [np.repeat(p[i:i + 1], len(req.rows), 0) for p in prefix])
            req.state = stepper(req.cfg)
            self.active.append(req)
        return admitted

    def _feed(self, entries: list[tuple[_Request, list[int], np.ndarray]]) -> None:
        """Run the decoder over every entry (request, its rows, ids [rows, T]) in as few calls as the cache
        allows, then let each request choose from its logits (a prompt's first row, copied to its beams)."""
        for group in self._calls(entries):
            rows = [r for _, rs, _ in group for r in rs]
            try:
                logits = self._run(rows, [ids for _, _, ids in group])
            except Exception as e:  # noqa: BLE001 - the decoder failed: these requests get the error, the loop goes on
                for req, _, _ in group:
                    self._fail(req, e)
                continue
            self.stats.steps += 1
            self.stats.last_step_batch = len(rows)
            self.stats.step_rows_total += len(rows)
            at = 0
            for req, rs, _ in group:
                lg = logits[at:at + len(rs)]
                at += len(rs)
                if req.pending is None and len(req.rows) > 1:  # a prompt: every beam starts from its cache
                    self.cache.copy_rows(np.array(req.rows[1:]), np.array([req.rows[0]] * (len(req.rows) - 1)))
                self._choose(req, lg)

    def _calls(self, entries):
        """Entries grouped into decoder calls. Fused decoder: one call (each row feeds its own number of
        tokens), split in two only where onnxruntime's rule (every row's length + the call's width within
        the capacity) would fail. Portable decoder: rows feeding one token together, prompts left-padded
        together as long as each row's pad slots still leave it room for its max_new_tokens."""
        if self.fused is not None:
            width = max(ids.shape[1] for _, _, ids in entries)
            span = [r for _, rs, _ in entries for r in rs]
            lo, hi = min(span), max(span) + 1
            if int(self.cache.lengths[lo:hi].max()) + width <= self.cache.capacity:
                return [entries]
            split = [[e for e in entries if e[0].pending is not None], [e for e in entries if e[0].pending is None]]
            return [g for g in split if g]
        steps = [e for e in entries if e[2].shape[1] == 1 and e[0].pending is not None]
        prompts = sorted((e for e in entries if e[0].pending is None), key=lambda e: -e[2].shape[1])
        calls = [steps] if steps else []
        for e in prompts:
            width = calls[-1][0][2].shape[1] if calls and calls[-1] is not steps else 0
            if width and self.pipe.num_query + width + e[0].cfg.max_new_tokens <= self.max_length:
                calls[-1].append(e)
            else:
                calls.append([e])
        return calls

    def _choose(self, req: _Request, logits: np.ndarray) -> None:
        """The request's search picks its next tokens; finished requests complete and leave their rows."""
        try:
            tokens, src = req.state.choose(logits)
        except Exception as e:  # noqa: BLE001
            self._fail(req, e)
            return
        now = time.perf_counter()
        if not req.first_token:
            req.first_token = True
            self.stats.ttft_seconds_sum += now - req.submitted
            self.stats.ttft_count += 1
        self.stats.tokens_generated += 1
        if req.on_tokens is not None:
            try:
                req.on_tokens(tokens)
            except Exception as e:  # noqa: BLE001 - a broken stream ends its own request
                self._fail(req, e)
                return
        if req.state.finished:
            self._release(req)
            self.stats.requests_done += 1
            req.future.set_result(req.state.result())
            return
        if src is not None and not np.array_equal(src, np.arange(len(req.rows))):
            rows = np.array(req.rows)
            self.cache.copy_rows(rows, rows[src])
        req.pending = tokens

    def _fail(self, req: _Request, error: BaseException) -> None:
        self._release(req)
        self.stats.requests_failed += 1
        if not req.future.done():
            req.future.set_exception(error)

    def _release(self, req: _Request) -> None:
        if req in self.active:
            self.active.remove(req)
        for r in req.rows:
            self.owner[r] = None
        if req.rows:
            self.cache.free(np.array(req.rows))

    def _compact(self) -> None:
        """Move the last active rows into the holes left by finished requests, so rows 0..n-1 are the active
        ones and a decode step feeds a view of the buffers."""
        n = sum(len(r.rows) for r in self.active)
        holes = [r for r in range(n) if self.owner[r] is None]
        movers = [r for r in range(n, self.cache.rows) if self.owner[r] is not None]
        if not holes:
            return
        self.cache.copy_rows(np.array(holes), np.array(movers))
        for dst, src in zip(holes, movers):
            req = self.owner[src]
            req.rows[req.rows.index(src)] = dst
            self.owner[dst], self.owner[src] = req, None
        self.cache.free(np.array(movers))

    # -- graphs -------------------------------------------------------------------------------
    def _pixels(self, image) -> np.ndarray:
        if isinstance(image, np.ndarray) and image.ndim == 4:
            return self.pipe._pixels(image)
        return preprocess([image], self.pipe.preprocessing)

    def _prefix(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Vision encoder + query bridge for a batch of images (within the engines' largest batch)."""
        step = self.pipe.max_batch or len(pixel_values)
        parts = []
        for i in range(0, len(pixel_values), step):
            hidden, _ = self.pipe.vision(pixel_values[i:i + step])
            parts.append(self.pipe.bridge(hidden))
        return (np.concatenate([g for g, _ in parts]),
                [np.concatenate([p[j] for _, p in parts]) for j in range(len(parts[0][1]))])

    def _run(self, rows: list[int], seqs: list[np.ndarray]) -> np.ndarray:
        """One decoder call: `rows` (in order) feed the ids of `seqs` ([rows of the entry, T_i] each) after their
        own lengths; returns each row's logits of its last token [len(rows), vocab]."""
        c, rows = self.cache, np.asarray(rows)
        ids = [row for s in seqs for row in s]
        width = max(len(x) for x in ids)
        if self.fused is not None:  # right-padded, each row's own query length; rows between them idle
            lo, hi = int(rows.min()), int(rows.max()) + 1
            full = np.zeros((hi - lo, width), np.int64)
            lens = np.zeros(hi - lo, np.int32)
            for r, x in zip(rows, ids):
                full[r - lo, :len(x)], lens[r - lo] = x, len(x)
            return self.fused.run(c, full, lens, start=lo)[rows - lo]  # a copy (fancy index) of a reused buffer
        feed = np.zeros((len(rows), width), np.int64)  # left-padded: each row's last token is the call's last
        step_mask = np.zeros((len(rows), width), np.int64)
        for i, x in enumerate(ids):
            feed[i, width - len(x):], step_mask[i, width - len(x):] = x, 1
        sel = slice(int(rows[0]), int(rows[-1]) + 1) if np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)) else rows
        # Only the slots some selected row has filled: a lone short request does not read (and attend over
        # masked) slots up to the server's --max-length every step.
        upto = c.filled(sel)
        feeds = {"input_ids": feed, "position_ids": c.positions(sel, step_mask),
                 "attention_mask": c.attention_feed(sel, step_mask, upto)}
        for (pk, pv, _, _), k, v in zip(self.kv_names, *[iter(c.past(sel, upto))] * 2):
            feeds[pk], feeds[pv] = k, v
        out = self.pipe._run("text_decoder", feeds)
        c.write(sel, [out[n] for names in self.kv_names for n in names[2:]], step_mask)
        return out["logits"]

    def _update_stats(self) -> None:
        with self._lock:
            self.stats.queue_length = len(self.queue)
        self.stats.active_requests = len(self.active)
        self.stats.active_rows = sum(len(r.rows) for r in self.active)
