"""Check the device KV cache on a real GPU against the host cache: `python -m bridge_export.runtime.gpu.check`.

Needs only numpy and cuda-python (no TensorRT, no onnxruntime-gpu, no torch). At QLLaMA's decoder shape
(32 layers, 32 heads x 128, the 96-token visual prefix) and 5 beams it checks, printing PASS or FAIL
per item (these are copies: any difference is a bug):

* geometry 2-D: the strided copy that writes a step's K/V into its slots of a (rows, heads, capacity,
  head_dim) buffer equals numpy's `buf[:, :, s:s+T] = new`, for a prompt and a one-token step;
* geometry 3-D: the copy that moves whole rows of every K/V tensor (beam repeat/reorder) equals numpy's
  row indexing on all 64 tensors at once;
* stream order: a chain of dependent asynchronous copies and memsets on the one stream, synchronised
  only at the end, gives numpy's result of the same sequence (nothing overtakes on the stream);
* device cache (fp32, fp16): bridge_export.runtime.gpu.kv_cache.DeviceKVCache on the GPU against
  bridge_export.runtime.kv_cache.KVCache in numpy through the prefix, a prompt, beam repeat and
  one token per step with random beam reorders; the device buffers and mask are downloaded every
  few steps and compared exactly, after the repeat and during the reorders separately; it also
  prints the bytes that crossed between host and device inside the cache's own calls (must be 0).

With `--bundle DIR` and onnxruntime's CUDA provider present, it also decodes a bundle with
device="cuda:0" against device="cpu" and prints the host<->device bytes per decode step. A bundle with
the fused decoder (onnxruntime target) is decoded through bridge_export.runtime.gpu.shared_kv.
DeviceSharedKVCache against the host SharedKVCache (GroupQueryAttention reading and appending to the
cudaMalloc'd buffer in place, beam repeat and reorder on the device); fp16 is the precision whose
GroupQueryAttention runs on CUDA (onnxruntime has no fp32 CUDA kernel for it). It also runs the step
scheduler's mixed call on both buffers (rows feeding 3, 1 and 0 tokens in one step, right-padded by
`query_seqlens`): the active rows' logits and every row's filled slots must agree.
`--time-limit` (default 540 s) stops the run with FAIL when exceeded; the full-shape run takes a
minute or two on a data-center GPU, most of it numpy on the host side. Exit status 0 only on PASS.
"""
from __future__ import annotations

import argparse
import logging
import os
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
    phases = {}  # the largest difference seen in each phase: prefix, repeat, reorder

    def compare(phase):
        nonlocal worst, compared
        diff = 0.0
        for h, d in zip(host.buffers, dev.buffers):
            diff = max(diff, float(np.max(np.abs(memory.download(d).astype(np.float32) - h))))
        feed = host.attention_feed(np.ones((host.rows, 1), np.int64))  # what a decode step would be fed
        if not np.array_equal(dev.mask, host.mask) or dev.length != host.length \
                or not np.array_equal(memory.download(dev.dmask), feed):
            diff = float("inf")
        worst, phases[phase] = max(worst, diff), max(phases.get(phase, 0.0), diff)
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
        compare("prefix")  # the prefix, and zeroed free slots
        write(prompt)
        host.repeat(beams)
        timed(dev.repeat, beams)
        compare("repeat")
        for step in range(steps):
            src = rng.integers(0, beams, beams)
            host.reorder(src)
            timed(dev.reorder, src)
            write(1)
            if (step + 1) % compare_every == 0 or step == steps - 1:
                compare("reorder")
    finally:
        dev.close()
    return {"dtype": np.dtype(dtype).name, "max_abs_diff": worst, "comparisons": compared, "phases": phases,
            "prefix_bytes_up": prefix_up, "cache_call_bytes": (in_cache_calls.up, in_cache_calls.down),
            "cache_kv_bytes": 2 * layers * beams * heads * cap * head_dim * np.dtype(dtype).itemsize,
            "device_seconds_in_cache_calls": t_dev}


def check_geometry_2d(memory, heads: int, capacity: int, head_dim: int, rows: int, start: int, length: int,
                      dtype, seed: int = 0) -> float:
    """Write `length` slots from `start` of a (rows, heads, capacity, head_dim) buffer with the cache's 2-D copy
    geometry (kv_slot_geometry); the largest difference from numpy's slice assignment (0 when right)."""
    from bridge_export.runtime.gpu.kv_cache import kv_slot_geometry

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, heads, capacity, head_dim)).astype(dtype)
    new = rng.standard_normal((rows, heads, length, head_dim)).astype(dtype)
    g = kv_slot_geometry(heads, capacity, head_dim, start, length, np.dtype(dtype).itemsize, rows)
    dst, src = memory.upload(base), memory.upload(new)
    try:
        memory.copy_2d(dst.ptr + g["dst_offset"], g["dpitch"], src.ptr, g["spitch"], g["width"], g["height"])
        got = memory.download(dst)
    finally:
        memory.release(dst)
        memory.release(src)
    base[:, :, start:start + length] = new
    return float(np.max(np.abs(got.astype(np.float32) - base.astype(np.float32))))


def check_geometry_3d(memory, tensors: int, rows: int, heads: int, capacity: int, head_dim: int, src_rows,
                      offset_slots: int, slots: int, dtype, seed: int = 0) -> float:
    """Row r of every one of `tensors` (tensors, rows, heads, capacity, head_dim) K/V tensors takes slots
    [offset_slots, offset_slots + slots) of row src_rows[r], one 3-D copy per row as the cache's beam reorder
    does; the largest difference from numpy's fancy indexing (0 when right)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((tensors, rows, heads, capacity, head_dim)).astype(dtype)
    b = rng.standard_normal(a.shape).astype(dtype)
    item = np.dtype(dtype).itemsize
    pitch, off, width = capacity * head_dim * item, offset_slots * head_dim * item, slots * head_dim * item
    row_bytes = heads * pitch
    src, dst = memory.upload(a), memory.upload(b)
    try:
        for r, s in enumerate(src_rows):
            memory.copy_3d(dst.ptr + r * row_bytes + off, pitch, rows * heads, src.ptr + int(s) * row_bytes + off,
                           pitch, rows * heads, width, heads, tensors)
        got = memory.download(dst)
    finally:
        memory.release(src)
        memory.release(dst)
    sl = slice(offset_slots, offset_slots + slots)
    b[:, :, :, sl] = a[:, np.asarray(src_rows)][:, :, :, sl]
    return float(np.max(np.abs(got.astype(np.float32) - b.astype(np.float32))))


def check_stream_order(memory, nbytes: int, rounds: int = 8, seed: int = 0) -> bool:
    """Ping-pong `nbytes` between two device buffers `rounds` times, zeroing the source after each copy, with
    no synchronisation until the final download: the data survives only if every copy and memset runs in
    issue order on the stream."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 255, nbytes, dtype=np.uint8)
    a, b = memory.upload(data), memory.empty((nbytes,), np.uint8)
    try:
        for _ in range(rounds):
            memory.copy(b.ptr, a.ptr, nbytes)
            memory.memset(a.ptr, 0, nbytes)
            # the same bytes as one 2-D copy of 1 KiB lines back: another copy kind on the same stream
            memory.copy_2d(a.ptr, 1024, b.ptr, 1024, 1024, nbytes // 1024)
            memory.memset(b.ptr, 0, nbytes)
        got = memory.download(a)
    finally:
        memory.release(a)
        memory.release(b)
    return bool(np.array_equal(got[: nbytes // 1024 * 1024], data[: nbytes // 1024 * 1024]))


def run_items(memory, layers: int, heads: int, head_dim: int, beams: int, queries: int, prompt: int, steps: int,
              say=print) -> bool:
    """Every check at the given shape on `memory`, each printed as one PASS/FAIL line (an item that raises is a
    FAIL naming the error, and the others still run); True when all pass."""
    ok = True
    cap = queries + prompt + steps
    rng = np.random.default_rng(1)

    def item(name, run):
        nonlocal ok
        t0 = time.perf_counter()
        try:
            good, detail = run()
        except Exception as e:  # a CUDA error in one item must not hide the others' results
            good, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ok &= bool(good)
        say(f"{'PASS' if good else 'FAIL'} {name}: {detail} ({time.perf_counter() - t0:.1f} s)")

    def geometry_2d(dtype):
        d = max(check_geometry_2d(memory, heads, cap, head_dim, beams, queries, prompt, dtype),
                check_geometry_2d(memory, heads, cap, head_dim, beams, cap - 1, 1, dtype, seed=1))
        return d == 0.0, f"prompt and step slots of [{beams}, {heads}, {cap}, {head_dim}]: max |device - numpy| = {d:g}"

    def geometry_3d(dtype):
        src = rng.integers(0, beams, beams)
        d = check_geometry_3d(memory, 2 * layers, beams, heads, cap, head_dim, src, queries, cap - queries, dtype)
        return d == 0.0, f"rows {src.tolist()} of {2 * layers} tensors, text slots: max |device - numpy| = {d:g}"

    def stream_order():
        nbytes = 2 * layers * beams * heads * cap * head_dim * 2  # the fp16 cache's size
        return check_stream_order(memory, nbytes), (f"8 rounds of copy / memset / 2-D copy / memset over "
                                                    f"{nbytes / 2**20:.0f} MiB, one sync at the end")

    def cache(dtype):
        r = check_cache(memory, layers, heads, head_dim, beams, queries, prompt, steps, dtype)
        good = r["max_abs_diff"] == 0.0 and r["cache_call_bytes"] == (0, 0)
        return good, (f"max |device - host| after repeat {r['phases'].get('repeat', float('nan')):g}, during "
                      f"{steps} reordered steps {r['phases'].get('reorder', float('nan')):g} ({r['comparisons']} "
                      f"comparisons); prefix up {r['prefix_bytes_up']} bytes once; host<->device bytes inside "
                      f"write/repeat/reorder: up {r['cache_call_bytes'][0]}, down {r['cache_call_bytes'][1]} (cache "
                      f"holds {r['cache_kv_bytes']} bytes); {r['device_seconds_in_cache_calls']:.3f} s in those calls")

    for dtype in (np.float32, np.float16):
        item(f"geometry 2-D {np.dtype(dtype).name}", lambda: geometry_2d(dtype))
        item(f"geometry 3-D {np.dtype(dtype).name}", lambda: geometry_3d(dtype))
    item("stream order", stream_order)
    for dtype in (np.float32, np.float16):
        item(f"device cache {np.dtype(dtype).name}", lambda: cache(dtype))
    return ok


def check_bundle(bundle: str, device: str, beams: int, max_new: int) -> dict:
    """Teacher-forced decode of a bundle on `device` and on the CPU (same tokens and beam reorders fed to
    both): the largest logits difference over all steps, and the host<->device bytes of each GPU step.
    A fused-decoder bundle runs its device shared cache against the host one (`fused` in the result)."""
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
                past, snap = _past(b.cache), gpu.memory.traffic.snapshot()
                la, lb = a.step(tokens, src), b.step(tokens, src)
                d = gpu.memory.traffic - snap
                per_step.append((past, d.up, d.down))
            worst = max(worst, float(np.max(np.abs(la - lb))))
        fused = gpu.fused_step is not None
        ragged = _ragged_fused_step(cpu, gpu, x) if fused else {}
    return {"max_logits_diff": worst, "logits_scale": scale, "per_step": per_step, "fused": fused, **ragged}


def _ragged_fused_step(cpu, gpu, x) -> dict:
    """The step scheduler's mixed call on the host and the device buffer: rows feeding 3, 1 and 0 tokens
    (right-padded by `query_seqlens`, the third row idle), then one token on the first two at their
    different lengths. The largest difference of the active rows' logits, and of every row's filled slots
    afterwards (an idle row's prefix must be untouched), with the buffer's scale."""
    _, prefix = cpu.bridge(cpu.vision(x)[0])
    prefix = [np.repeat(p[:1], 3, 0) for p in prefix]
    cap = prefix[0].shape[2] + 8
    host, dev = cpu._fused_cache(3, cap), gpu._fused_cache(3, cap)
    try:
        for c in (host, dev):
            c.load_prefix(np.arange(3), prefix)
        worst = 0.0
        for ids, lens in ((np.array([[5, 6, 7], [8, 0, 0], [0, 0, 0]]), [3, 1, 0]),
                          (np.array([[9], [10], [0]]), [1, 1, 0])):
            lens = np.array(lens, np.int32)
            la = cpu.fused_step.run(host, ids, lens)[:2]
            lb = gpu.fused_step.run(dev, ids, lens)[:2]
            worst = max(worst, float(np.max(np.abs(la - lb))))
        got, want = dev.download().astype(np.float32), host.data.astype(np.float32)
        slots = max((float(np.max(np.abs(got[:, :, r, :, :n] - want[:, :, r, :, :n])))
                     for r, n in enumerate(host.lengths)), default=0.0)
        same_lengths = bool(np.array_equal(dev.lengths, host.lengths))
        return {"ragged_logits_diff": worst if same_lengths else float("inf"), "ragged_slots_diff": slots,
                "kv_scale": float(np.max(np.abs(want)))}
    finally:
        dev.close()
        host.close()


def _past(cache) -> int:
    """Slots filled before a step: the portable cache's `length`, the fused cache's longest row."""
    return cache.length if hasattr(cache, "length") else int(cache.lengths.max())


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
    ap.add_argument("--time-limit", type=int, default=540, help="seconds before the run stops with FAIL (0: none)")
    args = ap.parse_args(argv)
    if args.time_limit <= 0:
        return _run(args)
    import signal

    def expired(*_):
        print(f"FAIL: the check ran past --time-limit {args.time_limit} s", flush=True)
        os._exit(1)  # nothing further runs (a CUDA call may be blocking), so the limit holds

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(args.time_limit)
    try:
        return _run(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run(args) -> int:
    """The checks main() asked for; its exit status."""
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
    t0 = time.perf_counter()
    with memory:
        ok = run_items(memory, args.layers, args.heads, args.head_dim, args.beams, args.queries, args.prompt,
                       args.steps, say=lambda line: print(line, flush=True))
    if args.bundle:
        import onnxruntime as ort

        if args.device != "host" and "CUDAExecutionProvider" not in ort.get_available_providers():
            log.info("SKIP bundle decode: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        else:
            r = check_bundle(args.bundle, memory if args.device == "host" else args.device, args.beams, 10)
            same_bytes = len({(u, d) for _, u, d in r["per_step"]}) == 1
            tol = 1e-3 * max(1.0, r["logits_scale"])
            good = r["max_logits_diff"] <= tol and same_bytes
            if r["fused"]:  # rows of different lengths and an idle row in one call: what the scheduler runs
                ragged = r["ragged_logits_diff"] <= tol and r["ragged_slots_diff"] <= 1e-2 * max(1.0, r["kv_scale"])
                log.info("%s fused step over rows feeding 3, 1 and 0 tokens, device vs host buffer: max |logits "
                         "diff| %g, max |filled slots diff| %g (K/V up to %g)", "PASS" if ragged else "FAIL",
                         r["ragged_logits_diff"], r["ragged_slots_diff"], r["kv_scale"])
                good &= ragged
            ok &= good
            what = "fused decoder, device shared cache vs host shared cache" if r["fused"] else "portable decoder"
            log.info("%s bundle decode on %s vs cpu (%s): max |logits diff| %g (logits up to %g); bytes per step "
                     "the same at every past length: %s", "PASS" if good else "FAIL", args.device, what,
                     r["max_logits_diff"], r["logits_scale"], same_bytes)
            for past, up, down in r["per_step"]:
                log.info("  past %4d: %d bytes up, %d bytes down", past, up, down)
    log.info("checked in %.0f s", time.perf_counter() - t0)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
