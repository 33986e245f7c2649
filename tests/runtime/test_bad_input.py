"""Every bad input to the Python API raises one clear error naming what was wrong; no NaN, no empty output.

Table-driven: one row per bad input (a call on the pipeline and the message it must raise).
The tiny bundle: 32x32 images, vocabulary 128, 128 positions; the text bundle has a word-level
tokenizer (words: a, cat, dog, photo, of, the, digit, seven, on, mat, w16...).
"""
import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.pipeline import PipelineClosed

X = np.zeros((1, 3, 32, 32), np.float32)
IDS = np.array([[1, 5, 6]], np.int64)


def _nan_pixels():
    x = X.copy()
    x[0, 0, 0, 0] = np.nan
    return x


# (id, call(pipe) -> anything, exception type, message regex)
ARRAYS = [
    ("NaN pixels", lambda p: p.encode_image(_nan_pixels()), ValueError, "pixel_values holds NaN"),
    ("inf pixels", lambda p: p.vision(X + np.inf), ValueError, "pixel_values holds NaN or infinite"),
    ("NaN pixels in generate", lambda p: p.generate(_nan_pixels(), IDS, max_new_tokens=2), ValueError, "NaN"),
    ("empty image batch", lambda p: p.encode_image(np.zeros((0, 3, 32, 32))), ValueError, "empty batch"),
    ("0x0 images", lambda p: p.encode_image(np.zeros((1, 3, 0, 0))), ValueError, "pixel_values must be"),
    ("string pixels", lambda p: p.encode_image(np.full((1, 3, 32, 32), "a")), ValueError, "float array"),
    ("float ids", lambda p: p.encode_text(np.array([[1.0, 5.5]])), ValueError, "input_ids must hold integer"),
    ("negative ids", lambda p: p.encode_text(np.array([[1, -3]])), ValueError, r"ids in \[0, 128\)"),
    ("ids >= vocab", lambda p: p.encode_text(np.array([[1, 128]])), ValueError, r"ids in \[0, 128\)"),
    ("huge ids", lambda p: p.generate(X, np.array([[1, 2 ** 40]]), max_new_tokens=2), ValueError, r"\[0, 128\)"),
    ("bool ids", lambda p: p.encode_text(np.array([[True, True]])), ValueError, "integer token ids"),
    ("1-D ids", lambda p: p.encode_text(np.array([1, 5])), ValueError, r"\[B, T\]"),
    ("empty ids", lambda p: p.generate(X, np.zeros((1, 0), np.int64)), ValueError, "non-empty"),
    ("pad-only ids", lambda p: p.encode_text(np.zeros((1, 4), np.int64)), ValueError, "no tokens"),
    ("float prompt ids", lambda p: p.generate(X, np.array([[1.0, 5.0]]), max_new_tokens=2), ValueError,
     "integer token ids"),
    ("mask of wrong shape", lambda p: p.generate(X, IDS, np.ones((1, 2)), max_new_tokens=2), ValueError,
     "attention_mask must have the shape of input_ids"),
    ("mask not 0/1", lambda p: p.generate(X, IDS, np.full((1, 3), 2), max_new_tokens=2), ValueError, "only 0 and 1"),
    ("mask all zero", lambda p: p.generate(X, IDS, np.zeros((1, 3)), max_new_tokens=2), ValueError, "row of zeros"),
    ("images/prompts mismatch", lambda p: p.generate(np.zeros((2, 3, 32, 32), np.float32), IDS, max_new_tokens=2),
     ValueError, "one prompt per image"),
]

BOUNDS = [
    ("100000 beams", lambda p: p.generate(X, IDS, num_beams=100000, max_new_tokens=2), ValueError, "at most 64"),
    ("fractional beams", lambda p: p.generate(X, IDS, num_beams=2.5, max_new_tokens=2), ValueError, "integer"),
    ("zero beams", lambda p: p.generate(X, IDS, num_beams=0), ValueError, "num_beams"),
    ("max_new_tokens 1e9", lambda p: p.generate(X, IDS, max_new_tokens=10 ** 9), ValueError,
     "exceeds max_position_embeddings"),
    ("max_new_tokens float", lambda p: p.generate(X, IDS, max_new_tokens=3.0), ValueError, "integer"),
    ("max_new_tokens 0", lambda p: p.generate(X, IDS, max_new_tokens=0), ValueError, "max_new_tokens"),
    ("NaN temperature", lambda p: p.generate(X, IDS, do_sample=True, temperature=float("nan")), ValueError, "finite"),
    ("embed batch_size 0", lambda p: p.embed_images([X[0].transpose(1, 2, 0) * 0], batch_size=0), ValueError,
     "batch_size"),
    ("embed batch_size huge", lambda p: p.embed_images([np.zeros((4, 4))], batch_size=10 ** 9), ValueError,
     "batch_size"),
    ("captions batch_size -1", lambda p: p.captions([np.zeros((4, 4))], batch_size=-1, max_new_tokens=2),
     ValueError, "batch_size"),
    ("unknown mode", lambda p: p.embed_images([np.zeros((4, 4))], mode="X"), ValueError, "mode must be"),
    ("min > max new tokens", lambda p: p.captions([np.zeros((4, 4))], max_new_tokens=2, min_new_tokens=5),
     ValueError, "min_new_tokens"),
]


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return runtime.load(tiny_bundle)


@pytest.mark.parametrize("call,exc,match", [r[1:] for r in ARRAYS + BOUNDS], ids=[r[0] for r in ARRAYS + BOUNDS])
def test_bad_array_input(pipe, call, exc, match):
    with pytest.raises(exc, match=match) as e:
        call(pipe)
    assert "\n" not in str(e.value)


TEXT = [
    ("template without {}", lambda p: p.classify([np.zeros((4, 4))], ["cat", "dog"], template="a photo"),
     "exactly once"),
    ("template with {0} and {}", lambda p: p.classify([np.zeros((4, 4))], ["cat"], template="{0} {}"),
     "exactly once"),
    ("template with a named field", lambda p: p.classify([np.zeros((4, 4))], ["cat"], template="a {animal}"),
     "no other"),
    ("template with two {}", lambda p: p.classify([np.zeros((4, 4))], ["cat"], template="{} or {}"),
     "exactly once"),
    ("template unbalanced brace", lambda p: p.classify([np.zeros((4, 4))], ["cat"], template="a {} {"),
     "not a valid format string"),
    ("labels None", lambda p: p.classify([np.zeros((4, 4))], None), "list of names"),
    ("labels as one string", lambda p: p.classify([np.zeros((4, 4))], "cat,dog"), "one string"),
    ("no labels", lambda p: p.classify([np.zeros((4, 4))], []), "no labels"),
    ("empty label", lambda p: p.classify([np.zeros((4, 4))], ["cat", " "]), "non-empty strings"),
    ("duplicate labels", lambda p: p.classify([np.zeros((4, 4))], ["cat", "cat"]), "distinct"),
    ("labels all unknown", lambda p: p.classify([np.zeros((4, 4))], ["cat", "zebra giraffe"], template="{}"),
     "no word of the text 'zebra giraffe'"),
    ("prompt all unknown", lambda p: p.captions([np.zeros((4, 4))], prompt="Légende anglaise:", max_new_tokens=2),
     "no word of the prompt"),
    ("empty text", lambda p: p.embed_texts(["a cat", ""]), "text 1 is ''"),
    ("non-string text", lambda p: p.embed_texts(["a cat", None]), "non-empty strings"),
    ("prompt not a string", lambda p: p.captions([np.zeros((4, 4))], prompt=3, max_new_tokens=2), "string"),
]


@pytest.fixture(scope="module")
def text_pipe(tiny_text_bundle):
    return runtime.load(tiny_text_bundle)


def test_kv_cache_beyond_memory_refused(pipe, monkeypatch):
    """A generate call whose KV cache would not fit is refused up front (here: a machine of 1 MiB)."""
    import bridge_export.runtime.pipeline as rp

    monkeypatch.setattr(rp, "_memory_budget", lambda: 1 << 20)
    with pytest.raises(ValueError, match="GiB of KV cache, more than half this machine's memory"):
        pipe.generate(np.zeros((4, 3, 32, 32), np.float32), np.ones((4, 3), np.int64), num_beams=64,
                      max_new_tokens=50)


@pytest.mark.parametrize("call,match", [r[1:] for r in TEXT], ids=[r[0] for r in TEXT])
def test_silent_nonsense_refused(text_pipe, call, match):
    with pytest.raises(ValueError, match=match) as e:
        call(text_pipe)
    assert "\n" not in str(e.value)


def test_a_4d_array_is_a_batch_of_images(text_pipe):
    batch = np.random.default_rng(0).random((3, 20, 20, 3)).astype(np.float32)
    np.testing.assert_allclose(text_pipe.embed_images(batch), text_pipe.embed_images(list(batch)), rtol=1e-5)


def test_a_long_text_truncates_at_the_models_positions(tmp_path):
    """A model with fewer positions (16) than the embedding max_length (80) truncates there, not errors."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from bridge_export.runtime.manifest import SpecialTokens, TextConventions
    from bridge_export.runtime.text import TextCodec

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import word_tokenizer

    conv = TextConventions(SpecialTokens(bos=1, eos=2, pad=0))
    manifest = SimpleNamespace(special_tokens=conv.special_tokens, prompts=conv.prompts,
                               dims=SimpleNamespace(max_positions=16))
    codec = TextCodec(word_tokenizer(128, tmp_path / "tokenizer.json"), manifest)
    ids = codec.embedding_ids(["a cat " * 1000])
    assert ids.shape == (1, 16) and ids[0, 0] == 1 and ids[0, -1] == 2


def test_partly_unknown_words_warn(text_pipe, caplog):
    with caplog.at_level("WARNING"):
        e = text_pipe.embed_texts(["a zebra cat"])
    assert np.isfinite(e).all() and "unknown to the tokenizer" in caplog.text


def test_min_new_tokens_default_adapts_to_a_small_max(text_pipe):
    caps = text_pipe.captions([np.zeros((4, 4))], max_new_tokens=3, num_beams=2)  # default min 8 > 3
    assert len(caps) == 1 and len(caps[0].tokens) <= 3
    assert "".join(text_pipe.caption_stream(np.zeros((4, 4)), max_new_tokens=2)) is not None


def test_captions_run_in_bounded_batches(text_pipe, monkeypatch):
    rows = []
    dec = text_pipe.sessions["text_decoder"]
    real = dec.run

    def spy(feeds, **kw):
        rows.append(len(feeds["input_ids"]))
        return real(feeds, **kw)

    monkeypatch.setattr(dec, "run", spy)
    images = [np.full((4, 4), 40 * i, np.uint8) for i in range(7)]
    caps = text_pipe.captions(images, max_new_tokens=2, num_beams=1, batch_size=3)
    assert len(caps) == 7 and max(rows) == 3  # the scheduler keeps at most batch_size rows decoding
    monkeypatch.setattr(dec, "run", real)
    assert caps == [text_pipe.captions([im], max_new_tokens=2, num_beams=1)[0] for im in images]


LOAD = [
    ("threads 10**6", dict(threads=10 ** 6), ValueError, "threads must be an integer from 1 to"),
    ("threads 0", dict(threads=0), ValueError, "threads must be"),
    ("threads float", dict(threads=2.5), ValueError, "threads must be"),
    ("unknown backend", dict(backend="cuda"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("kw,exc,match", [r[1:] for r in LOAD], ids=[r[0] for r in LOAD])
def test_bad_load_arguments(tiny_bundle, kw, exc, match):
    with pytest.raises(exc, match=match):
        runtime.load(tiny_bundle, **kw)


def test_tensorrt_backend_without_tensorrt(tiny_bundle):
    from bridge_export.runtime.errors import UserError
    from bridge_export.runtime.backends import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here: this checks the message where it is not")

    with pytest.raises(UserError, match="needs TensorRT, which is not installed"):
        runtime.load(tiny_bundle, backend="tensorrt")


def test_use_after_close(tiny_bundle):
    p = runtime.load(tiny_bundle)
    p.close()
    for call in (lambda: p.encode_image(X), lambda: p.encode_text(IDS), lambda: p.generate(X, IDS, max_new_tokens=2)):
        with pytest.raises(PipelineClosed, match="closed: call runtime.load"):
            call()


def _edit(key_path, value=None, delete=False):
    def edit(m):
        node = m
        for k in key_path[:-1]:
            node = node[k]
        if delete:
            del node[key_path[-1]]
        else:
            node[key_path[-1]] = value
    return edit


# (edit, re-seal the digest as another tool writing the manifest would, message)
MANIFEST_EDITS = [
    ("mean changed", _edit(["preprocessing", "mean"], [0.5, 0.5, 0.5]), False, "was edited after export"),
    ("eos changed", _edit(["special_tokens", "eos"], 5), False, "was edited after export"),
    ("prefix changed", _edit(["prompts", "text_embedding", "prefix"], "describe:"), False, "was edited after export"),
    ("mean deleted", _edit(["preprocessing", "mean"], delete=True), False, "was edited after export"),
    ("bos missing", _edit(["special_tokens", "bos"], delete=True), True, r"special_tokens lacks \['bos'\]"),
    ("image size missing", _edit(["preprocessing", "image_size"], delete=True), True,
     r"preprocessing lacks \['image_size'\]"),
    ("graphs missing", _edit(["graphs"], delete=True), True, r"lacks \['graphs'\]"),
    ("eos not a number", _edit(["special_tokens", "eos"], "two"), True, "special_tokens.eos must be int"),
]


@pytest.mark.parametrize("edit,reseal,match", [r[1:] for r in MANIFEST_EDITS], ids=[r[0] for r in MANIFEST_EDITS])
def test_edited_manifest_detected(tiny_bundle, tmp_path, edit, reseal, match):
    import json
    import shutil

    from bridge_export.runtime import BundleError
    from bridge_export.runtime.manifest import manifest_digest

    b = tmp_path / "b"
    b.mkdir()
    for f in tiny_bundle.iterdir():  # link the big files, copy the manifest
        (b / f.name).symlink_to(f) if f.name != "manifest.json" else shutil.copy(f, b / f.name)
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    if reseal:
        m["manifest_sha256"] = manifest_digest(m)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match) as e:
        runtime.load(b)
    assert "\n" not in str(e.value)
