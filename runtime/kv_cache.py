"""The KV cache of one generation request and the runtime's decoder over it.

Buffers (rows, heads, capacity, head_dim) per layer are allocated once per request, to its
maximum length. The query bridge's visual prefix fills slots 0..Q-1 once; every decoder step
reads the whole buffer in place (masked slots are ignored) and its new K/V are written at the
current slot: only the step's own positions are copied. Beam search reorders the text slots only.
bridge_export.runtime.gpu.kv_cache.DeviceKVCache is the same cache in device memory; CachedDecoder drives either.
The fused decoder's SharedKVCache (below) has its device twin in bridge_export.runtime.gpu.shared_kv
(DeviceSharedKVCache); FusedStep drives either.
"""
from __future__ import annotations

import numpy as np

from bridge_export.runtime.sessions import Session


class KVCache:
    """Preallocated K/V buffers plus a key mask; `length` slots are filled (same for every row)."""

    device_resident = False  # host memory: the decoder's outputs come back as numpy

    def __init__(self, prefix: list[np.ndarray], capacity: int):
        rows, heads, q_len, head_dim = prefix[0].shape
        if capacity < q_len:
            raise ValueError("cache capacity smaller than the visual prefix")
        self.prefix_len = q_len
        self.buffers = []
        for t in prefix:
            buf = np.zeros((rows, heads, capacity, head_dim), np.float32)
            buf[:, :, :q_len] = t
            self.buffers.append(buf)
        # the decode step's attention_mask feed, [slots' mask | the new token's 1]: `mask` is a view of it,
        # so a one-token step feeds it as is instead of concatenating a new array every step
        self._feed = np.zeros((rows, capacity + 1), np.int64)
        self.mask = self._feed[:, :capacity]
        self.mask[:, :q_len] = 1
        self.length = q_len
        self.capacity = capacity

    @property
    def rows(self) -> int:
        """Rows in the cache (batch x beams)."""
        return self.mask.shape[0]

    def write(self, present: list[np.ndarray], step_mask: np.ndarray) -> None:
        """Store one step's new K/V (rows, heads, T, head_dim) at the current slots."""
        T = step_mask.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache full ({self.capacity} slots): raise the request's maximum length")
        s = slice(self.length, self.length + T)
        for buf, new in zip(self.buffers, present):
            buf[:, :, s] = new
        self.mask[:, s] = step_mask
        self.length += T

    def attention_feed(self, step_mask: np.ndarray) -> np.ndarray:
        """The decoder's attention_mask for a step: the slots' mask, then the step's."""
        if step_mask.shape[1] == 1:
            self._feed[:, -1:] = step_mask
            return self._feed
        return np.concatenate([self.mask, step_mask], axis=1)

    def repeat(self, n: int) -> None:
        """Repeat each row n times (the beams of one image share one prefix copy per beam, made once)."""
        self.buffers = [np.repeat(b, n, axis=0) for b in self.buffers]
        self._feed = np.repeat(self._feed, n, axis=0)
        self.mask = self._feed[:, :self.capacity]

    def reorder(self, src: np.ndarray) -> None:
        """Beam reorder: rows take the text slots of rows `src`; the shared visual prefix is untouched."""
        if np.array_equal(src, np.arange(self.rows)):
            return
        s = slice(self.prefix_len, self.length)
        for buf in self.buffers:
            buf[:, :, s] = buf[src, :, s]
        self.mask[:, s] = self.mask[src, s]

    def close(self) -> None:
        """Nothing to free explicitly (host memory); here for the device cache's interface."""


class _OwnsCache:
    """A decoder that owns its cache: `close()` (or leaving `with`) frees it (device memory for a device cache)."""

    cache: KVCache

    def close(self) -> None:
        """Free the cache (device memory for a device cache)."""
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CachedDecoder(_OwnsCache):
    """`bridge_export.runtime.search.Decoder` over the text_decoder session and a KVCache."""

    def __init__(self, session: Session, names: list[tuple[str, str, str, str]], cache: KVCache,
                 prompt_ids: np.ndarray, prompt_mask: np.ndarray):
        self.sess, self.names, self.cache = session, names, cache
        self.prompt_ids, self.prompt_mask = prompt_ids.astype(np.int64), prompt_mask.astype(np.int64)
        self.next_pos = None

    def _run(self, ids: np.ndarray, pos: np.ndarray, step_mask: np.ndarray) -> np.ndarray:
        c = self.cache
        feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": c.attention_feed(step_mask)}
        for (pk, pv, _, _), k, v in zip(self.names, c.buffers[0::2], c.buffers[1::2]):
            feeds[pk], feeds[pv] = k, v
        if c.device_resident:  # new K/V stay on the device for the cache; only the logits come down
            out = self.sess.run(feeds, on_device=tuple(n for n in self.sess.output_names if n != "logits"))
        else:
            out = self.sess.run(feeds)
        present = [out[n] for names in self.names for n in names[2:]]
        c.write(present, step_mask)
        return out["logits"]


    def prefill(self) -> np.ndarray:
        """Run the prompt after the visual prefix; logits of the last position [rows, V]."""
        full = np.concatenate([self.cache.mask[:, : self.cache.length], self.prompt_mask], axis=1)
        pos = full.cumsum(-1) - 1
        pos = np.where(full == 0, 1, pos)[:, self.cache.length:]  # transformers' convention for pads
        self.next_pos = full.sum(1, keepdims=True)
        return self._run(self.prompt_ids, np.ascontiguousarray(pos), self.prompt_mask)

    def expand(self, n: int) -> None:
        """Repeat every row n times (beam search)."""
        self.cache.repeat(n)
        self.next_pos = np.repeat(self.next_pos, n, axis=0)

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """Reorder rows (beams), feed one token per row, return its logits."""
        if reorder is not None:
            self.cache.reorder(reorder)
            self.next_pos = self.next_pos[reorder]
        ones = np.ones((tokens.shape[0], 1), np.int64)
        logits = self._run(tokens.astype(np.int64)[:, None], self.next_pos.copy(), ones)
        self.next_pos = self.next_pos + 1
        return logits


# -- the fused decoder's shared buffer (bundles whose text_decoder targets onnxruntime) ----------------
class SharedKVCache:
    """The fused decoder's KV cache: one buffer the decoder reads as past and writes as present, in place.

    `data` is [layers, 2 (key, value), rows, heads, capacity, head_dim]; every layer's K (or V) is
    one contiguous [rows, heads, capacity, head_dim] block that onnxruntime's GroupQueryAttention
    gets as both `past_key` and `present_key` (bound through IOBinding), so a step writes only its
    new slots. `lengths[r]` is how many slots row r holds: rows may differ (the step-level
    scheduler's requests, prompts of different lengths), slots at or beyond a row's length are
    never read. Slot index = RoPE position, so the visual prefix occupies slots 0..Q-1.
    """

    device_resident = False

    def __init__(self, num_layers: int, rows: int, heads: int, capacity: int, head_dim: int,
                 dtype=np.float32, prefix_len: int = 0):
        self.data = np.zeros((num_layers, 2, rows, heads, capacity, head_dim), dtype)
        self.lengths = np.zeros(rows, np.int32)
        self.prefix_len = prefix_len
        self.capacity = capacity
        self.bindings: dict[tuple, tuple] = {}  # FusedStep's IOBindings to this buffer, freed with it

    @property
    def rows(self) -> int:
        """Rows the buffer holds (requests x beams)."""
        return self.data.shape[2]

    def write_prefix(self, prefix: list[np.ndarray], rows: slice | None = None) -> None:
        """Put the bridge's visual prefix ([k0, v0, k1, v1, ...], each [n, heads, Q, head_dim]) into
        slots 0..Q-1 of rows `rows` (default: the first n); those rows' lengths become Q."""
        n, q = prefix[0].shape[0], prefix[0].shape[2]
        if q > self.capacity:
            raise ValueError("cache capacity smaller than the visual prefix")
        rows = rows or slice(0, n)
        view = self.data[:, :, rows, :, :q]
        for i, t in enumerate(prefix):
            view[i // 2, i % 2] = t
        self.lengths[rows] = q
        self.prefix_len = q

    def repeat(self, n: int, rows: int) -> None:
        """Rows 0..rows-1 become rows*n rows, each repeated n times in place (beam search: one copy per beam)."""
        if rows * n > self.rows:
            raise ValueError(f"cache has {self.rows} rows, {rows} x {n} beams need more")
        m = int(self.lengths[:rows].max())
        for r in reversed(range(rows)):  # back to front: a source row is never overwritten before it is read
            self.data[:, :, r * n:(r + 1) * n, :, :m] = self.data[:, :, r:r + 1, :, :m]
        self.lengths[:rows * n] = np.repeat(self.lengths[:rows], n)

    def reorder(self, src: np.ndarray) -> None:
        """Beam reorder: row r takes the text slots of row src[r] (the visual prefix is the same in every beam)."""
        n = len(src)
        if np.array_equal(src, np.arange(n)):
            return
        s = slice(self.prefix_len, int(self.lengths[:n].max()))
        self.data[:, :, :n, :, s] = self.data[:, :, src, :, s]
        self.lengths[:n] = self.lengths[src]

    # -- the step-level scheduler's row cache interface (bridge_export.runtime.serve.row_cache.RowKVCache) --
    @staticmethod
    def nbytes(rows: int, num_layers: int, num_heads: int, head_dim: int, capacity: int, itemsize: int = 4) -> int:
        """Bytes the buffer of this shape takes (K and V)."""
        return 2 * num_layers * rows * num_heads * capacity * head_dim * itemsize

    def load_prefix(self, rows: np.ndarray, prefix: list[np.ndarray]) -> None:
        """Start `rows` afresh with a visual prefix (per layer K, V [len(rows), heads, Q, head_dim])."""
        q = prefix[0].shape[2]
        for i, t in enumerate(prefix):
            self.data[i // 2, i % 2, rows, :, :q] = t
        self.lengths[rows] = q
        self.prefix_len = q

    def copy_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows `dst` take the contents of rows `src` (slots up to the longest; sources read first)."""
        end = int(self.lengths[src].max())
        self.data[:, :, dst, :, :end] = self.data[:, :, src, :, :end]
        self.lengths[dst] = self.lengths[src]

    def free(self, rows) -> None:
        """Mark `rows` empty (their slots are overwritten when a request takes them)."""
        self.lengths[rows] = 0

    def close(self) -> None:
        """Drop the IOBindings into the buffer (the memory itself is host memory, freed with the object)."""
        self.bindings.clear()


class FusedStep:
    """One call of the fused text_decoder over a SharedKVCache, bound in place (the "step these rows" call).

    For a step-level scheduler (bridge_export.runtime.serve): keep one SharedKVCache whose rows are
    the running requests (`lengths` per row), and call `run(cache, ids, query_lens)` with every row:
    row r feeds `ids[r, :query_lens[r]]` (right-padded to the step's width), appended after its
    `lengths[r]` slots; `query_lens[r] == 0` leaves row r idle (its slots untouched, its logits
    meaningless). Returns each row's logits of its last fed token, [rows, vocab] (a view of a buffer
    reused by the next call of the same shape: copy what must outlive it). A row needs
    `lengths[r] + ids.shape[1] <= capacity` (onnxruntime's rule for a padded chunk), idle rows too.
    A finished request's row is reused by `cache.lengths[r] = 0` and a new prefix
    (`cache.write_prefix(prefix, slice(r, r + 1))`).

    SharedKVCache also has RowKVCache's methods (load_prefix, copy_rows, free, lengths, rows, nbytes),
    and `run_rows(cache, rows, ids)` is the scheduler's `_run(rows, ids)` for this decoder: a
    scheduler over a fused bundle (`pipe.fused_step` is not None) keeps a SharedKVCache(num_layers,
    rows, heads, max_length, head_dim, dtype of the graph's past inputs) and steps through
    `pipe.fused_step.run_rows` instead of building position/mask feeds.

    Per call: the cache's buffers are bound as both past and present (no copy of the cache), and
    the feeds and outputs are arrays kept per (rows, width, cache), so a decode step allocates
    nothing but onnxruntime's own scratch.

    On a device session (`session.memory`, bridge_export.runtime.gpu.ort_session.OrtDeviceSession) the
    cache is a bridge_export.runtime.gpu.shared_kv.DeviceSharedKVCache: its blocks are bound in device
    memory (`memory.ort_device`), the small feeds (input_ids, seqlens_k, query_seqlens) are staged in
    one device buffer kept per binding and go up in one copy per step, and only the logits come down
    (hidden_states too when asked). The host path below is untouched by this: one check of
    `cache.device_resident` per call.
    """

    def __init__(self, session, layout):
        self.session = session
        self.layers = [layout.past(i) + layout.present(i) for i in range(layout.num_layers)]

    def _ort(self):
        """The onnxruntime InferenceSession now open for the decoder (a session wrapper that opens its graph
        on use, as verify's one-session-at-a-time pipeline, provides `ort_session()`)."""
        s = self.session
        ort = s.ort_session() if hasattr(s, "ort_session") else getattr(s, "sess", None)
        if ort is None:
            from bridge_export.runtime.errors import SessionClosed

            raise SessionClosed(f"{getattr(s, 'name', 'text_decoder')}: session is closed; load the bundle again")
        return ort

    def _binding(self, ort, cache: SharedKVCache, start: int, n: int, width: int):
        key = (id(ort), start, n, width)
        if key in cache.bindings:
            return cache.bindings[key]
        if len(cache.bindings) > 8:  # prompt widths vary: keep the decode step's bindings, not every prefill's
            cache.bindings.clear()
        out = {o.name: o for o in ort.get_outputs()}
        vocab, hidden = out["logits"].shape[1], out["hidden_states"].shape[2]
        b = ort.io_binding()
        feeds = {"input_ids": np.zeros((n, width), np.int64), "seqlens_k": np.zeros(n, np.int32),
                 "query_seqlens": np.zeros(n, np.int32), "total_sequence_length": np.zeros((), np.int32)}
        for k, a in feeds.items():
            b.bind_input(k, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for i, (pk, pv, ok, ov) in enumerate(self.layers):
            for j, (src, dst) in enumerate(((pk, ok), (pv, ov))):
                block = cache.data[i, j, start:start + n]  # contiguous: rows are the block's first axis
                b.bind_input(src, "cpu", 0, block.dtype, list(block.shape), block.ctypes.data)
                b.bind_output(dst, "cpu", 0, block.dtype, list(block.shape), block.ctypes.data)
        outs = {"logits": np.zeros((n, vocab), np.float32), "hidden_states": np.zeros((n, width, hidden), np.float32)}
        for k, a in outs.items():
            b.bind_output(k, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        cache.bindings[key] = (b, feeds, outs, ort)  # lives as long as the buffer its pointers point into
        return cache.bindings[key]

    @staticmethod
    def _fill(cache, ids: np.ndarray, query_lens: np.ndarray, start: int, feeds: dict, total_feed: np.ndarray):
        """Write one call's feeds (ids, query_seqlens, seqlens_k, total_sequence_length into `total_feed`)
        after checking the rows' capacity; returns (the rows' lengths view, their lengths after the call)."""
        n, width = ids.shape
        lengths = cache.lengths[start:start + n]
        if int(lengths.max()) + width > cache.capacity:
            raise ValueError(f"KV cache full ({cache.capacity} slots): raise the request's maximum length")
        total = lengths + query_lens
        feeds["input_ids"][...] = ids
        feeds["query_seqlens"][...] = query_lens
        feeds["seqlens_k"][...] = total - 1
        total_feed[...] = max(int(total.max()), width)
        return lengths, total

    def run(self, cache: SharedKVCache, ids: np.ndarray, query_lens: np.ndarray, hidden: bool = False,
            start: int = 0):
        """Append each row's `query_lens[r]` tokens of `ids` [n, width] to rows start..start+n-1 of
        `cache`; returns logits [n, vocab] (and hidden_states [n, width, D] with `hidden`)."""
        if cache.device_resident:
            return self._run_device(cache, ids, query_lens, hidden, start)
        ort = self._ort()
        n, width = ids.shape
        b, feeds, outs, _ = self._binding(ort, cache, start, n, width)
        lengths, total = self._fill(cache, ids, query_lens, start, feeds, feeds["total_sequence_length"])
        ort.run_with_iobinding(b)
        lengths[...] = total
        if hasattr(self.session, "finite"):  # damaged weights: refused, never returned (idle rows' logits are not read)
            active = np.asarray(query_lens) > 0
            self.session.finite({"logits": outs["logits"][active]} |
                                ({"hidden_states": outs["hidden_states"][active]} if hidden else {}))
        return (outs["logits"], outs["hidden_states"]) if hidden else outs["logits"]

    # -- device sessions (a DeviceSharedKVCache) -------------------------------------------------------
    # onnxruntime's CUDA GroupQueryAttention kernel (contrib_ops/cuda/bert/group_query_attention.cc, its
    # kernel registration) declares one input in CPU memory: total_sequence_length (input 6,
    # `InputMemoryType(OrtMemTypeCPUInput, 6)`), which it reads on the host to size the launch; every
    # other input (seqlens_k included) is device memory, and past/present share one buffer when bound
    # to the same pointer (`MayInplace(3, 1)`, `MayInplace(4, 2)`). So total_sequence_length is bound
    # as "cpu" and the rest in the cache's memory. query_seqlens (input 16 in onnxruntime 1.32's schema)
    # is not named in the CUDA source read for this; it is bound in device memory like seqlens_k, and
    # `python -m bridge_export.runtime.gpu.check --bundle` runs a ragged step to show the kernel honours
    # it (an idle row's slots untouched). That registration
    # covers fp16 and bf16 only: an fp32 graph's GroupQueryAttention falls back to the CPU provider, and
    # onnxruntime then copies each layer's K/V between the devices inside the run (correct, not fast).
    def _device_binding(self, ort, cache, start: int, n: int, width: int):
        key = (id(ort), start, n, width)
        entry = cache.bindings.get(key)
        if entry is not None:
            return entry
        if len(cache.bindings) > 8:  # as the host path: keep the decode step's, not every prefill's
            cache.clear_bindings()
        mem = cache.memory
        dev, dev_id = mem.ort_device, mem.device_id
        out = {o.name: o for o in ort.get_outputs()}
        vocab, hidden = out["logits"].shape[1], out["hidden_states"].shape[2]
        ids_bytes = n * width * 8
        host = np.zeros(ids_bytes + 8 * n, np.uint8)  # input_ids | seqlens_k | query_seqlens: one upload a step
        feeds = {"input_ids": host[:ids_bytes].view(np.int64).reshape(n, width),
                 "seqlens_k": host[ids_bytes:ids_bytes + 4 * n].view(np.int32),
                 "query_seqlens": host[ids_bytes + 4 * n:].view(np.int32)}
        bufs = []
        try:
            staged = mem.empty(host.shape, np.uint8)
            bufs.append(staged)
            outs = {"logits": mem.empty((n, vocab), np.float32), "hidden_states": mem.empty((n, width, hidden),
                                                                                           np.float32)}
            bufs += list(outs.values())
        except BaseException:  # out of device memory: nothing of this binding stays allocated
            for buf in bufs:
                mem.release(buf)
            raise
        b = ort.io_binding()
        for k, off in (("input_ids", 0), ("seqlens_k", ids_bytes), ("query_seqlens", ids_bytes + 4 * n)):
            b.bind_input(k, dev, dev_id, feeds[k].dtype, list(feeds[k].shape), staged.ptr + off)
        total = np.zeros((), np.int32)
        b.bind_input("total_sequence_length", "cpu", 0, total.dtype, [], total.ctypes.data)
        shape = cache.block_shape(n)
        for i, (pk, pv, ok, ov) in enumerate(self.layers):
            for j, (src, dst) in enumerate(((pk, ok), (pv, ov))):
                ptr = cache.block_ptr(i, j, start)
                b.bind_input(src, dev, dev_id, cache.dtype, shape, ptr)
                b.bind_output(dst, dev, dev_id, cache.dtype, shape, ptr)
        for k, buf in outs.items():
            b.bind_output(k, dev, dev_id, buf.dtype, list(buf.shape), buf.ptr)
        # the device buffers last: DeviceSharedKVCache.clear_bindings frees them with the binding
        cache.bindings[key] = (b, host, feeds, total, staged, outs, ort, bufs)
        return cache.bindings[key]

    def _run_device(self, cache, ids: np.ndarray, query_lens: np.ndarray, hidden: bool, start: int):
        """`run` on a DeviceSharedKVCache: the feeds go up in one copy, the logits come down."""
        ort = self._ort()
        n, width = ids.shape
        b, host, feeds, tsl, staged, outs, _, _ = self._device_binding(ort, cache, start, n, width)
        lengths, total = self._fill(cache, ids, query_lens, start, feeds, tsl)
        mem = cache.memory
        mem.upload(host, into=staged)
        mem.sync()  # the upload and any row moves (our stream) done before onnxruntime reads them
        b.synchronize_inputs()
        ort.run_with_iobinding(b, getattr(self.session, "run_options", None))  # returns with its outputs complete
        lengths[...] = total
        logits = mem.download(outs["logits"])
        states = mem.download(outs["hidden_states"]) if hidden else None
        if hasattr(self.session, "finite"):  # damaged weights: refused, never returned (idle rows' logits are not read)
            active = np.asarray(query_lens) > 0
            self.session.finite({"logits": logits[active]} | ({"hidden_states": states[active]} if hidden else {}))
        return (logits, states) if hidden else logits

    def run_rows(self, cache: SharedKVCache, rows, ids: np.ndarray) -> np.ndarray:
        """RowKVCache's step for the scheduler: rows `rows` (a slice or index array) each feed all of
        `ids` [len(rows), T] after their own length; logits [len(rows), vocab]. One call over the
        span of rows they cover, rows between them idle (query length 0)."""
        idx = np.arange(cache.rows)[rows]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi - lo == len(idx) and np.array_equal(idx, np.arange(lo, hi)):
            return self.run(cache, ids, np.full(len(idx), ids.shape[1], np.int32), start=lo)
        full = np.zeros((hi - lo, ids.shape[1]), np.int64)
        lens = np.zeros(hi - lo, np.int32)
        full[idx - lo], lens[idx - lo] = ids, ids.shape[1]
        return self.run(cache, full, lens, start=lo)[idx - lo]


def pack_right(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens (mask 1) moved to the front, pad 0 after: ([n, max real], real counts).

    A token's position is its index among its row's real tokens (the original's cumsum of the mask),
    so dropping the pads changes no position and leaves nothing to mask."""
    lens = mask.sum(1).astype(np.int32)
    out = np.zeros((ids.shape[0], int(lens.max())), np.int64)
    for r in range(ids.shape[0]):
        out[r, :lens[r]] = ids[r, mask[r].astype(bool)]
    return out, lens


class FusedCachedDecoder(_OwnsCache):
    """`bridge_export.runtime.search.Decoder` over the fused decoder: the prompt prefill and decode steps
    append to one SharedKVCache in place; beams are repeated and reordered inside it."""

    def __init__(self, step: FusedStep, cache: SharedKVCache, prompt_ids: np.ndarray, prompt_mask: np.ndarray):
        self.step_fn, self.cache = step, cache
        self.ids, self.lens = pack_right(prompt_ids.astype(np.int64), prompt_mask)
        self.n = prompt_ids.shape[0]
        self._ones = None

    def prefill(self) -> np.ndarray:
        """Run the prompt after the visual prefix; logits of each row's last prompt token [rows, V]."""
        return self.step_fn.run(self.cache, self.ids, self.lens).copy()

    def expand(self, n: int) -> None:
        """Repeat every row n times (beam search)."""
        self.cache.repeat(n, self.n)
        self.n *= n

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """Reorder rows (beams), feed one token per row, return its logits [rows, V] (reused next step)."""
        if reorder is not None:
            self.cache.reorder(reorder)
        if self._ones is None or len(self._ones) != self.n:
            self._ones = np.ones(self.n, np.int32)
        return self.step_fn.run(self.cache, tokens.reshape(self.n, 1), self._ones)


def fused_text_hidden(step: FusedStep, ids: np.ndarray, mask: np.ndarray, layout, dtype=np.float32,
                      cache=None) -> np.ndarray:
    """hidden_states [n, T, D] of right-padded texts through the fused decoder with an empty past
    (a cache of capacity T; each row's `query_seqlens` is its token count).

    `cache`: an empty cache of n rows and T slots to run in, which the caller frees (a
    DeviceSharedKVCache on a device session); default a host SharedKVCache."""
    n, T = ids.shape
    if cache is None:
        cache = SharedKVCache(layout.num_layers, n, layout.num_heads, T, layout.head_dim, dtype)
    _, hidden = step.run(cache, ids, mask.sum(1).astype(np.int32), hidden=True)
    return hidden if cache.device_resident else hidden.copy()  # a device run's is a fresh download
