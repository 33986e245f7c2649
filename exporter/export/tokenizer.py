"""Turn the LLaMA SentencePiece model (`tokenizer.model`) into a fast `tokenizer.json`.

Built directly with the `tokenizers` library the way transformers' LlamaConverter (legacy mode)
does: BPE with byte fallback, merges recovered from the piece scores, `▁` prepended and
spaces replaced, `<s>` added in front. The runtime then needs neither sentencepiece nor
transformers, and its ids equal the original slow LlamaTokenizer's (tested token for token).
"""
from __future__ import annotations

from pathlib import Path

from bridge_export.runtime.errors import UserError


BPE_SCORES = "tokenizer_bpe_scores.npy"


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be found or converted."""


def whitespace_only_pieces(model_file: Path) -> bool:
    """The model's trainer_spec.allow_whitespace_only_pieces (runs of spaces stay in one word)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(model_file).read_bytes())
    return bool(m.trainer_spec.allow_whitespace_only_pieces)


def bpe_scores(model_file: Path):
    """Per-id merge scores (-inf for pieces merges never produce), when pieces tie on score; else None.

    The runtime uses them to merge in SentencePiece's order (bridge_export.runtime.text.ExactBPE).
    """
    import numpy as np
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    normal = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)) for i in range(n)]
    scores = np.array([sp.get_score(i) if normal[i] else -np.inf for i in range(n)], np.float32)
    finite = scores[np.isfinite(scores)]
    return scores if len(np.unique(finite)) < len(finite) else None


def convert_sentencepiece(model_file: Path):
    """Return a `tokenizers.Tokenizer` equal to LlamaTokenizer(legacy=True, add_bos_token=True)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError for bad files
        raise TokenizerError(f"{model_file} is not a SentencePiece model: {e}") from e
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    merges = []
    for piece, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges = [(a, b) for a, b, _ in sorted(merges, key=lambda m: -m[2])]
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, sp.bos_id())])
    return tok


def write_tokenizer(checkpoint: Path | None, tokenizer_dir: Path | None, out_dir: Path,
                    vocab_size: int | None = None) -> dict | None:
    """Put `tokenizer.json` into the bundle from --tokenizer DIR or the checkpoint; None if neither has one.

    Returns the manifest's tokenizer entry: {"file", "exact_bpe": {"scores", "whitespace_only_pieces"} | None}.
    A tokenizer with more pieces than the model's `vocab_size` is refused (it belongs to another model).
    """
    entry = _write_tokenizer(checkpoint, tokenizer_dir, out_dir)
    if entry and vocab_size:
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(str(out_dir / entry["file"])).get_vocab_size()
        if n > vocab_size:
            (out_dir / entry["file"]).unlink()
            raise TokenizerError(f"the tokenizer has {n} pieces but the model's vocabulary has {vocab_size}: "
                                 "give the tokenizer that belongs to this checkpoint (--tokenizer DIR)")
    return entry


def _write_tokenizer(checkpoint, tokenizer_dir, out_dir) -> dict | None:
    for given, src in ((True, tokenizer_dir), (False, checkpoint)):
        if src is None:
            continue
        src = Path(src)
        if given and not src.is_dir():
            raise TokenizerError(f"--tokenizer {src} is not a directory")
        if (src / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(str(src / "tokenizer.json")).save(str(out_dir / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{src / 'tokenizer.json'} cannot be read by `tokenizers`: {e}") from e
            return {"file": "tokenizer.json", "exact_bpe": None}
        if (src / "tokenizer.model").is_file():
            import numpy as np

            convert_sentencepiece(src / "tokenizer.model").save(str(out_dir / "tokenizer.json"))
            scores = bpe_scores(src / "tokenizer.model")
            exact = None
            if scores is not None:
                np.save(out_dir / BPE_SCORES, scores)
                exact = {"scores": BPE_SCORES,
                         "whitespace_only_pieces": whitespace_only_pieces(src / "tokenizer.model")}
            return {"file": "tokenizer.json", "exact_bpe": exact}
        if given:
            raise TokenizerError(f"--tokenizer {src} holds neither tokenizer.json nor tokenizer.model")
    return None
