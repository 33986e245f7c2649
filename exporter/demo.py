"""`bridge-export demo`: the shipped digits model through the whole chain, with a side-by-side report."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bridge_export.reference_model.digits import (CAPTION_PROMPT, TEMPLATE, WORDS, ReferenceRunner, caption_text, evaluate,
                                   load_calibration_images, load_heldout_style, load_test_split, names_digit)
from bridge_export.runtime.progress import get_logger, reporter

log = get_logger(__name__)


class BundleRunner:
    """A runtime pipeline behind the same calls."""

    def __init__(self, pipe):
        self.p = pipe

    def classify(self, images, labels, template, mode):
        """Similarities or probabilities [N, len(labels)] (argmax = predicted label)."""
        return np.asarray(self.p.classify(images, labels, template=template, mode=mode))

    def caption_tokens(self, images, max_new_tokens):
        """Greedy caption tokens [N, n] for the images."""
        from bridge_export.runtime.preprocess import preprocess

        pix = preprocess(images, self.p.preprocessing)
        prompt = np.repeat(self.p.codec.prompt_ids(CAPTION_PROMPT), len(images), 0)
        return self.p.generate(pix, prompt, max_new_tokens=max_new_tokens)


def save_grid(images, labels, texts, path: Path, n: int = 32) -> Path:
    """A PNG grid of digits, each with its caption (green when it names the right digit)."""
    from PIL import Image, ImageDraw

    n = min(n, len(images))
    cols, cell, pad = 8, 64, 28
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell * 2, rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % cols) * cell * 2, (i // cols) * (cell + pad)
        grid.paste(Image.fromarray(images[i]).resize((cell, cell), Image.NEAREST).convert("RGB"), (x + cell // 2, y))
        ok = names_digit(texts[i], int(labels[i]))
        draw.text((x + 4, y + cell + 2), texts[i].replace("the digit ", "") + f" ({WORDS[labels[i]]})",
                  fill=(0, 140, 0) if ok else (200, 0, 0))
    grid.save(path)
    return path


def demo_sets(checkpoint: Path, limit: int = 0) -> dict:
    """{title: (images, labels)}: the handwriting test split and, when shipped, the held-out font style."""
    images, labels = load_test_split(checkpoint)
    sets = {f"test split: {len(labels)} handwritten digits (scikit-learn load_digits, not trained on)":
            (images, labels)}
    held = load_heldout_style(checkpoint)
    if held is not None:
        sets[f"held-out style: {len(held[1])} digits typeset in {len(set(held[2].tolist()))} DejaVu fonts "
             "(never trained on), random size/position/stroke"] = held[:2]
    return {t: (x[:limit], y[:limit]) if limit else (x, y) for t, (x, y) in sets.items()}


def run_demo(out: Path = Path("demo-out"), limit: int = 0, precisions=("fp32", "fp16", "int8", "int8-cpu", "int4-cpu"),
             progress=None) -> dict:
    """Export the shipped checkpoint, run every variant over the test digits, print and return the report."""
    from bridge_export.exporter.output import owned_folder

    unknown = sorted(set(precisions) - {"fp32", "fp16", "int8", "int8-cpu", "int4-cpu"})
    if unknown:
        raise ValueError(f"unknown precisions {unknown}: choose from fp32, fp16, int8, int8-cpu, int4-cpu")
    progress = reporter(progress, log)
    t_start = time.perf_counter()
    # an earlier demo folder is reused (each bundle in it replaced atomically); a folder holding anything
    # bridge-export did not write is refused before any work
    out = owned_folder(out, "demo", legacy=_legacy_demo_dir)
    results = _run(out, limit, precisions, progress)
    print(f"caption grid: {out / 'captions.png'}")
    if (out / "captions-heldout.png").is_file() and len(results) > 1:
        print(f"caption grid (held-out style): {out / 'captions-heldout.png'}")
    print(f"finished in {time.perf_counter() - t_start:.0f}s")
    return results


def _legacy_demo_dir(path: Path) -> bool:
    """A demo folder written before owner files existed."""
    return {p.name for p in path.iterdir()} <= {"bundle-fp32", "bundle-fp16", "bundle-int8", "bundle-int8-cpu",
                                                 "calib", "captions.png", "captions-heldout.png"}


def _run(work: Path, limit: int, precisions, progress) -> dict:
    from bridge_export import runtime
    from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
    from bridge_export.runtime.text import TextCodec

    from bridge_export.exporter.export.bundle import export_bundle
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    sets = demo_sets(DEMO_CHECKPOINT, limit)
    progress(f"[demo] shipped model {DEMO_CHECKPOINT.name}; " + "; ".join(t.split(" (")[0] for t in sets))
    model = load_pretrained(DEMO_CHECKPOINT)
    fp32 = export_bundle(model, work / "bundle-fp32", checkpoint=DEMO_CHECKPOINT, overwrite=True, progress=progress)
    pipe = runtime.load(fp32)
    codec = pipe.codec
    variants = {"pytorch reference": ReferenceRunner(model, TextCodec(DEMO_CHECKPOINT / "tokenizer.json",
                                                                      pipe.manifest), pipe.preprocessing)}
    variants["onnx fp32"] = BundleRunner(pipe)
    calib_dir = work / "calib"
    if "int8" in precisions:
        from PIL import Image

        calib_dir.mkdir(exist_ok=True)
        for i, im in enumerate(load_calibration_images(DEMO_CHECKPOINT)):
            Image.fromarray(im).save(calib_dir / f"{i:03d}.png")
    texts_file = work / "calib_texts.txt"  # the task's own texts: class prompts and captions
    texts_file.write_text("\n".join([TEMPLATE.format(w) for w in WORDS] + [caption_text(i) for i in range(10)]
                                     + [f"{CAPTION_PROMPT} {caption_text(i)}" for i in range(10)]) + "\n")
    for prec in precisions:
        if prec == "fp32":
            continue
        b = make_precision_bundle(fp32, work / f"bundle-{prec}", prec, calib=calib_dir if prec == "int8" else None,
                                  calib_texts=texts_file, overwrite=True, progress=lambda s: None, report=False)
        progress(f"[demo] made the {prec} bundle")
        variants[f"onnx {prec}"] = BundleRunner(runtime.load(b))
    from bridge_export.exporter.output import atomic_file

    results = {}
    for (title, (images, labels)), grid in zip(sets.items(), ("captions.png", "captions-heldout.png")):
        results[title] = {}
        for name, runner in variants.items():
            progress(f"[demo] evaluating {name} on the {title.split(':')[0]} ...")
            results[title][name] = evaluate(runner, codec, images, labels)
        print(format_report(title, results[title], labels))
        with atomic_file(work / grid) as tmp:
            save_grid(images, labels, results[title]["onnx fp32"]["texts"], tmp)
    return results


def format_report(title: str, results: dict, labels) -> str:
    """The side-by-side table of one digit set plus a few example captions."""
    lines = ["", title, f"{'':<20} {'zero-shot C':>11} {'zero-shot G':>11} {'caption':>8} {'images/s':>9} {'tokens/s':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<20} {r['zero_shot_C']:>11.1%} {r['zero_shot_G']:>11.1%} {r['caption']:>8.1%} "
                     f"{r['images_per_s']:>9.0f} {r['tokens_per_s']:>9.0f}")
    lines.append("example captions (onnx fp32):")
    texts = results["onnx fp32"]["texts"]
    for i in range(min(4, len(texts))):
        lines.append(f"  true {WORDS[labels[i]]:<6} -> {texts[i]!r}")
    return "\n".join(lines)
