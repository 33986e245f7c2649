"""Image preprocessing identical to the original's torchvision transforms, in PIL + numpy.

retrieval:       Resize((S, S), BICUBIC) -> ToTensor -> Normalize(ImageNet mean/std)
classification:  Resize(S, BICUBIC) (shorter side) -> CenterCrop(S) -> ToTensor -> Normalize
torchvision's Resize on a PIL image is PIL's own bicubic resize, and CenterCrop's offsets are
int(round((size - S) / 2)); both are reproduced here without torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class ImageError(ValueError):
    """An image that cannot be read or converted."""


def to_pil(image) -> Image.Image:
    """A path, PIL image, uint8 array (H,W[,C]) or float array in [0, 1] -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read image {image}: {e}") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # CHW -> HWC
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating):
                raise ImageError(f"integer image arrays must be uint8, got {a.dtype}")
            if a.size and (a.min() < 0 or a.max() > 1):
                raise ImageError("float image arrays must hold values in [0, 1]")
            a = np.round(a * 255).astype(np.uint8)
        if a.ndim not in (2, 3):
            raise ImageError(f"image arrays must be (H, W) or (H, W, C), got shape {image.shape}")
        return Image.fromarray(a).convert("RGB")
    raise ImageError(f"unsupported image type {type(image).__name__}: give a path, PIL image or numpy array")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size) (shorter side) + CenterCrop(size)."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
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
