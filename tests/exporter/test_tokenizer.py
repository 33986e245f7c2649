"""tokenizer.json converted from the real SentencePiece model matches the original tokenizer."""
import pytest

from bridge_export.exporter.export.tokenizer import TokenizerError, convert_sentencepiece, write_tokenizer

ENGLISH = ["summarize:a photo of a cat", "English caption:", "Hello  world!  ", " leading space",
           "the digit seven", "x\ny\tz", "a dog running on the beach at sunset, 4k", "émigré café",
           "😀 emoji ☃", "summarize:The QUICK brown fox's jumps... (over) [the] {lazy} dog?!",
           "中文测试，一只猫。", "一个女孩在公园里放风筝"]


@pytest.fixture(scope="module")
def converted(tokenizer_dir):
    return convert_sentencepiece(tokenizer_dir / "tokenizer.model")


def test_matches_sentencepiece_token_for_token(converted, tokenizer_dir):
    """The original slow LlamaTokenizer (legacy, add_bos) is BOS + SentencePiece's encode on plain text."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert converted.get_vocab_size() == 49954
    for text in ENGLISH:
        assert converted.encode(text).ids == [1] + sp.encode(text), text


def test_decode_round_trip(converted):
    ids = converted.encode("English caption: a cat on a mat").ids
    assert converted.decode(ids, skip_special_tokens=True) == "English caption: a cat on a mat"


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        convert_sentencepiece(bad)
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        (tmp_path / "empty").mkdir()
        write_tokenizer(None, tmp_path / "empty", tmp_path)


def test_tokenizer_of_another_model_is_refused(tokenizer_dir, tmp_path, tiny_model):
    from bridge_export.exporter.export.bundle import export_bundle

    with pytest.raises(TokenizerError, match="49954 pieces but the model's vocabulary has 128"):
        export_bundle(tiny_model, tmp_path / "b", tokenizer=tokenizer_dir, progress=lambda s: None)
    assert list(tmp_path.iterdir()) == []
