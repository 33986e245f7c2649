"""Calibration and held-out inputs: images from a folder, texts from a file, feeds recorded from the runtime.

Feeds for every graph come from running the fp32 bundle's own pipeline on the user's images
and texts, with each session wrapped by a recorder, so calibration sees exactly the tensors
deployment will see (the decoder included, at P = 0 for texts and with the visual prefix for
captions).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.sessions import Session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class CalibrationError(ValueError):
    """Calibration data that cannot be used: the message says what to give instead."""


def read_image_folder(folder, limit: int | None = None) -> list:
    """Readable RGB images from `folder` (sorted); raises for a missing, empty or unreadable folder."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calib {folder} is not a folder: give a folder of .png/.jpg images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"--calib {folder} holds no images (.png/.jpg/...): add some representative images")
    images, bad = [], []
    for p in files[:limit] if limit else files:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError):
            bad.append(p.name)
    if not images:
        raise CalibrationError(f"--calib {folder}: none of its {len(files)} images could be read ({bad[:3]}...)")
    return images


def read_texts(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"--calib-texts {p} is not a file: give a text file, one text per line")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"--calib-texts {p} is empty")
    return lines


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images, used as held-out inputs when the user gave none."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.random((4, 4, 3))
        img = np.kron(low, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
        out.append(np.clip(img + 0.1 * rng.standard_normal(img.shape), 0, 1).astype(np.float32))
    return out


class Recorder(Session):
    """Wraps a session and keeps a copy of every feed it runs."""

    def __init__(self, inner: Session):
        self.inner, self.name = inner, inner.name
        self.inputs, self.output_names = inner.inputs, inner.output_names
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feeds):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(feeds)


def record_feeds(pipe, images, texts: list[str] | None, max_new_tokens: int = 4) -> dict[str, list[dict]]:
    """Run embeddings and short greedy captions through `pipe`, returning every graph's feeds."""
    originals = dict(pipe.sessions)
    recorders = {k: Recorder(s) for k, s in originals.items()}
    pipe.sessions.update(recorders)
    try:
        from runtime.preprocess import preprocess

        pix = preprocess(list(images), pipe.preprocessing)
        for i in range(0, len(pix), 4):
            batch = pix[i:i + 4]
            pipe.encode_image(batch, "InternVL-G")
            prompt = (pipe.codec.prompt_ids(pipe.manifest.prompts.caption.prompt) if pipe.codec.tok
                      else np.array([[pipe.special.bos]], np.int64))
            pipe.generate(batch, np.repeat(prompt, len(batch), 0), max_new_tokens=max_new_tokens)
        if texts and pipe.codec.tok:
            for i in range(0, len(texts), 8):
                pipe.encode_text(pipe.codec.embedding_ids(texts[i:i + 8]))
        else:  # no tokenizer or texts: random token ids still exercise the text path at P = 0
            vocab = pipe.manifest.dims.vocab_size
            rng = np.random.default_rng(0)
            ids = rng.integers(3, vocab, (4, 12)).astype(np.int64)
            ids[:, 0] = pipe.special.bos
            pipe.encode_text(ids)
    finally:
        pipe.sessions.update(originals)
    return {k: r.feeds for k, r in recorders.items()}


def shape_groups(feeds: list[dict[str, np.ndarray]]) -> list[list[dict[str, np.ndarray]]]:
    """Feeds grouped by shape signature (prefill, decode steps and text passes of the decoder differ).

    onnxruntime's histogram calibrators stack the activations of one collect_data call into one
    array, so each call must see one shape; their histograms merge across calls. A merge with an
    empty tensor fails (the text pass has an empty past, so empty attention scores), so only the
    largest such group is kept, and it goes first, where an empty tensor starts a histogram.
    """
    groups: dict[tuple, list] = {}
    for f in feeds:
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(f.items())), []).append(f)
    empty = sorted((g for g in groups.values() if any(v.size == 0 for v in g[0].values())), key=len, reverse=True)
    full = [g for g in groups.values() if all(v.size for v in g[0].values())]
    return empty[:1] + full


class FeedReader:
    """onnxruntime CalibrationDataReader over recorded feeds (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], progress=None, name: str = ""):
        self.feeds, self.i, self.progress, self.name = feeds, 0, progress, name

    def get_next(self):
        """The next recorded feed, or None when all were given."""
        if self.i >= len(self.feeds):
            return None
        if self.progress:
            self.progress(f"[calibrate] {self.name}: batch {self.i + 1}/{len(self.feeds)}")
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        """Start again from the first feed."""
        self.i = 0
