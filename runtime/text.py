"""Tokenization (SentencePiece or `tokenizers`) and the prompt conventions from the manifest."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.manifest import BundleError

log = logging.getLogger(__name__)


class TokenizerMissing(UserError, RuntimeError):
    """The bundle has no tokenizer: only the array-level API (token ids) works."""


class SentencePieceEncoder:
    """Encodes with the bundle's copy of the original SentencePiece model, as the slow LlamaTokenizer does.

    `tokenizers`' BPE ranks every merge strictly, while SentencePiece merges the highest-scoring pair
    and, among equal scores, the leftmost; InternVL's tokenizer adds 18,213 Chinese-LLaMA pieces that
    all score 0, so a converted tokenizer.json disagrees on some strings (e.g. '456.78'). SentencePiece
    itself gives the original's ids by definition, and is faster than `tokenizers` here
    (`bridge-export tools tokenizer-bench`). As LlamaTokenizer(legacy=True), the strings of special
    tokens map to their ids and each piece of text between them is encoded on its own.
    """

    def __init__(self, model_file: Path, specials: dict[str, int]):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise BundleError(f"tokenizer model {model_file} cannot be read by sentencepiece ({str(e)[:120]}): the "
                              "file is damaged; run `bridge-export verify --checksums` on the bundle, then re-copy "
                              "or re-export it") from None
        self.specials = dict(sorted(specials.items(), key=lambda kv: len(kv[0]), reverse=True))

    def _chunks(self, text: str) -> Iterator[list[int]]:
        """Ids in order, a piece of text or a special token at a time."""
        for sp, sid in self.specials.items():
            if sp in text:
                parts = text.split(sp)
                yield from self._chunks(parts[0])
                for part in parts[1:]:
                    yield [sid]
                    yield from self._chunks(part)
                return
        if text:
            yield self.sp.encode(text)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Ids without BOS, as the slow tokenizer gives them (`max_tokens`: may stop once that many are known)."""
        out: list[int] = []
        for chunk in self._chunks(text):
            out += chunk
            if max_tokens is not None and len(out) >= max_tokens:
                break
        return out


class TextCodec:
    """Encodes texts for embedding (prefix + BOS + EOS, right padding) and prompts; decodes ids."""

    def __init__(self, path: Path | None, manifest, sentencepiece: Path | None = None):
        """`manifest`: a Manifest or a TextConventions (anything with `special_tokens` and `prompts`).

        `path`: the tokenizer.json (vocabulary, decoding); `sentencepiece`: the original tokenizer.model,
        which then does the encoding (exactly as the original tokenizer).
        """
        self.special = manifest.special_tokens
        self.prompts = manifest.prompts
        # a model with fewer positions than the embedding max_length truncates at its positions instead
        self.max_positions = getattr(getattr(manifest, "dims", None), "max_positions", None)
        self.tok, self.exact = None, None
        if path is not None:
            from tokenizers import Tokenizer

            try:
                self.tok = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a plain Exception with serde's message
                raise BundleError(f"tokenizer file {path} cannot be read by `tokenizers` "
                                  f"({str(e).splitlines()[0][:120]}): the file is damaged; run `bridge-export "
                                  "verify --checksums` on the bundle, then re-copy or re-export it") from None
            if sentencepiece is not None:
                specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
                self.exact = SentencePieceEncoder(Path(sentencepiece), specials)

    @classmethod
    def from_manifest(cls, manifest) -> "TextCodec":
        """The codec a bundle describes (no tokenizer: array API only)."""
        entry = manifest.tokenizer
        if entry is None:
            return cls(None, manifest)
        if entry.exact_bpe is not None and entry.sentencepiece is None:
            raise BundleError(f"{manifest.root} keeps its tokenizer in an older layout (merge scores instead of "
                              "the SentencePiece model): re-export the bundle with this version")
        return cls(manifest.path(entry.file), manifest,
                   manifest.path(entry.sentencepiece) if entry.sentencepiece else None)

    def _need(self):
        if self.tok is None:
            raise TokenizerMissing(
                "this bundle has no tokenizer.json: re-export with --tokenizer DIR, or use the array API "
                "(encode_text / generate with token ids)"
            )
        return self.tok

    def _ids(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BOS + the text's ids; with `max_tokens`, possibly only a prefix (at least that many) of them."""
        if self.exact:
            ids = self.exact.encode(text, max_tokens)
        else:
            ids = self._need().encode(text).ids
        bos = self.special.bos
        if not ids or ids[0] != bos:
            ids = [bos] + ids
        return ids

    def embedding_ids(self, texts: list[str]) -> np.ndarray:
        """`summarize:` + text, BOS, EOS, right-padded with the pad id (the original's convention).

        Like the original (max_length=80, truncation=True), a longer text keeps its first tokens and
        still gets BOS and EOS.
        """
        if not texts:
            raise ValueError("no texts given: pass at least one")
        conv = self.prompts.text_embedding
        limit = conv.max_length
        if self.max_positions and (not limit or limit > self.max_positions):
            limit = self.max_positions
        rows = []
        for t in texts:
            self._check_known(t, limit)
            ids = self._ids(conv.prefix + t, limit)
            if limit and len(ids) + 1 > limit:
                ids = ids[: limit - 1]
            rows.append(ids + [self.special.eos])
        out = np.full((len(rows), max(map(len, rows))), conv.pad_id, np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """A caption prompt with BOS and no EOS, shape (1, T)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt.strip():
            self._check_known(prompt, None, "prompt")
        return np.asarray([self._ids(prompt)], np.int64)

    def known_fraction(self, texts: list[str]) -> float:
        """Share of the texts' tokens (BOS aside) the vocabulary knows: 1.0 for a tokenizer without an
        unknown-token id, 0.0 for no tokens."""
        toks = [i for t in texts for i in self._ids(t)[1:]]
        unk = self.special.unk
        if not toks:
            return 0.0
        return 1.0 if unk is None else sum(i != unk for i in toks) / len(toks)

    def _check_known(self, text: str, limit: int | None, what: str = "text") -> None:
        """ValueError if no word of `text` is in the vocabulary (it would embed as nothing); warn if some aren't."""
        unk = self.special.unk
        if unk is None:
            return
        own = self._ids(text, limit)[1:]
        n_unk = sum(i == unk for i in own)
        if own and n_unk == len(own):
            raise ValueError(f"no word of the {what} {text[:60]!r} is in the tokenizer's vocabulary: the model would "
                             "see nothing of it; use words it knows")
        if n_unk:
            log.warning("%d token(s) of the %s %r are unknown to the tokenizer and carry no meaning",
                        n_unk, what, text[:60])

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped, stopping at EOS."""
        ids = [int(i) for i in ids]
        if self.special.eos in ids:
            ids = ids[: ids.index(self.special.eos)]
        ids = [i for i in ids if i != self.special.pad]
        return self._need().decode(ids, skip_special_tokens=True).strip()
