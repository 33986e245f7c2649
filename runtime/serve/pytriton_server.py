"""`bridge-export serve`: a Triton Inference Server over a bundle, through PyTriton.

Models (batch axis first; BYTES = encoded image files or UTF-8 text):
  embed_image     image BYTES [1], optional mode BYTES [1] (C | G)          -> embedding FP32 [E]
  embed_text      text BYTES [1]                                           -> embedding FP32 [E]
  caption         image BYTES [1], optional prompt BYTES [1],
                  max_new_tokens INT32 [1], num_beams INT32 [1]            -> text BYTES [1]
  caption_stream  as caption, decoupled (gRPC streaming): one response per new piece of text (greedy)
Dynamic batching on; health, readiness and metrics are Triton's own endpoints. Bad requests get
Triton error responses and the server stays up (a plain exception fails that batch only; PyTriton
stops the server on PyTritonUnrecoverableError, which is never raised here). SIGTERM and SIGINT stop it.
"""
from __future__ import annotations

import logging
import os
import signal
import sysconfig
from dataclasses import dataclass

import numpy as np

from bridge_export.runtime.errors import MissingDependency, UserError

from bridge_export.runtime.serve import SERVE_EXTRA

log = logging.getLogger(__name__)


class ServeError(UserError, RuntimeError):
    """Triton could not start serving the bundle: the message gives the cause, the server log the rest."""


@dataclass
class ServeOptions:
    """Ports and scheduling."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # Triton's max_batch_size for the batched models
    instances: int = 1  # inference callables per model (they share one pipeline: onnxruntime runs them concurrently)
    queue_delay_us: int = 2000  # dynamic batcher's wait for more requests
    threads: int | None = None  # onnxruntime intra-op threads (default: all cores)


def _import_pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise MissingDependency(SERVE_EXTRA) from e
    return DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig


def _batch_fn(handler):
    """A PyTriton callable over a batch handler. PyTriton answers a batch with one error, so the first bad
    request's message fails the requests batched with it; Triton's own Python backend (triton-repo) is per request."""
    from bridge_export.runtime.serve.handlers import RequestError

    def infer(requests):
        results = handler([dict(r.data) if hasattr(r, "data") else dict(r) for r in requests])
        bad = [(i, r) for i, r in enumerate(results) if isinstance(r, RequestError)]
        if bad:
            i, err = bad[0]
            where = f"request {i + 1} of {len(results)} in this batch: " if len(results) > 1 else ""
            raise RequestError(where + str(err))
        return results

    return infer


def _stream_fn(handlers):
    """A decoupled PyTriton callable: yields one response per new piece of caption text."""

    def infer(requests):
        if len(requests) != 1:  # max_batch_size 1 without a batcher: Triton sends one request at a time
            raise ValueError(f"caption_stream takes one request at a time, got {len(requests)}")
        r = requests[0]
        for piece in handlers.caption_stream(dict(r.data) if hasattr(r, "data") else dict(r)):
            yield [piece]

    return infer


def bind_models(triton, handlers, opts: ServeOptions, embed_dim: int) -> None:
    """Bind embed_image, embed_text, caption and caption_stream to a PyTriton `Triton` instance."""
    DynamicBatcher, ModelConfig, Tensor, _, _ = _import_pytriton()
    batched = ModelConfig(max_batch_size=opts.max_batch,
                          batcher=DynamicBatcher(max_queue_delay_microseconds=opts.queue_delay_us))
    image, opt_bytes = Tensor(name="image", dtype=bytes, shape=(1,)), dict(dtype=bytes, shape=(1,), optional=True)
    embedding = [Tensor(name="embedding", dtype=np.float32, shape=(embed_dim,))]
    text_out = [Tensor(name="text", dtype=bytes, shape=(1,))]
    caption_in = [image, Tensor(name="prompt", **opt_bytes),
                  Tensor(name="max_new_tokens", dtype=np.int32, shape=(1,), optional=True),
                  Tensor(name="num_beams", dtype=np.int32, shape=(1,), optional=True)]
    n = opts.instances
    triton.bind("embed_image", [_batch_fn(handlers.embed_image) for _ in range(n)], inputs=[image, Tensor(name="mode", **opt_bytes)],
                outputs=embedding, config=batched, strict=True)
    triton.bind("embed_text", [_batch_fn(handlers.embed_text) for _ in range(n)], inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
                outputs=embedding, config=batched, strict=True)
    triton.bind("caption", [_batch_fn(handlers.caption) for _ in range(n)], inputs=caption_in, outputs=text_out, config=batched,
                strict=True)
    triton.bind("caption_stream", [_stream_fn(handlers) for _ in range(n)], inputs=caption_in, outputs=text_out,
                config=ModelConfig(max_batch_size=1, batching=True, decoupled=True), strict=True)


def use_own_libpython() -> None:
    """Put this interpreter's libpython first for child processes: PyTriton's Python-backend stub links
    libpython3.X by soname, and the system's copy next to another interpreter's stdlib fails at start."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + [p for p in paths if p])


def serve(bundle, opts: ServeOptions | None = None) -> None:
    """Load the bundle and serve it until SIGTERM/SIGINT; returns after a clean shutdown."""
    _, _, _, Triton, TritonConfig = _import_pytriton()
    use_own_libpython()
    from bridge_export import runtime
    from bridge_export.runtime.serve.handlers import Handlers

    opts = opts or ServeOptions()
    pipe = runtime.load(bundle, threads=opts.threads)
    embed_dim = int(pipe.text_projection.shape[1])
    for name in ("pytriton", "tritonclient"):  # per-request INFO lines the user cannot act on
        logging.getLogger(name).setLevel(logging.WARNING)
    config = TritonConfig(http_port=opts.http_port, grpc_port=opts.grpc_port, metrics_port=opts.metrics_port,
                          exit_timeout_secs=5)

    def stop(signum, frame):  # Triton.serve() leaves its loop on KeyboardInterrupt and stops cleanly
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with Triton(config=config) as triton:
            bind_models(triton, Handlers(pipe, batch_size=opts.max_batch), opts, embed_dim)
            log.warning("serving %s: HTTP %d, gRPC %d, metrics %d (SIGTERM or Ctrl-C stops)", bundle,
                        opts.http_port, opts.grpc_port, opts.metrics_port)
            triton.serve()
    except KeyboardInterrupt:
        pass
    except Exception as e:  # tritonclient's InferenceServerException: Triton failed to load a model
        if type(e).__name__ != "InferenceServerException":
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else str(e))
        raise ServeError(f"Triton could not load the models: {cause} ({lines[0][:100] if lines else ''}...; "
                           "the server log above has the rest)") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
        pipe.close()
    log.warning("server stopped")
