"""Special files, extreme images and raw arrays are refused in one line, before they are opened or resized.

Table-driven: one row per bad input (how to make it under a temporary folder, the call, the message).
"""
import os
import signal
import socket

import numpy as np
import pytest
from PIL import Image

from bridge_export import runtime
from bridge_export.runtime.preprocess import ImageError, preprocess, to_pil


def _fifo(t):
    os.mkfifo(t / "pipe.png")  # opening it would block until a writer appears
    return t / "pipe.png"


def _socket(t):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(t / "sock.png"))
    return t / "sock.png"


def _device(t):
    return "/dev/zero"  # reading it never ends


def _folder(t):
    (t / "dir.png").mkdir()
    return t / "dir.png"


def _strip(t):  # 70000 x 1: cropping would resize the shorter side to 32 -> 2240000 x 32 pixels
    Image.new("RGB", (70000, 1)).save(t / "strip.png")
    return t / "strip.png"


def _over_limit(t):  # between 1x and 2x Pillow's pixel limit (lowered for the test): Pillow only warns
    Image.new("RGB", (150, 100)).save(t / "big.png")
    Image.MAX_IMAGE_PIXELS = 10_000  # 150 x 100 = 1.5x (restored by the fixture)
    return t / "big.png"


# (id, make(tmp) -> path, call(path), message regex)
FILES = [
    ("FIFO as image", _fifo, to_pil, "is a named pipe .FIFO.; give a regular file"),
    ("socket as image", _socket, to_pil, "is a socket"),
    ("device as image", _device, to_pil, "is a device"),
    ("folder as image", _folder, to_pil, "is a folder"),
    ("extreme aspect ratio cropped", _strip,
     lambda p: preprocess([p], runtime.manifest.Preprocessing(image_size=32), crop=True), "too elongated to crop"),
    ("1.5x Pillow's pixel limit", _over_limit, to_pil, "more pixels than Pillow allows"),
]


@pytest.fixture
def low_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after each row


@pytest.mark.parametrize("make,call,match", [r[1:] for r in FILES], ids=[r[0] for r in FILES])
def test_bad_files_refused_before_opening(tmp_path, low_pixel_limit, make, call, match):
    path = make(tmp_path)
    signal.alarm(20)  # a regression would hang on the FIFO or the device: fail instead
    try:
        with pytest.raises(ImageError, match=match) as e:
            call(path)
    finally:
        signal.alarm(0)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return runtime.load(tiny_bundle)


ARRAYS = [
    ("uint8 pixel_values", lambda p: p.encode_image(np.zeros((1, 3, 32, 32), np.uint8)),
     "normalised float pixels, got uint8.*preprocess.preprocess"),
    ("int64 pixel_values", lambda p: p.vision(np.full((1, 3, 32, 32), 255)), "got int64"),
]


@pytest.mark.parametrize("call,match", [r[1:] for r in ARRAYS], ids=[r[0] for r in ARRAYS])
def test_raw_arrays_refused(pipe, call, match):
    with pytest.raises(ValueError, match=match):
        call(pipe)
