"""Measure INT4 settings side by side: block size, symmetric or not, lm_head and embeddings.

    python -m bridge_export.exporter.bench.int4_sweep --demo OUT_DIR          # shipped digits model: zero-shot and captions
    python -m bridge_export.exporter.bench.int4_sweep --bundle BUNDLE OUT_DIR  # any fp32 bundle: cosines to fp32 and size

Each row is one `int4-cpu` bundle made from the same fp32 bundle and measured against it; the
bundles are deleted after measuring. The chosen defaults (`Int4Options`) come from these tables.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from bridge_export.exporter.quantize.int4 import Int4Options

SETTINGS = [("block 32 asym", {}), ("block 64 asym", {"block_size": 64}), ("block 128 asym", {"block_size": 128}),
            ("block 32 sym", {"symmetric": True}), ("block 64 sym", {"block_size": 64, "symmetric": True}),
            ("block 128 sym", {"block_size": 128, "symmetric": True}),
            ("block 32 asym, lm_head fp32", {"lm_head": False}),
            ("block 32 asym, embeddings fp32", {"embeddings": False}),
            ("block 32 asym, accuracy_level 0", {"accuracy_level": 0})]


def bundle_bytes(path: Path) -> int:
    """Bytes of every file in a bundle directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def sweep(fp32: Path, out: Path, measure, settings=SETTINGS) -> list[tuple[str, dict]]:
    """Make one int4-cpu bundle per setting from `fp32`, run `measure(path)` on it, delete it."""
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    rows, base = [], bundle_bytes(fp32)
    for label, kw in settings:
        print(f"[int4-sweep] {label} ...", file=sys.stderr, flush=True)
        path = make_precision_bundle(fp32, out / "sweep-int4", "int4-cpu", overwrite=True, report=False,
                                     progress=lambda s: None, int4=replace(Int4Options(), **kw))
        rows.append((label, {**measure(path), "size_vs_fp32": bundle_bytes(path) / base}))
        shutil.rmtree(path)
    return rows


def demo_measure(out: Path):
    """(fp32 bundle, measure) on the shipped digits model: zero-shot C/G and caption accuracy."""
    from bridge_export import runtime
    from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
    from bridge_export.reference_model.digits import evaluate, load_test_split

    from bridge_export.exporter.export.bundle import export_bundle
    from bridge_export.exporter.demo import BundleRunner

    images, labels = load_test_split(DEMO_CHECKPOINT)
    fp32 = export_bundle(load_pretrained(DEMO_CHECKPOINT), out / "bundle-fp32", checkpoint=DEMO_CHECKPOINT,
                         overwrite=True, progress=lambda s: None)
    ref = runtime.load(fp32)
    codec = ref.codec

    def measure(path, pipe=None):
        r = evaluate(BundleRunner(pipe or runtime.load(path)), codec, images, labels)
        return {"zero_shot_C": r["zero_shot_C"], "zero_shot_G": r["zero_shot_G"], "caption": r["caption"]}

    return fp32, measure, measure(fp32, ref)


def cosine_measure(fp32: Path):
    """measure(path) -> smallest cosines to the fp32 bundle (image C/G, text embeddings, teacher-forced logits)."""
    from bridge_export import runtime

    from bridge_export.exporter.quantize.accuracy import accuracy_report
    from bridge_export.exporter.quantize.calibration import synthetic_images

    ref = runtime.load(fp32)
    images = synthetic_images(4, ref.preprocessing.image_size, seed=5)

    def measure(path):
        new = runtime.load(path)
        e2e = accuracy_report(ref, new, images, caption_tokens=4)["end_to_end"]
        return {"image_C": e2e["image_embeds_C_cosine"], "image_G": e2e["image_embeds_G_cosine"],
                "text": e2e["text_embeds_cosine"], "logits": e2e["logits_cosine"]}

    return measure


def format_rows(rows: list[tuple[str, dict]]) -> str:
    """A Markdown table of the measured rows."""
    keys = list(rows[0][1])
    lines = ["| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, r in rows:
        cells = [f"{v:.1%}" if k in ("zero_shot_C", "zero_shot_G", "caption", "size_vs_fp32") else f"{v:.4f}"
                 for k, v in r.items()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Command line entry (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="scratch directory for the bundles")
    ap.add_argument("--demo", action="store_true", help="measure on the shipped digits model")
    ap.add_argument("--bundle", type=Path, help="an fp32 bundle to measure cosines on")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.demo:
        fp32, measure, base = demo_measure(a.out)
        rows = [("fp32", {**base, "size_vs_fp32": 1.0})] + sweep(fp32, a.out, measure)
    elif a.bundle:
        rows = sweep(a.bundle, a.out, cosine_measure(a.bundle))
    else:
        ap.error("give --demo or --bundle BUNDLE")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
