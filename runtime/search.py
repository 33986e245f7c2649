"""Token search shared by the PyTorch reference and the runtime: greedy, sampling, beam search.

Numpy only. A decoder is anything with `prefill() -> logits [B, V]`, `expand(n)` (repeat each
row n times, for beams) and `step(tokens [N], reorder [N] | None) -> logits [N, V]`; the search
never knows whether it drives PyTorch, onnxruntime or TensorRT. Beam search reproduces
transformers' BeamSearchScorer: scores are sums of log-softmax over the full vocabulary
(before the min-length EOS mask) divided by generated_length ** length_penalty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

MAX_BEAMS = 64  # more beams multiply the KV cache and the per-step sort for no gain in caption quality


class Decoder(Protocol):
    """What a search drives: one generation request's model state."""

    def prefill(self) -> np.ndarray:
        """Logits [B, V] of the last prompt position."""

    def expand(self, n: int) -> None:
        """Repeat every row n times (beam search)."""

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """Reorder rows by `reorder` (if given), feed `tokens` [N], return logits [N, V]."""


@dataclass
class SearchConfig:
    """Decoding options, named and defaulted as transformers' GenerationConfig."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError for options of the wrong type, out of range, or that cannot work together."""
        for name in ("max_new_tokens", "min_new_tokens", "num_beams", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k filtering), got {self.top_k}")
        if self.num_beams > MAX_BEAMS:
            raise ValueError(f"num_beams must be at most {MAX_BEAMS}, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling is not supported: use num_beams=1 with do_sample=True")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


@dataclass
class SearchResult:
    """New tokens [B, n] (padded with pad_token_id after EOS) and one score per row."""

    tokens: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32."""
    x = x.astype(np.float32, copy=False)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _process(logits: np.ndarray, history: list[np.ndarray], n_new: int, cfg: SearchConfig) -> np.ndarray:
    """transformers' logits processors in their order: repetition penalty, then min-length EOS mask."""
    if cfg.repetition_penalty != 1.0 and history:
        hist = np.stack(history, 1)  # (N, n)
        rows = np.arange(logits.shape[0])[:, None]
        picked = logits[rows, hist]
        logits[rows, hist] = np.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
    if n_new < cfg.min_new_tokens:
        logits[:, cfg.eos_token_id] = -np.inf
    return logits


def _warp_and_sample(logits: np.ndarray, cfg: SearchConfig, rng: np.random.Generator) -> np.ndarray:
    """Temperature, top-k, top-p (transformers' warper order), then one multinomial draw per row."""
    x = logits / cfg.temperature
    if 0 < cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if cfg.top_p < 1.0:
        order = np.argsort(x, axis=-1)  # ascending, as transformers
        sorted_x = np.take_along_axis(x, order, -1)
        p = np.exp(log_softmax(sorted_x))
        remove = np.cumsum(p, -1) <= 1 - cfg.top_p
        remove[:, -1] = False  # keep at least one
        x = x.copy()
        np.put_along_axis(x, order, np.where(remove, -np.inf, sorted_x), -1)
    p = np.exp(log_softmax(x)).astype(np.float64)
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


class TokenStepper:
    """Greedy or sampled decoding of one request (B rows), one step at a time.

    `choose(logits [B, V])` returns the step's tokens [B] (pad after EOS); `finished` is then True when
    every row has ended or max_new_tokens is reached, else the caller feeds the tokens and passes the
    next logits. `iter_tokens` and the runtime's step-level scheduler both drive it, so a request run
    alone and one decoded among others make the same choices.
    """

    expand = 1  # rows per prompt row (beam search takes num_beams)

    def __init__(self, cfg: SearchConfig):
        cfg.validate()
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.done: np.ndarray | None = None
        self.history: list[np.ndarray] = []
        self.finished = False

    def choose(self, logits: np.ndarray) -> tuple[np.ndarray, None]:
        """The next tokens [B] from the last position's logits [B, V]; no row reorder (None)."""
        cfg, i = self.cfg, len(self.history)
        if self.done is None:
            self.done = np.zeros(logits.shape[0], bool)
        if cfg.do_sample or cfg.repetition_penalty != 1.0 or i < cfg.min_new_tokens:
            scores = _process(logits.astype(np.float32, copy=True), self.history, i, cfg)
        else:  # greedy with nothing to adjust: the argmax of the logits as they are (no per-step copy)
            scores = logits
        tok = _warp_and_sample(scores, cfg, self.rng) if cfg.do_sample else scores.argmax(-1).astype(np.int64)
        tok = np.where(self.done, cfg.pad_token_id, tok)
        self.history.append(tok)
        self.done |= tok == cfg.eos_token_id
        self.finished = bool(self.done.all()) or i + 1 == cfg.max_new_tokens
        return tok, None

    def result(self) -> SearchResult:
        """All chosen tokens [B, n] and zero scores (scores are beam search's)."""
        return SearchResult(np.stack(self.history, 1), np.zeros(len(self.history[0]), np.float32))


def iter_tokens(decoder: Decoder, cfg: SearchConfig) -> Iterator[np.ndarray]:
    """Greedy or sampled decoding, yielding each step's tokens [B] as they arrive (pad after EOS)."""
    return iter_tokens_with(TokenStepper(cfg), decoder)


def iter_tokens_with(st: TokenStepper, decoder: Decoder) -> Iterator[np.ndarray]:
    """`iter_tokens` over a given stepper (its `result()` holds every step afterwards)."""
    logits = decoder.prefill()
    while True:
        tok, _ = st.choose(logits)
        yield tok
        if st.finished:
            return
        logits = decoder.step(tok, None)


class _Hypotheses:
    """Finished beams of one row, kept as transformers' BeamHypotheses (early_stopping=False)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.lp = num_beams, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        """Offer a finished hypothesis; keeps the best num_beams."""
        score = sum_logprobs / (length ** self.lp)
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """True when no open beam can still beat the worst kept hypothesis."""
        if len(self.beams) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / (length ** self.lp)


class BeamStepper:
    """Beam search of one request (B prompt rows, each becoming num_beams rows), one step at a time,
    as transformers' `beam_search` + BeamSearchScorer.

    `choose(logits)` takes the prefill's logits [B, V] first (the caller then repeats each row
    `expand` times), later the step's [B*K, V]; it returns the tokens to feed [B*K] and, per new row,
    the row it continues (reorder the rows' caches by it before feeding). `finished` is True when
    every row is done or max_new_tokens is reached; `result()` then gives the best hypotheses.
    """

    def __init__(self, cfg: SearchConfig):
        cfg.validate()
        self.cfg, self.K = cfg, cfg.num_beams
        self.expand = self.K
        self.step_no = 0
        self.finished = False

    def _start(self, first: np.ndarray) -> np.ndarray:
        B, K = first.shape[0], self.K
        self.B = B
        beam_scores = np.zeros((B, K), np.float32)
        beam_scores[:, 1:] = -1e9
        self.beam_scores = beam_scores.reshape(-1)
        self.seqs: list[list[int]] = [[] for _ in range(B * K)]
        self.hyps = [_Hypotheses(K, self.cfg.length_penalty) for _ in range(B)]
        self.done = [False] * B
        return np.repeat(first, K, axis=0)  # (B*K, V)

    def choose(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [B*K] to feed next and the source row of each (see the class docstring)."""
        cfg, K, step = self.cfg, self.K, self.step_no
        if step == 0:
            logits = self._start(logits)
        B, V = self.B, logits.shape[1]
        seqs, hyps, done = self.seqs, self.hyps, self.done
        history = [np.array([s[j] for s in seqs]) for j in range(step)] if cfg.repetition_penalty != 1.0 else []
        scores = _process(log_softmax(logits), history, step, cfg) + self.beam_scores[:, None]
        flat = scores.reshape(B, K * V)
        # top 2K candidates per row: partition first (the vocabulary is large), then sort those
        part = np.argpartition(-flat, 2 * K - 1, axis=1)[:, : 2 * K]
        order = np.argsort(-np.take_along_axis(flat, part, 1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, 1)  # (B, 2K), best first
        top_scores = np.take_along_axis(flat, top, 1)
        next_scores = np.zeros(B * K, np.float32)
        next_tokens = np.zeros(B * K, np.int64)
        next_src = np.zeros(B * K, np.int64)
        length = step + 1
        for b in range(B):
            if done[b]:
                next_tokens[b * K:(b + 1) * K] = cfg.pad_token_id
                next_src[b * K:(b + 1) * K] = b * K
                continue
            n = 0
            for rank, (idx, sc) in enumerate(zip(top[b], top_scores[b])):
                src, tok = b * K + idx // V, idx % V
                if tok == cfg.eos_token_id:
                    if rank < K:
                        hyps[b].add(seqs[src] + [int(tok)], float(sc), length)
                    continue
                next_scores[b * K + n], next_tokens[b * K + n], next_src[b * K + n] = sc, tok, src
                n += 1
                if n == K:
                    break
            done[b] = done[b] or hyps[b].is_done(float(top_scores[b].max()), length)
        self.seqs = [seqs[s] + [int(t)] for s, t in zip(next_src, next_tokens)]
        self.beam_scores = next_scores
        self.step_no += 1
        self.finished = all(done) or self.step_no == cfg.max_new_tokens
        return next_tokens, next_src

    def result(self) -> SearchResult:
        """The best finished hypothesis of each prompt row [B, n] (pad-filled) and its score."""
        cfg, K = self.cfg, self.K
        tokens, best_scores = [], []
        for b in range(self.B):
            if not self.done[b]:
                for k in range(K):
                    seq = self.seqs[b * K + k]
                    self.hyps[b].add(seq, float(self.beam_scores[b * K + k]), len(seq))
            score, best = max(self.hyps[b].beams, key=lambda h: h[0])
            tokens.append(best)
            best_scores.append(score)
        width = max(len(t) for t in tokens)
        out = np.full((self.B, width), cfg.pad_token_id, np.int64)
        for b, t in enumerate(tokens):
            out[b, : len(t)] = t
        return SearchResult(out, np.array(best_scores, np.float32))


def stepper(cfg: SearchConfig) -> TokenStepper | BeamStepper:
    """The per-request search state `cfg` asks for (beam search when num_beams > 1)."""
    return BeamStepper(cfg) if cfg.num_beams > 1 else TokenStepper(cfg)


def beam_search(decoder: Decoder, cfg: SearchConfig) -> SearchResult:
    """Beam search as transformers' `beam_search` + BeamSearchScorer, for a batch of B rows."""
    st = BeamStepper(cfg)
    logits = decoder.prefill()  # (B, V)
    decoder.expand(st.expand)
    while True:
        tokens, src = st.choose(logits)
        if st.finished:
            return st.result()
        logits = decoder.step(tokens, src)


def search(decoder: Decoder, cfg: SearchConfig) -> SearchResult:
    """Run the search `cfg` asks for and return all new tokens."""
    if cfg.num_beams > 1:
        return beam_search(decoder, cfg)
    st = TokenStepper(cfg)
    for _ in iter_tokens_with(st, decoder):
        pass
    return st.result()
