"""`bridge-export bench-load`: what `runtime.load` costs beyond onnxruntime opening the three graphs.

Measured side by side in one process: the baseline (three onnxruntime InferenceSessions with the
runtime's own session options), `runtime.load()` (cheap checks: manifest digest, sizes, headers)
and `runtime.load(verify_checksums=True)` (every byte hashed), run in turn `repeats` times after
one warm-up of each, so all see the same page cache; best and median of each are reported.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from bridge_export.runtime.manifest import GRAPHS, read_manifest, sample_sha256
from bridge_export.runtime.sessions import ort_session_options
from bridge_export.runtime.progress import get_logger

log = get_logger(__name__)


def open_graphs(bundle, threads: int | None = None) -> list:
    """The baseline: onnxruntime opens the bundle's three graphs, nothing else."""
    import onnxruntime as ort

    man = read_manifest(bundle)  # only to find the files; its cost is not in the timed call below
    paths = [man.graph_path(g) for g in GRAPHS]

    def run():
        opts = ort_session_options(threads)  # the runtime's own options
        return [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths]

    return run


def measure_load(bundle, repeats: int = 3, threads: int | None = None, checksums: bool = True) -> dict:
    """Seconds per repeat of each way to open `bundle`: {"onnxruntime": [...], "runtime.load": [...], ...}."""
    from bridge_export import runtime

    from bridge_export.runtime.text import TextCodec

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number of timed rounds, at least 1, got {repeats!r}")
    man = read_manifest(bundle)
    tasks = {"onnxruntime": open_graphs(bundle, threads),
             "runtime.load": lambda: runtime.load(bundle, threads=threads),
             # part of runtime.load (on a thread beside onnxruntime): a fixed cost, whatever the weights' size
             "  of which: tokenizer parse": lambda: TextCodec.from_manifest(man),
             # part of runtime.load's default checks: 64 blocks of 64 KiB hashed per file (damage at load)
             "  of which: sampled digests": lambda: [sample_sha256(man.path(rel)) for rel in man.files]}
    if checksums:
        tasks["runtime.load(verify_checksums=True)"] = lambda: runtime.load(bundle, threads=threads,
                                                                            verify_checksums=True)
    times = {k: [] for k in tasks}
    for i in range(repeats + 1):  # round 0 warms the page cache and is not counted
        for name, task in tasks.items():
            t0 = time.perf_counter()
            opened = task()
            dt = time.perf_counter() - t0
            del opened
            if i:
                times[name].append(dt)
        log.info(f"[bench-load] round {i}/{repeats} done")
    return times


def format_load(bundle, times: dict) -> str:
    """A table: best and median seconds, and each ratio to the onnxruntime baseline."""
    man = read_manifest(bundle)
    size = sum(e.size for e in man.files.values())
    base_best, base_med = min(times["onnxruntime"]), statistics.median(times["onnxruntime"])
    lines = [f"bundle {Path(bundle)}: {len(man.files)} files, {size / 1e9:.2f} GB, precision {man.precision.mode}",
             f"{'':<38} {'best s':>8} {'median s':>9} {'ratio (best)':>13} {'ratio (median)':>15}"]
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        lines.append(f"{name:<38} {best:>8.3f} {med:>9.3f} {best / base_best:>12.2f}x {med / base_med:>14.2f}x")
    lines.append(f"ratio = time / onnxruntime opening the {len(GRAPHS)} graphs; {len(times['onnxruntime'])} "
                 "interleaved rounds after a warm-up, same process and page cache")
    return "\n".join(lines)
