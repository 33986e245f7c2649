"""The KV cache of one generation request in device memory, shared by the TensorRT and onnxruntime
CUDA sessions (see bridge_export.runtime.kv_cache.KVCache for the host version and the slot layout).

All K/V tensors live in one allocation laid out (2L, rows, heads, capacity, head_dim), tensor i
being layer i//2's key (even) or value (odd); each tensor is a contiguous view the graph reads
by pointer. The visual prefix is written once per request; each step's new K/V are copied device
to device into their slots (one strided copy per tensor); beam reorder and repeat move whole rows
of every tensor at once (one 3-D copy per row). The key mask has a device copy too, laid out as a
decode step's attention_mask feed (rows, capacity + 1: the slots, then the new token's 1), kept in
step on the device (a decode step's slot is set from a row of ones); it goes up once per request,
and the prompt's part with the prompt. So after the prompt no byte of K/V or mask crosses
between host and device in a decode step: only the token ids and positions go up.
"""
from __future__ import annotations

import numpy as np

from bridge_export.runtime.gpu.memory import DeviceBuffer, DeviceMemory


def kv_slot_geometry(heads: int, capacity: int, head_dim: int, start: int, length: int, itemsize: int = 4,
                     rows: int = 1) -> dict:
    """2-D copy geometry for slots [start, start+length) of a (rows, heads, capacity, head_dim) buffer
    from/to a packed (rows, heads, length, head_dim) one: offsets, pitches, width and height in bytes."""
    return {"dst_offset": start * head_dim * itemsize, "dpitch": capacity * head_dim * itemsize,
            "spitch": length * head_dim * itemsize, "width": length * head_dim * itemsize, "height": rows * heads}


class DeviceKVCache:
    """KVCache's interface (write / repeat / reorder / mask / length) over device memory.

    `prefix` holds per-layer K, V [rows, heads, Q, head_dim] as numpy arrays (uploaded once) or
    DeviceBuffers (copied device to device). Free the memory with `close()` (or use `with`).
    """

    device_resident = True  # CachedDecoder keeps the decoder's outputs but logits on the device

    def __init__(self, prefix: list, capacity: int, memory: DeviceMemory):
        rows, self.heads, q_len, self.head_dim = prefix[0].shape
        if capacity < q_len:
            raise ValueError("cache capacity smaller than the visual prefix")
        self.memory, self.count, self.dtype = memory, len(prefix), np.dtype(prefix[0].dtype)
        self.prefix_len, self.capacity, self.length = q_len, capacity, q_len
        self.pitch = capacity * self.head_dim * self.dtype.itemsize  # bytes per (row, head)
        self.block = self._alloc(rows)
        self.scratch = None  # second block for beam reorder, made on first use
        self.mask = np.zeros((rows, capacity), np.int64)
        self.mask[:, :q_len] = 1
        self.dmask = self.dmask_scratch = self.ones = None
        try:
            self._write_prefix(prefix)
            self._upload_mask()
            self.ones = memory.upload(np.ones(rows, np.int64))  # the source of a decode step's new 1s
        except BaseException:  # e.g. out of device memory: free what was allocated, then report
            self.close()
            raise

    def _upload_mask(self) -> None:
        """The device mask (rows, capacity + 1) from the host one: slots, then the decode step's 1."""
        self.memory.release(self.dmask)
        self.memory.release(self.dmask_scratch)
        self.dmask_scratch = None
        self.dmask = self.memory.upload(np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], axis=1))

    def _write_prefix(self, prefix: list) -> None:
        rows, q_len = self.rows, self.prefix_len
        g = kv_slot_geometry(self.heads, self.capacity, self.head_dim, 0, q_len, self.dtype.itemsize, rows)
        for i, t in enumerate(prefix):  # the visual prefix: once per request
            if tuple(t.shape) != (rows, self.heads, q_len, self.head_dim):
                raise ValueError(f"prefix tensor {i} has shape {list(t.shape)}, expected "
                                 f"{[rows, self.heads, q_len, self.head_dim]}")
            staged = self.memory.upload(np.asarray(t, self.dtype)) if isinstance(t, np.ndarray) else None
            src = t if staged is None else staged
            self.memory.copy_2d(self._tensor_ptr(self.block, i, rows), g["dpitch"], src.ptr, g["spitch"],
                                g["width"], g["height"])
            if staged is not None:
                self.memory.sync()
                self.memory.release(staged)

    # -- layout ----------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows in the cache (batch x beams)."""
        return self.mask.shape[0]

    def _row_bytes(self) -> int:
        return self.heads * self.pitch

    def _alloc(self, rows: int) -> DeviceBuffer:
        buf = self.memory.empty((self.count, rows, self.heads, self.capacity, self.head_dim), self.dtype)
        self.memory.memset(buf.ptr, 0, buf.nbytes)  # unused slots are masked, but must not hold NaN
        return buf

    def _tensor_ptr(self, block: DeviceBuffer, i: int, rows: int) -> int:
        return block.ptr + i * rows * self._row_bytes()

    @property
    def buffers(self) -> list[DeviceBuffer]:
        """Per-tensor views [rows, heads, capacity, head_dim]: layer 0 key, layer 0 value, layer 1 key, ..."""
        shape = (self.rows, self.heads, self.capacity, self.head_dim)
        return [DeviceBuffer(self._tensor_ptr(self.block, i, self.rows), shape, self.dtype) for i in range(self.count)]

    # -- the KVCache interface -------------------------------------------------------------------
    def write(self, present: list[DeviceBuffer], step_mask: np.ndarray) -> None:
        """Copy one step's new K/V (device, [rows, heads, T, head_dim]) into the current slots."""
        T = step_mask.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache full ({self.capacity} slots): raise the request's maximum length")
        g = kv_slot_geometry(self.heads, self.capacity, self.head_dim, self.length, T, self.dtype.itemsize, self.rows)
        for i, new in enumerate(present):
            if new.shape != (self.rows, self.heads, T, self.head_dim) or new.dtype != self.dtype:
                raise ValueError(f"present tensor {i} is {new.dtype}{list(new.shape)}, the cache expects "
                                 f"{self.dtype}{[self.rows, self.heads, T, self.head_dim]}")
            self.memory.copy_2d(self._tensor_ptr(self.block, i, self.rows) + g["dst_offset"], g["dpitch"], new.ptr,
                                g["spitch"], g["width"], g["height"])
        self.mask[:, self.length:self.length + T] = step_mask
        mpitch = (self.capacity + 1) * 8
        if step_mask.all() and T == 1:  # a decode step: device to device, from the ones
            self.memory.copy_2d(self.dmask.ptr + self.length * 8, mpitch, self.ones.ptr, 8, 8, self.rows)
        else:  # a prompt (once per request): its mask goes up
            staged = self.memory.upload(np.ascontiguousarray(step_mask, np.int64))
            try:
                self.memory.copy_2d(self.dmask.ptr + self.length * 8, mpitch, staged.ptr, T * 8, T * 8, self.rows)
                self.memory.sync()
            finally:
                self.memory.release(staged)
        self.length += T

    def attention_feed(self, step_mask: np.ndarray):
        """The decoder's attention_mask for a step: the device mask for a decode step (one new
        position, all ones), else the host array (prefill)."""
        if step_mask.shape[1] == 1 and step_mask.all():
            return self.dmask
        return np.concatenate([self.mask, step_mask], axis=1)

    def _copy_rows(self, dst: DeviceBuffer, dst_rows: int, dst_row: int, src: DeviceBuffer, src_rows: int,
                   src_row: int, offset: int, width: int, height: int) -> None:
        """One 3-D copy: `height` (row, head) lines of `width` bytes from `offset`, in every tensor."""
        self.memory.copy_3d(dst.ptr + dst_row * self._row_bytes() + offset, self.pitch, dst_rows * self.heads,
                            src.ptr + src_row * self._row_bytes() + offset, self.pitch, src_rows * self.heads,
                            width, height, self.count)

    def repeat(self, n: int) -> None:
        """Repeat every row n times (beam search), on the device."""
        rows, mpitch = self.rows, (self.capacity + 1) * 8
        new = dmask = ones = None
        try:  # every new buffer first: out of memory here leaves the cache as it was, nothing leaked
            new = self._alloc(rows * n)
            dmask = self.memory.empty((rows * n, self.capacity + 1), np.int64)
            ones = self.memory.empty((rows * n,), np.int64)
        except BaseException:
            for buf in (new, dmask, ones):
                self.memory.release(buf)
            raise
        for r in range(rows):
            for k in range(n):  # whole rows (heads x capacity) of every tensor, and of the mask
                self._copy_rows(new, rows * n, r * n + k, self.block, rows, r, 0, self.pitch, self.heads)
                self.memory.copy(dmask.ptr + (r * n + k) * mpitch, self.dmask.ptr + r * mpitch, mpitch)
        for r in range(rows * n):  # the 1s, device to device from the mask's last column
            self.memory.copy(ones.ptr + r * 8, self.dmask.ptr + self.capacity * 8, 8)
        self.memory.sync()
        for buf in (self.block, self.scratch, self.dmask, self.dmask_scratch, self.ones):
            self.memory.release(buf)
        self.block, self.scratch, self.dmask, self.dmask_scratch, self.ones = new, None, dmask, None, ones
        self.mask = np.repeat(self.mask, n, axis=0)

    def reorder(self, src: np.ndarray) -> None:
        """Beam reorder: rows take the text slots of rows `src` (on the device); prefixes are shared."""
        if np.array_equal(src, np.arange(self.rows)):
            return
        rows, q = self.rows, self.prefix_len
        if self.scratch is None:  # a full copy once, so its prefixes are valid
            self.scratch = self.memory.empty(self.block.shape, self.dtype)
            self.memory.copy(self.scratch.ptr, self.block.ptr, self.block.nbytes)
        offset = q * self.head_dim * self.dtype.itemsize
        width = (self.length - q) * self.head_dim * self.dtype.itemsize
        for r, s in enumerate(src):  # text slots of every head of every tensor: one copy per row
            self._copy_rows(self.scratch, rows, r, self.block, rows, int(s), offset, width, self.heads)
        self.block, self.scratch = self.scratch, self.block
        self.mask[:, q:self.length] = self.mask[src, q:self.length]
        mpitch = (self.capacity + 1) * 8
        if self.dmask_scratch is None:  # as for K/V: a full copy once, so prefix and tail are valid
            self.dmask_scratch = self.memory.empty(self.dmask.shape, np.int64)
            self.memory.copy(self.dmask_scratch.ptr, self.dmask.ptr, self.dmask.nbytes)
        for r, s in enumerate(src):
            self.memory.copy(self.dmask_scratch.ptr + r * mpitch + q * 8, self.dmask.ptr + int(s) * mpitch + q * 8,
                             (self.length - q) * 8)
        self.dmask, self.dmask_scratch = self.dmask_scratch, self.dmask

    def close(self) -> None:
        """Free the device memory (idempotent)."""
        for name in ("block", "scratch", "dmask", "dmask_scratch", "ones"):
            self.memory.release(getattr(self, name, None))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
