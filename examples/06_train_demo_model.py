"""Training the demo model: a short run of the shipped model's training, then the trained model exported and used.

Runs `bridge_export.reference_model.train_demo.train` for a few steps into a temporary directory (the shipped
checkpoint was made the same way, with many more steps:
`python -m bridge_export.reference_model.train_demo --threads 1`), prints its accuracy
figures, then exports the fresh checkpoint to a bundle and classifies a few digits with it.
Needs scikit-learn for the handwritten digits (`pip install -e ".[train]"`). A few steps do not
make a good model: this shows the loop, not the final accuracy.

    python examples/06_train_demo_model.py
"""
import tempfile
from pathlib import Path

import numpy as np

from bridge_export import runtime
from bridge_export.exporter.export.bundle import export_bundle
from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
from bridge_export.reference_model.digits import WORDS, load_test_split

STEPS = 40


def main() -> None:
    try:
        from bridge_export.reference_model.train_demo import train
    except ImportError as e:
        raise SystemExit(f"training needs torch and scikit-learn: pip install -e '.[train]' ({e})")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "my-digits"
        train(steps=STEPS, batch=32, out=ckpt, eval_limit=100)  # score 100 digits of each set
        print(f"\ntrained {STEPS} steps into {ckpt}: {sorted(p.name for p in ckpt.iterdir())}")
        bundle = export_bundle(load_pretrained(ckpt), Path(tmp) / "bundle", checkpoint=ckpt)
        pipe = runtime.load(bundle)
        images, labels = load_test_split(DEMO_CHECKPOINT)
        probs = pipe.classify(list(images[:100]), WORDS, template="the digit {}")
        print(f"the fresh model's bundle: zero-shot accuracy {np.mean(np.asarray(probs).argmax(1) == labels[:100]):.0%} on 100 "
              "test digits (chance is 10%; the shipped checkpoint trained far longer)")
        pipe.close()


if __name__ == "__main__":
    main()
