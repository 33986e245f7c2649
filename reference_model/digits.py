"""The digits task the demo model is trained on: words, texts, tokenizer and image conversion.

Shared by the training script, the demo and the tests so all three see digits the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATE = "the digit {}"
CAPTION_PROMPT = "English caption:"
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
    """The shipped held-out digits: uint8 images (N, 8, 8) and labels (N,)."""
    with np.load(Path(checkpoint) / "test_digits.npz") as d:
        return d["images"], d["labels"]
