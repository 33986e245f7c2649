"""Open one graph on a backend: the place that knows every Session class.

The Session classes (runtime.sessions for onnxruntime on the host, runtime.gpu.ort_session and
runtime.gpu.trt_session on a GPU) build on runtime.sessions; this module picks among them, so no
module imports one that imports it back.
"""
from __future__ import annotations

from pathlib import Path

from bridge_export.runtime.manifest import BundleError
from bridge_export.runtime.sessions import BackendUnavailable, OrtSession, Session


def tensorrt_available() -> bool:
    """True if the real TensorRT Python package imports (not merely a folder named tensorrt on sys.path)."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Runtime")


def open_session(path: Path, backend: str = "onnxruntime", providers=None, threads=None, memory=None,
                 session_config: dict[str, str] | None = None) -> Session:
    """Open one graph on the named backend ("onnxruntime" or "tensorrt"); with a DeviceMemory
    (`memory`), onnxruntime binds its inputs and outputs in that memory (bridge_export.runtime.gpu.ort_session)."""
    if backend == "onnxruntime":
        if memory is not None:
            from bridge_export.runtime.gpu.ort_session import OrtDeviceSession

            return OrtDeviceSession(path, memory, providers=providers, threads=threads, session_config=session_config)
        return OrtSession(path, providers=providers, threads=threads, session_config=session_config)
    if backend == "tensorrt":
        if not tensorrt_available():
            raise BackendUnavailable("backend='tensorrt' needs TensorRT, which is not installed here: pip install "
                                     "tensorrt on a machine with an NVIDIA GPU, or use backend='onnxruntime'")
        if not Path(path).is_file():
            raise BundleError(f"no TensorRT engine at {path}: build it with `bridge-export engine BUNDLE`")
        from bridge_export.runtime.gpu.trt_session import TrtSession

        return TrtSession(path, memory=memory)
    raise ValueError(f"unknown backend {backend!r}: use 'onnxruntime' or 'tensorrt'")
