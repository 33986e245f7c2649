"""Turn the LLaMA SentencePiece model (`tokenizer.model`) into a fast `tokenizer.json`.

Built directly with the `tokenizers` library the way transformers' LlamaConverter (legacy mode)
does: BPE with byte fallback, merges recovered from the piece scores, `▁` prepended and
spaces replaced, `<s>` added in front. The bundle keeps the original tokenizer.model too: the
runtime encodes with SentencePiece itself (the converted BPE disagrees where pieces tie on score)
and uses tokenizer.json for the vocabulary and decoding. No transformers at run time.
"""
from __future__ import annotations

from pathlib import Path

from bridge_export.runtime.errors import UserError


SENTENCEPIECE = "tokenizer.model"  # the original model, copied into the bundle: the runtime encodes with it


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be found or converted."""


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

    Returns the manifest's tokenizer entry: {"file": "tokenizer.json", "sentencepiece": "tokenizer.model" | None}
    (a SentencePiece source is copied too: the runtime encodes with it, exactly as the original).
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
            return {"file": "tokenizer.json"}
        if (src / "tokenizer.model").is_file():
            import shutil

            convert_sentencepiece(src / "tokenizer.model").save(str(out_dir / "tokenizer.json"))
            shutil.copyfile(src / "tokenizer.model", out_dir / SENTENCEPIECE)
            return {"file": "tokenizer.json", "sentencepiece": SENTENCEPIECE}
        if given:
            raise TokenizerError(f"--tokenizer {src} holds neither tokenizer.json nor tokenizer.model")
    return None
