"""Batch-embed an image folder with Ray Data into Parquet, and compare worker counts side by side.

    pip install "bridge-export[ray]"
    python examples/ray_embed_job.py BUNDLE IMAGES_DIR --out emb.parquet --workers 1,2     # local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python examples/ray_embed_job.py /shared/bundle /shared/images --out /shared/emb.parquet \
        --workers 8 --gpus-per-worker 1 --address auto                                        # a GPU cluster

With several --workers values the same images run once per value in this one process, and a
table gives images/s and the ratio to the first value.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bridge_export.runtime.serve.ray_embed import RayOptions, embed_with_ray

EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def main() -> None:
    """Run the job once per worker count; print rows, errors and throughput."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("images", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mode", choices=["C", "G"], default="C")
    ap.add_argument("--baseline", action="store_true", help="also time the plain runtime in this process (no Ray)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in EXTS)
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    for w in counts:
        out = args.out if len(counts) == 1 else args.out.with_name(f"{args.out.stem}-w{w}{args.out.suffix}")
        r = embed_with_ray(args.bundle, paths, out, mode=args.mode, overwrite=True,
                           opts=RayOptions(address=args.address, workers=w, gpus_per_worker=args.gpus_per_worker,
                                           batch_size=args.batch_size))
        rows.append(r)
        print(f"{out}: {r['rows']} rows, {r['errors']} errors")
    if args.baseline:  # same images, one process, all cores, bundle load included as in the Ray rows
        import time

        from bridge_export import runtime

        t0 = time.perf_counter()
        with runtime.load(args.bundle) as pipe:
            for i in range(0, len(paths), args.batch_size):
                pipe.embed_images([str(p) for p in paths[i:i + args.batch_size]], args.mode)
        seconds = time.perf_counter() - t0
        rows.append({"workers": "no Ray", "threads": "all", "seconds": seconds, "images_per_s": len(paths) / seconds})
    print(f"{'workers':>7} {'threads':>7} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['workers']:>7} {r['threads']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>9.2f} "
              f"{r['images_per_s'] / rows[0]['images_per_s']:>6.2f}")


if __name__ == "__main__":
    main()
