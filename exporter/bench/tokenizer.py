"""Tokenizer speed, side by side in one run: exact-BPE merge loop (old quadratic vs heap) and `tokenizers`.

    python -m bridge_export.exporter.bench.tokenizer --tokenizer ../shared/data/internvl-tokenizer --chars 30000

Prints seconds per encode and the ratios, and checks that every variant returns the same ids as
SentencePiece itself (the original slow LlamaTokenizer's engine).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from bridge_export.runtime.text import ExactBPE


def quadratic_word(bpe: ExactBPE, word: str) -> list[int]:
    """The merge loop before the heap (kept here as the baseline): rescans every pair after each merge."""
    syms = list(word)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            sc = bpe.score.get(syms[i] + syms[i + 1])
            if sc is not None and (best is None or sc > best):
                best, at = sc, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
    out = []
    for s in syms:
        out.extend([bpe.vocab[s]] if s in bpe.score else [bpe.byte_ids[b] for b in s.encode("utf-8")])
    return out


def _time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


@click.command()
@click.option("--tokenizer", "tok_dir", required=True, type=click.Path(path_type=Path, exists=True),
              help="directory with the original tokenizer.model")
@click.option("--chars", default=30000, show_default=True, help="characters of the test text")
@click.option("--old-chars", default=0, help="characters for the old loop (0: same as --chars; it is slow)")
@click.option("--repeat", default=3, show_default=True)
def main(tok_dir, chars, old_chars, repeat):
    """Time one long CJK text and one long spaced English text through each tokenizer."""
    import numpy as np
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from bridge_export.exporter.export.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        entry = write_tokenizer(None, tok_dir, Path(d))
        fast = Tokenizer.from_file(str(Path(d) / entry["file"]))
        scores = np.load(Path(d) / entry["exact_bpe"]["scores"])
    specials = [t.content for t in fast.get_added_tokens_decoder().values()]
    bpe = ExactBPE(fast.get_vocab(), scores, specials, entry["exact_bpe"]["whitespace_only_pieces"])
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    cjk = "".join(np.random.default_rng(0).choice(list("中文测试一只猫在公园里放风筝的女孩是我们你好世界图片"), chars))
    eng = " ".join(["a photo of a cat sitting on the mat"] * (chars // 36 + 1))[:chars]
    old_n = old_chars or chars
    print(f"{'text':<8}{'chars':>7}{'old loop s':>12}{'heap s':>10}{'fast s':>10}{'old/heap':>10}{'heap/fast':>11}"
          f"{'trunc80 s':>11}  ids equal sentencepiece")
    for name, text in (("CJK", cjk), ("English", eng)):
        old_text = text[:old_n]
        t_old, ids_old = _time(lambda: [i for w in bpe._words_text(old_text) for i in quadratic_word(bpe, w)], 1)
        t_new_old, ids_new_old = _time(lambda: bpe.encode(old_text), repeat)
        t_new, ids_new = _time(lambda: bpe.encode(text), repeat)
        t_fast, _ = _time(lambda: fast.encode(text, add_special_tokens=False).ids, repeat)
        t_trunc, ids_trunc = _time(lambda: bpe.encode(text, max_tokens=80), repeat)
        ok = ids_new == sp.encode(text) and ids_old == ids_new_old and ids_trunc[:80] == ids_new[:80]
        ratio = t_old / t_new_old
        print(f"{name:<8}{len(text):>7}{t_old:>12.3f}{t_new:>10.4f}{t_fast:>10.4f}{ratio:>9.0f}x"
              f"{t_new / t_fast:>10.1f}x"
              f"{t_trunc:>11.5f}  {ok}" + (f"  (old loop on the first {old_n} chars)" if old_n != len(text) else ""))


if __name__ == "__main__":
    main()
