"""Accuracy of a reduced-precision bundle against its fp32 source, on held-out inputs."""
from __future__ import annotations

import numpy as np

from .calibration import record_feeds


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine over the leading axis (the whole tensor when 1-D; 1.0 when empty)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[None]
    b2 = b.reshape(b.shape[0], -1) if b.ndim > 1 else b[None]
    if a2.size == 0:
        return 1.0
    num = (a2 * b2).sum(1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def accuracy_report(ref_pipe, new_pipe, images, texts=None, caption_tokens: int = 8) -> dict:
    """Per graph (cosine, max abs error per output) and end to end (embeddings, zero-shot top-1, captions)."""
    from runtime.preprocess import preprocess

    feeds = record_feeds(ref_pipe, images, texts)
    graphs = {}
    for name, runs in feeds.items():
        worst_cos, worst_err = 1.0, 0.0
        for f in runs[:6]:
            a, b = ref_pipe.sessions[name].run(f), new_pipe.sessions[name].run(f)
            for k in a:
                if a[k].size:
                    worst_cos = min(worst_cos, min_row_cosine(a[k], b[k]))
                    worst_err = max(worst_err, float(np.abs(a[k] - b[k]).max()))
        graphs[name] = {"min_cosine": round(worst_cos, 6), "max_abs_error": float(f"{worst_err:.4g}")}
    pix = preprocess(list(images), ref_pipe.preprocessing)
    e2e = {}
    for mode in ("InternVL-C", "InternVL-G"):
        e2e[f"image_embeds_{mode[-1]}_cosine"] = round(min_row_cosine(ref_pipe.encode_image(pix, mode),
                                                                 new_pipe.encode_image(pix, mode)), 6)
    if texts and ref_pipe.codec.tok:
        ids = ref_pipe.codec.embedding_ids(texts[:16])
    else:
        rng = np.random.default_rng(1)
        vocab = ref_pipe.manifest.model["qllama_config"]["vocab_size"]
        ids = rng.integers(3, vocab, (8, 10)).astype(np.int64)
        ids[:, 0] = ref_pipe.special["bos"]
    t_ref, t_new = ref_pipe.encode_text(ids), new_pipe.encode_text(ids)
    e2e["text_embeds_cosine"] = round(min_row_cosine(t_ref, t_new), 6)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    top_ref = (norm(ref_pipe.encode_image(pix)) @ norm(t_ref).T).argmax(1)
    top_new = (norm(new_pipe.encode_image(pix)) @ norm(t_new).T).argmax(1)
    e2e["zero_shot_top1_agreement"] = float((top_ref == top_new).mean())
    prompt = np.array([[ref_pipe.special["bos"]]], np.int64)
    if ref_pipe.codec.tok:
        prompt = ref_pipe.codec.prompt_ids(ref_pipe.manifest["prompts"]["caption"]["prompt"])
    prompts = np.repeat(prompt, len(pix), 0)
    g_ref = ref_pipe.generate(pix, prompts, max_new_tokens=caption_tokens)
    g_new = new_pipe.generate(pix, prompts, max_new_tokens=caption_tokens)
    e2e["caption_token_agreement"] = float((g_ref == g_new).mean())
    return {"graphs": graphs, "end_to_end": e2e, "held_out_images": len(images)}


def format_report(rep: dict, mode: str) -> str:
    """The report as printed after every precision step."""
    lines = [f"accuracy of the {mode} bundle against fp32 ({rep['held_out_images']} held-out images):"]
    for name, g in rep["graphs"].items():
        lines.append(f"  {name:<16} min cosine {g['min_cosine']:.6f}   max abs error {g['max_abs_error']:.3g}")
    for k, v in rep["end_to_end"].items():
        lines.append(f"  {k:<34} {v:.6f}" if isinstance(v, float) else f"  {k:<34} {v}")
    return "\n".join(lines)
