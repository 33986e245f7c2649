"""Preprocessing equals the original's torchvision transforms, written out independently here."""
import numpy as np
import pytest
from PIL import Image

from bridge_export.runtime.manifest import Preprocessing
from bridge_export.runtime.preprocess import ImageError, preprocess

CFG = Preprocessing(image_size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _expected(im: Image.Image, crop: bool) -> np.ndarray:
    """torchvision: Resize((S,S)) or Resize(S)+CenterCrop(S) on PIL (PIL bicubic), ToTensor, Normalize."""
    S = 32
    if crop:
        w, h = im.size
        if w < h:
            size = (S, int(S * h / w))
        else:
            size = (int(S * w / h), S)
        im = im.resize(size, Image.BICUBIC)
        top, left = int(round((size[1] - S) / 2.0)), int(round((size[0] - S) / 2.0))
        im = im.crop((left, top, left + S, top + S))
    else:
        im = im.resize((S, S), Image.BICUBIC)
    t = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
    return (t - np.array(CFG.mean, np.float32)[:, None, None]) / np.array(CFG.std, np.float32)[:, None, None]


@pytest.mark.parametrize("crop", [False, True])
@pytest.mark.parametrize("size", [(50, 40), (40, 77), (32, 32)])
def test_matches_torchvision_semantics(crop, size):
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    got = preprocess([im], CFG, crop=crop)[0]
    np.testing.assert_allclose(got, _expected(im, crop), atol=1e-6)


def test_inputs_agree_across_types(tmp_path):
    arr = (np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)
    p = tmp_path / "x.png"
    Image.fromarray(arr).save(p)
    a = preprocess([arr], CFG)
    for other in (Image.fromarray(arr), str(p), p, arr.astype(np.float32) / 255.0):
        np.testing.assert_allclose(preprocess([other], CFG), a, atol=1e-6)


def test_grayscale_becomes_rgb():
    g = (np.random.default_rng(2).random((8, 8)) * 255).astype(np.uint8)
    x = preprocess([g], CFG)[0]
    # the three channels hold the same pixels, only mean/std differ
    raw = x * np.array(CFG.std)[:, None, None] + np.array(CFG.mean)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-6)


def test_bad_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageError, match="cannot read image"):
        preprocess([bad], CFG)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        preprocess([np.full((4, 4, 3), 3.0)], CFG)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], CFG)


def test_equals_the_original_torchvision_transforms():
    """Outputs of the original InternVL transforms, produced by torchvision 0.29 (tests/data/make_*.py)."""
    from pathlib import Path

    fx = np.load(Path(__file__).parents[1] / "data" / "torchvision_transforms.npz")
    n = sum(k.startswith("image_") for k in fx.files)
    assert n == 5
    for i in range(n):
        img = fx[f"image_{i}"]
        np.testing.assert_allclose(preprocess([img], CFG)[0], fx[f"retrieval_{i}"], atol=1e-5, err_msg=str(i))
        np.testing.assert_allclose(preprocess([img], CFG, crop=True)[0], fx[f"classification_{i}"], atol=1e-5,
                                   err_msg=str(i))
