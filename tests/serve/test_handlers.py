"""bridge_export.runtime.serve.handlers: the request handlers every Triton front end wraps, checked against the Python API."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bridge_export import runtime
from bridge_export.runtime.serve.handlers import Handlers, RequestError


def _png(seed: int, size=(40, 52)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _col(*items):
    return np.array([[x] for x in items], dtype=object)


@pytest.fixture(scope="module")
def served(tiny_text_bundle):
    pipe = runtime.load(tiny_text_bundle)
    yield pipe, Handlers(pipe)
    pipe.close()


def test_embed_image_matches_pipeline_per_request_and_mode(served):
    pipe, h = served
    imgs = [_png(i) for i in range(3)]
    pils = [Image.open(io.BytesIO(b)) for b in imgs]
    out = h.embed_image([{"image": _col(imgs[0], imgs[1])},  # two items in one request, mode unset (C)
                         {"image": _col(imgs[2]), "mode": _col(b"G")}])
    np.testing.assert_allclose(out[0]["embedding"], pipe.embed_images(pils[:2], "C"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1]["embedding"], pipe.embed_images(pils[2:], "G"), rtol=1e-5, atol=1e-6)
    assert out[0]["embedding"].dtype == np.float32 and out[0]["embedding"].shape == (2, 24)


def test_bad_requests_fail_alone(served):
    pipe, h = served
    good = _png(7)
    out = h.embed_image([{"image": _col(b"\x89PNG garbage")}, {"image": _col(good)},
                         {"image": _col(good), "mode": _col(b"X")}, {"image": _col(b"")},
                         {"image": np.array([[good, good]], dtype=object)}])
    assert isinstance(out[0], RequestError) and "not a readable image" in str(out[0])
    np.testing.assert_allclose(out[1]["embedding"], pipe.embed_images([Image.open(io.BytesIO(good))]), atol=1e-6)
    assert isinstance(out[2], RequestError) and "C or G" in str(out[2])
    assert isinstance(out[3], RequestError) and "empty" in str(out[3])
    assert isinstance(out[4], RequestError) and "[batch, 1]" in str(out[4])
    texts = h.embed_text([{"text": _col(b"\xff\xfe")}, {"text": _col(b"a photo of a cat")}, {"text": _col(b" ")}])
    assert isinstance(texts[0], RequestError) and "UTF-8" in str(texts[0])
    np.testing.assert_allclose(texts[1]["embedding"], pipe.embed_texts(["a photo of a cat"]), rtol=1e-5, atol=1e-6)
    assert isinstance(texts[2], RequestError)
    caps = h.caption([{"image": _col(good), "num_beams": np.array([[0]], np.int32)}])
    assert isinstance(caps[0], RequestError) and "num_beams" in str(caps[0])


def test_caption_defaults_and_options_equal_pipeline(served):
    pipe, h = served
    a, b = _png(11), _png(12)
    pa, pb = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
    out = h.caption([{"image": _col(a)},
                     {"image": _col(b), "prompt": _col(b"a photo of"), "max_new_tokens": np.array([[10]], np.int32),
                      "num_beams": np.array([[2]], np.int32)}])
    assert out[0]["text"][0, 0].decode() == pipe.caption(pa).text
    assert out[1]["text"][0, 0].decode() == pipe.caption(pb, "a photo of", max_new_tokens=10, num_beams=2).text
    too_long = h.caption([{"image": _col(a), "max_new_tokens": np.array([[100000]], np.int32)}])
    assert isinstance(too_long[0], RequestError) and "max_position_embeddings" in str(too_long[0])


def test_caption_stream_equals_pipeline_stream(served):
    pipe, h = served
    a = _png(21)
    pieces = [r["text"][0, 0].decode() for r in h.caption_stream({"image": _col(a)})]
    assert pieces and "".join(pieces) == "".join(pipe.caption_stream(Image.open(io.BytesIO(a))))
    with pytest.raises(RequestError, match="beam"):
        list(h.caption_stream({"image": _col(a), "num_beams": np.array([[3]], np.int32)}))
