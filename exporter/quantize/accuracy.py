"""Accuracy of a reduced-precision bundle against its fp32 source, on held-out inputs."""
from __future__ import annotations

import numpy as np

from bridge_export.runtime.numeric import min_row_cosine, normalize

from bridge_export.exporter.quantize.calibration import record_feeds

__all__ = ["accuracy_report", "format_report", "min_row_cosine", "output_cosines", "worst_cosine"]


def output_cosines(ref_session, new_session, feeds: list[dict]) -> tuple[dict[str, float], float]:
    """Smallest row cosine of every output of one graph over `feeds`, and the largest absolute error."""
    cos: dict[str, float] = {}
    worst_err = 0.0
    for f in feeds:
        a, b = ref_session.run(f), new_session.run(f)
        for k in a:
            if a[k].size:
                cos[k] = min(cos.get(k, 1.0), min_row_cosine(a[k], b[k]))
                worst_err = max(worst_err, float(np.abs(a[k] - b[k]).max()))
    return cos, worst_err


def logits_cosine(ref_pipe, new_pipe, pix: np.ndarray, prompts: np.ndarray, steps: int) -> float:
    """Smallest logits cosine over a caption prefill and `steps - 1` decode steps, both bundles fed the
    fp32 bundle's greedy tokens (teacher forcing, so one early flip does not hide later agreement)."""
    a, b = ref_pipe._decoder(pix, prompts, None, steps), new_pipe._decoder(pix, prompts, None, steps)
    la, lb = a.prefill(), b.prefill()
    worst = min_row_cosine(la, lb)
    for _ in range(steps - 1):
        tok = la.argmax(-1)
        la, lb = a.step(tok, None), b.step(tok, None)
        worst = min(worst, min_row_cosine(la, lb))
    return worst


def end_to_end_outputs(pipe, pix: np.ndarray, text_ids: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The user-visible embeddings: image C and G, and text (all text batches stacked)."""
    return {"image_embeds_C": pipe.encode_image(pix, "InternVL-C"), "image_embeds_G": pipe.encode_image(pix, "InternVL-G"),
            "text_embeds": np.concatenate([pipe.encode_text(ids) for ids in text_ids])}


def accuracy_report(ref_pipe, new_pipe, images, texts=None, caption_tokens: int = 8, seed: int = 1,
                    feeds: dict | None = None) -> dict:
    """Per graph (cosine of each output, max abs error) and end to end (embeddings, logits, zero-shot top-1,
    captions), on held-out `images` and `texts` (texts as in calibration.text_batches).

    `feeds`: those inputs' graph feeds if already recorded (`record_feeds(ref_pipe, images, texts, seed=seed)`)."""
    from bridge_export.runtime.preprocess import preprocess

    from bridge_export.exporter.quantize.calibration import text_batches

    feeds = record_feeds(ref_pipe, images, texts, seed=seed) if feeds is None else feeds
    graphs = {}
    for name, runs in feeds.items():
        cos, err = output_cosines(ref_pipe.sessions[name], new_pipe.sessions[name], runs[:8])
        graphs[name] = {"min_cosine": round(min(cos.values(), default=1.0), 6), "max_abs_error": float(f"{err:.4g}"),
                        "outputs": {k: round(v, 6) for k, v in cos.items()}}
    pix = preprocess(list(images), ref_pipe.preprocessing)
    ids, text_source = text_batches(ref_pipe, texts, seed)
    ref_out, new_out = end_to_end_outputs(ref_pipe, pix, ids), end_to_end_outputs(new_pipe, pix, ids)
    e2e = {f"{k}_cosine": round(min_row_cosine(ref_out[k], new_out[k]), 6) for k in ref_out}
    prompt = np.array([[ref_pipe.special.bos]], np.int64)
    if ref_pipe.codec.tok:
        prompt = ref_pipe.codec.prompt_ids(ref_pipe.manifest.prompts.caption.prompt)
    prompts = np.repeat(prompt, len(pix), 0)
    e2e["logits_cosine"] = round(logits_cosine(ref_pipe, new_pipe, pix, prompts, caption_tokens), 6)
    t_ref, t_new = ref_out["text_embeds"], new_out["text_embeds"]
    top_ref = (normalize(ref_out["image_embeds_C"]) @ normalize(t_ref).T).argmax(1)
    top_new = (normalize(new_out["image_embeds_C"]) @ normalize(t_new).T).argmax(1)
    e2e["zero_shot_top1_agreement"] = float((top_ref == top_new).mean())
    g_ref = ref_pipe.generate(pix, prompts, max_new_tokens=caption_tokens)
    g_new = new_pipe.generate(pix, prompts, max_new_tokens=caption_tokens)
    e2e["caption_token_agreement"] = float((g_ref == g_new).mean())
    return {"graphs": graphs, "end_to_end": e2e, "held_out_images": len(images), "held_out_texts": text_source}


def worst_cosine(rep: dict) -> tuple[str, float]:
    """The lowest cosine in a report (any graph output or end-to-end embedding/logits), with its name."""
    items = [(f"{g}.{k}", v) for g, r in rep["graphs"].items() for k, v in r["outputs"].items()]
    items += [(k, v) for k, v in rep["end_to_end"].items() if k.endswith("_cosine")]
    return min(items, key=lambda kv: kv[1], default=("", 1.0))


def format_report(rep: dict, mode: str) -> str:
    """The report as printed after every precision step: each output's cosine, then end to end."""
    lines = [f"accuracy of the {mode} bundle against fp32 ({rep['held_out_images']} held-out images, "
             f"held-out texts: {rep.get('held_out_texts', '-')}):"]
    for name, g in rep["graphs"].items():
        lines.append(f"  {name}  (max abs error {g['max_abs_error']:.3g})")
        outs = list(g.get("outputs", {}).items())
        for i in range(0, len(outs), 3):
            lines.append("    " + "   ".join(f"{k:<22} {v:.6f}" for k, v in outs[i:i + 3]))
    lines.append("  end to end")
    for k, v in rep["end_to_end"].items():
        lines.append(f"    {k:<32} {v:.6f}" if isinstance(v, float) else f"    {k:<32} {v}")
    return "\n".join(lines)
