"""TensorRT backend: the Session interface over an engine, on the device memory of bridge_export.runtime.gpu.cuda.

Device buffers are allocated once (grown only when a larger shape arrives), one CUDA stream (the
DeviceMemory's), the optimization profile chosen per call from the sidecar's ranges. Device feeds
(the KV cache of bridge_export.runtime.gpu.kv_cache) are bound by pointer; outputs named in `on_device` stay on
the device, so the cache's new K/V are copied device to device. Needs TensorRT, cuda-python and a
GPU; tests skip without them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge_export.runtime.gpu.memory import DeviceBuffer, DeviceMemory
from bridge_export.runtime.errors import SessionClosed
from bridge_export.runtime.sessions import Session, TensorMeta
from bridge_export.runtime.gpu.trt_compat import EngineMismatch, check_engine_compat, read_sidecar


def pick_profile(profiles: list[dict], shapes: dict[str, tuple]) -> int:
    """Index of the first profile whose [min, max] ranges hold every given input shape."""
    for i, prof in enumerate(profiles):
        if all(name not in prof or all(lo <= s <= hi for s, lo, hi in zip(shape, prof[name][0], prof[name][2]))
               for name, shape in shapes.items()):
            return i
    raise ValueError(f"no optimization profile admits shapes {shapes}: rebuild the engine with larger "
                     "--max-batch / --max-seq")


class TrtSession(Session):
    """One TensorRT engine behind `run(feeds, on_device=()) -> outputs`."""

    def __init__(self, engine_path: Path, memory: DeviceMemory | None = None):
        import tensorrt as trt

        from bridge_export.runtime.gpu.cuda import CudaMemory, device_info

        engine_path = Path(engine_path)
        self.name = engine_path.stem
        side = read_sidecar(engine_path)
        self.owns_memory = memory is None
        self.memory = CudaMemory(0) if memory is None else memory
        name, cc = device_info(self.memory.device_id)
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
            self.memory.release(buf)
            buf = self.buffers[name] = self.memory.empty(shape, self.dtypes[name])
        return DeviceBuffer(buf.ptr, shape, self.dtypes[name])

    def run(self, feeds: dict, on_device: tuple[str, ...] = ()) -> dict:
        """Run the engine; outputs named by an `on_device` prefix stay on the device, the rest come back
        as numpy (a device output is valid until the next run)."""
        if self.ctx is None:
            raise SessionClosed(f"{self.name}: session is closed; load the bundle again")
        stream = self.memory.stream_handle
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        prof = pick_profile(self.profiles, shapes)
        if prof != self.profile:
            self.ctx.set_optimization_profile_async(prof, stream)
            self.profile = prof
        for k, v in feeds.items():
            buf = v if isinstance(v, DeviceBuffer) else self.memory.upload(np.asarray(v, self.dtypes[k]),
                                                                         into=self._buffer(k, v.shape))
            self.ctx.set_input_shape(k, buf.shape)
            self.ctx.set_tensor_address(k, buf.ptr)
        outs = {}
        for n in self.output_names:
            outs[n] = buf = self._buffer(n, tuple(self.ctx.get_tensor_shape(n)))
            self.ctx.set_tensor_address(n, buf.ptr)
        if not self.ctx.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to run {self.name}")
        result = {n: (b if n.startswith(on_device) else self.memory.download(b)) for n, b in outs.items()}
        self.memory.sync()
        return self.finite(result)

    def close(self) -> None:
        """Free the device buffers (and the memory's stream when it was created here); idempotent."""
        for b in self.buffers.values():
            self.memory.release(b)
        self.buffers.clear()
        self.ctx = self.engine = None
        if self.owns_memory:
            self.memory.close()
