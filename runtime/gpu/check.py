"""Check the device KV cache on a real GPU against the host cache: `python -m bridge_export.runtime.gpu.check`.

Needs only numpy and cuda-python (no TensorRT, no onnxruntime-gpu, no torch). With QLLaMA's
decoder shape (32 layers, 32 heads x 128) and 5 beams, it writes the visual prefix, a prompt and
then one token per step into bridge_export.runtime.gpu.kv_cache.DeviceKVCache on the GPU (bridge_export.runtime.gpu.cuda.CudaMemory)
and into bridge_export.runtime.kv_cache.KVCache in numpy, with beam repeat and random reorders, downloads the
device buffers every few steps and compares them exactly (these are copies: any difference is a
bug). It prints the largest difference, the bytes that crossed between host and device inside the
cache's own calls (must be 0 after the prefix), and PASS or FAIL; exit status 0 only on PASS.
With `--bundle DIR` and onnxruntime's CUDA provider present, it also decodes a bundle with
device="cuda:0" against device="cpu" and prints the host<->device bytes per decode step.
Takes well under 5 minutes on a data-center GPU (most of it numpy on the host side).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

log = logging.getLogger("bridge_export.runtime.gpu.check")


def check_cache(memory, layers: int, heads: int, head_dim: int, beams: int, queries: int, prompt: int,
                steps: int, dtype, seed: int = 0, compare_every: int = 5) -> dict:
    """Run write / repeat / reorder on the device cache and the host cache; return the differences."""
    from bridge_export.runtime.gpu.kv_cache import DeviceKVCache
    from bridge_export.runtime.gpu.memory import Traffic
    from bridge_export.runtime.kv_cache import KVCache

    rng = np.random.default_rng(seed)
    cap = queries + prompt + steps
    prefix = [rng.standard_normal((1, heads, queries, head_dim)).astype(dtype) for _ in range(2 * layers)]
    host = KVCache(prefix, cap)
    before = memory.traffic.snapshot()
    dev = DeviceKVCache(prefix, cap, memory)
    prefix_up = (memory.traffic - before).up
    in_cache_calls = Traffic()
    worst, compared, t_dev = 0.0, 0, 0.0

    def compare():
        nonlocal worst, compared
        for h, d in zip(host.buffers, dev.buffers):
            worst = max(worst, float(np.max(np.abs(memory.download(d).astype(np.float32) - h))))
        feed = host.attention_feed(np.ones((host.rows, 1), np.int64))  # what a decode step would be fed
        if not np.array_equal(dev.mask, host.mask) or dev.length != host.length \
                or not np.array_equal(memory.download(dev.dmask), feed):
            worst = float("inf")
        compared += 1

    def timed(fn, *args):
        nonlocal in_cache_calls, t_dev
        snap, t0 = memory.traffic.snapshot(), time.perf_counter()
        fn(*args)
        memory.sync()
        t_dev += time.perf_counter() - t0
        d = memory.traffic - snap
        in_cache_calls.up += d.up
        in_cache_calls.down += d.down

    def write(T):
        new = [rng.standard_normal((host.rows, heads, T, head_dim)).astype(dtype) for _ in range(2 * layers)]
        mask = np.ones((host.rows, T), np.int64)
        host.write(new, mask)
        bufs = [memory.upload(a) for a in new]  # stands in for the decoder's outputs on the device
        if T == 1:
            timed(dev.write, bufs, mask)
        else:  # the prompt: its mask goes up, once per request (counted with the prefix)
            snap = memory.traffic.snapshot()
            dev.write(bufs, mask)
            nonlocal prefix_up
            prefix_up += (memory.traffic - snap).up
        for b in bufs:
            memory.release(b)

    try:
        compare()  # the prefix, and zeroed free slots
        write(prompt)
        host.repeat(beams)
        timed(dev.repeat, beams)
        compare()
        for step in range(steps):
            src = rng.integers(0, beams, beams)
            host.reorder(src)
            timed(dev.reorder, src)
            write(1)
            if (step + 1) % compare_every == 0 or step == steps - 1:
                compare()
    finally:
        dev.close()
    return {"dtype": np.dtype(dtype).name, "max_abs_diff": worst, "comparisons": compared,
            "prefix_bytes_up": prefix_up, "cache_call_bytes": (in_cache_calls.up, in_cache_calls.down),
            "cache_kv_bytes": 2 * layers * beams * heads * cap * head_dim * np.dtype(dtype).itemsize,
            "device_seconds_in_cache_calls": t_dev}


def check_bundle(bundle: str, device: str, beams: int, max_new: int) -> dict:
    """Teacher-forced decode of a bundle on `device` and on the CPU (same tokens and beam reorders fed to
    both): the largest logits difference over all steps, and the host<->device bytes of each GPU step."""
    from bridge_export import runtime

    rng = np.random.default_rng(0)
    with runtime.load(bundle) as cpu, runtime.load(bundle, device=device) as gpu:
        s = cpu.preprocessing.image_size
        x = rng.standard_normal((1, 3, s, s), dtype=np.float32)
        ids = np.array([[1] + list(rng.integers(3, 100, 5))])
        feeds = [(rng.integers(3, 100, beams), rng.integers(0, beams, beams)) for _ in range(max_new)]
        worst, scale, per_step = 0.0, 0.0, []
        with cpu._decoder(x, ids, None, max_new, beams) as a, gpu._decoder(x, ids, None, max_new, beams) as b:
            la, lb = a.prefill(), b.prefill()
            a.expand(beams)
            b.expand(beams)
            for tokens, src in feeds:
                worst, scale = max(worst, float(np.max(np.abs(la - lb)))), max(scale, float(np.max(np.abs(la))))
                past, snap = b.cache.length, gpu.memory.traffic.snapshot()
                la, lb = a.step(tokens, src), b.step(tokens, src)
                d = gpu.memory.traffic - snap
                per_step.append((past, d.up, d.down))
            worst = max(worst, float(np.max(np.abs(la - lb))))
    return {"max_logits_diff": worst, "logits_scale": scale, "per_step": per_step}


def main(argv=None) -> int:
    """Command line: run the checks, print PASS/FAIL; 0 on PASS, 1 on FAIL, 2 when no GPU is usable."""
    ap = argparse.ArgumentParser(prog="python -m bridge_export.runtime.gpu.check", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or 'host' to rehearse on the host stand-in")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bundle", help="also decode this bundle with onnxruntime's CUDA provider against the CPU")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bridge_export.runtime.gpu.cuda import CudaError, CudaMemory, device_info, parse_device

    if args.device == "host":  # a rehearsal of the same code on bridge_export.runtime.gpu.memory.HostMemory
        from bridge_export.runtime.gpu.memory import HostMemory

        memory = HostMemory()
        log.info("host stand-in (no GPU): checks the logic and the host side's time, not CUDA")
    else:
        try:
            ordinal = parse_device(args.device)
            memory = CudaMemory(ordinal)
            name, cc = device_info(ordinal)
        except (CudaError, ValueError) as e:
            print(f"FAIL: {e}", file=sys.stderr)
            return 2
        import cuda.bindings

        log.info("GPU %s (compute capability %s), cuda-bindings %s", name, cc, cuda.bindings.__version__)
    ok = True
    with memory:
        for dtype in (np.float32, np.float16):
            r = check_cache(memory, args.layers, args.heads, args.head_dim, args.beams, args.queries, args.prompt,
                            args.steps, dtype)
            good = r["max_abs_diff"] == 0.0 and r["cache_call_bytes"] == (0, 0)
            ok &= good
            log.info("%s device cache %s: max |device - host| = %g over %d comparisons; prefix up %d bytes once; "
                     "host<->device bytes inside write/repeat/reorder: up %d, down %d (cache holds %d bytes); "
                     "%.3f s in those calls", "PASS" if good else "FAIL", r["dtype"], r["max_abs_diff"],
                     r["comparisons"], r["prefix_bytes_up"], *r["cache_call_bytes"], r["cache_kv_bytes"],
                     r["device_seconds_in_cache_calls"])
    if args.bundle:
        import onnxruntime as ort

        if args.device != "host" and "CUDAExecutionProvider" not in ort.get_available_providers():
            log.info("SKIP bundle decode: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        else:
            r = check_bundle(args.bundle, memory if args.device == "host" else args.device, args.beams, 10)
            same_bytes = len({(u, d) for _, u, d in r["per_step"]}) == 1
            good = r["max_logits_diff"] <= 1e-3 * max(1.0, r["logits_scale"]) and same_bytes
            ok &= good
            log.info("%s bundle decode on %s vs cpu: max |logits diff| %g (logits up to %g); bytes per step the "
                     "same at every past length: %s", "PASS" if good else "FAIL", args.device, r["max_logits_diff"],
                     r["logits_scale"], same_bytes)
            for past, up, down in r["per_step"]:
                log.info("  past %4d: %d bytes up, %d bytes down", past, up, down)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
