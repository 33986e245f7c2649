"""The fused decoder's shared KV buffer in device memory (bridge_export.runtime.kv_cache.SharedKVCache's
interface and layout, for onnxruntime's CUDA provider; HostMemory runs the same code in the tests).

One allocation `[layers, 2 (key, value), rows, heads, capacity, head_dim]`: every layer's K (or V)
block over a run of rows is contiguous, so FusedStep binds it by pointer as both GroupQueryAttention's
past and present and a step writes only its new slots, on the device. Row moves (beam repeat and
reorder, the scheduler's copy_rows) are strided device-to-device copies, one 3-D copy per row moving
that row's slots in every layer's K and V at once. Where a move reads a row that it also writes
(a beam reorder), the sources go through a scratch block first, so none is overwritten before it is
read. `lengths` stays on the host: it is what FusedStep turns into each step's `seqlens_k`.
"""
from __future__ import annotations

import numpy as np

from bridge_export.runtime.gpu.kv_cache import kv_slot_geometry
from bridge_export.runtime.gpu.memory import DeviceBuffer, DeviceMemory


class DeviceSharedKVCache:
    """SharedKVCache over a DeviceMemory: `[layers, 2, rows, heads, capacity, head_dim]` as one allocation.

    `lengths[r]` (host int32) is how many slots row r holds; slots at or beyond it are never read. Prefix
    tensors may be numpy arrays (uploaded) or DeviceBuffers (copied device to device, as the bridge's
    outputs stay on the device). Free the memory with `close()` (or use `with`).
    """

    device_resident = True  # FusedStep binds the blocks in device memory and downloads only the logits

    def __init__(self, memory: DeviceMemory, num_layers: int, rows: int, heads: int, capacity: int, head_dim: int,
                 dtype=np.float32, prefix_len: int = 0):
        self.memory, self.dtype = memory, np.dtype(dtype)
        self.shape = (num_layers, 2, rows, heads, capacity, head_dim)
        self.lengths = np.zeros(rows, np.int32)
        self.prefix_len, self.capacity = prefix_len, capacity
        self.bindings: dict[tuple, tuple] = {}  # FusedStep's IOBindings and their device feeds/outputs
        self.scratch: DeviceBuffer | None = None  # row moves that read what they write go through it
        self.block = memory.empty(self.shape, self.dtype)
        try:
            memory.memset(self.block.ptr, 0, self.block.nbytes)  # never-written slots are not read, but no NaN
        except BaseException:
            self.close()
            raise

    # -- layout ----------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows the buffer holds (requests x beams)."""
        return self.shape[2]

    @property
    def tensors(self) -> int:
        """K and V of every layer: 2 x layers."""
        return 2 * self.shape[0]

    @property
    def pitch(self) -> int:
        """Bytes from one (row, head) line of slots to the next."""
        return self.capacity * self.shape[5] * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of one tensor (heads x capacity x head_dim)."""
        return self.shape[3] * self.pitch

    def block_ptr(self, layer: int, kind: int, start: int = 0) -> int:
        """Device address of rows start.. of layer `layer`'s key (kind 0) or value (kind 1) block, a
        contiguous [rows - start, heads, capacity, head_dim] array."""
        return self.block.ptr + ((layer * 2 + kind) * self.rows + start) * self.row_bytes

    def block_shape(self, n: int) -> list[int]:
        """The shape onnxruntime is given for `n` rows of one block."""
        return [n, self.shape[3], self.capacity, self.shape[5]]

    def download(self) -> np.ndarray:
        """The whole buffer as a host array (for checks; counted as traffic)."""
        return self.memory.download(self.block)

    @staticmethod
    def nbytes(rows: int, num_layers: int, num_heads: int, head_dim: int, capacity: int, itemsize: int = 4) -> int:
        """Bytes the buffer of this shape takes (K and V), as SharedKVCache.nbytes."""
        return 2 * num_layers * rows * num_heads * capacity * head_dim * itemsize

    # -- prefixes ------------------------------------------------------------------------------
    def _check_prefix(self, prefix: list, n: int) -> int:
        q = int(prefix[0].shape[2])
        if q > self.capacity:
            raise ValueError("cache capacity smaller than the visual prefix")
        want = (n, self.shape[3], q, self.shape[5])
        if len(prefix) != self.tensors:
            raise ValueError(f"{len(prefix)} prefix tensors, the cache holds {self.tensors} (K and V per layer)")
        for i, t in enumerate(prefix):
            if tuple(t.shape) != want:
                raise ValueError(f"prefix tensor {i} has shape {list(t.shape)}, expected {list(want)}")
        return q

    def _staged(self, t) -> tuple[DeviceBuffer, bool]:
        """`t` on the device in the cache's dtype, and whether it is a temporary to release."""
        if isinstance(t, DeviceBuffer) and t.dtype == self.dtype:
            return t, False
        if isinstance(t, DeviceBuffer):  # e.g. an fp32 prefix for an fp16 buffer: no device cast kernel here,
            t = self.memory.download(t)  # so it is cast on the host (once per request, counted)
        return self.memory.upload(np.ascontiguousarray(t, self.dtype)), True

    def _put_prefix(self, rows: np.ndarray, prefix: list) -> None:
        """Slots 0..Q-1 of `rows` (ascending runs are one copy each) take prefix rows 0..len(rows)-1."""
        n, heads, q = len(rows), self.shape[3], int(prefix[0].shape[2])
        g = kv_slot_geometry(heads, self.capacity, self.shape[5], 0, q, self.dtype.itemsize, 1)
        src_row_bytes = heads * g["spitch"]
        runs, j = [], 0
        while j < n:  # (first destination row, first prefix row, count)
            k = j + 1
            while k < n and rows[k] == rows[k - 1] + 1:
                k += 1
            runs.append((int(rows[j]), j, k - j))
            j = k
        temps = []
        try:
            for i, t in enumerate(prefix):
                src, temp = self._staged(t)
                if temp:
                    temps.append(src)
                for dst_row, src_row, count in runs:
                    self.memory.copy_2d(self.block_ptr(i // 2, i % 2, dst_row), g["dpitch"],
                                        src.ptr + src_row * src_row_bytes, g["spitch"], g["width"], heads * count)
        finally:
            if temps:
                self.memory.sync()  # the copies read the staged uploads: finish before freeing them
            for b in temps:
                self.memory.release(b)

    def write_prefix(self, prefix: list, rows: slice | None = None) -> None:
        """Put the bridge's visual prefix ([k0, v0, k1, v1, ...], each [n, heads, Q, head_dim], numpy or
        DeviceBuffer) into slots 0..Q-1 of rows `rows` (default: the first n); those rows' lengths become Q."""
        n = int(prefix[0].shape[0])
        rows = rows or slice(0, n)
        idx = np.arange(self.rows)[rows]
        if len(idx) != n:
            raise ValueError(f"{n} prefix rows for {len(idx)} cache rows")
        q = self._check_prefix(prefix, n)
        self._put_prefix(idx, prefix)
        self.lengths[rows] = q
        self.prefix_len = q

    def load_prefix(self, rows: np.ndarray, prefix: list) -> None:
        """Start `rows` afresh with a visual prefix (per layer K, V [len(rows), heads, Q, head_dim])."""
        rows = np.atleast_1d(np.asarray(rows))
        q = self._check_prefix(prefix, len(rows))
        self._put_prefix(rows, prefix)
        self.lengths[rows] = q
        self.prefix_len = q

    # -- row moves -------------------------------------------------------------------------------
    def _copy_row(self, dst: DeviceBuffer, dst_rows: int, dst_row: int, src: DeviceBuffer, src_rows: int,
                  src_row: int, start: int, end: int) -> None:
        """Slots [start, end) of one row, in every layer's K and V: one 3-D copy (heads lines per tensor)."""
        item, hd, heads = self.dtype.itemsize, self.shape[5], self.shape[3]
        off = start * hd * item
        self.memory.copy_3d(dst.ptr + dst_row * self.row_bytes + off, self.pitch, dst_rows * heads,
                            src.ptr + src_row * self.row_bytes + off, self.pitch, src_rows * heads,
                            (end - start) * hd * item, heads, self.tensors)

    def _scratch(self, rows: int) -> DeviceBuffer:
        """A scratch block of at least `rows` rows (kept, grown when a larger move comes)."""
        if self.scratch is None or self.scratch.shape[2] < rows:
            new = self.memory.empty((self.shape[0], 2, rows) + self.shape[3:], self.dtype)
            self.memory.sync()  # an earlier move may still read the old scratch
            self.memory.release(self.scratch)
            self.scratch = new
        return self.scratch

    def _move(self, dst, src, start: int, end: int) -> None:
        """Rows `dst` take slots [start, end) of rows `src`, every source read before any row is written."""
        pairs = [(int(d), int(s)) for d, s in zip(dst, src) if int(d) != int(s)]
        if not pairs or end <= start:
            return
        if not {s for _, s in pairs} & {d for d, _ in pairs}:  # no source is overwritten: straight across
            for d, s in pairs:
                self._copy_row(self.block, self.rows, d, self.block, self.rows, s, start, end)
            return
        scratch = self._scratch(len(dst))  # sized to the call, not its moving rows: a beam search allocates once
        srows = scratch.shape[2]
        for j, (_, s) in enumerate(pairs):
            self._copy_row(scratch, srows, j, self.block, self.rows, s, start, end)
        for j, (d, _) in enumerate(pairs):  # stream order: after every gather above
            self._copy_row(self.block, self.rows, d, scratch, srows, j, start, end)

    def repeat(self, n: int, rows: int) -> None:
        """Rows 0..rows-1 become rows*n rows, each repeated n times (beam search: one copy per beam)."""
        if rows * n > self.rows:
            raise ValueError(f"cache has {self.rows} rows, {rows} x {n} beams need more")
        m = int(self.lengths[:rows].max())
        for r in reversed(range(rows)):  # back to front: row r's copies land on rows >= r, already read
            for k in range(n):
                if r * n + k != r:
                    self._copy_row(self.block, self.rows, r * n + k, self.block, self.rows, r, 0, m)
        self.lengths[:rows * n] = np.repeat(self.lengths[:rows], n)

    def reorder(self, src: np.ndarray) -> None:
        """Beam reorder: row r takes the text slots of row src[r] (the visual prefix is the same in every beam)."""
        n = len(src)
        if np.array_equal(src, np.arange(n)):
            return
        self._move(np.arange(n), src, self.prefix_len, int(self.lengths[:n].max()))
        self.lengths[:n] = self.lengths[src]

    def copy_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows `dst` take the contents of rows `src` (slots up to the longest; sources read first)."""
        src = np.atleast_1d(np.asarray(src))
        self._move(np.atleast_1d(np.asarray(dst)), src, 0, int(self.lengths[src].max()))
        self.lengths[dst] = self.lengths[src]

    def free(self, rows) -> None:
        """Mark `rows` empty (their slots are overwritten when a request takes them)."""
        self.lengths[rows] = 0

    # -- lifetime --------------------------------------------------------------------------------
    def clear_bindings(self) -> None:
        """Drop FusedStep's IOBindings into the buffer and free their device feeds and outputs."""
        for entry in self.bindings.values():  # as DeviceKVCache.close: cudaFree synchronizes first
            for buf in entry[-1]:
                self.memory.release(buf)
        self.bindings.clear()

    def close(self) -> None:
        """Free the device memory: the buffer, its scratch and the bindings' buffers (idempotent)."""
        self.clear_bindings()
        for name in ("block", "scratch"):
            self.memory.release(getattr(self, name, None))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
