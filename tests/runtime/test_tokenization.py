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
    assert entry == {"file": "tokenizer.json", "sentencepiece": "tokenizer.model"}
    return TextCodec(d / entry["file"], MANIFEST, d / entry["sentencepiece"])


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


def test_long_words_equal_sentencepiece(codec, sp):
    """Long runs without spaces (CJK, digits) and tied-score strings, through the bundle's encoder."""
    rng = np.random.default_rng(1)
    alphabet = list("中文测试一只猫在公园里放风筝的女孩是我们你好世界0123456789.,abcxyz😀é")
    texts = ["".join(rng.choice(alphabet, n)) for n in (13, 50, 200, 1000, 3000)]
    texts.append("456.78" * 300)
    for t in texts:
        assert codec.exact.encode(t) == sp.encode(t)


def test_special_token_strings_map_to_their_ids(codec, sp):
    """As LlamaTokenizer(legacy=True): '</s>' in a text is the EOS id, the text around it encoded apart."""
    assert codec.exact.encode("a cat</s>a dog") == sp.encode("a cat") + [2] + sp.encode("a dog")


def test_early_truncation_keeps_the_prefix(codec, sp):
    """encode(max_tokens=k) returns (at least k of) the same first ids; after a special token it stops."""
    text = "a photo of a cat " * 50 + "</s>" + "中文测试" * 500
    full = codec.exact.encode(text)
    for k in (1, 5, 80, 200):
        part = codec.exact.encode(text, max_tokens=k)
        assert len(part) >= k and part == full[: len(part)]
        assert len(part) < len(full)  # the text after the special token was never encoded
    assert codec.exact.encode(text, max_tokens=10 ** 6) == full


def test_an_older_tokenizer_layout_asks_for_a_re_export(tmp_path):
    """Bundles that kept merge scores instead of the SentencePiece model are refused in one line."""
    from types import SimpleNamespace

    from bridge_export.runtime.manifest import BundleError, ExactBPEInfo, TokenizerInfo

    man = SimpleNamespace(tokenizer=TokenizerInfo("tokenizer.json", ExactBPEInfo("tokenizer_bpe_scores.npy")),
                          root=tmp_path, special_tokens=MANIFEST.special_tokens, prompts=MANIFEST.prompts)
    with pytest.raises(BundleError, match="older layout.*re-export the bundle"):
        TextCodec.from_manifest(man)
