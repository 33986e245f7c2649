"""Every PIL mode is read by its meaning (not clipped), and unreadable images get one clear ImageError.

Table-driven: one row per mode or bad image; a new case is one line.
"""
import numpy as np
import pytest
from PIL import Image

from bridge_export.runtime.preprocess import BACKGROUND, ImageError, to_pil

GRAY = 0.25  # every image below shows this gray level (or pure white where transparent)


def _gray_u8():
    return np.full((6, 5), round(GRAY * 255), np.uint8)


def _alpha(mode):
    a = np.full((6, 5), 255, np.uint8)
    a[:, 0] = 0  # first column fully transparent -> background
    return a


# (name, make a PIL image, expected RGB of pixel (row 0, col 1) and of a transparent pixel (row 0, col 0))
def _i16():
    return Image.fromarray(np.full((6, 5), round(GRAY * 65535), np.uint16))  # I;16: 16-bit PNGs


def _i16_png(tmp):
    p = tmp / "16bit.png"
    _i16().save(p)
    return p


def _i32():
    return Image.fromarray(np.full((6, 5), round(GRAY * 65535), np.int32))  # I holding 16-bit values


def _i32_8bit():
    return Image.fromarray(np.full((6, 5), round(GRAY * 255), np.int32))  # I holding 8-bit values


def _f01():
    return Image.fromarray(np.full((6, 5), GRAY, np.float32))  # F in [0, 1]


def _f255():
    return Image.fromarray(np.full((6, 5), GRAY * 255, np.float32))  # F in [0, 255]


def _palette_transparent():
    im = Image.fromarray(_gray_u8()).convert("P")
    im = im.copy()
    a = np.asarray(im).copy()
    a[:, 0] = 7  # a palette index marked transparent
    im2 = Image.fromarray(a, "P")
    im2.putpalette(im.getpalette())
    im2.info["transparency"] = 7
    return im2


def _cmyk():
    v = round((1 - GRAY) * 255)  # K only
    return Image.fromarray(np.stack([np.zeros((6, 5), np.uint8)] * 3 + [np.full((6, 5), v, np.uint8)], -1), "CMYK")


def _la():
    return Image.fromarray(np.stack([_gray_u8(), _alpha("LA")], -1), "LA")


def _rgba():
    rgb = np.stack([_gray_u8()] * 3, -1)
    rgb[:, 0] = 0  # transparent pixels hold black: they must show the background, not black
    return Image.fromarray(np.concatenate([rgb, _alpha("RGBA")[..., None]], -1), "RGBA")


def _one_bit():
    return Image.fromarray(np.zeros((6, 5), bool)).convert("1")


def _l():
    return Image.fromarray(_gray_u8())


def _ycbcr():
    return Image.fromarray(np.stack([_gray_u8()] * 3, -1)).convert("YCbCr")


WHITE = BACKGROUND
CASES = [
    ("I;16", _i16, GRAY, None),
    ("I (16-bit values)", _i32, GRAY, None),
    ("I (8-bit values)", _i32_8bit, GRAY, None),
    ("F [0,1]", _f01, GRAY, None),
    ("F [0,255]", _f255, GRAY, None),
    ("P + transparency", _palette_transparent, GRAY, WHITE),
    ("CMYK", _cmyk, GRAY, None),
    ("LA", _la, GRAY, WHITE),
    ("RGBA", _rgba, GRAY, WHITE),
    ("1", _one_bit, 0.0, None),
    ("L", _l, GRAY, None),
    ("YCbCr", _ycbcr, GRAY, None),
    ("uint16 array", lambda: np.full((6, 5), round(GRAY * 65535), np.uint16), GRAY, None),
    ("float CHW array", lambda: np.full((3, 6, 5), GRAY, np.float32), GRAY, None),
    ("bool array", lambda: np.zeros((6, 5), bool), 0.0, None),
]


@pytest.mark.parametrize("name,make,gray,transparent", CASES, ids=[c[0] for c in CASES])
def test_mode_read_by_its_meaning(name, make, gray, transparent):
    rgb = np.asarray(to_pil(make()))
    assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[0, 1].astype(int) - round(gray * 255)).max() <= 2, rgb[0, 1]
    if transparent is not None:
        assert tuple(rgb[0, 0]) == transparent


def test_16bit_png_file_is_not_white(tmp_path):
    rgb = np.asarray(to_pil(_i16_png(tmp_path)))
    assert abs(int(rgb.mean()) - round(GRAY * 255)) <= 2


def _bomb(tmp):
    p = tmp / "bomb.png"
    Image.new("L", (1, 1)).save(p)
    return p, lambda mp: mp.setattr(Image, "MAX_IMAGE_PIXELS", 0)  # any image exceeds 2x0 pixels


def _truncated(tmp):
    p = tmp / "cut.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    return p, None


def _not_an_image(tmp):
    p = tmp / "notes.png"
    p.write_text("hello")
    return p, None


def _missing(tmp):
    return tmp / "missing.png", None


def _directory(tmp):
    return tmp, None


BAD = [
    ("decompression bomb", _bomb, "decompression bomb"),
    ("truncated file", _truncated, "cannot read image"),
    ("not an image", _not_an_image, "cannot read image"),
    ("missing file", _missing, "cannot read image"),
    ("a directory", _directory, "cannot read image"),
    ("empty array", lambda t: (np.zeros((0, 5, 3), np.uint8), None), "no pixels"),
    ("empty PIL image", lambda t: (Image.new("RGB", (0, 0)), None), "no pixels"),
    ("NaN array", lambda t: (np.full((4, 4), np.nan, np.float32), None), "NaN"),
    ("inf array", lambda t: (np.full((4, 4), np.inf, np.float32), None), "NaN or infinite"),
    ("float array above 1", lambda t: (np.full((4, 4), 3.0, np.float32), None), r"\[0, 1\]"),
    ("negative float array", lambda t: (np.full((4, 4), -0.5), None), r"\[0, 1\]"),
    ("int32 array", lambda t: (np.zeros((4, 4), np.int32), None), "uint8 or uint16"),
    ("5 channels", lambda t: (np.zeros((6, 6, 5), np.uint8), None), "shape"),
    ("4-D array", lambda t: (np.zeros((1, 4, 4, 3), np.uint8), None), "shape"),
    ("a list", lambda t: ([[0, 1]], None), "unsupported image type"),
]


@pytest.mark.parametrize("name,make,match", BAD, ids=[c[0] for c in BAD])
def test_bad_image_gets_one_clear_error(tmp_path, monkeypatch, name, make, match):
    image, patch = make(tmp_path)
    if patch:
        patch(monkeypatch)
    with pytest.raises(ImageError, match=match) as e:
        to_pil(image)
    assert "\n" not in str(e.value)
