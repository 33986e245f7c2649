"""Calibration and held-out inputs: images from a folder, texts from a file, feeds recorded from the runtime.

Feeds for every graph come from running the fp32 bundle's own pipeline on the user's images
and texts, with each session wrapped by a recorder, so calibration sees exactly the tensors
deployment will see: the vision encoder and bridge on every image, the decoder on the caption
prefill (prompt after the visual prefix) and on each greedy decode step, and on text-embedding
passes (P = 0, right-padded batches of mixed lengths).

Texts: the user's `--calib-texts`, else a built-in varied set (exporter/data/calibration_texts.txt:
captions, questions, numbers, several scripts, short and long). A bundle without a tokenizer, or
whose tokenizer knows too few of the built-in words (mostly <unk>), gets token-id sequences of
varied lengths instead, and the report says so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.sessions import Session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class CalibrationError(UserError, ValueError):
    """Calibration data that cannot be used: the message says what to give instead."""


def read_image_folder(folder, limit: int | None = None) -> list:
    """Readable RGB images from `folder` (sorted); raises for a missing, empty or unreadable folder.

    Read as the runtime reads images (runtime.preprocess.to_pil): special files (a FIFO would block),
    decompression bombs and unreadable files are skipped, transparency is composited the same way.
    """
    from bridge_export.runtime.preprocess import ImageError, to_pil

    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calib {folder} is not a folder: give a folder of .png/.jpg images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"--calib {folder} holds no images (.png/.jpg/...): add some representative images")
    images, bad = [], []
    for p in files[:limit] if limit else files:
        try:
            images.append(to_pil(p))
        except ImageError:
            bad.append(p.name)
    if not images:
        raise CalibrationError(f"--calib {folder}: none of its {len(files)} images could be read ({bad[:3]}...)")
    return images


def read_texts(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"--calib-texts {p} is not a file: give a text file, one text per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"--calib-texts {p} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
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


def builtin_texts() -> list[str]:
    """The built-in varied calibration texts (one per line of exporter/data/calibration_texts.txt)."""
    from importlib import resources

    text = resources.files("bridge_export.exporter").joinpath("data/calibration_texts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_held_out(items: list, every: int = 4) -> tuple[list, list]:
    """(calibration, held-out): every `every`-th item (at least one) is held out for measuring accuracy."""
    if len(items) < 2:
        return list(items), list(items)
    held = items[::every]
    return [x for i, x in enumerate(items) if i % every], held


def text_batches(pipe, texts: list[str] | None, seed: int = 0, batch: int = 8) -> tuple[list[np.ndarray], str]:
    """Right-padded id batches for the text-embedding path, and where they came from.

    Tokenized texts when the bundle has a tokenizer that knows most of their words; otherwise
    token ids of varied lengths (2 to 40, BOS first, EOS last) drawn from the vocabulary.
    """
    if texts and pipe.codec.tok:
        known = pipe.codec.known_fraction(texts)
        if known >= 0.5:  # texts with no known word would embed as nothing (and are refused): left out
            usable = [t for t in texts if pipe.codec.known_fraction([t]) > 0]
            ids = [pipe.codec.embedding_ids(usable[i:i + batch]) for i in range(0, len(usable), batch)]
            return ids, f"{len(usable)} texts"
        source = f"token ids (the tokenizer knows only {known:.0%} of the texts' tokens)"
    else:
        source = "token ids (no tokenizer in the bundle)" if texts else "token ids"
    vocab = pipe.manifest.dims.vocab_size
    rng = np.random.default_rng(seed)
    n = len(texts) if texts else 32
    longest = max(3, min(40, pipe.max_positions))
    out = []
    for i in range(0, n, batch):
        lens = rng.integers(2, longest + 1, min(batch, n - i))
        rows = np.zeros((len(lens), int(lens.max())), np.int64)
        for r, L in enumerate(lens):
            rows[r, :L] = rng.integers(3, vocab, L)
            rows[r, 0], rows[r, L - 1] = pipe.special.bos, pipe.special.eos
        out.append(rows)
    return out, f"{n} {source}, lengths 2-{longest}"


def record_feeds(pipe, images, texts: list[str] | None, max_new_tokens: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    """Run embeddings, caption prefill + greedy decode steps, and text embeddings through `pipe`,
    returning every graph's feeds (texts as in `text_batches`)."""
    originals = dict(pipe.sessions)
    recorders = {k: Recorder(s) for k, s in originals.items()}
    pipe.sessions.update(recorders)
    try:
        from bridge_export.runtime.preprocess import preprocess

        pix = preprocess(list(images), pipe.preprocessing)
        for i in range(0, len(pix), 4):
            batch = pix[i:i + 4]
            pipe.encode_image(batch, "InternVL-G")
            prompt = (pipe.codec.prompt_ids(pipe.manifest.prompts.caption.prompt) if pipe.codec.tok
                      else np.array([[pipe.special.bos]], np.int64))
            pipe.generate(batch, np.repeat(prompt, len(batch), 0), max_new_tokens=max_new_tokens)
        for ids in text_batches(pipe, texts, seed)[0]:
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

    def __iter__(self):
        """Iterate over the feeds (onnxruntime's qdq_loss_debug iterates readers)."""
        self.rewind()
        return iter(self.get_next, None)
