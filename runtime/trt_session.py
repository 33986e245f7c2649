"""TensorRT backend: the Session interface over an engine, and a KV cache that lives on the device.

Device buffers are allocated once (grown only when a larger shape arrives), one CUDA stream,
the optimization profile chosen per call from the sidecar's ranges. Decoder steps feed the
device-resident cache by pointer and its new K/V are copied device-to-device into it: no host
round trip for the cache. Needs TensorRT, the CUDA runtime and a GPU; tests skip without them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cuda import (DeviceBuffer, Stream, copy_2d, copy_dtoh, copy_htod, device_info, kv_slot_geometry)
from .sessions import Session, TensorMeta
from .trt_compat import EngineMismatch, check_engine_compat, read_sidecar


def pick_profile(profiles: list[dict], shapes: dict[str, tuple]) -> int:
    """Index of the first profile whose [min, max] ranges hold every given input shape."""
    for i, prof in enumerate(profiles):
        if all(name not in prof or all(lo <= s <= hi for s, lo, hi in zip(shape, prof[name][0], prof[name][2]))
               for name, shape in shapes.items()):
            return i
    raise ValueError(f"no optimization profile admits shapes {shapes}: rebuild the engine with larger "
                     "--max-batch / --max-seq")


class TrtSession(Session):
    """One TensorRT engine behind `run(feeds) -> outputs`."""

    def __init__(self, engine_path: Path, device_outputs=()):
        import tensorrt as trt

        engine_path = Path(engine_path)
        self.name = engine_path.stem
        self.device_outputs = set(device_outputs)  # outputs left on the device (the decoder's new K/V)
        side = read_sidecar(engine_path)
        name, cc = device_info()
        check_engine_compat(side, trt.__version__, name, cc)
        self.logger = trt.Logger(trt.Logger.WARNING)
        rt = trt.Runtime(self.logger)
        if side.get("version_compatible"):
            rt.engine_host_code_allowed = True
        self.engine = rt.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not deserialize {engine_path} (built by "
                                 f"{side['tensorrt_version']} for {side['gpu']}): rebuild it here")
        self.ctx = self.engine.create_execution_context()
        self.stream = Stream()
        self.profiles = side["profiles"]
        self.profile = -1
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.inputs = {n: TensorMeta(n, trt.nptype(self.engine.get_tensor_dtype(n)),
                                     [d if d >= 0 else "dyn" for d in self.engine.get_tensor_shape(n)])
                       for n in io if is_in(n)}
        self.output_names = [n for n in io if not is_in(n)]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in io}
        self.buffers: dict[str, DeviceBuffer] = {}
        self.max_batch = max(min(v[2][0] for v in prof.values()) for prof in self.profiles)

    def _buffer(self, name: str, shape) -> DeviceBuffer:
        need = max(1, int(np.prod(shape))) * self.dtypes[name].itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < need:
            if buf is not None:
                buf.free()
            buf = self.buffers[name] = DeviceBuffer.alloc(shape, self.dtypes[name])
        return buf.view(shape)

    def run(self, feeds: dict) -> dict:
        """Run the engine; KV outputs stay on the device, the rest come back as numpy."""
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        prof = pick_profile(self.profiles, shapes)
        if prof != self.profile:
            self.ctx.set_optimization_profile_async(prof, self.stream.handle.value or 0)
            self.profile = prof
        for k, v in feeds.items():
            if isinstance(v, DeviceBuffer):  # already on the device (the KV cache): pass the pointer
                buf = v
            else:
                buf = self._buffer(k, v.shape)
                copy_htod(buf, v, self.stream)
            self.ctx.set_input_shape(k, buf.shape)
            self.ctx.set_tensor_address(k, buf.ptr)
        outs = {}
        for n in self.output_names:
            buf = self._buffer(n, tuple(self.ctx.get_tensor_shape(n)))
            self.ctx.set_tensor_address(n, buf.ptr)
            outs[n] = buf
        if not self.ctx.execute_async_v3(self.stream.handle.value or 0):
            raise RuntimeError(f"TensorRT failed to run {self.name}")
        result = {n: (b if n in self.device_outputs else copy_dtoh(b, self.stream))
                  for n, b in outs.items()}
        self.stream.sync()
        return result

    def make_kv_cache(self, prefix: list[np.ndarray], capacity: int) -> "DeviceKVCache":
        """A device-resident KV cache on this session's stream."""
        return DeviceKVCache(prefix, capacity, self.stream)

    def close(self) -> None:
        """Free the device buffers."""
        for b in self.buffers.values():
            b.free()
        self.buffers.clear()


class DeviceKVCache:
    """KVCache's interface with the buffers in device memory (see runtime.kv_cache.KVCache)."""

    def __init__(self, prefix: list[np.ndarray], capacity: int, stream: Stream):
        rows, self.heads, q_len, self.head_dim = prefix[0].shape
        self.prefix_len, self.capacity, self.length, self.stream = q_len, capacity, q_len, stream
        self.buffers = []
        for t in prefix:  # one host-to-device copy of the visual prefix per request
            host = np.zeros((rows, self.heads, capacity, self.head_dim), np.float32)
            host[:, :, :q_len] = t
            buf = DeviceBuffer.alloc(host.shape, np.float32)
            copy_htod(buf, host, stream)
            self.buffers.append(buf)
        self.mask = np.zeros((rows, capacity), np.int64)
        self.mask[:, :q_len] = 1
        self.scratch = None

    def __del__(self):
        for b in list(self.buffers) + list(self.scratch or []):
            b.free()

    @property
    def rows(self) -> int:
        """Rows in the cache (batch x beams)."""
        return self.mask.shape[0]

    def write(self, present: list[DeviceBuffer], step_mask: np.ndarray) -> None:
        """Copy one step's new K/V (device) into the current slots, device to device."""
        T = step_mask.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache full ({self.capacity} slots): raise the request's maximum length")
        g = kv_slot_geometry(self.heads, self.capacity, self.head_dim, self.length, T, rows=self.rows)
        for buf, new in zip(self.buffers, present):
            copy_2d(buf.ptr + g["dst_offset"], g["dpitch"], new.ptr, g["spitch"], g["width"], g["height"],
                    self.stream)
        self.mask[:, self.length:self.length + T] = step_mask
        self.length += T

    def repeat(self, n: int) -> None:
        """Repeat every row n times (beam search), on the device."""
        rows = self.rows
        row_bytes = self.heads * self.capacity * self.head_dim * 4
        new = []
        for buf in self.buffers:
            out = DeviceBuffer.alloc((rows * n, self.heads, self.capacity, self.head_dim), np.float32)
            for r in range(rows):
                for k in range(n):
                    copy_2d(out.ptr + (r * n + k) * row_bytes, row_bytes, buf.ptr + r * row_bytes, row_bytes,
                            row_bytes, 1, self.stream)
            buf.free()
            new.append(out)
        self.buffers = new
        self.mask = np.repeat(self.mask, n, axis=0)
        self.scratch = None

    def reorder(self, src: np.ndarray) -> None:
        """Beam reorder of the text slots only, on the device."""
        if np.array_equal(src, np.arange(self.rows)):
            return
        row_bytes = self.heads * self.capacity * self.head_dim * 4
        g = kv_slot_geometry(self.heads, self.capacity, self.head_dim, self.prefix_len,
                             self.length - self.prefix_len)
        if self.scratch is None:  # full copies once, so their (shared) prefixes are valid
            self.scratch = []
            for buf in self.buffers:
                s = DeviceBuffer.alloc(buf.shape, np.float32)
                copy_2d(s.ptr, buf.nbytes, buf.ptr, buf.nbytes, buf.nbytes, 1, self.stream)
                self.scratch.append(s)
        for buf, s in zip(self.buffers, self.scratch):
            for r, sr in enumerate(src):  # text slots only, row by row
                copy_2d(s.ptr + r * row_bytes + g["dst_offset"], g["dpitch"],
                        buf.ptr + int(sr) * row_bytes + g["dst_offset"], g["dpitch"], g["width"], g["height"],
                        self.stream)
        self.buffers, self.scratch = self.scratch, self.buffers
        self.mask[:, self.prefix_len:self.length] = self.mask[src, self.prefix_len:self.length]
