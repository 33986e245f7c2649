"""Tokenizer check and speed, side by side in one run: the runtime's encoder against SentencePiece and `tokenizers`.

    bridge-export tools tokenizer-bench --tokenizer DIR_WITH_TOKENIZER_MODEL [--strings 2000] [--chars 30000]

The runtime encodes with the bundle's copy of the original SentencePiece model; this prints how many
of N random mixed-script strings (Latin, CJK, digits, punctuation, emoji, runs of spaces) get other
ids than SentencePiece itself and than the converted tokenizer.json (`tokenizers`' BPE, which breaks
ties between equal-score pieces differently), and the time per encode of one long CJK text and one
long English text for each, as the best of interleaved rounds.
"""
from __future__ import annotations

import string
import tempfile
import time
from pathlib import Path

import click


def _best(fns: dict, rounds: int) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):  # interleaved: a drifting shared CPU hits every variant alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


@click.command()
@click.option("--tokenizer", "tok_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="directory with the original tokenizer.model")
@click.option("--strings", default=2000, show_default=True, help="random mixed-script strings compared id for id")
@click.option("--chars", default=30000, show_default=True, help="characters of each long test text")
@click.option("--repeat", default=5, show_default=True, help="interleaved timing rounds (best kept)")
def main(tok_dir, strings, chars, repeat):
    """Compare the runtime's ids with SentencePiece's and time one long CJK and one long English text."""
    import numpy as np
    import sentencepiece as spm

    from bridge_export.exporter.export.tokenizer import write_tokenizer
    from bridge_export.runtime.manifest import SpecialTokens, TextConventions
    from bridge_export.runtime.text import TextCodec

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    with tempfile.TemporaryDirectory() as d:
        entry = write_tokenizer(None, tok_dir, Path(d))
        codec = TextCodec(Path(d) / entry["file"], TextConventions(SpecialTokens(bos=1, eos=2, pad=0)),
                          Path(d) / entry["sentencepiece"])
    rng = np.random.default_rng(0)
    alphabet = (list(string.ascii_letters + string.digits + string.punctuation + "   \t\n")
                + list("中文测试一只猫在公园里放风筝的女孩是我们你好世界。，！？") + ["é", "ü", "ß", "😀", "☃", "€"])
    texts = ["".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(strings)]
    runtime_off = sum(codec.exact.encode(t) != sp.encode(t) for t in texts)
    bpe_off = sum(codec.tok.encode(t, add_special_tokens=False).ids != sp.encode(t) for t in texts)
    print(f"{strings} mixed-script strings: runtime ids differ from SentencePiece on {runtime_off}; "
          f"tokenizer.json's BPE differs on {bpe_off}")
    cjk = "".join(rng.choice(list("中文测试一只猫在公园里放风筝的女孩是我们你好世界0123456789"), chars))
    eng = (" ".join(["photograph"] * (chars // 10 + 1)))[:chars]
    print(f"{'text':<8}{'chars':>7}{'runtime ms':>12}{'sentencepiece ms':>18}{'tokenizers ms':>15}{'same ids':>10}")
    for name, text in (("CJK", cjk), ("English", eng)):
        best = _best({"runtime": lambda: codec.exact.encode(text), "sp": lambda: sp.encode(text),
                      "tokenizers": lambda: codec.tok.encode(text, add_special_tokens=False)}, repeat)
        same = codec.exact.encode(text) == sp.encode(text)
        print(f"{name:<8}{len(text):>7}{best['runtime'] * 1e3:>12.2f}{best['sp'] * 1e3:>18.2f}"
              f"{best['tokenizers'] * 1e3:>15.2f}{str(same):>10}")


if __name__ == "__main__":
    main()
