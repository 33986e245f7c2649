"""The device-resident KV cache, run on host memory through a stand-in for libcudart.

The stand-in performs every cudaMemcpy*/cudaMalloc the cache issues with ctypes.memmove on real
pointers, so the cache's offsets, pitches and beam reorders are checked against the numpy cache.
"""
import ctypes

import numpy as np
import pytest

import runtime.cuda as cuda
from runtime.kv_cache import KVCache
from runtime.trt_session import DeviceKVCache


class HostCuda:
    """libcudart's calls used by runtime.cuda, on host memory."""

    def __init__(self):
        self.blocks = {}

    def cudaMalloc(self, pptr, size):
        buf = ctypes.create_string_buffer(size.value)
        self.blocks[ctypes.addressof(buf)] = buf
        pptr._obj.value = ctypes.addressof(buf)
        return 0

    def cudaFree(self, ptr):
        self.blocks.pop(ptr.value, None)
        return 0

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst.value, src.value, n.value)
        return 0

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height.value):
            ctypes.memmove(dst.value + r * dpitch.value, src.value + r * spitch.value, width.value)
        return 0

    def cudaStreamCreate(self, handle):
        handle._obj.value = 1
        return 0

    def cudaStreamSynchronize(self, stream):
        return 0


@pytest.fixture()
def host_cuda(monkeypatch):
    monkeypatch.setattr(cuda, "_LIB", HostCuda())


def _host(buf, stream):
    return cuda.copy_dtoh(buf, stream)


def test_device_cache_matches_numpy_cache(host_cuda):
    rng = np.random.default_rng(0)
    rows, H, Q, Dh, cap = 2, 3, 4, 5, 12
    prefix = [rng.standard_normal((rows, H, Q, Dh), dtype=np.float32) for _ in range(4)]
    stream = cuda.Stream()
    host, dev = KVCache(prefix, cap), DeviceKVCache(prefix, cap, stream)

    def step(T, mask_value=1):
        new = [rng.standard_normal((host.rows, H, T, Dh), dtype=np.float32) for _ in range(4)]
        mask = np.full((host.rows, T), mask_value, np.int64)
        host.write(new, mask)
        bufs = []
        for a in new:
            b = cuda.DeviceBuffer.alloc(a.shape, np.float32)
            cuda.copy_htod(b, a, stream)
            bufs.append(b)
        dev.write(bufs, mask)

    def same():
        for h, d in zip(host.buffers, dev.buffers):
            np.testing.assert_array_equal(_host(d, stream), h)
        np.testing.assert_array_equal(dev.mask, host.mask)
        assert dev.length == host.length

    step(3)  # prompt prefill
    same()
    host.repeat(3)  # beams
    dev.repeat(3)
    same()
    for src in (np.array([0, 0, 1, 4, 3, 3]), np.array([2, 1, 0, 5, 5, 4]), np.arange(6)):
        step(1)
        host.reorder(src)
        dev.reorder(src)
        same()
    with pytest.raises(ValueError, match="KV cache full"):
        step(cap)


class DeviceOutputsSession:
    """An onnxruntime session that behaves like TrtSession at its edges: device KV in, device KV out."""

    def __init__(self, inner, stream):
        self.inner, self.stream = inner, stream
        self.name, self.inputs, self.output_names = inner.name, inner.inputs, inner.output_names
        self.max_batch = None
        self.device_outputs = set()  # set by the test from the manifest's KV layout

    def run(self, feeds):
        host = {k: (cuda.copy_dtoh(v, self.stream) if isinstance(v, cuda.DeviceBuffer) else v)
                for k, v in feeds.items()}
        out = self.inner.run(host)
        for k in out:
            if k in self.device_outputs:
                buf = cuda.DeviceBuffer.alloc(out[k].shape, np.float32)
                cuda.copy_htod(buf, out[k], self.stream)
                out[k] = buf
        return out

    def make_kv_cache(self, prefix, capacity):
        return DeviceKVCache(prefix, capacity, self.stream)

    def close(self):
        pass


def test_generation_with_device_cache_equals_host_cache(host_cuda, tiny_bundle):
    import runtime

    plain, dev = runtime.load(tiny_bundle), runtime.load(tiny_bundle)
    dev.sessions["text_decoder"] = DeviceOutputsSession(dev.sessions["text_decoder"], cuda.Stream())
    dev.sessions["text_decoder"].device_outputs = set(dev.manifest.kv_layout.names("present"))
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32), dtype=np.float32)
    prompt = np.array([[1, 5, 6, 7]] * 2)
    for beams in (1, 3):
        np.testing.assert_array_equal(dev.generate(x, prompt, max_new_tokens=8, num_beams=beams),
                                      plain.generate(x, prompt, max_new_tokens=8, num_beams=beams))
    np.testing.assert_allclose(dev.encode_text(np.array([[1, 5, 9, 2]])), plain.encode_text(np.array([[1, 5, 9, 2]])))
