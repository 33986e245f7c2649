"""Q/DQ variants side by side: INT8 with full 8-bit weights (TensorRT), INT8 with 7-bit weights
(`--target onnxruntime`) and FP8 (E4M3), made from one fp32 bundle with the same calibration.

`python -m bridge_export.exporter.bench.qdq_variants --demo --out DIR` uses the shipped digits model (as
`bridge-export demo` does: its calibration digits, test split) and prints zero-shot / caption accuracy
of each variant run two ways on onnxruntime CPU: "unfused" (Q/DQ not fused into integer kernels:
dequantize then float MatMul, as TensorRT computes) and "fused" (onnxruntime's default integer
kernels, where this CPU's kernels decide), then each variant's end-to-end cosines to fp32 from its
precision report. `--preset small` does the same on a random `small` model (synthetic calibration
images; cosines only: random weights have no accuracy to measure).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name: (precision, operator target)
    "int8 8-bit (tensorrt)": ("int8", "tensorrt"),
    "int8 7-bit (onnxruntime)": ("int8", "onnxruntime"),
    "fp8 e4m3 (tensorrt)": ("fp8", "tensorrt"),
}
COSINES = ("image_embeds_C_cosine", "image_embeds_G_cosine", "text_embeds_cosine", "logits_cosine")


def _save_images(images, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def make_variants(fp32: Path, out: Path, calib: Path, texts: Path | None, progress) -> dict[str, Path]:
    """The three Q/DQ bundles of `fp32` under `out`, each with its accuracy report."""
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    made = {}
    for name, (prec, target) in VARIANTS.items():
        t0 = time.perf_counter()
        made[name] = make_precision_bundle(fp32, out / f"bundle-{prec}-{target}", prec, calib=calib, calib_texts=texts,
                                           overwrite=True, progress=lambda s: None, target=target)
        progress(f"made {name} in {time.perf_counter() - t0:.0f}s")
    return made


def cosine_table(made: dict[str, Path]) -> list[str]:
    """Each variant's end-to-end cosines to fp32 (held-out inputs, as its precision report measured them)."""
    from bridge_export.runtime.manifest import read_manifest

    lines = [f"{'':<26}" + "".join(f"{k.replace('_cosine', ''):>16}" for k in COSINES) + "  measured"]
    for name, path in made.items():
        rep = read_manifest(path).precision.accuracy
        lines.append(f"{name:<26}" + "".join(f"{rep['end_to_end'].get(k, float('nan')):>16.6f}" for k in COSINES)
                     + ("  unfused" if "fusion off" in rep.get("run_on", "") else "  fused"))
    return lines


def _runner(pipe):
    """The demo's runner, its classify giving the probability matrix (a plain array or a typed result)."""
    from bridge_export.exporter.demo import BundleRunner

    class Runner(BundleRunner):
        def classify(self, images, labels, template, mode):
            return np.asarray(super().classify(images, labels, template, mode))

    return Runner(pipe)


def demo_table(fp32: Path, made: dict[str, Path], limit: int) -> list[str]:
    """Zero-shot C/G and caption accuracy on the demo's test split, every variant run unfused and fused."""
    from bridge_export import runtime
    from bridge_export.exporter.quantize.precision import FLOAT_QDQ
    from bridge_export.reference_model import DEMO_CHECKPOINT
    from bridge_export.reference_model.digits import evaluate, load_test_split

    images, labels = load_test_split(DEMO_CHECKPOINT)
    if limit:
        images, labels = images[:limit], labels[:limit]
    lines = [f"test split: {len(labels)} handwritten digits",
             f"{'':<36} {'zero-shot C':>11} {'zero-shot G':>11} {'caption':>8}"]
    runs = [("fp32", fp32, None)] + [(f"{n}, {how}", p, cfg) for n, p in made.items()
                                     for how, cfg in (("unfused", FLOAT_QDQ), ("fused", None))]
    for name, path, cfg in runs:
        pipe = runtime.load(path, session_config=cfg)
        r = evaluate(_runner(pipe), pipe.codec, images, labels)
        lines.append(f"{name:<36} {r['zero_shot_C']:>11.1%} {r['zero_shot_G']:>11.1%} {r['caption']:>8.1%}")
    return lines


def main(argv=None) -> int:
    """Command line: make the variants, print the tables."""
    ap = argparse.ArgumentParser(prog="python -m bridge_export.exporter.bench.qdq_variants",
                                 description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="the shipped digits model")
    src.add_argument("--preset", help="a random model of this preset (e.g. small)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the bundles (created)")
    ap.add_argument("--limit", type=int, default=0, help="demo: first N test digits only")
    args = ap.parse_args(argv)
    from bridge_export.exporter.export.bundle import export_bundle

    progress = lambda s: print(s, flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    texts = None
    if args.demo:
        from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
        from bridge_export.reference_model.digits import (CAPTION_PROMPT, TEMPLATE, WORDS, caption_text,
                                                          load_calibration_images)

        fp32 = export_bundle(load_pretrained(DEMO_CHECKPOINT), args.out / "bundle-fp32", checkpoint=DEMO_CHECKPOINT,
                             overwrite=True, progress=lambda s: None)
        calib = _save_images(load_calibration_images(DEMO_CHECKPOINT), args.out / "calib")
        texts = args.out / "calib_texts.txt"  # the demo's own texts: class prompts and captions
        texts.write_text("\n".join([TEMPLATE.format(w) for w in WORDS] + [caption_text(i) for i in range(10)]
                                   + [f"{CAPTION_PROMPT} {caption_text(i)}" for i in range(10)]) + "\n")
    else:
        from bridge_export import reference_model
        from bridge_export.exporter.quantize.calibration import synthetic_images

        model = reference_model.from_preset(args.preset, seed=0)
        fp32 = export_bundle(model, args.out / "bundle-fp32", overwrite=True, progress=lambda s: None)
        calib = _save_images([(im * 255).astype(np.uint8) for im in synthetic_images(16, model.config.image_size, seed=3)],
                             args.out / "calib")
    progress(f"fp32 bundle: {fp32}")
    made = make_variants(fp32, args.out, calib, texts, progress)
    print("\nend-to-end cosines to fp32 on held-out inputs (precision report)")
    print("\n".join(cosine_table(made)))
    if args.demo:
        print()
        print("\n".join(demo_table(fp32, made, args.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
