"""The runtime's tokenization equals the original slow LlamaTokenizer's on the real tokenizer."""
import string

import numpy as np
import pytest

from bridge_export.runtime.manifest import Prompts, SpecialTokens, TextConventions, TextEmbeddingPrompt
from bridge_export.runtime.text import TextCodec

MANIFEST = TextConventions(SpecialTokens(bos=1, eos=2, pad=0))


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def codec(tokenizer_dir, tmp_path_factory):
    from bridge_export.exporter.export.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    entry = write_tokenizer(None, tokenizer_dir, d)
    assert entry["exact_bpe"] == {"scores": "tokenizer_bpe_scores.npy", "whitespace_only_pieces": True}
    return TextCodec(d / entry["file"], MANIFEST, entry["exact_bpe"])


def test_embedding_ids_as_original(codec, sp):
    texts = ["a photo of a cat", "a diagram", "two dogs playing in the snow"]
    ids = codec.embedding_ids(texts)
    for row, t in zip(ids, texts):
        want = [1] + sp.encode("summarize:" + t) + [2]  # add_bos, add_eos_token=True
        assert row[: len(want)].tolist() == want and not row[len(want):].any()
    assert codec.decode(codec.prompt_ids("English caption: a red car")[0]) == "English caption: a red car"
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64


def test_token_for_token_on_a_random_corpus(codec, sp):
    """Mixed scripts, digits, punctuation, runs of spaces: including strings where tied scores matter."""
    rng = np.random.default_rng(0)
    alphabet = (list(string.ascii_letters + string.digits + string.punctuation + "   \t\n")
                + list("中文测试一只猫在公园里放风筝的女孩是我们你好世界。，！？") + ["é", "ü", "ß", "😀", "☃", "€"])
    texts = ["123,456.78", "Hello  world!  ", " leading", "中文测试，一只猫。", "3.14159 and 2.71828"]
    texts += ["".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(2000)]
    mismatched = [t for t in texts if codec._ids(t) != [1] + sp.encode(t)]
    assert mismatched == []


def test_long_texts_truncated_like_the_original(codec, sp):
    """max_length=80 with truncation: the first tokens survive, BOS and EOS are still there."""
    import copy

    limited = copy.copy(codec)
    limited.prompts = Prompts(text_embedding=TextEmbeddingPrompt(max_length=80))
    text = " ".join(["word"] * 200)
    row = limited.embedding_ids([text])[0]
    want = ([1] + sp.encode("summarize:" + text))[:79] + [2]
    assert len(row) == 80 and row.tolist() == want


def test_long_words_heap_merge_equals_sentencepiece(codec, sp):
    """Words far longer than the short-word path (CJK runs, digits, no spaces) go through the heap merge."""
    from bridge_export.exporter.bench.tokenizer import quadratic_word

    rng = np.random.default_rng(1)
    alphabet = list("中文测试一只猫在公园里放风筝的女孩是我们你好世界0123456789.,abcxyz😀é")
    texts = ["".join(rng.choice(alphabet, n)) for n in (13, 50, 200, 1000, 3000)]
    texts.append("456.78" * 300)
    for t in texts:
        assert codec.exact.encode(t) == sp.encode(t)
    for w in codec.exact._words_text(texts[3]):
        assert codec.exact._word(w) == quadratic_word(codec.exact, w)


def test_early_truncation_keeps_the_prefix(codec, sp):
    """encode(max_tokens=k) returns (at least k of) the same first ids without tokenizing the whole text."""
    text = "a photo of a cat " * 50 + "中文测试" * 500
    full = sp.encode(text)
    for k in (1, 5, 80, 200):
        part = codec.exact.encode(text, max_tokens=k)
        assert len(part) >= k and part == full[: len(part)]
        assert len(part) < len(full)  # it stopped early
    assert codec.exact.encode(text, max_tokens=10 ** 6) == full
