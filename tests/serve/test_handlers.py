"""bridge_export.runtime.serve.handlers: the request handlers every Triton front end wraps, checked against the Python API."""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from bridge_export import runtime
from bridge_export.runtime.serve.handlers import Handlers, RequestError
from bridge_export.runtime.serve.scheduler import Scheduler


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


@pytest.fixture(scope="module", params=["static", "step"])
def caption_served(request, tiny_text_bundle):
    """Handlers with static batching, and with the step-level scheduler running on its thread."""
    pipe = runtime.load(tiny_text_bundle)
    sch = None
    if request.param == "step":
        sch = Scheduler(pipe, rows=6)  # the default caption takes 5 beams
        sch.start()
    yield pipe, Handlers(pipe, scheduler=sch)
    if sch is not None:
        sch.close()
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


def test_caption_defaults_and_options_equal_pipeline(caption_served):
    pipe, h = caption_served
    a, b = _png(11), _png(12)
    pa, pb = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
    out = h.caption([{"image": _col(a)},
                     {"image": _col(b), "prompt": _col(b"a photo of"), "max_new_tokens": np.array([[10]], np.int32),
                      "num_beams": np.array([[2]], np.int32)}])
    assert out[0]["text"][0, 0].decode() == pipe.caption(pa).text
    assert out[1]["text"][0, 0].decode() == pipe.caption(pb, "a photo of", max_new_tokens=10, num_beams=2).text
    too_long = h.caption([{"image": _col(a), "max_new_tokens": np.array([[100000]], np.int32)}])
    assert isinstance(too_long[0], RequestError) and "positions exceeds" in str(too_long[0])


def test_bad_caption_request_fails_alone(caption_served):
    pipe, h = caption_served
    a, b = _png(13), _png(14)
    out = h.caption([{"image": _col(a)}, {"image": _col(b), "max_new_tokens": np.array([[100000]], np.int32)},
                     {"image": _col(b"not an image")}, {"image": _col(b), "num_beams": np.array([[2]], np.int32)}])
    assert out[0]["text"][0, 0].decode() == pipe.caption(Image.open(io.BytesIO(a))).text
    assert isinstance(out[1], RequestError) and "max_new_tokens" in str(out[1])
    assert isinstance(out[2], RequestError) and "not a readable image" in str(out[2])
    assert out[3]["text"][0, 0].decode() == pipe.caption(Image.open(io.BytesIO(b)), num_beams=2).text


def test_caption_stream_from_the_shared_batch(tiny_text_bundle):
    pipe = runtime.load(tiny_text_bundle)
    sch = Scheduler(pipe, rows=6)
    sch.start()
    h = Handlers(pipe, scheduler=sch)
    images = [_png(30 + i) for i in range(3)]

    async def collect(req):
        return [r["text"][0, 0].decode() async for r in h.caption_stream_steps(req)]

    async def many():  # three streams at once, with a caption decoding beside them
        cap = asyncio.get_running_loop().run_in_executor(None, h.caption, [{"image": _col(images[0])}])
        streams = await asyncio.gather(*(collect({"image": _col(im)}) for im in images))
        return streams, await cap

    streams, cap = asyncio.run(many())
    for im, pieces in zip(images, streams):
        assert pieces and "".join(pieces) == "".join(pipe.caption_stream(Image.open(io.BytesIO(im))))
    assert cap[0]["text"][0, 0].decode() == pipe.caption(Image.open(io.BytesIO(images[0]))).text
    with pytest.raises(RequestError, match="beam"):
        asyncio.run(collect({"image": _col(images[0]), "num_beams": np.array([[3]], np.int32)}))
    with pytest.raises(RequestError, match="positions exceeds"):
        asyncio.run(collect({"image": _col(images[0]), "max_new_tokens": np.array([[100000]], np.int32)}))
    assert sch.stats.requests_done >= 4 and sch.stats.ttft_count >= 4
    sch.close()
    pipe.close()


def test_caption_stream_equals_pipeline_stream(served):
    pipe, h = served
    a = _png(21)
    pieces = [r["text"][0, 0].decode() for r in h.caption_stream({"image": _col(a)})]
    assert pieces and "".join(pieces) == "".join(pipe.caption_stream(Image.open(io.BytesIO(a))))
    with pytest.raises(RequestError, match="beam"):
        list(h.caption_stream({"image": _col(a), "num_beams": np.array([[3]], np.int32)}))
