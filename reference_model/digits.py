"""The digits task the demo model is trained on: words, texts, tokenizer and image conversion.

Shared by the training script, the demo and the tests so all three see digits the same way.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bridge_export.runtime.numeric import normalize

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATE = "the digit {}"
CAPTION_PROMPT = "English caption:"
CAPTION_TOKENS = 6  # "the digit seven" + EOS fits with room to spare
VOCAB = ["<unk>", "<s>", "</s>", "summarize:", "English", "caption:", "the", "digit", *WORDS]


def caption_text(label: int) -> str:
    """The caption of a digit, e.g. 'the digit seven'."""
    return TEMPLATE.format(WORDS[label])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """load_digits' 0-16 grayscale values scaled to 0-255 uint8 (N, 8, 8)."""
    return np.round(np.asarray(images, np.float64) / 16.0 * 255.0).astype(np.uint8)


def build_tokenizer(path: Path, vocab: list[str] = VOCAB) -> Path:
    """A word-level tokenizer.json over `vocab` (<unk>=0, <s>=1, </s>=2 first); BOS added, EOS left to callers."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    # "summarize:the digit seven": split after the colon, then on spaces
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("merged_with_previous")])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


def names_digit(text: str, label: int) -> bool:
    """A caption is right when it names the true digit and no other one."""
    said = [w for w in text.split() if w in WORDS]
    return said == [WORDS[label]]


def load_test_split(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """The shipped test split of the handwriting: uint8 images (N, 8, 8) and labels (N,)."""
    with np.load(Path(checkpoint) / "test_digits.npz") as d:
        return d["images"], d["labels"]


def load_heldout_style(checkpoint: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The shipped held-out style (digits typeset in fonts never trained on): uint8 images (N, S, S),
    labels (N,) and font names (N,); None for a checkpoint trained without one."""
    with np.load(Path(checkpoint) / "test_digits.npz") as d:
        if "heldout_images" not in d:
            return None
        return d["heldout_images"], d["heldout_labels"], d["heldout_fonts"]


def load_calibration_images(checkpoint: Path) -> np.ndarray:
    """A few training digits shipped for INT8 calibration (never a test image): uint8 (N, S, S)."""
    with np.load(Path(checkpoint) / "test_digits.npz") as d:
        return d["calib_images"]


class ReferenceRunner:
    """The PyTorch reference behind the same three user-level calls the runtime pipeline offers."""

    def __init__(self, model, codec, preprocessing):
        self.m, self.codec, self.pre = model, codec, preprocessing

    def classify(self, images, labels, template, mode):
        """Similarities or probabilities [N, len(labels)] (argmax = predicted label)."""
        import torch

        from bridge_export.runtime.preprocess import preprocess

        pix = torch.from_numpy(preprocess(images, self.pre, crop=True))
        img = self.m.encode_image(pix, f"InternVL-{mode}").numpy()
        txt = self.m.encode_text(torch.from_numpy(self.codec.embedding_ids([template.format(w) for w in labels])))
        return normalize(img) @ normalize(txt.numpy()).T

    def caption_tokens(self, images, max_new_tokens):
        """Greedy caption tokens [N, n] for the images."""
        import torch

        from bridge_export.runtime.preprocess import preprocess

        pix = torch.from_numpy(preprocess(images, self.pre))
        prompt = torch.from_numpy(self.codec.prompt_ids(CAPTION_PROMPT)).repeat(len(images), 1)
        return self.m.generate(pix, prompt, max_new_tokens=max_new_tokens).numpy()


def evaluate(runner, codec, images, labels, batch: int = 128) -> dict:
    """Zero-shot accuracy (C, G), caption accuracy, images/s (C embeddings) and caption tokens/s."""
    images = list(images)
    res = {}
    t0 = time.perf_counter()
    for mode in ("C", "G"):
        preds = np.concatenate([np.asarray(runner.classify(images[i:i + batch], WORDS, TEMPLATE, mode)).argmax(1)
                                for i in range(0, len(images), batch)])
        res[f"zero_shot_{mode}"] = float((preds == labels).mean())
        if mode == "C":
            res["images_per_s"] = len(images) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    toks = [runner.caption_tokens(images[i:i + batch], CAPTION_TOKENS) for i in range(0, len(images), batch)]
    dt = time.perf_counter() - t0
    texts = [codec.decode(t) for part in toks for t in part]
    n_tokens = sum(int(((part != 0) & (part != 2)).sum()) + len(part) for part in toks)  # words + EOS
    res["caption"] = float(np.mean([names_digit(t, y) for t, y in zip(texts, labels)]))
    res["tokens_per_s"] = n_tokens / dt
    res["texts"] = texts
    return res
