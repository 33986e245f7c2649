"""The step-level scheduler's KV cache: one buffer of N rows that requests share, each row at its own length.

Laid out for the portable decoder graph (past K/V [rows, heads, capacity, head_dim] and a per-row
attention mask): every row keeps its visual prefix in slots 0..Q-1, then its prompt and new tokens (a prompt prefilled
beside longer ones is left-padded: its pad slots stay masked, and positions count real slots only);
a decode step reads rows 0..n-1 in place (the active rows are kept first, so that is a view, no
copy) and writes each row's new K/V at that row's own length. Empty slots are masked, so a row
attends to exactly what it would attend to alone. The scheduler only uses the methods below, so a
cache for another decoder layout (onnxruntime's GroupQueryAttention, whose per-row `seqlens_k`
plays the role of `lengths`) can stand in for it.
"""
from __future__ import annotations

import numpy as np


class RowKVCache:
    """K/V buffers for `rows` rows of `capacity` positions, a key mask and each row's filled length."""

    def __init__(self, rows: int, num_layers: int, num_heads: int, head_dim: int, capacity: int):
        shape = (rows, num_heads, capacity, head_dim)
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * num_layers)]  # k0, v0, k1, v1, ...
        self.mask = np.zeros((rows, capacity), np.int64)
        self.lengths = np.zeros(rows, np.int64)
        self.rows, self.capacity = rows, capacity

    @staticmethod
    def nbytes(rows: int, num_layers: int, num_heads: int, head_dim: int, capacity: int) -> int:
        """Bytes the buffers of this shape take (K and V, fp32)."""
        return 2 * num_layers * rows * num_heads * capacity * head_dim * 4

    def load_prefix(self, rows: np.ndarray, prefix: list[np.ndarray]) -> None:
        """Start `rows` afresh with a visual prefix (per layer K, V [len(rows), heads, Q, head_dim])."""
        q = prefix[0].shape[2]
        for buf, t in zip(self.buffers, prefix):
            buf[rows, :, :q] = t
        self.mask[rows] = 0
        self.mask[rows, :q] = 1
        self.lengths[rows] = q

    def filled(self, rows) -> int:
        """Slots a step over `rows` must read: their longest length (every slot past it is masked in all of
        them, so a step fed only these slots attends to exactly the same keys)."""
        return int(self.lengths[rows].max())

    def past(self, rows, upto: int | None = None) -> list[np.ndarray]:
        """The past K/V feeds of `rows` (their first `upto` slots, default all): a row slice of the full
        capacity is a view of the buffers (no copy); an index array, or fewer slots, a copy of what is fed."""
        if upto is None:
            return [buf[rows] for buf in self.buffers]
        return [buf[rows][:, :, :upto] for buf in self.buffers]

    def attention_feed(self, rows, step_mask: np.ndarray, upto: int | None = None) -> np.ndarray:
        """The decoder's attention mask for `rows` feeding a step whose own mask is `step_mask` [rows, T]
        (0 for left padding): their (first `upto`) slots' mask, then the step's."""
        return np.concatenate([self.mask[rows][:, :upto], step_mask], axis=1)

    def positions(self, rows, step_mask: np.ndarray) -> np.ndarray:
        """Position ids [rows, T]: a token's position counts the real (unmasked) slots before it, as the
        original's cumsum of the attention mask; pads get 1 (transformers' convention; they are masked)."""
        pos = self.mask[rows].sum(1)[:, None] + step_mask.cumsum(1) - 1
        return np.where(step_mask == 0, 1, pos)

    def write(self, rows, present: list[np.ndarray], step_mask: np.ndarray) -> None:
        """Store each row's new K/V (present [len(rows), heads, T, head_dim]) at that row's own length; the
        step's pad slots (step_mask 0) stay masked."""
        idx = np.arange(self.rows)[rows]
        T = present[0].shape[2]
        if (self.lengths[idx] + T > self.capacity).any():
            raise ValueError(f"row KV cache full ({self.capacity} positions per row)")
        slots = self.lengths[idx][:, None] + np.arange(T)[None, :]  # (n, T)
        r = idx[:, None]
        for buf, new in zip(self.buffers, present):
            buf[r, :, slots] = new.transpose(0, 2, 1, 3)  # advanced indices first: (n, T, heads, head_dim)
        self.mask[r, slots] = step_mask
        self.lengths[idx] += T

    def copy_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows `dst` take the contents of rows `src` (beam expand/reorder, moving a row); slots up to the
        longest of them are copied, and the sources are read before any destination is written."""
        end = int(self.lengths[src].max())
        for buf in self.buffers:
            buf[dst, :, :end] = buf[src, :, :end]
        self.mask[dst] = self.mask[src]
        self.lengths[dst] = self.lengths[src]

    def free(self, rows) -> None:
        """Mark `rows` empty (their buffers are overwritten when a request takes them)."""
        self.mask[rows] = 0
        self.lengths[rows] = 0
