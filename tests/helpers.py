"""Small builders the tests share."""
from __future__ import annotations

from pathlib import Path

from bridge_export.reference_model.digits import build_tokenizer


def word_tokenizer(vocab_size: int, path: Path) -> Path:
    """A word-level tokenizer.json of `vocab_size` ids: <unk>=0, <s>=1, </s>=2, a few words, then w16, w17..."""
    words = ["<unk>", "<s>", "</s>", "summarize:", "English", "caption:", "a", "cat", "dog", "photo", "of",
             "the", "digit", "seven", "on", "mat"]
    return build_tokenizer(path, words + [f"w{i}" for i in range(len(words), vocab_size)])
