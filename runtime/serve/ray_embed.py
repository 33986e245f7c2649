"""Batch image embedding on Ray Data, written as Parquet (`bridge-export embed ... --ray`).

The image paths become a dataset; `map_batches` runs `EmbedActor`, a callable class holding one
Pipeline per actor (the bundle is opened once per worker, not per batch). Each actor's onnxruntime
gets `threads` intra-op threads and reserves as many Ray CPUs, so actors never oversubscribe the
cores. An unreadable image becomes a row with an `error`, never a failed job. Output: Parquet
(a directory of part files, readable by `pyarrow.parquet.read_table`) with one row per input in
input order: path (string), embedding (list<float32>, null on error), error (string, null when fine).
On a cluster the paths must be readable by every worker (a shared filesystem), and so must the bundle.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bridge_export.runtime.errors import MissingDependency
from bridge_export.runtime.progress import is_verbose
from bridge_export.runtime.write_guard import OutputLock, abandoned, temp_prefix

log = logging.getLogger(__name__)

RAY_EXTRA = 'batch embedding on Ray needs Ray Data and pyarrow: pip install "bridge-export[ray]"'


def _import_ray():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependency(RAY_EXTRA) from e
    return ray


def schema():
    """The output table's schema: path, embedding, error."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32())), ("error", pa.string())])


class EmbedActor:
    """One Pipeline per Ray actor; called on batches of paths, returns path/embedding/error rows."""

    def __init__(self, bundle: str, mode: str = "C", threads: int | None = None, gpu: bool = False):
        from bridge_export import runtime

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else None
        self.pipe = runtime.load(bundle, providers=providers, threads=threads, verify_checksums=False)
        self.mode = mode

    def __call__(self, batch: dict):
        """batch["path"] -> a pyarrow table of rows in the same order."""
        import numpy as np
        import pyarrow as pa

        from bridge_export.runtime.preprocess import ImageError, to_pil

        paths = [str(p) for p in batch["path"]]
        embeddings: list = [None] * len(paths)
        errors: list = [None] * len(paths)
        good, images = [], []
        for i, p in enumerate(paths):
            try:
                images.append(to_pil(p))
                good.append(i)
            except ImageError as e:  # to_pil reports unreadable files and bombs as ImageError: an error row
                errors[i] = str(e)
        if images:
            emb = self.pipe.embed_images(images, self.mode, batch_size=len(images))
            for i, e in zip(good, np.asarray(emb, np.float32)):
                embeddings[i] = e
        return pa.table({"path": pa.array(paths, pa.string()),
                         "embedding": pa.array([None if e is None else e.tolist() for e in embeddings],
                                               pa.list_(pa.float32())),
                         "error": pa.array(errors, pa.string())}, schema=schema())


@dataclass
class RayOptions:
    """Where and how wide the job runs."""

    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None: start a local one
    workers: int = 1  # actors (one Pipeline each)
    gpus_per_worker: float = 0.0
    threads: int | None = None  # onnxruntime threads per actor (default: the CPUs divided among the actors)
    batch_size: int = 8


def _check_replaceable(out: Path) -> None:
    """ValueError unless an existing `out` is what this job writes: a Parquet file or a folder of Parquet parts."""
    if not out.exists() or (out.is_file() and out.suffix == ".parquet"):
        return
    extra = sorted(p.name for p in out.iterdir() if not p.name.endswith(".parquet")) if out.is_dir() else [out.name]
    if extra:
        raise ValueError(f"{out} holds files this job did not write ({', '.join(extra[:8])}): --overwrite would delete "
                         "them; move them out or choose another --out")


def embed_with_ray(bundle, paths, out, mode: str = "C", opts: RayOptions | None = None,
                   overwrite: bool = False) -> dict:
    """Embed images at `paths` with Ray Data into Parquet at `out`; returns counts and timing."""
    ray = _import_ray()
    import ray.data

    opts = opts or RayOptions()
    out = Path(out).absolute()
    paths = [str(Path(p).absolute()) for p in paths]
    if not paths:
        raise ValueError("no images given: pass image files or folders")
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {opts.workers}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: choose another --out or pass --overwrite")
    _check_replaceable(out)
    lock = OutputLock(out).acquire()  # one writer per --out; released in the finally below
    for left in abandoned(out):  # a killed run's temporary (same host, PID gone)
        shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-stage chatter; errors still surface
    verbose = is_verbose()
    if not verbose:
        # Ray's start-up advice (token authentication) is not the user's to act on; failures still
        # raise in Python. --verbose shows it.
        logging.getLogger("ray").setLevel(logging.ERROR)
    started_here = not ray.is_initialized()
    try:
        if started_here:
            ray.init(address=opts.address, include_dashboard=False,
                     logging_level=logging.INFO if verbose else logging.ERROR,
                     log_to_driver=verbose, configure_logging=True)
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads = opts.threads or max(1, cpus // opts.workers)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # one row per input, in input order
        ctx.enable_progress_bars = log.isEnabledFor(logging.INFO)
        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={"bundle": str(Path(bundle).absolute()), "mode": mode,
                                                               "threads": threads,
                                                               "gpu": opts.gpus_per_worker > 0},
                            batch_size=opts.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=opts.workers),
                            num_cpus=min(threads, cpus), num_gpus=opts.gpus_per_worker or None)
        tmp = out.with_name(temp_prefix(out, "partial") + "parquet")
        t0 = time.perf_counter()
        try:
            ds.write_parquet(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        if out.exists():
            _check_replaceable(out)  # still only Parquet now that the new one is ready
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        lock.release()
        if started_here and ray.is_initialized():
            ray.shutdown()
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["error"])
    failed = table.num_rows - table.column("error").null_count
    return {"rows": table.num_rows, "errors": failed, "seconds": seconds, "workers": opts.workers,
            "threads": threads, "images_per_s": len(paths) / seconds}


def run_cli(bundle, files, texts, mode, out, batch_size, address, workers, gpus_per_worker) -> None:
    """`bridge-export embed --ray`: check the options, run the job, print one summary line."""
    import click

    if texts:
        raise click.ClickException("--ray embeds images only: run texts without --ray")
    if out is None or Path(out).suffix != ".parquet":
        raise click.ClickException("--ray writes Parquet: give --out OUT.parquet")
    opts = RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker, batch_size=batch_size)
    r = embed_with_ray(bundle, files, out, mode=mode, opts=opts)
    click.echo(f"wrote {r['rows']} rows ({r['errors']} unreadable) to {out} in {r['seconds']:.1f}s: "
               f"{r['images_per_s']:.2f} images/s with {r['workers']} workers x {r['threads']} threads", err=True)
