"""Image preprocessing identical to the original's torchvision transforms, in PIL + numpy.

retrieval:       Resize((S, S), BICUBIC) -> ToTensor -> Normalize(ImageNet mean/std)
classification:  Resize(S, BICUBIC) (shorter side) -> CenterCrop(S) -> ToTensor -> Normalize
torchvision's Resize on a PIL image is PIL's own bicubic resize, and CenterCrop's offsets are
int(round((size - S) / 2)); both are reproduced here without torch.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from bridge_export.runtime.errors import UserError


class ImageError(UserError, ValueError):
    """An image that cannot be read or converted."""


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a page or viewer shows them
MAX_RESIZED_PIXELS = 1 << 26  # the shorter-side resize of `crop` may make at most this many pixels (64 Mpx)


def check_regular_file(path, what: str = "input file", error=None) -> Path:
    """`path` if it is a regular file (after links); FIFOs, sockets and devices are refused before they are
    opened (opening a FIFO blocks until a writer appears; a device may never end)."""
    error = error or ImageError
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"cannot read {what} {path}: it does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise error(f"cannot read {what} {path}: it is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise error(f"cannot read {what} {path}: it is {kind}; give a regular file (special files are not read)")
    return Path(path)


def _describe(image) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"{type(image).__name__} image"


def to_pil(image) -> Image.Image:
    """A path, PIL image, or array (H,W[,C] or C,H,W; uint8, uint16, bool, or float in [0, 1]) -> RGB PIL image.

    Every PIL mode is read by its meaning, not clipped: 16-bit (I;16*, and I holding 0..65535) is scaled to
    8 bits, F (float) must hold [0, 1] or [0, 255], palette images with transparency, LA, RGBA and PA are
    composited on white (BACKGROUND), CMYK and YCbCr are converted. A decompression bomb (more pixels than
    PIL.Image.MAX_IMAGE_PIXELS; Pillow itself only warns up to twice that, here it is refused), a
    truncated file, a FIFO, socket or device, or an image without pixels raises ImageError.
    """
    if isinstance(image, (str, Path)):
        check_regular_file(image, "image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(image) as im:
                    return _pil_to_rgb(im, image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"cannot read image {image}: it has more pixels than Pillow allows "
                             f"({Image.MAX_IMAGE_PIXELS}); a decompression bomb, or raise PIL.Image.MAX_IMAGE_PIXELS "
                             "if you trust it") from e
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some corrupt headers
            raise ImageError(f"cannot read image {image}: {e}") from e
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(f"unsupported image type {type(image).__name__}: give a path, PIL image or numpy array")


def _pil_to_rgb(im: Image.Image, source) -> Image.Image:
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{_describe(source)} has no pixels ({im.width}x{im.height})")
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im is source else im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        top = 65535 if mode.startswith("I;16") or a.max() > 255 else 255
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{_describe(source)} is a 32-bit integer image with values outside 0..65535: "
                             "convert it to 8 or 16 bits")
        return Image.fromarray(np.round(a * (255.0 / top)).astype(np.uint8)).convert("RGB")
    if mode == "F":
        return _array_to_rgb(np.asarray(im, np.float32), source)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV
    except ValueError as e:
        raise ImageError(f"{_describe(source)}: Pillow cannot convert mode {mode} to RGB ({e})") from e


def _array_to_rgb(image: np.ndarray, source=None) -> Image.Image:
    a = image
    what = _describe(source) if source is not None else f"image array of shape {list(image.shape)}"
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
        raise ImageError(f"image arrays must be (H, W), (H, W, C) or (C, H, W) with C in 1-4, got shape "
                         f"{list(image.shape)}")
    if a.size == 0 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{what} has no pixels")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ImageError(f"integer image arrays must be uint8 or uint16, got {a.dtype}: convert with "
                             "a.astype(np.uint8) after scaling to 0..255")
        if not np.isfinite(a).all():
            raise ImageError(f"{what} holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255 or (hi > 1 and source is None):
            raise ImageError(f"float image arrays must hold values in [0, 1], got [{lo:g}, {hi:g}]")
        a = np.round(a * (255.0 if hi <= 1 else 1.0)).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] in (2, 4):  # with alpha: composite on the background
        return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(a), "LA" if a.shape[-1] == 2 else "RGBA"), what)
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size) (shorter side) + CenterCrop(size)."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    if new_long * size > MAX_RESIZED_PIXELS:  # a 1 x 100000 strip would become size x (size * 100000)
        raise ImageError(f"image of {w}x{h} pixels is too elongated to crop: resizing its shorter side to {size} "
                         f"would make {size}x{new_long} pixels; crop it to a less extreme aspect ratio first")
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    im = im.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def preprocess(images, config, crop: bool = False) -> np.ndarray:
    """Images -> pixel_values float32 (N, 3, S, S) as the manifest's `Preprocessing` prescribes."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given: pass at least one")
    size = config.image_size
    mean = np.asarray(config.mean, np.float32)[:, None, None]
    std = np.asarray(config.std, np.float32)[:, None, None]
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, img in enumerate(images):
        im = to_pil(img)
        im = resize_center_crop(im, size) if crop else im.resize((size, size), Image.BICUBIC)
        x = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (x - mean) / std
    return out
