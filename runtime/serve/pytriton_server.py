"""`bridge-export serve`: a Triton Inference Server over a bundle, through PyTriton.

Models (batch axis first; BYTES = encoded image files or UTF-8 text):
  embed_image     image BYTES [1], optional mode BYTES [1] (C | G)          -> embedding FP32 [E]
  embed_text      text BYTES [1]                                           -> embedding FP32 [E]
  caption         image BYTES [1], optional prompt BYTES [1],
                  max_new_tokens INT32 [1], num_beams INT32 [1]            -> text BYTES [1]
  caption_stream  as caption, decoupled (gRPC streaming): one response per new piece of text (greedy)
`--models` binds a subset, and only the graphs those need are opened (runtime.load(graphs=...)).
Captions (scheduler "step", the default) go through the step-level scheduler: every caption and
stream request takes rows of one shared decode batch and is answered when its own rows finish;
`caption` has `rows` model instances without Triton's batcher (each request its own call, so a bad
one fails alone) and `caption_stream` is one asynchronous decoupled instance serving every stream.
Scheduler "static" keeps Triton's dynamic batching (a batch decodes as one generate call, streams
run one at a time). The embedding models always use the dynamic batcher. Health, readiness and
Triton's metrics are Triton's own endpoints; the scheduler's gauges are Prometheus text on
`scheduler_metrics_port` (runtime.serve.metrics). Bad requests get Triton error responses and the
server stays up (PyTriton stops the server on PyTritonUnrecoverableError, never raised here);
their text is one line without the server's traceback (runtime.serve.client_errors), though
PyTriton answers every error with Triton's INTERNAL status (triton-repo's models answer 400).
SIGTERM and SIGINT stop it; requests still decoding then get an error.
Every onnxruntime session of the server runs on one process-wide intra-op thread pool
(runtime.sessions.share_threads): the step scheduler runs new requests' image graphs between decode
steps, and with a pool per graph the decoder's spinning threads held the cores the image graphs needed.
"""
from __future__ import annotations

import logging
import os
import signal
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge_export.runtime.errors import MissingDependency, UserError
from bridge_export.runtime.progress import is_verbose

from bridge_export.runtime.serve import SERVE_EXTRA
from bridge_export.runtime.serve.client_errors import clean_errors

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
    threads: int | None = None  # onnxruntime intra-op threads, one pool every graph shares (default: all cores)
    device: str = "cpu"  # cpu | cuda:N
    backend: str = "onnxruntime"  # onnxruntime | tensorrt
    models: tuple[str, ...] = field(default_factory=lambda: MODELS)  # which entry points to serve
    scheduler: str = "step"  # step (step-level batching of captions) | static (Triton's batches)
    rows: int = 8  # step: KV cache rows decoding together (a beam request takes num_beams)
    max_length: int | None = None  # step: positions per row (queries + prompt + new tokens); None: see row_length
    scheduler_metrics_port: int = 8003  # step: Prometheus text of the scheduler's gauges (0: off)


MODELS = ("embed_image", "embed_text", "caption", "caption_stream")
TASKS = {"embed_image": "embed_image", "embed_text": "embed_text", "caption": "caption", "caption_stream": "caption"}
ROW_TEXT = 128  # default positions per row after the visual queries: prompt + new tokens
# PyTriton 0.7 gives each model instance 1 s to reach its model's handshake socket; step scheduling
# binds --rows caption instances, and on a busy machine one of them can miss it: Triton is started again
START_TRIES = 3


def check_options(opts: ServeOptions) -> None:
    """ValueError naming the first option that cannot work."""
    bad = [m for m in opts.models if m not in MODELS]
    if bad or not opts.models:
        raise ValueError(f"models must name some of {', '.join(MODELS)}, got {','.join(opts.models) or 'none'}")
    if opts.scheduler not in ("step", "static"):
        raise ValueError(f"scheduler must be step or static, got {opts.scheduler!r}")
    if opts.backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"backend must be onnxruntime or tensorrt, got {opts.backend!r}")
    if isinstance(opts.rows, bool) or not isinstance(opts.rows, int) or not 1 <= opts.rows <= 256:
        raise ValueError(f"rows must be an integer from 1 to 256, got {opts.rows!r}")


def row_length(pipe, opts: ServeOptions) -> int:
    """Positions per scheduler row: --max-length, else the visual queries + ROW_TEXT (within the model's
    positions). Every decode step reads each active row's whole buffer, so rows are sized to the
    captions served, not to max_position_embeddings."""
    if opts.max_length is not None:
        return opts.max_length
    return min(pipe.max_positions, pipe.num_query + ROW_TEXT)


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

    return clean_errors(infer)  # one line to the client, no server traceback


def _stream_fn(handlers):
    """A decoupled PyTriton callable: yields one response per new piece of caption text."""

    def infer(requests):
        if len(requests) != 1:  # max_batch_size 1 without a batcher: Triton sends one request at a time
            raise ValueError(f"caption_stream takes one request at a time, got {len(requests)}")
        r = requests[0]
        for piece in handlers.caption_stream(dict(r.data) if hasattr(r, "data") else dict(r)):
            yield [piece]

    return clean_errors(infer)  # one line to the client, no server traceback


def _stream_steps_fn(handlers):
    """An asynchronous decoupled callable streaming from the scheduler's shared batch: PyTriton runs it on
    its event loop, and Triton hands a decoupled model new requests while earlier streams still run,
    so one instance serves every stream at once."""

    async def infer(requests):
        if len(requests) != 1:
            raise ValueError(f"caption_stream takes one request at a time, got {len(requests)}")
        r = requests[0]
        async for piece in handlers.caption_stream_steps(dict(r.data) if hasattr(r, "data") else dict(r)):
            yield [piece]

    return clean_errors(infer)  # one line to the client, no server traceback


def bind_models(triton, handlers, opts: ServeOptions, embed_dim: int) -> None:
    """Bind the chosen models (embed_image, embed_text, caption, caption_stream) to a PyTriton `Triton`."""
    DynamicBatcher, ModelConfig, Tensor, _, _ = _import_pytriton()
    batched = ModelConfig(max_batch_size=opts.max_batch,
                          batcher=DynamicBatcher(max_queue_delay_microseconds=opts.queue_delay_us))
    image, opt_bytes = Tensor(name="image", dtype=bytes, shape=(1,)), dict(dtype=bytes, shape=(1,), optional=True)
    embedding = [Tensor(name="embedding", dtype=np.float32, shape=(embed_dim,))]
    text_out = [Tensor(name="text", dtype=bytes, shape=(1,))]
    caption_in = [image, Tensor(name="prompt", **opt_bytes),
                  Tensor(name="max_new_tokens", dtype=np.int32, shape=(1,), optional=True),
                  Tensor(name="num_beams", dtype=np.int32, shape=(1,), optional=True)]
    n, step = opts.instances, handlers.scheduler is not None
    if "embed_image" in opts.models:
        triton.bind("embed_image", [_batch_fn(handlers.embed_image) for _ in range(n)],
                    inputs=[image, Tensor(name="mode", **opt_bytes)], outputs=embedding, config=batched, strict=True)
    if "embed_text" in opts.models:
        triton.bind("embed_text", [_batch_fn(handlers.embed_text) for _ in range(n)],
                    inputs=[Tensor(name="text", dtype=bytes, shape=(1,))], outputs=embedding, config=batched, strict=True)
    if "caption" in opts.models:  # step: each request its own call on one of `rows` instances, no batcher
        caption_cfg = ModelConfig(max_batch_size=opts.max_batch, batcher=None) if step else batched
        triton.bind("caption", [_batch_fn(handlers.caption) for _ in range(opts.rows if step else n)],
                    inputs=caption_in, outputs=text_out, config=caption_cfg, strict=True)
    if "caption_stream" in opts.models:
        stream = [_stream_steps_fn(handlers)] if step else [_stream_fn(handlers) for _ in range(n)]
        triton.bind("caption_stream", stream, inputs=caption_in, outputs=text_out,
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
    from bridge_export.runtime.sessions import share_threads

    opts = opts or ServeOptions()
    check_options(opts)
    graphs = runtime.graphs_for(*dict.fromkeys(TASKS[m] for m in opts.models))
    share_threads(opts.threads)  # one pool for every graph: no graph's idle threads spin on the cores another needs
    pipe = runtime.load(bundle, backend=opts.backend, device=opts.device, threads=opts.threads, graphs=graphs)
    scheduler = metrics = None
    try:
        if opts.scheduler == "step" and {"caption", "caption_stream"} & set(opts.models):
            scheduler, metrics = _start_scheduler(pipe, opts)
    except BaseException:
        pipe.close()
        raise
    embed_dim = int(pipe.text_projection.shape[1])
    for name in ("pytriton", "tritonclient"):  # per-request INFO lines the user cannot act on
        logging.getLogger(name).setLevel(logging.WARNING)
    # Triton prints ~70 lines of start-up tables and CUDA probing on a healthy start: they go to a log
    # file unless --verbose, and a failure to load names that file.
    triton_log = None if is_verbose() else Path(tempfile.mkdtemp(prefix="bridge-export-triton-")) / "tritonserver.log"
    config = TritonConfig(http_port=opts.http_port, grpc_port=opts.grpc_port, metrics_port=opts.metrics_port,
                          exit_timeout_secs=5, log_file=triton_log)

    def stop(signum, frame):  # Triton.serve() leaves its loop on KeyboardInterrupt and stops cleanly
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for attempt in range(1, START_TRIES + 1):
            try:
                with Triton(config=config) as triton:
                    bind_models(triton, Handlers(pipe, batch_size=opts.max_batch, scheduler=scheduler), opts,
                                embed_dim)
                    log.warning("serving %s (%s) on %s: HTTP %d, gRPC %d, metrics %d%s (SIGTERM or Ctrl-C stops)",
                                bundle, ", ".join(opts.models), opts.device, opts.http_port, opts.grpc_port,
                                opts.metrics_port, f", scheduler metrics {metrics.port}" if metrics else "")
                    if triton_log is not None:
                        log.info("Triton's own log: %s (--verbose shows it here)", triton_log)
                    triton.serve()
                break
            except Exception as e:  # noqa: BLE001 - only PyTriton's start-up handshake timeout is retried
                if attempt == START_TRIES or type(e).__name__ != "InferenceServerException" \
                        or "-config.sock" not in str(e):
                    raise
                log.warning("a model instance missed PyTriton's fixed 1 s start-up handshake (a busy machine): "
                            "starting Triton again (try %d of %d)", attempt + 1, START_TRIES)
    except KeyboardInterrupt:
        pass
    except Exception as e:  # tritonclient's InferenceServerException: Triton failed to load a model
        if type(e).__name__ != "InferenceServerException":
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else str(e))
        raise ServeError(f"Triton could not load the models: {cause} ({lines[0][:100] if lines else ''}...; "
                           + (f"{triton_log} has the rest)" if triton_log else "the server log above has the rest)")
                           ) from e
    finally:
        signal.signal(signal.SIGTERM, previous)
        if scheduler is not None:
            scheduler.close()  # requests still decoding get an error; then the sessions can go
        if metrics is not None:
            metrics.close()
        pipe.close()
    log.warning("server stopped")


def _start_scheduler(pipe, opts: ServeOptions):
    """The started step-level scheduler, and its metrics server (None with port 0)."""
    from bridge_export.runtime.serve.metrics import MetricsServer
    from bridge_export.runtime.serve.scheduler import Scheduler

    beams = pipe.caption_defaults.num_beams
    if "caption" in opts.models and opts.rows < beams:
        raise ValueError(f"rows {opts.rows} is fewer than the bundle's default num_beams {beams}: a caption with "
                         f"default options could never start; serve with --rows {beams} or more")
    scheduler = Scheduler(pipe, rows=opts.rows, max_length=row_length(pipe, opts))
    scheduler.start()
    try:
        metrics = MetricsServer(opts.scheduler_metrics_port, lambda: scheduler.stats) \
            if opts.scheduler_metrics_port else None
    except OSError as e:
        scheduler.close()
        raise ServeError(f"cannot serve the scheduler metrics on port {opts.scheduler_metrics_port} ({e}): "
                         "choose another --scheduler-metrics-port, or 0 for none") from e
    return scheduler, metrics
