"""The small allocator/copier interface the device KV cache and the device sessions run on.

`DeviceMemory` names the few operations they need (allocate, free, zero, host<->device copies,
strided device-to-device copies, synchronize) and counts every byte that crosses between host and
device. `bridge_export.runtime.gpu.cuda.CudaMemory` implements it with cuda-python on a GPU; `HostMemory` here
implements it on host memory (real pointers, `ctypes.memmove`), so the same cache, offsets, pitches
and onnxruntime binding code run in the tests without a GPU.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Traffic:
    """Bytes copied host->device (`up`) and device->host (`down`) through one DeviceMemory."""

    up: int = 0
    down: int = 0

    def snapshot(self) -> "Traffic":
        """A copy of the counters now (subtract two snapshots for the traffic in between)."""
        return Traffic(self.up, self.down)

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.up - other.up, self.down - other.down)


@dataclass
class DeviceBuffer:
    """`shape` x `dtype` at device address `ptr` (a view: `owner` keeps foreign memory alive)."""

    ptr: int
    shape: tuple
    dtype: np.dtype
    owner: object = field(default=None, repr=False)

    def __post_init__(self):
        self.shape, self.dtype = tuple(int(s) for s in self.shape), np.dtype(self.dtype)

    @property
    def ndim(self) -> int:
        """Number of dimensions (so Session.check_feeds accepts device feeds)."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the viewed array."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class DeviceMemory:
    """Allocator and copier over one device and one stream; every host<->device byte is counted.

    Subclasses implement the raw operations (`alloc`, `free`, `memset`, `_htod`, `_dtoh`, `copy_2d`,
    `copy_3d`, `sync`); the array-level helpers here count what crosses the bus.
    """

    ort_device = "cpu"  # onnxruntime's device_type for I/O binding of this memory
    device_id = 0

    def __init__(self):
        self.traffic = Traffic()

    # -- raw operations (pointers and byte counts) -----------------------------------------------
    def alloc(self, nbytes: int) -> int:
        """Allocate at least one byte; return the device address."""
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        """Release an address returned by `alloc`."""
        raise NotImplementedError

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        """Set `nbytes` bytes at `ptr` to `value` (stream-ordered)."""
        raise NotImplementedError

    def _htod(self, dst: int, src: int, nbytes: int) -> None:
        raise NotImplementedError

    def _dtoh(self, dst: int, src: int, nbytes: int) -> None:
        raise NotImplementedError

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy of `nbytes` contiguous bytes."""
        raise NotImplementedError

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        """Device-to-device: `height` rows of `width` bytes, rows `spitch`/`dpitch` bytes apart."""
        raise NotImplementedError

    def copy_3d(self, dst: int, dpitch: int, drows: int, src: int, spitch: int, srows: int,
                width: int, height: int, depth: int) -> None:
        """Device-to-device: `depth` slabs of `height` rows of `width` bytes; a slab is `drows`/`srows`
        rows of `dpitch`/`spitch` bytes (cudaMemcpy3D on pitched pointers)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until every operation issued so far has finished."""
        raise NotImplementedError

    def free_bytes(self) -> int | None:
        """Bytes the device has free now, or None where this memory cannot tell (callers then keep their
        host-memory bounds)."""
        return None

    def close(self) -> None:
        """Release the stream and anything else the memory object holds (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- array level (counted) --------------------------------------------------------------------
    def empty(self, shape, dtype) -> DeviceBuffer:
        """A new uninitialised device array (free it with `release`)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return DeviceBuffer(self.alloc(max(1, n)), tuple(shape), dtype)

    def release(self, buf: DeviceBuffer | None) -> None:
        """Free a buffer made by `empty`/`upload` (None and already released buffers are ignored)."""
        if buf is not None and buf.ptr:
            self.free(buf.ptr)
            buf.ptr = 0

    def upload(self, arr: np.ndarray, into: DeviceBuffer | None = None) -> DeviceBuffer:
        """Copy a host array to the device (into `into`, which must be large enough, or a new buffer)."""
        arr = np.ascontiguousarray(arr)
        buf = self.empty(arr.shape, arr.dtype) if into is None else DeviceBuffer(into.ptr, arr.shape, arr.dtype,
                                                                                  into.owner)
        if arr.nbytes:
            self._htod(buf.ptr, arr.ctypes.data, arr.nbytes)
            self.traffic.up += arr.nbytes
        return buf

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        """Copy a device array to a new host array (waits for the stream)."""
        out = np.empty(buf.shape, buf.dtype)
        if out.nbytes:
            self._dtoh(out.ctypes.data, buf.ptr, out.nbytes)
            self.traffic.down += out.nbytes
        self.sync()
        return out


class HostMemory(DeviceMemory):
    """DeviceMemory on host memory: the stand-in that runs the device code paths without a GPU.

    New allocations are filled with 0xFF bytes (NaN as float32), as uninitialised device memory
    may hold anything; code that forgets to zero or write a buffer shows up as NaN in the tests.
    """

    ort_device = "cpu"

    def __init__(self):
        super().__init__()
        self.blocks: dict[int, np.ndarray] = {}
        self.copies = 0  # device-to-device copy calls issued

    @property
    def live_bytes(self) -> int:
        """Bytes allocated and not yet freed."""
        return sum(b.nbytes for b in self.blocks.values())

    def alloc(self, nbytes: int) -> int:
        block = np.full(max(1, int(nbytes)), 0xFF, np.uint8)
        self.blocks[block.ctypes.data] = block
        return block.ctypes.data

    def free(self, ptr: int) -> None:
        if self.blocks.pop(ptr, None) is None:
            raise ValueError(f"free of {ptr:#x}, which is not allocated (double free?)")

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        ctypes.memset(ptr, value, nbytes)

    def _htod(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    _dtoh = _htod

    def copy(self, dst, src, nbytes) -> None:
        self.copies += 1
        ctypes.memmove(dst, src, nbytes)

    def copy_2d(self, dst, dpitch, src, spitch, width, height) -> None:
        self.copy_3d(dst, dpitch, height, src, spitch, height, width, height, 1)

    def copy_3d(self, dst, dpitch, drows, src, spitch, srows, width, height, depth) -> None:
        if width > dpitch or width > spitch or height > drows or height > srows:
            raise ValueError("copy width/height exceeds the pitch/rows of a side")  # cudaErrorInvalidPitchValue
        self.copies += 1
        for z in range(depth):
            for y in range(height):
                ctypes.memmove(dst + (z * drows + y) * dpitch, src + (z * srows + y) * spitch, width)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.blocks.clear()
