"""bridge-export runtime: runs a bundle on onnxruntime (or TensorRT) with numpy, tokenizers and Pillow.

No torch here: `import runtime` must work where torch is not installed.
"""
from __future__ import annotations

from pathlib import Path

from .manifest import BundleError, read_manifest
from .pipeline import Caption, Pipeline
from .text import TextCodec, TokenizerMissing

GRAPHS = ("vision_encoder", "query_bridge", "text_decoder")


def load(bundle, backend: str = "onnxruntime", providers=None, threads: int | None = None,
         verify_checksums: bool = True) -> Pipeline:
    """Open a bundle directory and return a Pipeline (sessions for all three graphs)."""
    from .sessions import check_threads, open_session

    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}: use 'onnxruntime' or 'tensorrt'")
    check_threads(threads)
    manifest = read_manifest(bundle, verify_checksums=verify_checksums)
    sessions = {}
    for name in GRAPHS:
        path = manifest.graph_path(name)
        if backend == "tensorrt":
            path = Path(bundle) / "engines" / f"{name}.engine"
        sessions[name] = open_session(path, backend, providers=providers, threads=threads)
    return Pipeline(manifest, sessions, TextCodec.from_manifest(manifest))


__all__ = ["load", "Pipeline", "Caption", "BundleError", "TokenizerMissing", "read_manifest"]
