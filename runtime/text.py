"""Tokenization with the `tokenizers` library and the prompt conventions from the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import ExactBPEInfo


class TokenizerMissing(RuntimeError):
    """The bundle has no tokenizer: only the array-level API (token ids) works."""


class ExactBPE:
    """SentencePiece's own BPE merge order, for vocabularies whose pieces tie on score.

    `tokenizers`' BPE ranks every merge strictly; SentencePiece merges the highest-scoring
    adjacent pair and, among equal scores, the leftmost. InternVL's tokenizer adds 18,213
    Chinese-LLaMA pieces that all score 0, so the two disagree on some strings (e.g. '456.78').
    This class redoes only the merge loop with the scores the exporter stored; normalization,
    the vocabulary and decoding still come from tokenizer.json.
    """

    def __init__(self, vocab: dict[str, int], scores: np.ndarray, specials: list[str],
                 whitespace_only_pieces: bool = True):
        self.vocab = vocab
        self.ws_runs = whitespace_only_pieces
        finite = np.isfinite(scores).tolist()
        values = scores.tolist()  # python floats: one conversion for the whole vocabulary
        self.score = {p: values[i] for p, i in vocab.items() if finite[i]}
        self.specials = sorted(specials, key=len, reverse=True)
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]

    def _word(self, word: str) -> list[int]:
        syms = list(word)
        while len(syms) > 1:
            best, at = None, -1
            for i in range(len(syms) - 1):
                sc = self.score.get(syms[i] + syms[i + 1])
                if sc is not None and (best is None or sc > best):  # strict: the leftmost wins ties
                    best, at = sc, i
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        out = []
        for s in syms:
            if s in self.score:
                out.append(self.vocab[s])
            else:  # byte fallback
                out.extend(self.byte_ids[b] for b in s.encode("utf-8"))
        return out

    def _segment(self, text: str) -> list[int]:
        if not text:
            return []
        norm = "\u2581" + text.replace(" ", "\u2581")
        ids, start = [], 0
        for i in range(1, len(norm) + 1):  # a word starts at a "▁" (not inside a run of them, if allowed)
            if i == len(norm) or (norm[i] == "\u2581" and not (self.ws_runs and norm[i - 1] == "\u2581")):
                ids += self._word(norm[start:i])
                start = i
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids without BOS; special-token strings in the text map to their ids, as the slow tokenizer does."""
        for sp in self.specials:
            if sp in text:
                parts = text.split(sp)
                out = self.encode(parts[0])
                for part in parts[1:]:
                    out += [self.vocab[sp]] + self.encode(part)
                return out
        return self._segment(text)


class TextCodec:
    """Encodes texts for embedding (prefix + BOS + EOS, right padding) and prompts; decodes ids."""

    def __init__(self, path: Path | None, manifest, exact_bpe: ExactBPEInfo | dict | None = None,
                 root: Path | None = None):
        """`manifest`: a Manifest or a TextConventions (anything with `special_tokens` and `prompts`)."""
        self.special = manifest.special_tokens
        self.prompts = manifest.prompts
        self.tok, self.exact = None, None
        if isinstance(exact_bpe, dict):  # as exporter.tokenizer.write_tokenizer returns it
            exact_bpe = ExactBPEInfo.from_dict(exact_bpe, "exact_bpe")
        if path is not None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(path))
            if exact_bpe:
                specials = [t.content for t in self.tok.get_added_tokens_decoder().values()]
                scores = np.load(Path(root or Path(path).parent) / exact_bpe.scores, allow_pickle=False)
                self.exact = ExactBPE(self.tok.get_vocab(), scores, specials, exact_bpe.whitespace_only_pieces)

    @classmethod
    def from_manifest(cls, manifest) -> "TextCodec":
        """The codec a bundle describes (no tokenizer: array API only)."""
        entry = manifest.tokenizer
        if entry is None:
            return cls(None, manifest)
        return cls(manifest.path(entry.file), manifest, entry.exact_bpe, manifest.root)

    def _need(self):
        if self.tok is None:
            raise TokenizerMissing(
                "this bundle has no tokenizer.json: re-export with --tokenizer DIR, or use the array API "
                "(encode_text / generate with token ids)"
            )
        return self.tok

    def _ids(self, text: str) -> list[int]:
        ids = self.exact.encode(text) if self.exact else self._need().encode(text).ids
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
        rows = []
        for t in texts:
            ids = self._ids(conv.prefix + t)
            if limit and len(ids) + 1 > limit:
                ids = ids[: limit - 1]
            rows.append(ids + [self.special.eos])
        out = np.full((len(rows), max(map(len, rows))), conv.pad_id, np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """A caption prompt with BOS and no EOS, shape (1, T)."""
        return np.asarray([self._ids(prompt)], np.int64)

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped, stopping at EOS."""
        ids = [int(i) for i in ids]
        if self.special.eos in ids:
            ids = ids[: ids.index(self.special.eos)]
        ids = [i for i in ids if i != self.special.pad]
        return self._need().decode(ids, skip_special_tokens=True).strip()
