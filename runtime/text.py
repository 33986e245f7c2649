"""Tokenization with the `tokenizers` library and the prompt conventions from the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenizerMissing(RuntimeError):
    """The bundle has no tokenizer: only the array-level API (token ids) works."""


class TextCodec:
    """Encodes texts for embedding (prefix + BOS + EOS, right padding) and prompts; decodes ids."""

    def __init__(self, path: Path | None, manifest):
        self.special = manifest["special_tokens"]
        self.prompts = manifest["prompts"]
        self.tok = None
        if path is not None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(path))

    def _need(self):
        if self.tok is None:
            raise TokenizerMissing(
                "this bundle has no tokenizer.json: re-export with --tokenizer DIR, or use the array API "
                "(encode_text / generate with token ids)"
            )
        return self.tok

    def _ids(self, text: str) -> list[int]:
        ids = self._need().encode(text).ids
        bos = self.special["bos"]
        if not ids or ids[0] != bos:
            ids = [bos] + ids
        return ids

    def embedding_ids(self, texts: list[str]) -> np.ndarray:
        """`summarize:` + text, BOS, EOS, right-padded with the pad id (the original's convention)."""
        if not texts:
            raise ValueError("no texts given: pass at least one")
        conv = self.prompts["text_embedding"]
        rows = [self._ids(conv["prefix"] + t) + [self.special["eos"]] for t in texts]
        out = np.full((len(rows), max(map(len, rows))), conv["pad_id"], np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """A caption prompt with BOS and no EOS, shape (1, T)."""
        return np.asarray([self._ids(prompt)], np.int64)

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped, stopping at EOS."""
        ids = [int(i) for i in ids]
        if self.special["eos"] in ids:
            ids = ids[: ids.index(self.special["eos"])]
        ids = [i for i in ids if i != self.special["pad"]]
        return self._need().decode(ids, skip_special_tokens=True).strip()
