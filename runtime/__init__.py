"""bridge-export runtime: runs a bundle on onnxruntime (or TensorRT) with numpy, tokenizers and Pillow.

No torch here: `import runtime` must work where torch is not installed.
"""
from __future__ import annotations

from pathlib import Path

from .manifest import GRAPHS, BundleError, Manifest, read_manifest
from .pipeline import Caption, Pipeline
from .text import TextCodec, TokenizerMissing


def load(bundle, backend: str = "onnxruntime", providers=None, threads: int | None = None,
         verify_checksums: bool = False) -> Pipeline:
    """Open a bundle directory and return a Pipeline (sessions for all three graphs).

    Checks what is cheap (the manifest's digest, file sizes, graph headers); `verify_checksums=True`
    also hashes every byte of the bundle (slow on a bundle of many GB).
    """
    from .sessions import open_session

    manifest = read_manifest(bundle, verify_checksums=verify_checksums)
    device_kv = manifest.kv_layout.names("present")
    sessions = {}
    for name in GRAPHS:
        path = manifest.graph_path(name)
        if backend == "tensorrt":
            path = Path(bundle) / "engines" / f"{name}.engine"
        sessions[name] = open_session(path, backend, providers=providers, threads=threads,
                                      device_outputs=device_kv if name == "text_decoder" else ())
    return Pipeline(manifest, sessions, TextCodec.from_manifest(manifest))


__all__ = ["load", "Pipeline", "Caption", "BundleError", "TokenizerMissing", "read_manifest", "Manifest", "GRAPHS"]
