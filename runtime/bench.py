"""`bridge-export bench`: runtime throughput and memory, with the PyTorch reference side by side.

Both sides run in this one process on the same inputs and thread count, so the printed ratios
are comparable even on a shared, noisy machine (each figure is the best of several repeats).
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Callable

import numpy as np

from .kv_cache import CachedDecoder, KVCache


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def runtime_figures(pipe, pasts: list[int], steps: int, image_batch: int = 8, text_batch: int = 16) -> dict:
    """Measure the runtime: images/s, texts/s, caption time to first token, decode tokens/s per past."""
    m = pipe.manifest.model
    q = m["qllama_config"]
    s = pipe.preprocessing["image_size"]
    rng = np.random.default_rng(0)
    pix = rng.standard_normal((image_batch, 3, s, s), dtype=np.float32)
    ids = rng.integers(3, q["vocab_size"], (text_batch, 12)).astype(np.int64)
    ids[:, 0] = 1
    prompt = np.array([[1, 5, 6, 7, 8]], np.int64)
    out = {}
    _say("[bench] runtime: image embeddings")
    out["images_per_s"] = image_batch / best_time(lambda: pipe.encode_image(pix, "InternVL-C"), repeats=3)
    _say("[bench] runtime: text embeddings")
    out["texts_per_s"] = text_batch / best_time(lambda: pipe.encode_text(ids), repeats=3)
    _say("[bench] runtime: caption time to first token")
    out["ttft_s"] = best_time(lambda: next(iter(pipe.iter_generate(pix[:1], prompt, max_new_tokens=1))), repeats=3)
    H, Dh, L = q["num_attention_heads"], q["hidden_size"] // q["num_attention_heads"], q["num_hidden_layers"]
    for past in pasts:
        _say(f"[bench] runtime: decode at past {past}")
        prefix = [rng.standard_normal((1, H, past, Dh), dtype=np.float32) for _ in range(2 * L)]

        def run():
            dec = CachedDecoder(pipe.sessions["text_decoder"], pipe.kv_names, KVCache(prefix, past + steps + 1),
                                prompt[:, :1], np.ones((1, 1), np.int64))
            dec.next_pos = np.array([[past]])
            tok = np.array([5])
            for _ in range(steps):
                tok = dec.step(tok, None).argmax(-1)

        out[f"decode_tok_s@{past}"] = steps / best_time(run, repeats=3)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def reference_figures(model, pasts: list[int], steps: int, image_batch: int = 8, text_batch: int = 16) -> dict:
    """The same measurements on the PyTorch reference (eager, concatenating KV cache)."""
    import torch

    from reference_model.heads import additive_mask
    from reference_model.model import _TorchDecoder

    cfg = model.config
    q = cfg.qllama
    s = cfg.image_size
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(image_batch, 3, s, s, generator=g)
    ids = torch.randint(3, q.vocab_size, (text_batch, 12), generator=g)
    ids[:, 0] = 1
    prompt = torch.tensor([[1, 5, 6, 7, 8]])
    out = {}
    with torch.no_grad():
        _say("[bench] reference: image embeddings")
        out["images_per_s"] = image_batch / best_time(lambda: model.encode_image(pix, "InternVL-C"), repeats=3)
        _say("[bench] reference: text embeddings")
        out["texts_per_s"] = text_batch / best_time(lambda: model.encode_text(ids), repeats=3)
        _say("[bench] reference: caption time to first token")
        out["ttft_s"] = best_time(lambda: _TorchDecoder(model, pix[:1], prompt, torch.ones_like(prompt), True)
                                  .prefill(), repeats=3)
        H, Dh = q.num_attention_heads, q.head_dim
        trunk, head = model.qllama.model, model.qllama.lm_head
        for past in pasts:
            _say(f"[bench] reference: decode at past {past}")
            kv0 = [(torch.randn(1, H, past, Dh, generator=g), torch.randn(1, H, past, Dh, generator=g))
                   for _ in range(q.num_hidden_layers)]

            def run():
                kv, tok, n = kv0, torch.tensor([[5]]), past
                for _ in range(steps):
                    mask = additive_mask(torch.ones(1, n + 1, dtype=torch.long), 1)
                    h, new = trunk(trunk.embed_tokens(tok), torch.tensor([[n]]), mask, past=kv)
                    kv = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(kv, new)]
                    tok = head(h[:, -1]).argmax(-1, keepdim=True)
                    n += 1

            out[f"decode_tok_s@{past}"] = steps / best_time(run, repeats=3)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def format_table(rt: dict, ref: dict | None) -> str:
    """Side-by-side table with runtime/reference ratios (higher is better except time and memory)."""
    lines = [f"{'metric':<24} {'runtime':>12} {'reference':>12} {'ratio':>8}"]
    for k, v in rt.items():
        r = ref.get(k) if ref else None
        ratio = ""
        if r:
            ratio = f"{(r / v if k in ('ttft_s',) else v / r):.2f}x" if k != "peak_rss_mb" else ""
        lines.append(f"{k:<24} {v:>12.4g} {(f'{r:.4g}' if r else '-'):>12} {ratio:>8}")
    decs = [k for k in rt if k.startswith("decode_tok_s@")]
    if len(decs) >= 2:
        first, last = rt[decs[0]], rt[decs[-1]]
        lines.append(f"runtime per-token time at {decs[-1].split('@')[1]} vs {decs[0].split('@')[1]}: "
                     f"{first / last:.2f}x (target <= 1.5x)")
    if ref:
        lines.append("ratio = runtime / reference throughput (for ttft_s: reference time / runtime time)")
        lines.append("peak_rss_mb is the process peak after each side ran (runtime first)")
    return "\n".join(lines)


def run_bench(bundle, reference=None, threads: int | None = None, pasts=(16, 256, 1024), steps: int = 16) -> dict:
    """Run and print the benchmark; returns {'runtime': {...}, 'reference': {...} | None}."""
    import runtime

    pasts = list(pasts)
    pipe = runtime.load(bundle, threads=threads)
    maxp = pipe.max_positions
    bad = [p for p in pasts if p + steps + 1 > maxp]
    if bad:
        raise ValueError(f"past lengths {bad} + {steps} steps exceed max_position_embeddings {maxp}")
    rt = runtime_figures(pipe, pasts, steps)
    ref = None
    if reference is not None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        ref = reference_figures(reference.float().eval(), pasts, steps)
    print(format_table(rt, ref))
    return {"runtime": rt, "reference": ref}
