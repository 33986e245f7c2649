"""Small builders the tests share."""
from __future__ import annotations

from pathlib import Path


def word_tokenizer(vocab_size: int, path: Path) -> Path:
    """A word-level tokenizer.json of `vocab_size` ids: <unk>=0, <s>=1, </s>=2, then w3, w4, ... plus words."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = ["<unk>", "<s>", "</s>", "summarize:", "English", "caption:", "a", "cat", "dog", "photo", "of",
             "the", "digit", "seven", "on", "mat"]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # "summarize:" is glued to the text as the original does; split after the colon
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("merged_with_previous")])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path
