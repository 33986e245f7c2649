"""onnxruntime with inputs and outputs bound in device memory (CUDA, or host memory in the tests).

Host feeds are uploaded through the session's DeviceMemory into buffers it keeps (grown when a
larger shape arrives) and bound by pointer; device feeds (the KV cache) are bound by pointer as
they are. Every output is bound to the device, so onnxruntime allocates it there as an OrtValue:
the outputs the caller asks for by prefix (`on_device`, e.g. "present.") come back as
DeviceBuffers over those OrtValues, the rest are downloaded through the DeviceMemory. So every
host<->device byte is counted, and with `memory.ort_device == "cpu"` the same code runs here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge_export.runtime.gpu.memory import DeviceBuffer, DeviceMemory
from bridge_export.runtime.errors import SessionClosed
from bridge_export.runtime.sessions import _ORT_TYPES, OrtSession


class OrtDeviceSession(OrtSession):
    """An OrtSession whose I/O lives in `memory` (onnxruntime device `memory.ort_device`)."""

    def __init__(self, path: Path, memory: DeviceMemory, providers=None, threads: int | None = None,
                 check: bool = True, session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        super().__init__(path, providers=providers, threads=threads, check=check, session_config=session_config)
        self.memory = memory
        self.run_options = ort.RunOptions()  # the default, stated: Run returns with its streams synchronized
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "0")
        self.staging: dict[str, DeviceBuffer] = {}
        self._held = None  # last run's OrtValues, alive until copies issued from them have finished

    def _stage(self, name: str, arr: np.ndarray) -> DeviceBuffer:
        buf = self.staging.get(name)
        if buf is None or buf.nbytes < arr.nbytes:
            self.memory.release(buf)
            buf = self.staging[name] = self.memory.empty(arr.shape, arr.dtype)
        return self.memory.upload(arr, into=buf)

    def run(self, feeds: dict, on_device: tuple[str, ...] = ()) -> dict:
        """Run with device I/O: outputs named by an `on_device` prefix stay on the device."""
        if self.sess is None:
            raise SessionClosed(f"{self.name}: session is closed; load the bundle again")
        if self.check:
            self.check_feeds(feeds)
        binding = self.sess.io_binding()
        dev, dev_id = self.memory.ort_device, self.memory.device_id
        for k, a in feeds.items():
            buf = a if isinstance(a, DeviceBuffer) else self._stage(k, np.ascontiguousarray(a))
            binding.bind_input(k, dev, dev_id, buf.dtype, list(buf.shape), buf.ptr)
        for k in self.output_names:
            binding.bind_output(k, dev, dev_id)
        self.memory.sync()  # uploads and cache writes (our stream) done before onnxruntime reads them
        self._held = None
        binding.synchronize_inputs()
        self.sess.run_with_iobinding(binding, self.run_options)  # returns with its outputs complete
        values = binding.get_outputs()
        self._held = values
        out = {}
        for k, v in zip(self.output_names, values):
            buf = DeviceBuffer(v.data_ptr(), tuple(v.shape()), _ORT_TYPES[v.data_type()], owner=v)
            out[k] = buf if k.startswith(on_device) else self.memory.download(buf)
        return self.finite(out)

    def close(self) -> None:
        """Free the staging buffers and the onnxruntime session (idempotent)."""
        if self.sess is not None:
            self.memory.sync()
        self._held = None
        for b in self.staging.values():
            self.memory.release(b)
        self.staging.clear()
        super().close()
