"""Accuracy of a reduced-precision bundle against its fp32 source, on held-out inputs."""
from __future__ import annotations

import numpy as np

from runtime.numeric import min_row_cosine, normalize

from .calibration import record_feeds

__all__ = ["accuracy_report", "format_report", "min_row_cosine"]


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
        vocab = ref_pipe.manifest.dims.vocab_size
        ids = rng.integers(3, vocab, (8, 10)).astype(np.int64)
        ids[:, 0] = ref_pipe.special.bos
    t_ref, t_new = ref_pipe.encode_text(ids), new_pipe.encode_text(ids)
    e2e["text_embeds_cosine"] = round(min_row_cosine(t_ref, t_new), 6)
    top_ref = (normalize(ref_pipe.encode_image(pix)) @ normalize(t_ref).T).argmax(1)
    top_new = (normalize(new_pipe.encode_image(pix)) @ normalize(t_new).T).argmax(1)
    e2e["zero_shot_top1_agreement"] = float((top_ref == top_new).mean())
    prompt = np.array([[ref_pipe.special.bos]], np.int64)
    if ref_pipe.codec.tok:
        prompt = ref_pipe.codec.prompt_ids(ref_pipe.manifest.prompts.caption.prompt)
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
