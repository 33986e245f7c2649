"""bridge-export runtime: runs a bundle on onnxruntime (or TensorRT) with numpy, tokenizers and Pillow.

No torch here: `import runtime` must work where torch is not installed.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .manifest import GRAPHS, BundleError, Manifest, read_manifest
from .pipeline import Caption, Pipeline
from .text import TextCodec, TokenizerMissing


def load(bundle, backend: str = "onnxruntime", providers=None, threads: int | None = None,
         verify_checksums: bool = False, device=None, session_config: dict[str, str] | None = None) -> Pipeline:
    """Open a bundle directory and return a Pipeline (sessions for all three graphs).

    Checks what is cheap (the manifest's digest, file sizes, graph headers); `verify_checksums=True`
    also hashes every byte of the bundle (slow on a bundle of many GB).
    `device`: "cpu" (onnxruntime's default; numpy in and out), "cuda" / "cuda:N" (onnxruntime's CUDA
    provider or TensorRT, with the KV cache in device memory and I/O bound there), or a
    runtime.device_memory.DeviceMemory to bind onnxruntime's I/O in (the tests' host stand-in).
    TensorRT defaults to "cuda:0". Close the pipeline (or use `with`) to free the device memory.
    `session_config`: onnxruntime session config entries for every graph, e.g.
    {"session.disable_prepacking": "1"} so weights stay in the bundle's memory-mapped file instead
    of being copied per session (the bridge and the decoder share QLLaMA's bytes in weights.bin).
    """
    from .sessions import BackendUnavailable, check_threads, open_session, tensorrt_available

    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}: use 'onnxruntime' or 'tensorrt'")
    if backend == "tensorrt" and device != "cpu" and not tensorrt_available():
        raise BackendUnavailable("backend='tensorrt' needs TensorRT, which is not installed here: pip install "
                                 "tensorrt on a machine with an NVIDIA GPU, or use backend='onnxruntime'")
    check_threads(threads)
    memory, providers = _device(device, backend, providers)
    manifest = read_manifest(bundle, verify_checksums=verify_checksums)
    sessions = {}
    # The tokenizer (tokenizers, Rust) is parsed on a thread while onnxruntime opens the graphs.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridge-export-tokenizer")
    codec = pool.submit(TextCodec.from_manifest, manifest)
    pool.shutdown(wait=False)
    try:
        for name in GRAPHS:
            path = manifest.graph_path(name)
            if backend == "tensorrt":
                path = Path(bundle) / "engines" / f"{name}.engine"
            sessions[name] = open_session(path, backend, providers=providers, threads=threads, memory=memory,
                                          session_config=session_config)
        text_codec = codec.result()
    except BaseException:
        for s in sessions.values():
            s.close()
        if memory is not None:
            memory.close()
        raise
    return Pipeline(manifest, sessions, text_codec, memory=memory)


def _device(device, backend: str, providers):
    """(DeviceMemory or None, onnxruntime providers) for `load`'s device argument."""
    from .device_memory import DeviceMemory

    if isinstance(device, DeviceMemory):
        return device, providers
    if device is None:
        device = "cuda:0" if backend == "tensorrt" else "cpu"
    if device == "cpu":
        if backend == "tensorrt":
            raise ValueError("TensorRT runs on a GPU: use device='cuda:0' (or backend='onnxruntime' on the CPU)")
        return None, providers
    from .cuda import CudaMemory, parse_device
    from .sessions import BackendUnavailable

    ordinal = parse_device(device)
    if backend == "onnxruntime" and providers is None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(f"device={device!r} needs onnxruntime's CUDA provider, and this onnxruntime "
                                     f"has only {ort.get_available_providers()}: pip install onnxruntime-gpu (in "
                                     "place of onnxruntime), or use device='cpu'")
        providers = [("CUDAExecutionProvider", {"device_id": ordinal}), "CPUExecutionProvider"]
    return CudaMemory(ordinal), providers


__all__ = ["load", "Pipeline", "Caption", "BundleError", "TokenizerMissing", "read_manifest", "Manifest", "GRAPHS"]
