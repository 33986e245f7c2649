"""A client's bad request gets one line back, never the server's traceback or paths.

The PyTriton callables are run directly (PyTriton itself needs its own venv) and their error is
formatted exactly as PyTriton formats it for the client: traceback.format_exception(None, e,
e.__traceback__). Table-driven: one row per bad request.
"""
import traceback

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.serve.client_errors import ClientError, ServerError, clean_errors
from bridge_export.runtime.serve.handlers import Handlers
from bridge_export.runtime.serve.pytriton_server import _batch_fn, _stream_fn


def _b(*items):
    return np.array([[x] for x in items], dtype=object)


def _png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


# (id, model, request, message regex)
BAD = [
    ("empty image", "embed_image", {"image": _b(b"")}, "input 'image' is empty"),
    ("not an image", "embed_image", {"image": _b(b"GIF89a garbage")}, "not a readable image file"),
    ("unknown mode", "embed_image", {"image": _b(_png()), "mode": _b(b"X")}, "'mode' must be C or G"),
    ("text not UTF-8", "embed_text", {"text": _b(b"\xff\xfe")}, "not UTF-8 text"),
    ("empty text", "embed_text", {"text": _b(b"")}, "empty string"),
    ("missing input", "embed_text", {}, "missing input 'text'"),
    ("caption 0 tokens", "caption", {"image": _b(_png()), "max_new_tokens": np.array([[0]], np.int32)},
     "max_new_tokens"),
    ("stream with beams", "caption_stream", {"image": _b(_png()), "num_beams": np.array([[3]], np.int32)},
     "beam search"),
]


@pytest.fixture(scope="module")
def handlers(tiny_text_bundle):
    pipe = runtime.load(tiny_text_bundle)
    yield Handlers(pipe)
    pipe.close()


def _client_text(e: BaseException) -> str:
    return "".join(traceback.format_exception(None, e, e.__traceback__))  # what PyTriton sends


@pytest.mark.parametrize("model,request_,match", [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_request_is_one_line_without_server_paths(handlers, model, request_, match):
    infer = _stream_fn(handlers) if model == "caption_stream" else _batch_fn(getattr(handlers, model))
    with pytest.raises(ClientError, match=match) as e:
        out = infer([request_])
        if model == "caption_stream":
            list(out)
    text = _client_text(e.value)
    assert text.count("\n") == 1 and "Traceback" not in text and 'File "' not in text, text


def test_a_bug_is_logged_on_the_server_and_reported_as_internal(caplog):
    @clean_errors
    def infer(requests):
        return {}["missing"]

    with pytest.raises(ServerError, match=r"internal error \(KeyError\); see the server's log") as e:
        infer([{}])
    assert "Traceback" not in _client_text(e.value)
    assert "KeyError" in caplog.text and any(r.exc_info for r in caplog.records)
