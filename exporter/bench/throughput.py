"""`bridge-export bench`: runtime throughput and memory, with the PyTorch reference side by side.

Both sides run in this one process on the same inputs and thread count, and their runs are
interleaved (runtime, reference, runtime, ...) with the best of several kept for each, so a
shared machine whose speed drifts affects both alike and the printed ratios stay comparable.
"""
from __future__ import annotations

import resource
import time
from typing import Callable

import numpy as np

from bridge_export.runtime.kv_cache import CachedDecoder, FusedCachedDecoder, KVCache, SharedKVCache
from bridge_export.runtime.progress import get_logger

log = get_logger(__name__)

Task = Callable[[], object]


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far of this process (or, with RUSAGE_CHILDREN, its largest child), in MB."""
    return resource.getrusage(who).ru_maxrss / 1024


def interleaved_best(tasks: list[Task], repeats: int = 5) -> list[float]:
    """Best wall time of each task, running them in turn `repeats` times after one warm-up each."""
    for t in tasks:
        t()
    best = [float("inf")] * len(tasks)
    for _ in range(repeats):
        for i, t in enumerate(tasks):
            t0 = time.perf_counter()
            t()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def runtime_tasks(pipe, pasts: list[int], steps: int, image_batch: int = 8, text_batch: int = 16) -> dict:
    """metric -> (task, units per call) for the runtime."""
    dims, kv = pipe.manifest.dims, pipe.manifest.kv_layout
    s = dims.image_size
    rng = np.random.default_rng(0)
    pix = rng.standard_normal((image_batch, 3, s, s), dtype=np.float32)
    ids = rng.integers(3, dims.vocab_size, (text_batch, 12)).astype(np.int64)
    ids[:, 0] = 1
    prompt = np.array([[1, 5, 6, 7, 8]], np.int64)
    tasks = {"images_per_s": (lambda: pipe.encode_image(pix, "InternVL-C"), image_batch),
             "texts_per_s": (lambda: pipe.encode_text(ids), text_batch),
             "ttft_s": (lambda: next(iter(pipe.iter_generate(pix[:1], prompt, max_new_tokens=1))), None)}
    H, L, Dh = kv.num_heads, kv.num_layers, kv.head_dim
    for past in pasts:
        prefix = [rng.standard_normal((1, H, past, Dh), dtype=np.float32) for _ in range(2 * L)]

        def run(prefix=prefix, past=past):
            if pipe.fused_step is not None:  # onnxruntime target: the shared buffer, `past` slots filled
                cache = SharedKVCache(L, 1, H, past + steps + 1, Dh,
                                      pipe.sessions["text_decoder"].inputs[kv.past(0)[0]].dtype)
                cache.write_prefix(prefix)
                dec = FusedCachedDecoder(pipe.fused_step, cache, prompt[:, :1], np.ones((1, 1), np.int64))
            else:
                dec = CachedDecoder(pipe.sessions["text_decoder"], pipe.kv_names, KVCache(prefix, past + steps + 1),
                                    prompt[:, :1], np.ones((1, 1), np.int64))
                dec.next_pos = np.array([[past]])
            tok = np.array([5])
            for _ in range(steps):
                tok = dec.step(tok, None).argmax(-1)

        tasks[f"decode_tok_s@{past}"] = (run, steps)
    return tasks


def reference_tasks(model, pasts: list[int], steps: int, image_batch: int = 8, text_batch: int = 16) -> dict:
    """The same tasks on the PyTorch reference (eager, concatenating KV cache)."""
    import torch

    from bridge_export.reference_model.heads import additive_mask
    from bridge_export.reference_model.model import _TorchDecoder

    cfg = model.config
    q = cfg.qllama
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(image_batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(3, q.vocab_size, (text_batch, 12), generator=g)
    ids[:, 0] = 1
    prompt = torch.tensor([[1, 5, 6, 7, 8]])
    tasks = {"images_per_s": (lambda: model.encode_image(pix, "InternVL-C"), image_batch),
             "texts_per_s": (lambda: model.encode_text(ids), text_batch),
             "ttft_s": (lambda: _TorchDecoder(model, pix[:1], prompt, torch.ones_like(prompt), True).prefill(), None)}
    trunk, head = model.qllama.model, model.qllama.lm_head
    for past in pasts:
        kv0 = [(torch.randn(1, q.num_attention_heads, past, q.head_dim, generator=g),
                torch.randn(1, q.num_attention_heads, past, q.head_dim, generator=g))
               for _ in range(q.num_hidden_layers)]

        @torch.no_grad()
        def run(kv0=kv0, past=past):
            kv, tok, n = kv0, torch.tensor([[5]]), past
            for _ in range(steps):
                mask = additive_mask(torch.ones(1, n + 1, dtype=torch.long), 1)
                h, new = trunk(trunk.embed_tokens(tok), torch.tensor([[n]]), mask, past=kv)
                kv = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(kv, new)]
                tok = head(h[:, -1]).argmax(-1, keepdim=True)
                n += 1

        tasks[f"decode_tok_s@{past}"] = (run, steps)
    return tasks


def _figure(seconds: float, units) -> float:
    return seconds if units is None else units / seconds


def format_table(rt: dict, ref: dict | None) -> str:
    """Side-by-side table with runtime/reference ratios (for ttft_s: reference time / runtime time)."""
    lines = [f"{'metric':<24} {'runtime':>12} {'reference':>12} {'ratio':>8}"]
    for k, v in rt.items():
        r = ref.get(k) if ref else None
        ratio = "" if not r or k.startswith("peak") else f"{(r / v if k == 'ttft_s' else v / r):.2f}x"
        lines.append(f"{k:<24} {v:>12.4g} {(f'{r:.4g}' if r else '-'):>12} {ratio:>8}")
    decs = [k for k in rt if k.startswith("decode_tok_s@")]
    if len(decs) >= 2:
        lines.append(f"runtime per-token time at past {decs[-1].split('@')[1]} vs {decs[0].split('@')[1]}: "
                     f"{rt[decs[0]] / rt[decs[-1]]:.2f}x (target <= 1.5x)")
    if ref:
        lines.append("ratio = runtime / reference throughput; runs interleaved, best of 5 each")
        lines.append("peak_rss_mb: runtime = process peak before the reference model existed; "
                     "reference = process peak after it ran")
    return "\n".join(lines)


def logits_cosine(ref_pipe, new_pipe, steps: int = 8, seed: int = 0) -> float:
    """Smallest cosine between the two bundles' logits over a teacher-forced greedy caption."""
    s = ref_pipe.preprocessing.image_size
    pix = np.random.default_rng(seed).standard_normal((2, 3, s, s), dtype=np.float32)
    prompt = np.array([[1, 5, 6, 7]] * 2, np.int64)
    from bridge_export.exporter.quantize.accuracy import logits_cosine as teacher_forced

    return min(1.0, teacher_forced(ref_pipe, new_pipe, pix, prompt, steps))


def compare_bundles(pipe, others: list, pasts: list[int], steps: int, repeats: int = 3) -> str:
    """Decode speed (interleaved with `pipe`'s) and logits cosine of other bundles, e.g. int8-cpu."""
    lines = [f"{'bundle':<24} {'precision':<9} " + " ".join(f"{'tok/s@' + str(p):>12}" for p in pasts)
             + f" {'speedup':>8} {'logits cos':>11}"]
    base_tasks = runtime_tasks(pipe, pasts, steps)
    for other in others:
        log.info(f"[bench] comparing {other.manifest.root.name}")
        other_tasks = runtime_tasks(other, pasts, steps)
        rates = {}
        for p in pasts:
            key = f"decode_tok_s@{p}"
            a, b = interleaved_best([base_tasks[key][0], other_tasks[key][0]], repeats=repeats)
            rates[p] = (steps / a, steps / b)
        lines.append(f"{pipe.manifest.root.name:<24} {pipe.manifest.precision.mode:<9} "
                     + " ".join(f"{rates[p][0]:>12.1f}" for p in pasts) + f" {'1.00x':>8} {1.0:>11.6f}")
        lines.append(f"{other.manifest.root.name:<24} {other.manifest.precision.mode:<9} "
                     + " ".join(f"{rates[p][1]:>12.1f}" for p in pasts)
                     + f" {rates[pasts[0]][1] / rates[pasts[0]][0]:>7.2f}x {logits_cosine(pipe, other):>11.6f}")
    lines.append(f"speedup = greedy decode tokens/s at past {pasts[0]} against the first bundle, measured "
                 f"interleaved in this run (best of {repeats})")
    return "\n".join(lines)


def run_bench(bundle, reference: Callable[[], object] | None = None, threads: int | None = None,
              pasts=(16, 256, 1024), steps: int = 16, compare=(), repeats: int = 3) -> dict:
    """Run and print the benchmark. `reference` is a zero-argument loader of the PyTorch model (or None)."""
    from bridge_export import runtime

    pasts = list(pasts)
    pipe = runtime.load(bundle, threads=threads)
    bad = [p for p in pasts if p + steps + 1 > pipe.max_positions]
    if bad:
        raise ValueError(f"past lengths {bad} + {steps} steps exceed max_position_embeddings {pipe.max_positions}")
    rt_tasks = runtime_tasks(pipe, pasts, steps)
    for name, (task, _) in rt_tasks.items():
        log.info(f"[bench] runtime warm-up: {name}")
        task()
    rt_peak = peak_rss_mb()
    ref_tasks, ref_peak = None, None
    if reference is not None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        model = reference().float().eval()
        ref_tasks = reference_tasks(model, pasts, steps)
        for name, (task, _) in ref_tasks.items():
            log.info(f"[bench] reference warm-up: {name}")
            with torch.no_grad():
                task()
        ref_peak = peak_rss_mb()
    rt, ref = {}, ({} if ref_tasks else None)
    for name, (task, units) in rt_tasks.items():
        log.info(f"[bench] timing {name}")
        if ref_tasks:
            import torch

            with torch.no_grad():
                a, b = interleaved_best([task, ref_tasks[name][0]])
            rt[name], ref[name] = _figure(a, units), _figure(b, ref_tasks[name][1])
        else:
            rt[name] = _figure(interleaved_best([task])[0], units)
    rt["peak_rss_mb"] = rt_peak
    if ref is not None:
        ref["peak_rss_mb"] = ref_peak
    print(format_table(rt, ref))
    if compare:
        print()
        print(compare_bundles(pipe, [runtime.load(b, threads=threads) for b in compare], pasts, steps, repeats))
    return {"runtime": rt, "reference": ref}
