"""What the default integrity checks cost at load, measured side by side (interleaved rounds).

    python -m bridge_export.exporter.bench.integrity_cost BUNDLE [--repeats 5]

Each round times, in turn: read_manifest with every default check (sizes, headers, confinement,
external-data locations, sampled digests); the sampled digests alone; runtime.load (which
includes read_manifest and opens the graphs). With the page cache cold
(the bundle's pages dropped with posix_fadvise(DONTNEED) before each timed call: only this
bundle's files, nothing else of the machine) and warm. Ratios are to runtime.load of the same
round and cache state. Medians over the rounds are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def drop_cache(bundle: Path) -> None:
    """Ask the kernel to drop the bundle's cached pages (its files only)."""
    for p in Path(bundle).rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(bundle, repeats: int = 5) -> dict[tuple[str, str], list[float]]:
    """{(cache state, what): [seconds per round]}; rounds interleave every variant."""
    from bridge_export import runtime
    from bridge_export.runtime import manifest as mf

    bundle = Path(bundle)
    man = mf.read_manifest(bundle)

    tasks = {
        "read_manifest, default checks": lambda: mf.read_manifest(bundle),
        "  of which: sampled digests": lambda: [mf.sample_sha256(man.path(r)) for r in man.files],
        "runtime.load": lambda: runtime.load(bundle).close(),
    }
    times = {(state, k): [] for state in ("cold", "warm") for k in tasks}
    for i in range(repeats + 1):
        for state in ("cold", "warm"):
            for k, fn in tasks.items():
                if state == "cold":
                    drop_cache(bundle)
                t = time.perf_counter()
                fn()
                if i:  # round 0 warms imports and is not counted
                    times[(state, k)].append(time.perf_counter() - t)
    return times


def report(bundle, times) -> str:
    """The table: median seconds and ratio to runtime.load in the same cache state."""
    from bridge_export.runtime.manifest import read_manifest

    man = read_manifest(bundle)
    size = sum(e.size for e in man.files.values())
    lines = [f"bundle {bundle}: {len(man.files)} files, {size / 1e9:.2f} GB; medians of {len(next(iter(times.values())))}"
             " interleaved rounds", f"{'':34}{'cache':>6}{'median s':>10}{'/ runtime.load':>16}"]
    for state in ("cold", "warm"):
        base = statistics.median(times[(state, "runtime.load")])
        for (st, k), v in times.items():
            if st == state:
                m = statistics.median(v)
                lines.append(f"{k:34}{state:>6}{m:>10.4f}{m / base:>15.1%}")
    return "\n".join(lines)


def main() -> None:
    """The command line: print the table for one bundle."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    print(report(a.bundle, measure(a.bundle, a.repeats)))


if __name__ == "__main__":
    main()
