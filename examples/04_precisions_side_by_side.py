"""Precisions side by side: accuracy, size on disk and speed of fp32, fp16, int8 and int8-cpu bundles.

Exports the shipped digits model into a temporary directory, makes one bundle per precision with
`bridge_export.exporter.quantize.precision.make_precision_bundle` (int8 is static Q/DQ calibrated on shipped training
digits, for TensorRT and onnxruntime; int8-cpu is dynamic INT8 for onnxruntime on CPUs; any
further precision the exporter offers is included), then measures every bundle in the same run:
zero-shot and caption accuracy on the shipped test digits, bytes on disk, and speed, timed in
interleaved rounds so a busy machine slows all of them alike. Ratios are against fp32.

    python examples/04_precisions_side_by_side.py
"""
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bridge_export import runtime
from bridge_export.exporter.export.bundle import export_bundle
from bridge_export.exporter.quantize.precision import MODES, make_precision_bundle
from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
from bridge_export.reference_model.digits import (CAPTION_TOKENS, WORDS, load_calibration_images, load_test_split,
                                    names_digit)

ROUNDS = 3


def size_mb(bundle: Path) -> float:
    """Bytes of every file in the bundle, in MB."""
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6


def accuracy(pipe, images, labels) -> tuple[float, float]:
    """(zero-shot InternVL-C accuracy, greedy caption accuracy) on the digits."""
    probs = pipe.classify(images, WORDS, template="the digit {}")
    caps = pipe.captions(images, max_new_tokens=CAPTION_TOKENS, min_new_tokens=0, num_beams=1)
    return (float(np.mean(np.asarray(probs).argmax(1) == labels)),
            float(np.mean([names_digit(c.text, int(y)) for c, y in zip(caps, labels)])))


def main() -> None:
    images, labels = load_test_split(DEMO_CHECKPOINT)
    images = list(images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundles = {"fp32": export_bundle(load_pretrained(DEMO_CHECKPOINT), tmp / "fp32", checkpoint=DEMO_CHECKPOINT)}
        calib = tmp / "calib"
        calib.mkdir()
        for i, im in enumerate(load_calibration_images(DEMO_CHECKPOINT)):
            Image.fromarray(im).save(calib / f"{i:03d}.png")
        for mode in MODES:
            print(f"making the {mode} bundle ...", flush=True)
            bundles[mode] = make_precision_bundle(bundles["fp32"], tmp / mode, mode, calib=calib,
                                                  progress=lambda s: None, report=False)
        pipes = {name: runtime.load(b) for name, b in bundles.items()}
        acc = {name: accuracy(p, images, labels) for name, p in pipes.items()}

        timings = {name: {"embed": [], "caption": []} for name in pipes}
        batch, few = images[:64], images[:8]
        for _ in range(ROUNDS):  # interleaved: every bundle once per round
            for name, p in pipes.items():
                t0 = time.perf_counter()
                p.embed_images(batch, batch_size=64)
                t1 = time.perf_counter()
                p.captions(few, max_new_tokens=CAPTION_TOKENS, min_new_tokens=0, num_beams=1)
                t2 = time.perf_counter()
                timings[name]["embed"].append(len(batch) / (t1 - t0))
                timings[name]["caption"].append(len(few) / (t2 - t1))

        base = {k: float(np.median(v)) for k, v in timings["fp32"].items()}
        print(f"\n{len(labels)} test digits; speed = median of {ROUNDS} interleaved rounds, ratio vs fp32\n")
        print(f"{'bundle':<10} {'zero-shot C':>11} {'caption':>8} {'size MB':>8} {'images/s':>15} {'captions/s':>15}")
        for name in pipes:
            emb, cap = (float(np.median(timings[name][k])) for k in ("embed", "caption"))
            print(f"{name:<10} {acc[name][0]:>11.1%} {acc[name][1]:>8.1%} {size_mb(bundles[name]):>8.2f} "
                  f"{emb:>8.0f} ({emb / base['embed']:.2f}x) {cap:>8.0f} ({cap / base['caption']:.2f}x)")
        for p in pipes.values():
            p.close()


if __name__ == "__main__":
    main()
