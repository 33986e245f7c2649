"""The few CUDA runtime calls the TensorRT backend needs, through ctypes (no torch, no pycuda)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .errors import UserError

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
_LIB = None


class CudaError(UserError, RuntimeError):
    """A CUDA runtime call failed, or no CUDA runtime/GPU is present."""


def lib():
    """The CUDA runtime library (libcudart), loaded once."""
    global _LIB
    if _LIB is None:
        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                _LIB = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise CudaError("libcudart not found: the TensorRT backend needs the CUDA runtime and an NVIDIA GPU")
    return _LIB


def check(err: int) -> None:
    """Raise CudaError for a non-zero cudaError_t."""
    if err:
        lib().cudaGetErrorString.restype = ctypes.c_char_p
        raise CudaError(f"CUDA error {err}: {lib().cudaGetErrorString(err).decode()}")


def device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor')."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib().cudaDeviceGetAttribute(ctypes.byref(major), 75, device))
    check(lib().cudaDeviceGetAttribute(ctypes.byref(minor), 76, device))
    props = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with char name[256]
    fn = getattr(lib(), "cudaGetDeviceProperties_v2", None) or lib().cudaGetDeviceProperties
    check(fn(props, device))
    return props.raw[:256].split(b"\0", 1)[0].decode(), f"{major.value}.{minor.value}"


class Stream:
    """One CUDA stream."""

    def __init__(self):
        self.handle = ctypes.c_void_p()
        check(lib().cudaStreamCreate(ctypes.byref(self.handle)))

    def sync(self) -> None:
        """Wait for the stream's work to finish."""
        check(lib().cudaStreamSynchronize(self.handle))


@dataclass
class DeviceBuffer:
    """Device memory holding an array of `shape` and `dtype` (capacity may exceed it)."""

    ptr: int
    nbytes: int
    shape: tuple
    dtype: np.dtype

    @classmethod
    def alloc(cls, shape, dtype) -> "DeviceBuffer":
        """cudaMalloc a buffer for `shape` x `dtype`."""
        n = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        p = ctypes.c_void_p()
        check(lib().cudaMalloc(ctypes.byref(p), ctypes.c_size_t(n)))
        return cls(p.value, n, tuple(shape), np.dtype(dtype))

    def view(self, shape) -> "DeviceBuffer":
        """The same memory seen as another shape (no larger than the allocation)."""
        need = int(np.prod(shape)) * self.dtype.itemsize
        if need > self.nbytes:
            raise ValueError(f"view {shape} needs {need} bytes, buffer has {self.nbytes}")
        return DeviceBuffer(self.ptr, self.nbytes, tuple(shape), self.dtype)

    def free(self) -> None:
        """Release the memory (idempotent)."""
        if self.ptr:
            lib().cudaFree(ctypes.c_void_p(self.ptr))
            self.ptr = 0


def copy_htod(dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
    """Asynchronous host-to-device copy of `src` into `dst`."""
    src = np.ascontiguousarray(src, dtype=dst.dtype)
    check(lib().cudaMemcpyAsync(ctypes.c_void_p(dst.ptr), src.ctypes.data_as(ctypes.c_void_p),
                                ctypes.c_size_t(src.nbytes), H2D, stream.handle))


def copy_dtoh(src: DeviceBuffer, stream: Stream) -> np.ndarray:
    """Asynchronous device-to-host copy into a new array (valid after Stream.sync)."""
    out = np.empty(src.shape, src.dtype)
    check(lib().cudaMemcpyAsync(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(src.ptr),
                                ctypes.c_size_t(out.nbytes), D2H, stream.handle))
    return out


def copy_2d(dst_ptr: int, dpitch: int, src_ptr: int, spitch: int, width: int, height: int, stream: Stream) -> None:
    """Strided device-to-device copy (cudaMemcpy2DAsync)."""
    if width and height:
        check(lib().cudaMemcpy2DAsync(ctypes.c_void_p(dst_ptr), ctypes.c_size_t(dpitch), ctypes.c_void_p(src_ptr),
                                      ctypes.c_size_t(spitch), ctypes.c_size_t(width), ctypes.c_size_t(height),
                                      D2D, stream.handle))


def kv_slot_geometry(heads: int, capacity: int, head_dim: int, start: int, length: int, itemsize: int = 4,
                     rows: int = 1) -> dict:
    """2-D copy geometry for slots [start, start+length) of a (rows, heads, capacity, head_dim) buffer
    from/to a packed (rows, heads, length, head_dim) one: offsets, pitches, width and height in bytes."""
    return {"dst_offset": start * head_dim * itemsize, "dpitch": capacity * head_dim * itemsize,
            "spitch": length * head_dim * itemsize, "width": length * head_dim * itemsize, "height": rows * heads}
