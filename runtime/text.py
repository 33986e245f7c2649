"""Tokenization with the `tokenizers` library and the prompt conventions from the manifest."""
from __future__ import annotations

import heapq
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.manifest import BundleError, ExactBPEInfo

log = logging.getLogger(__name__)


class TokenizerMissing(UserError, RuntimeError):
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
        """One word's ids: merge the highest-scoring adjacent pair, ties to the leftmost, until none merges.

        A heap of candidate pairs over a doubly linked list of symbols, as SentencePiece's own
        bpe_model.cc: O(n log n) in the word's length (a 30k-character CJK run is one "word").
        Entries made stale by a neighbour's merge are skipped when popped (lazy invalidation).
        """
        syms: list[str | None] = list(word)
        n = len(syms)
        score = self.score
        if n <= 12:  # short words (most of them): rescanning is cheaper than a heap, with the same order
            return self._short_word(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            sc = score.get(syms[i] + syms[i + 1])
            if sc is not None:  # (-score, left index): the highest score first, then the leftmost
                heap.append((-sc, i, i + 1, 2))
        heapq.heapify(heap)
        while heap:
            _, i, j, size = heapq.heappop(heap)
            left, right = syms[i], syms[j]
            if left is None or right is None or nxt[i] != j or len(left) + len(right) != size:
                continue  # one side was merged away or grew since this pair was pushed
            syms[i], syms[j] = left + right, None
            nxt[i] = nxt[j]
            if nxt[i] != -1:
                prev[nxt[i]] = i
            for a, b in ((prev[i], i), (i, nxt[i])):
                if a != -1 and b != -1:
                    piece = syms[a] + syms[b]
                    sc = score.get(piece)
                    if sc is not None:
                        heapq.heappush(heap, (-sc, a, b, len(piece)))
        out_syms, i = [], 0
        while i != -1:
            out_syms.append(syms[i])
            i = nxt[i]
        return self._ids_of(out_syms)

    def _short_word(self, syms: list[str]) -> list[int]:
        """The same merge order by rescanning all pairs after each merge (quadratic; for short words)."""
        score = self.score
        while len(syms) > 1:
            best, at = None, -1
            for i in range(len(syms) - 1):
                sc = score.get(syms[i] + syms[i + 1])
                if sc is not None and (best is None or sc > best):  # strict: the leftmost wins ties
                    best, at = sc, i
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        return self._ids_of(syms)

    def _ids_of(self, syms: list[str]) -> list[int]:
        out = []
        for s in syms:
            if s in self.score:
                out.append(self.vocab[s])
            else:  # byte fallback
                out.extend(self.byte_ids[b] for b in s.encode("utf-8"))
        return out

    def _words_text(self, text: str) -> Iterator[str]:
        """The normalized words of `text` ("▁" for spaces, one in front); merges never cross them."""
        if not text:
            return
        norm = "\u2581" + text.replace(" ", "\u2581")
        start = 0
        for i in range(1, len(norm) + 1):  # a word starts at a "▁" (not inside a run of them, if allowed)
            if i == len(norm) or (norm[i] == "\u2581" and not (self.ws_runs and norm[i - 1] == "\u2581")):
                yield norm[start:i]
                start = i

    def _words(self, text: str) -> Iterator[list[int]]:
        """Ids word by word; SentencePiece merges never cross a word start, so words are independent."""
        for w in self._words_text(text):
            yield self._word(w)

    def _chunks(self, text: str) -> Iterator[list[int]]:
        """Ids in order, a word or a special token at a time (special-token strings map to their ids)."""
        for sp in self.specials:
            if sp in text:
                parts = text.split(sp)
                yield from self._chunks(parts[0])
                for part in parts[1:]:
                    yield [self.vocab[sp]]
                    yield from self._chunks(part)
                return
        yield from self._words(text)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Ids without BOS, as the slow tokenizer gives them.

        With `max_tokens`, stop after the word that reaches it: the result starts with the same
        ids as the full encoding (at least `max_tokens` of them, or all), so a caller that keeps
        only the first tokens never tokenizes the rest of a long text.
        """
        out: list[int] = []
        for chunk in self._chunks(text):
            out += chunk
            if max_tokens is not None and len(out) >= max_tokens:
                break
        return out


class TextCodec:
    """Encodes texts for embedding (prefix + BOS + EOS, right padding) and prompts; decodes ids."""

    def __init__(self, path: Path | None, manifest, exact_bpe: ExactBPEInfo | dict | None = None,
                 root: Path | None = None):
        """`manifest`: a Manifest or a TextConventions (anything with `special_tokens` and `prompts`)."""
        self.special = manifest.special_tokens
        self.prompts = manifest.prompts
        # a model with fewer positions than the embedding max_length truncates at its positions instead
        self.max_positions = getattr(getattr(manifest, "dims", None), "max_positions", None)
        self.tok, self.exact = None, None
        if isinstance(exact_bpe, dict):  # as bridge_export.exporter.export.tokenizer.write_tokenizer returns it
            exact_bpe = ExactBPEInfo.from_dict(exact_bpe, "exact_bpe")
        if path is not None:
            from tokenizers import Tokenizer

            try:
                self.tok = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a plain Exception with serde's message
                raise BundleError(f"tokenizer file {path} cannot be read by `tokenizers` "
                                  f"({str(e).splitlines()[0][:120]}): the file is damaged; run `bridge-export "
                                  "verify --checksums` on the bundle, then re-copy or re-export it") from None
            if exact_bpe:
                specials = [t.content for t in self.tok.get_added_tokens_decoder().values()]
                scores_path = Path(root or Path(path).parent) / exact_bpe.scores
                try:
                    scores = np.load(scores_path, allow_pickle=False)
                except (OSError, ValueError, EOFError) as e:
                    raise BundleError(f"tokenizer scores {scores_path} cannot be read ({str(e)[:120]}): the file is "
                                      "damaged; re-copy or re-export the bundle") from None
                vocab = self.tok.get_vocab()
                if scores.ndim != 1 or scores.dtype.kind != "f" or len(scores) < max(vocab.values(), default=-1) + 1:
                    raise BundleError(f"tokenizer scores {scores_path} hold {scores.dtype} {list(scores.shape)}, not "
                                      f"one float per token of the {len(vocab)}-token vocabulary: the file is "
                                      "damaged or from another model; re-export the bundle")
                self.exact = ExactBPE(vocab, scores, specials, exact_bpe.whitespace_only_pieces)

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
