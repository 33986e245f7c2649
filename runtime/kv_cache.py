"""The KV cache of one generation request and the runtime's decoder over it.

Buffers (rows, heads, capacity, head_dim) per layer are allocated once per request, to its
maximum length. The query bridge's visual prefix fills slots 0..Q-1 once; every decoder step
reads the whole buffer in place (masked slots are ignored) and its new K/V are written at the
current slot: only the step's own positions are copied. Beam search reorders the text slots only.
bridge_export.runtime.gpu.kv_cache.DeviceKVCache is the same cache in device memory; CachedDecoder drives either.
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
        self.mask = np.zeros((rows, capacity), np.int64)
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
        return np.concatenate([self.mask, step_mask], axis=1)

    def repeat(self, n: int) -> None:
        """Repeat each row n times (the beams of one image share one prefix copy per beam, made once)."""
        self.buffers = [np.repeat(b, n, axis=0) for b in self.buffers]
        self.mask = np.repeat(self.mask, n, axis=0)

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


class CachedDecoder:
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

    def close(self) -> None:
        """Free the cache (device memory for a device cache)."""
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
