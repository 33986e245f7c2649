"""Augmentation and typeset digits for the demo model (numpy + Pillow only)."""
import numpy as np

from bridge_export.reference_model import digit_styles as styles


def _digit() -> np.ndarray:
    a = np.zeros((8, 8), np.uint8)
    a[1:7, 3:5] = 255  # a "one": a vertical bar
    return styles.upsample(a[None])[0]


def _centre_of_ink(a: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(a > 100)
    return np.array([ys.mean(), xs.mean()])


def test_augment_varies_position_size_and_stroke_but_keeps_the_digit():
    base = _digit()
    out = styles.augment(np.repeat(base[None], 200, 0), np.random.default_rng(0))
    assert out.shape == (200, styles.CANVAS, styles.CANVAS) and out.dtype == np.uint8
    centres = np.array([_centre_of_ink(a) for a in out])
    ink = (out > 100).sum((1, 2))
    assert centres[:, 1].std() > 1.0 and centres[:, 0].std() > 1.0  # moved about
    assert ink.min() > 5 and ink.max() > 1.8 * ink.min()  # never erased; size/stroke vary
    assert len({a.tobytes() for a in out}) == 200


def test_augment_strength_zero_keeps_the_digit_centred_and_upright():
    base = _digit()
    out = styles.augment(np.repeat(base[None], 20, 0), np.random.default_rng(1), strength=0.0)
    for a in out:
        assert np.abs(_centre_of_ink(a) - (styles.CANVAS - 1) / 2).max() < 2.0
        assert _centre_of_ink(a).shape == (2,) and (a > 100).sum() >= (base > 100).sum() * 0.7


def test_pillow_font_renders_every_digit_differently():
    font = styles.pillow_font(48)
    glyphs = [styles.centered(styles.glyph(font, d)) for d in range(10)]
    assert all(g.max() == 255 for g in glyphs)
    assert len({(g > 127).tobytes() for g in glyphs}) == 10


def test_render_labels_each_font_and_digit():
    font = styles.pillow_font(40)
    images, labels, which = styles.render([font, font], per_font=2, seed=0)
    assert images.shape == (40, styles.CANVAS, styles.CANVAS)
    assert np.bincount(labels).tolist() == [4] * 10 and np.bincount(which).tolist() == [20, 20]
    assert (images.reshape(40, -1).max(1) > 150).all()
