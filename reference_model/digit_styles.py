"""Digit images in many styles: augmentation of handwriting and digits typeset in fonts.

The demo model is trained on scikit-learn's handwritten digits made varied here (shifts,
scaling, stroke width by dilation/erosion, slight rotation, blur, noise, contrast), and
judged on digits typeset in fonts it never saw. Everything works on square uint8 images,
white ink on black (as load_digits), `CANVAS` pixels wide; numpy and Pillow only. Ink
polarity is not augmented by default (the model expects light digits on a dark ground):
`invert_p` makes dark-on-light variants.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CANVAS = 32  # side of the generated images; the model resizes them to its own input size

# Fonts for the held-out style: the DejaVu family (fonts-dejavu, or matplotlib's copy). Never trained on.
DEJAVU_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/TTF"),
               Path("/usr/share/fonts/dejavu")]


def upsample(images: np.ndarray, size: int = CANVAS) -> np.ndarray:
    """(N, h, w) uint8 -> (N, size, size) uint8 by bicubic resizing (load_digits' 8x8 -> CANVAS)."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _ink_box(a: np.ndarray, thresh: int = 40) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(a > thresh)
    if len(xs) == 0:
        return None
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def place(im: Image.Image, rng: np.random.Generator, scale=(0.6, 1.0), rotate=10.0, shift: float = 1.0,
          size: int = CANVAS) -> Image.Image:
    """Rotate slightly, scale the ink's box to a random fraction of the frame and put it at a random spot."""
    im = im.rotate(float(rng.uniform(-rotate, rotate)), resample=Image.BILINEAR, expand=True)
    a = np.asarray(im)
    box = _ink_box(a)
    if box is None:
        return Image.new("L", (size, size))
    glyph = im.crop(box)
    gw, gh = glyph.size
    target = rng.uniform(*scale) * size  # the glyph's longer side
    aspect = rng.uniform(0.85, 1.15)  # a little wider or narrower
    k = target / max(gw, gh)
    w = max(1, min(size, round(gw * k * aspect)))
    h = max(1, min(size, round(gh * k)))
    glyph = glyph.resize((w, h), Image.BILINEAR)
    cx = (size - w) / 2 + rng.uniform(-shift, shift) * (size - w) / 2
    cy = (size - h) / 2 + rng.uniform(-shift, shift) * (size - h) / 2
    out = Image.new("L", (size, size))
    out.paste(glyph, (int(round(cx)), int(round(cy))))
    return out


def stroke(im: Image.Image, rng: np.random.Generator, p_thick=0.3, p_thin=0.2) -> Image.Image:
    """Thicker strokes (dilation, MaxFilter) or thinner ones (erosion, MinFilter), sometimes."""
    r = rng.random()
    if r < p_thick:
        im = im.filter(ImageFilter.MaxFilter(3))
    elif r < p_thick + p_thin:
        thin = im.filter(ImageFilter.MinFilter(3))
        if np.asarray(thin).max() > 100:  # never erase the digit
            im = thin
    return im


def finish(im: Image.Image, rng: np.random.Generator, invert_p: float = 0.5, noise: float = 12.0,
           blur_p: float = 0.3) -> np.ndarray:
    """Random contrast, blur, noise and ink polarity; uint8 array."""
    if rng.random() < blur_p:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    a = np.asarray(im, np.float32)
    if a.max() > 0:
        a = a / a.max()
    lo, hi = rng.uniform(0, 0.25 * noise / 12.0), rng.uniform(1.0 - 0.3 * noise / 12.0, 1.0)
    a = lo + (hi - lo) * a + rng.normal(0, noise / 255.0, a.shape) * (rng.random() < 0.5)
    if rng.random() < invert_p:
        a = 1.0 - a
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def augment(images: np.ndarray, rng: np.random.Generator, strength: float = 1.0, invert_p: float = 0.0) -> np.ndarray:
    """A random variant of each (N, S, S) uint8 digit image: position, size, rotation, stroke, contrast.

    `strength` in [0, 1] scales every random change (0: the digit centred, upright, as given), so
    training can start easy and end on the full range.
    """
    k = float(np.clip(strength, 0.0, 1.0))
    out = np.empty((len(images), CANVAS, CANVAS), np.uint8)
    for i, a in enumerate(images):
        im = Image.fromarray(a)
        if im.size != (CANVAS, CANVAS):
            im = im.resize((CANVAS, CANVAS), Image.BICUBIC)
        im = place(im, rng, scale=(1.0 - 0.4 * k, 1.0), rotate=10.0 * k, shift=k)
        im = stroke(im, rng, p_thick=0.3 * k, p_thin=0.2 * k)
        out[i] = finish(im, rng, invert_p * k, noise=12.0 * k, blur_p=0.3 * k)
    return out


def glyph(font: ImageFont.FreeTypeFont, digit: int, stroke_width: int = 0) -> Image.Image:
    """One digit drawn in `font`, white on black, cropped loosely around the ink."""
    size = font.size
    im = Image.new("L", (size * 3, size * 3))
    ImageDraw.Draw(im).text((size, size // 2), str(digit), fill=255, font=font, stroke_width=stroke_width,
                            stroke_fill=255)
    box = _ink_box(np.asarray(im))
    return im.crop(box) if box else im


def render(fonts: list[ImageFont.FreeTypeFont], per_font: int, seed: int, invert_p: float = 0.0):
    """Every digit in every font, `per_font` random renderings each: (images (N, CANVAS, CANVAS), labels, font idx)."""
    rng = np.random.default_rng(seed)
    images, labels, which = [], [], []
    for fi, font in enumerate(fonts):
        for digit in range(10):
            for _ in range(per_font):
                g = glyph(font, digit, stroke_width=int(rng.integers(0, 3)) if font.size >= 40 else 0)
                big = Image.new("L", (max(g.size) + 8,) * 2)
                big.paste(g, ((big.size[0] - g.size[0]) // 2, (big.size[1] - g.size[1]) // 2))
                im = stroke(place(big, rng, scale=(0.6, 1.0), rotate=8.0), rng, p_thick=0.15, p_thin=0.15)
                images.append(finish(im, rng, invert_p))
                labels.append(digit)
                which.append(fi)
    return np.stack(images), np.asarray(labels, np.int64), np.asarray(which, np.int64)


def dejavu_fonts(size: int = 48) -> list[tuple[str, ImageFont.FreeTypeFont]]:
    """The DejaVu typefaces installed on this machine (name, font); empty when there are none."""
    for d in DEJAVU_DIRS:
        files = sorted(d.glob("DejaVu*.ttf")) if d.is_dir() else []
        if files:
            return [(f.stem, ImageFont.truetype(str(f), size)) for f in files]
    try:  # matplotlib ships DejaVu Sans and friends
        import matplotlib

        d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        return [(f.stem, ImageFont.truetype(str(f), size)) for f in sorted(d.glob("DejaVu*.ttf"))]
    except ImportError:
        return []


def pillow_font(size: int = 48) -> ImageFont.FreeTypeFont:
    """The typeface Pillow ships inside itself (Aileron Regular, Pillow >= 10.1 with FreeType)."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("this Pillow has no FreeType support: pip install 'pillow>=10.1'")
    return font



def centered(im: Image.Image, size: int = CANVAS, fill: float = 0.8) -> np.ndarray:
    """A glyph scaled so its longer side is `fill` of a size x size black frame, centred: uint8 array."""
    w, h = im.size
    k = fill * size / max(w, h)
    im = im.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
    out = Image.new("L", (size, size))
    out.paste(im, ((size - im.size[0]) // 2, (size - im.size[1]) // 2))
    return np.asarray(out)
