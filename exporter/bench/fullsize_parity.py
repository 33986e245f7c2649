"""Full-size parity in one command: a random InternVL-14B checkpoint -> fp32 bundle -> runtime vs reference.

    python -m bridge_export.exporter.bench.fullsize_parity --workdir /scratch/parity            # InternVL-14B, ~128 GB of RAM
    python -m bridge_export.exporter.bench.fullsize_parity --workdir /tmp/p --preset real-width  # the same at 1.2 B parameters

Steps, each timed: (1) a seeded random checkpoint in the published layout (bf16 shards, written in
parallel by `random-checkpoint`'s writer); (2) `bridge-export onnx` on it in a child process (whichever
exporter the CLI has; its peak RSS is reported separately); (3) the fp32 reference, loaded from the
checkpoint in two parts (vision tower, then the language side), against the bundle on onnxruntime CPU:
InternVL-C and -G image embeddings, text embeddings and similarity logits (cosine >= 0.99999 and
allclose) and greedy caption tokens (identical). Prints every figure and PASS or FAIL; exit code 1 on
FAIL. Artifacts are deleted at the end unless --keep (only what this script wrote).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bridge_export.exporter.bench.throughput import peak_rss_mb


def _phase(name: str, t0: float) -> float:
    dt = time.perf_counter() - t0
    print(f"[parity] {name}: {dt:.1f} s", flush=True)
    return dt


def run(workdir: Path, preset: str, seed: int, max_new_tokens: int, keep: bool, checkpoint: Path | None,
        bundle: Path | None, lean: bool) -> bool:
    """Run the steps above; returns True on PASS."""
    import torch

    from bridge_export.reference_model.checkpoint_writer import write_random_checkpoint

    from bridge_export.exporter.verify.parity import VerifyReport, verify_end_to_end
    from bridge_export.exporter.verify.parts import ReferenceSource

    torch.set_num_threads(os.cpu_count() or 1)
    workdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    times = {}
    try:
        if checkpoint is None:
            checkpoint = workdir / f"{preset}-seed{seed}-bf16"
            t0 = time.perf_counter()
            write_random_checkpoint(checkpoint, preset, dtype="bf16", seed=seed, overwrite=False)
            written.append(checkpoint)
            times["random checkpoint (bf16)"] = _phase("random checkpoint written", t0)
        if bundle is None:
            bundle = workdir / f"{preset}-seed{seed}-fp32-bundle"
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "bridge_export.exporter.cli", "onnx", "--checkpoint", str(checkpoint), "--out", str(bundle)]
            print("[parity] " + " ".join(cmd), flush=True)
            written.append(bundle)
            subprocess.run(cmd, check=True)
            times["export (fp32 bundle)"] = _phase("bundle exported", t0)
        export_rss = peak_rss_mb(resource.RUSAGE_CHILDREN) * 1024 / 1e6
        t0 = time.perf_counter()
        report = VerifyReport()
        verify_end_to_end(bundle, ReferenceSource.from_checkpoint(checkpoint), report, cosine_min=0.99999,
                          seed=seed, max_new_tokens=max_new_tokens, beams=(1,), one_session_at_a_time=lean,
                          progress=lambda m: print(m, flush=True))
        times["reference vs bundle"] = _phase("compared", t0)
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e9 for p in (checkpoint, bundle)}
    finally:
        if not keep:
            for p in written:
                shutil.rmtree(p, ignore_errors=True)
    print(report.format())
    print(f"[parity] preset {preset}, seed {seed}: " + ", ".join(f"{k} {v:.1f} GB" for k, v in sizes.items()))
    for k, v in times.items():
        print(f"[parity] time   {k:<28} {v:8.1f} s")
    print(f"[parity] peak RSS: this process {peak_rss_mb(resource.RUSAGE_SELF) * 1024 / 1e6:.2f} GB, "
          f"export child {export_rss:.2f} GB")
    print("PASS" if report.passed else "FAIL")
    return report.passed


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bridge_export.exporter.bench.fullsize_parity", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="where the checkpoint and bundle are written")
    ap.add_argument("--preset", default="internvl-14b-224px", help="model size (real-width: 1.2 B, for a dry run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of writing a random one")
    ap.add_argument("--bundle", type=Path, help="use this fp32 bundle (exported from --checkpoint) instead")
    ap.add_argument("--lean", action="store_true",
                    help="one onnxruntime session at a time (less memory, graphs re-opened: slower)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle")
    a = ap.parse_args(argv)
    if a.bundle and not a.checkpoint:
        ap.error("--bundle needs the --checkpoint it was exported from")
    ok = run(a.workdir, a.preset, a.seed, a.max_new_tokens, a.keep, a.checkpoint, a.bundle, a.lean)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
