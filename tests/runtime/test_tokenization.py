"""The runtime's tokenization equals the original slow LlamaTokenizer's on the real tokenizer."""
import numpy as np
import pytest

from runtime.text import TextCodec


@pytest.fixture(scope="module")
def codec(tokenizer_dir, tmp_path_factory):
    from exporter.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(None, tokenizer_dir, d)
    manifest = {"special_tokens": {"bos": 1, "eos": 2, "pad": 0},
                "prompts": {"text_embedding": {"prefix": "summarize:", "pad_id": 0}}}
    return TextCodec(d / "tokenizer.json", manifest)


def test_embedding_ids_as_original(codec, tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    texts = ["a photo of a cat", "a diagram", "two dogs playing in the snow"]
    ids = codec.embedding_ids(texts)
    for row, t in zip(ids, texts):
        want = [1] + sp.encode("summarize:" + t) + [2]  # add_bos, add_eos_token=True
        assert row[: len(want)].tolist() == want and not row[len(want):].any()
    assert codec.decode(codec.prompt_ids("English caption: a red car")[0]) == "English caption: a red car"
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
