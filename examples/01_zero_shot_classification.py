"""Zero-shot classification: label images with words the model was never given as classes.

Exports the shipped digits model into a temporary directory, writes a few digit images as PNG
files (as a user would have them) and asks the bundle, for each image, which of the texts
"the digit zero" ... "the digit nine" fits best: InternVL-C (vision encoder + contrastive head)
and InternVL-G (adds the QLLaMA query bridge). Only numpy, onnxruntime, tokenizers and Pillow run
the model; torch is used once, to export it.

    python examples/01_zero_shot_classification.py
"""
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bridge_export import runtime
from bridge_export.exporter.export.bundle import export_bundle
from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
from bridge_export.reference_model.digits import WORDS, load_heldout_style, load_test_split


def sample_images(folder: Path) -> tuple[list[Path], list[int]]:
    """A few handwritten test digits and a few typeset ones, saved as PNG files."""
    folder.mkdir()
    images, labels = load_test_split(DEMO_CHECKPOINT)
    picked = [(im, int(y)) for im, y in zip(images[:10], labels[:10])]
    held = load_heldout_style(DEMO_CHECKPOINT)
    if held is not None:  # digits typeset in fonts the model never saw
        picked += [(im, int(y)) for im, y in zip(held[0][::40][:10], held[1][::40][:10])]
    paths = []
    for i, (im, _) in enumerate(picked):
        paths.append(folder / f"digit_{i:02d}.png")
        Image.fromarray(im).save(paths[-1])
    return paths, [y for _, y in picked]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = export_bundle(load_pretrained(DEMO_CHECKPOINT), tmp / "bundle", checkpoint=DEMO_CHECKPOINT)
        paths, truth = sample_images(tmp / "images")
        pipe = runtime.load(bundle)
        probs = {mode: pipe.classify(paths, WORDS, template="the digit {}", mode=mode) for mode in ("C", "G")}
        print(f"\n{'image':<14} {'true':<6} {'InternVL-C':<18} {'InternVL-G':<18}")
        for i, p in enumerate(paths):
            cells = [f"{probs[m][i].label:<6} ({probs[m][i].score:.0%})" for m in ("C", "G")]
            print(f"{p.name:<14} {WORDS[truth[i]]:<6} {cells[0]:<18} {cells[1]:<18}")
        for m in ("C", "G"):
            acc = float(np.mean(np.asarray(probs[m]).argmax(1) == np.asarray(truth)))
            print(f"InternVL-{m}: {acc:.0%} of {len(paths)} right")
        pipe.close()


if __name__ == "__main__":
    main()
