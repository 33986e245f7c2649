"""InternVL-14B at full size on one machine: random checkpoint -> streamed bundles -> run, measured.

    python -m bridge_export.exporter.bench.fullsize run --work /big/disk/dir [--preset internvl-14b-224px]
    python -m bridge_export.exporter.bench.fullsize measure BUNDLE     # the runtime figures of one bundle
    python -m bridge_export.exporter.bench.fullsize decode A B         # decode speed of A and B, interleaved,
                                                                       # as a fraction of GEMV bandwidth
    python -m bridge_export.exporter.bench.fullsize profile BUNDLE     # per-operator share of a decode step

`run` does the whole sequence, deleting as it goes (at most the checkpoint plus the int4-cpu and
int8-cpu bundles exist at once: 27.7 + 8 + 14.8 GB at 14B): random bf16 checkpoint -> int4-cpu and
int8-cpu bundles (exports measured with /usr/bin/time -v), each measured (load, embeddings C/G, a
text embedding, a 20-token greedy caption, decode tokens/s against the bandwidth a large GEMV
reaches in the same process) -> their decoders timed against each other in one process -> both
deleted -> fp16 bundle (export measured) -> delete everything. It prints one table and writes it as JSON.
The run step (~15 GB at 14B) holds the lock file named by $BRIDGE_EXPORT_BIGMEM_LOCK, when set and
present (one big-memory job at a time on a shared machine); exports stay under ~2 GB and do not.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Machines shared by several big-memory jobs can serialise them with flock(1) on a file named in
# this environment variable (unset: no lock).
LOCK_ENV = "BRIDGE_EXPORT_BIGMEM_LOCK"


# -- helpers ---------------------------------------------------------------------------------------
def _sig3(x: float) -> float:
    """`x` to three significant digits (tiny test models read fractions far below 0.001)."""
    return float(f"{x:.3g}")


def _timed(cmd: list[str], log: Path, lock: bool = False) -> dict:
    """Run `cmd` under /usr/bin/time -v (and the big-memory lock if asked); returns wall s, peak RSS GB, output."""
    full = ["/usr/bin/time", "-v"] + cmd
    lock_file = os.environ.get(LOCK_ENV)
    if lock and lock_file and Path(lock_file).exists():
        full = ["flock", lock_file] + full
    p = subprocess.run(full, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"wall_s": round(secs, 1), "peak_rss_gb": round(rss / 1e6, 2), "stdout": p.stdout}


def _size_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9, 2)


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def checkpoint_gb(preset: str) -> float:
    """Size of the preset's bf16 checkpoint in GB (27.7 for internvl-14b-224px)."""
    import math

    from bridge_export.reference_model.config import preset_config

    from bridge_export.exporter.export.weight_stream import expected_shapes

    return sum(math.prod(s) for s in expected_shapes(preset_config(preset)).values()) * 2 / 1e9


def _need_disk(path: Path, gb: float, what: str) -> None:
    free = _free_gb(path)
    if free < gb:
        raise RuntimeError(f"{what} needs ~{gb:.0f} GB free on {path}, only {free:.0f} GB: free space first")


# -- the runtime measurement (runs in its own process so its peak RSS is its own) ------------------
def gemv_probe(threads: int, gib: float = 1.0, int4: bool = False):
    """(run, bytes): a callable running one batch-1 GEMV over a weight far larger than any cache, and
    the bytes of weight it reads. fp32: a MatMul over a [4096, N] fp32 weight; int4: a MatMulNBits over
    the same shape packed as int4-cpu packs it (block 32, 4-bit zero points, accuracy level 4: the
    decoder's own kernel), reading `bytes` = packed weights + scales + zero points."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 4096
    rng = np.random.default_rng(0)
    if not int4:
        n = int(gib * (1 << 30) / 4 / k)
        inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        nbytes = k * n * 4
    else:
        blocks, bs = k // 32, 32
        per_col = blocks * bs // 2 + blocks * 4 + (blocks + 1) // 2  # packed nibbles + fp32 scales + zero points
        n = int(gib * (1 << 30) / per_col)
        inits = [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, bs // 2), dtype=np.uint8), "w"),
                 numpy_helper.from_array(rng.random((n * blocks,), dtype=np.float32) * 0.01, "s"),
                 numpy_helper.from_array(np.full((n * ((blocks + 1) // 2),), 0x88, np.uint8), "z")]
        node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n,
                                bits=4, block_size=bs, accuracy_level=4)
        nbytes = n * per_col
    g = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # threads that spin after a probe run take the cores from whatever is timed next (the first bundle of
    # decode_compare's rounds: 0.7x its rate in the second place on a 2-core machine)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del m, g, inits
    x = np.ones((1, k), np.float32)
    for _ in range(3):
        s.run(None, {"x": x})
    return (lambda: s.run(None, {"x": x})), nbytes


def gemv_bandwidth(threads: int, gib: float = 1.0) -> float:
    """GB/s a large fp32 GEMV reaches in onnxruntime here (weights far larger than any cache)."""
    run, nbytes = gemv_probe(threads, gib)
    best = []
    for _ in range(10):
        t0 = time.perf_counter()
        run()
        best.append(time.perf_counter() - t0)
    best.sort()
    return nbytes / best[len(best) // 2] / 1e9


def decoder_weight_bytes(bundle: Path) -> int:
    """Bytes of weights a decode step reads: every text_decoder initializer except the embedding
    table (a step gathers one row of it)."""
    import onnx

    m = onnx.load(str(bundle / "text_decoder.onnx"), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        if "embed_tokens" in t.name:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def measure(bundle: Path, threads: int, new_tokens: int = 20, no_prepack: tuple[str, ...] | None = None,
            gemv_gib: float = 1.0) -> dict:
    """Load the bundle, embed, caption, decode; figures as a dict.

    Graphs in `no_prepack` (default: bridge_export.runtime.sessions.prepacking_plan) run with onnxruntime's prepacking off:
    their weights stay in weights.bin's shared, reclaimable page cache instead of a packed heap
    copy per session. (The first 14B run left every graph unpacked: 0.22 of the bound.)
    """
    import numpy as np

    from bridge_export import runtime
    from bridge_export.runtime.manifest import read_manifest
    from bridge_export.runtime.sessions import prepacking_plan

    bundle = Path(bundle)
    no_prepack = prepacking_plan(read_manifest(bundle)) if no_prepack is None else tuple(no_prepack)
    res = {"prepacking_off": list(no_prepack)}
    t0 = time.perf_counter()
    pipe = runtime.load(bundle, threads=threads,
                        session_config={g: {"session.disable_prepacking": "1"} for g in no_prepack})
    res["load_s"] = round(time.perf_counter() - t0, 1)
    man = pipe.manifest
    s = man.preprocessing.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, s, s), dtype=np.float32)
    t0 = time.perf_counter()
    hidden, c = pipe.vision(px)
    res["vision_s_per_image"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    g, prefix = pipe.bridge(hidden)
    res["bridge_s_per_image"] = round(time.perf_counter() - t0, 2)
    res["image_embeds_C"] = [float(v) for v in c[0, :4]]
    res["image_embeds_G_part"] = [float(v) for v in g[0, :4]]
    vocab = man.dims.vocab_size  # the ids below are real words at 14B; folded into a small model's vocabulary
    ids = np.array([[1, 3234, 29901, 263, 15661, 2]]) % vocab
    t0 = time.perf_counter()
    txt = pipe.encode_text(ids)
    res["text_embedding_s"] = round(time.perf_counter() - t0, 2)
    res["text_embeds"] = [float(v) for v in txt[0, :4]]
    for k in ("image_embeds_C", "image_embeds_G_part", "text_embeds"):
        if not np.all(np.isfinite(res[k])):
            raise RuntimeError(f"{k} is not finite: the bundle is broken")
    prompt = np.array([[1, 4223, 5777, 29901]]) % vocab
    t0 = time.perf_counter()
    toks = pipe.generate(px, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    res["caption_s"] = round(time.perf_counter() - t0, 1)
    res["caption_tokens"] = [int(t) for t in np.asarray(toks)[0]]
    res["pss_after_caption_gb"] = _pss_gb()
    # decode speed alone: steps timed through the decoder session with a growing cache
    step_fn = decode_step(pipe)
    step_fn()
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        step_fn()
        steps.append(time.perf_counter() - t0)
    steps.sort()
    step = steps[len(steps) // 2]
    res["decode_tokens_per_s"] = round(1 / step, 2)
    pipe.close()
    del pipe
    gb = decoder_weight_bytes(bundle) / 1e9
    res["weight_bytes_per_token_gb"] = round(gb, 2 if gb >= 1 else 4)
    bw = gemv_bandwidth(threads, gemv_gib)
    res["gemv_bandwidth_gb_s"] = round(bw, 1)
    res["bandwidth_bound_tokens_per_s"] = round(bw / gb, 2)
    res["fraction_of_bound"] = round(res["decode_tokens_per_s"] / res["bandwidth_bound_tokens_per_s"], 2)
    return res


def decode_step_feeds(kv, batch: int = 1, past: int | None = None) -> dict:
    """A portable decoder step's feeds at `past` (default: visual prefix + 4; zero K/V: the timing is the same)."""
    import numpy as np

    P = kv.prefix_length + 4 if past is None else past
    feeds = {"input_ids": np.full((batch, 1), 5, np.int64), "position_ids": np.full((batch, 1), P, np.int64),
             "attention_mask": np.ones((batch, P + 1), np.int64)}
    for i in range(kv.num_layers):
        for name in kv.past(i):  # key, value
            feeds[name] = np.zeros((batch, kv.num_heads, P, kv.head_dim), np.float32)
    return feeds


def decode_step(pipe, batch: int = 1, past: int | None = None):
    """A callable running one decode step of a loaded pipeline's text decoder as the runtime runs it:
    the fused decoder through FusedStep on a shared KV buffer holding `past` slots (rewritten in place
    each call), the portable one through its session with `past` positions of K/V. `past` defaults
    to the visual prefix + 4."""
    import numpy as np

    kv = pipe.manifest.kv_layout
    past = kv.prefix_length + 4 if past is None else past
    ids = np.full((batch, 1), 5, np.int64)
    if getattr(pipe, "fused_step", None) is not None:
        from bridge_export.runtime.kv_cache import SharedKVCache

        dtype = pipe.sessions["text_decoder"].inputs[kv.past(0)[0]].dtype
        cache = SharedKVCache(kv.num_layers, batch, kv.num_heads, past + 1, kv.head_dim, dtype)
        ones = np.ones(batch, np.int32)

        def step():
            cache.lengths[:] = past
            pipe.fused_step.run(cache, ids, ones)
        return step
    feeds = decode_step_feeds(kv, batch, past)
    sess = pipe.sessions["text_decoder"]
    return lambda: sess.run(feeds)


def decode_compare(bundles: list[Path], threads: int, steps: int = 8, rounds: int = 5, gemv_gib: float = 1.0) -> dict:
    """Decode tokens/s of each bundle's text_decoder alone (the other graphs are not loaded, so two
    14B bundles fit in memory; onnxruntime's prepacking on, as runtime.load does), timed in turns with
    two bandwidth probes in the same process: each round runs `steps` steps of every bundle and of an
    fp32 and an int4 (MatMulNBits) GEMV over `gemv_gib` GiB; every figure is its best round. Returns
    {bundle name: tokens/s, ratio to the first, weight bytes per token, the fraction of the fp32 GEMV's
    bandwidth that decode reaches (tokens/s x bytes per token / GEMV GB/s) and of the int4 GEMV's},
    plus {"gemv": the probes' GB/s}."""
    from bridge_export import runtime

    runs = []
    for b in bundles:
        t0 = time.perf_counter()
        pipe = runtime.load(b, threads=threads, graphs=("text_decoder",))
        print(f"[decode] {Path(b).name}: text_decoder opened in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        step = decode_step(pipe)
        step()  # warm-up: pages in the weights
        runs.append((Path(b).name, pipe.manifest.precision.mode, pipe, step))
    probes = {f"{kind} GEMV": gemv_probe(threads, gemv_gib, int4=kind == "int4") for kind in ("fp32", "int4")}
    best = {name: float("inf") for name in [r[0] for r in runs] + list(probes)}
    tasks = [(name, step, steps) for name, _, _, step in runs] + [(k, run, 3) for k, (run, _) in probes.items()]
    for r in range(rounds):
        for name, fn, n in tasks:
            # the first call after another task's runs pays for the switch (the other session's threads, cold
            # caches: whichever bundle came second in a round ran at 0.6-0.8x of the same bundle timed first
            # on 2 cores), so each task's turn starts with one untimed call, as a decode loop is warm
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
        print(f"[decode] round {r + 1}/{rounds}: " + ", ".join(f"{n} {1 / t:.3f}/s" for n, t in best.items()),
              file=sys.stderr)
    gbs = {k: nbytes / best[k] / 1e9 for k, (_, nbytes) in probes.items()}
    first = runs[0][0]
    out = {"gemv": {k: round(v, 2) for k, v in gbs.items()}}
    for (name, mode, pipe, _), b in zip(runs, bundles):
        wb = decoder_weight_bytes(Path(b))
        read = wb / best[name] / 1e9  # GB/s the decode step reads its weights at
        out[name] = {"precision": mode, "fused": getattr(pipe, "fused_step", None) is not None,
                     "decode_tokens_per_s": round(1 / best[name], 3), "vs_first": round(best[first] / best[name], 3),
                     "weight_bytes_per_token": wb, "weight_bytes_per_token_gb": round(wb / 1e9, 4),
                     "weights_read_gb_s": round(read, 2),
                     "fraction_of_fp32_gemv": _sig3(read / gbs["fp32 GEMV"]),
                     "fraction_of_int4_gemv": _sig3(read / gbs["int4 GEMV"])}
        pipe.close()
    return out


def format_decode(d: dict) -> str:
    """The decode comparison as a markdown table (fractions as the JSON has them)."""
    rows = ["| bundle | precision | fused | decode tok/s | weight GB/token | weights read GB/s | "
            "of fp32 GEMV | of int4 GEMV |", "|---|---|---|---|---|---|---|---|"]
    for name, r in d.items():
        if name != "gemv":
            rows.append(f"| {name} | {r['precision']} | {r['fused']} | {r['decode_tokens_per_s']} | "
                        f"{r['weight_bytes_per_token_gb']} | {r['weights_read_gb_s']} | {r['fraction_of_fp32_gemv']} | "
                        f"{r['fraction_of_int4_gemv']} |")
    rows.append("GEMV probes (same process, same rounds): "
                + ", ".join(f"{k} {v} GB/s" for k, v in d["gemv"].items()))
    return "\n".join(rows)


def profile_decode(bundle: Path, threads: int, steps: int = 16, top: int = 8) -> dict:
    """Per-operator share of a decode step's kernel time (onnxruntime's profiler, `steps` steps at
    past = prefix + 4, batch 1, as decode_step runs them): {op type: {"share", "ms_per_step"}}."""
    import json as _json

    from bridge_export import runtime

    pipe = runtime.load(bundle, threads=threads, graphs=("text_decoder",))
    sess = pipe.sessions["text_decoder"]
    path = Path(bundle).absolute() / "text_decoder.onnx"
    import onnxruntime as ort

    from bridge_export.runtime.sessions import ort_session_options

    opts = ort_session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "decode-profile")
    sess.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # same graph, profiled
    if getattr(pipe, "fused_step", None) is not None:  # the fused step drives the profiled session
        from bridge_export.runtime.kv_cache import FusedStep

        pipe.fused_step = FusedStep(sess, pipe.manifest.kv_layout)
    step = decode_step(pipe)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    trace = Path(sess.sess.end_profiling())
    events = _json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    pipe.close()
    total = sum(per_op.values())
    n_runs = steps + 3
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {"step_ms_wall": round(wall * 1e3, 3), "kernel_ms_per_step": round(total / 1e3 / n_runs, 3),
            "ops": {op: {"share": round(us / total, 3), "ms_per_step": round(us / 1e3 / n_runs, 3)} for op, us in ranked}}


def _pss_gb() -> float:
    """Proportional set size now (pages shared between mappings counted once; RSS counts each)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1e6, 2)
    except OSError:
        pass
    return -1.0


# -- the whole sequence ------------------------------------------------------------------------------
DISK_FACTOR = {"int4-cpu": 0.4, "int8-cpu": 0.55, "fp16": 1.05}  # bundle size / bf16 checkpoint size
PAIR = ("int8-cpu", "int4-cpu")  # decoders timed against each other when both are made


def run(work: Path, preset: str, threads: int, keep: bool = False,
        precisions: tuple[str, ...] = ("int4-cpu", "int8-cpu", "fp16"), gemv_gib: float = 1.0) -> dict:
    """Checkpoint -> each bundle in `precisions` exported (measured); int4-cpu and int8-cpu bundles are
    also run (measured), and their decoders timed against each other in one process; each bundle is
    deleted as soon as nothing else needs it, the checkpoint at the end."""
    work = Path(work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    ck, table = work / "checkpoint", {"preset": preset}
    made: dict[str, Path] = {}
    try:
        if not (ck / "config.json").is_file():
            _need_disk(work, checkpoint_gb(preset) * 1.05, "the random checkpoint")
            r = _timed(py + ["bridge_export.exporter.cli", "random-checkpoint", "--preset", preset, "--dtype", "bf16",
                             "--out", str(ck)], work / "checkpoint.log")
            table["checkpoint"] = {"wall_s": r["wall_s"], "peak_rss_gb": r["peak_rss_gb"]}
        table["checkpoint_gb"] = _size_gb(ck)
        for precision in precisions:
            out = work / f"bundle-{precision}"
            _need_disk(work, table["checkpoint_gb"] * DISK_FACTOR.get(precision, 2.1), precision)
            r = _timed(py + ["bridge_export.exporter.cli", "onnx", "--checkpoint", str(ck), "--out", str(out), "--precision",
                             precision, "--overwrite"], work / f"export-{precision}.log")
            made[precision] = out
            entry = {"export_wall_s": r["wall_s"], "export_peak_rss_gb": r["peak_rss_gb"],
                     "bundle_gb": _size_gb(out), "files": sorted(p.name for p in out.iterdir())}
            if precision in PAIR:
                m = _timed(py + ["bridge_export.exporter.bench.fullsize", "measure", str(out), "--threads", str(threads),
                                 "--gemv-gib", str(gemv_gib)],
                           work / f"measure-{precision}.log", lock=True)
                entry.update(json.loads(m["stdout"].strip().splitlines()[-1]))
                entry["run_peak_rss_gb"], entry["run_wall_s"] = m["peak_rss_gb"], m["wall_s"]
            table[precision] = entry
            print(json.dumps({precision: entry}), flush=True)
            if all(p in made for p in PAIR) and "decode" not in table:
                d = _timed(py + ["bridge_export.exporter.bench.fullsize", "decode"] + [str(made[p]) for p in PAIR]
                           + ["--threads", str(threads), "--gemv-gib", str(gemv_gib)], work / "decode.log", lock=True)
                table["decode"] = json.loads(d["stdout"].strip().splitlines()[-1])
                table["decode"]["peak_rss_gb"] = d["peak_rss_gb"]
                print(json.dumps({"decode": table["decode"]}), flush=True)
            pair_pending = all(p in precisions for p in PAIR) and "decode" not in table
            for p in [p for p in made if not keep and not (pair_pending and p in PAIR)]:
                shutil.rmtree(made.pop(p))
    finally:
        if not keep:
            for path in made.values():
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(ck, ignore_errors=True)
    return table


def format_table(t: dict) -> str:
    """The README table: one column per precision made, plus the interleaved decode comparison."""
    cols = [p for p in ("int4-cpu", "int8-cpu", "fp16") if p in t]
    rows = ["| figure | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    keys = [("export wall time (s)", "export_wall_s"), ("export peak RSS (GB)", "export_peak_rss_gb"),
            ("bundle size (GB)", "bundle_gb"), ("load time (s)", "load_s"),
            ("peak RSS while running (GB)", "run_peak_rss_gb"), ("vision s/image", "vision_s_per_image"),
            ("bridge s/image", "bridge_s_per_image"), ("text embedding (s)", "text_embedding_s"),
            ("20-token greedy caption (s)", "caption_s"), ("decode tokens/s", "decode_tokens_per_s"),
            ("weight GB read per token", "weight_bytes_per_token_gb"),
            ("GEMV bandwidth (GB/s)", "gemv_bandwidth_gb_s"),
            ("bandwidth-bound tokens/s", "bandwidth_bound_tokens_per_s"), ("fraction of bound", "fraction_of_bound")]
    for label, k in keys:
        rows.append(f"| {label} | " + " | ".join(str(t[c].get(k, "-")) for c in cols) + " |")
    for name, d in t.get("decode", {}).items():
        if isinstance(d, dict) and name != "gemv":
            rows.append(f"| decoders interleaved: {d['precision']} tokens/s (vs int8-cpu) | "
                        f"{d['decode_tokens_per_s']} ({d['vs_first']}x) |" + " |" * (len(cols) - 1))
    return "\n".join(rows)


def main(argv=None) -> None:
    """Command line: `run` the whole sequence or `measure` one bundle."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True, type=Path)
    r.add_argument("--preset", default="internvl-14b-224px")
    r.add_argument("--threads", type=int, default=os.cpu_count())
    r.add_argument("--keep", action="store_true", help="keep checkpoint and bundles (needs ~80 GB)")
    r.add_argument("--precisions", default="int4-cpu,int8-cpu,fp16", help="bundles to export, in order")
    r.add_argument("--gemv-gib", type=float, default=1.0, help="size of the bandwidth probe's weight")
    d = sub.add_parser("decode", help="decode speed of bundles' text decoders, interleaved (best round)")
    d.add_argument("bundles", type=Path, nargs="+")
    d.add_argument("--threads", type=int, default=os.cpu_count())
    d.add_argument("--steps", type=int, default=8)
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--gemv-gib", type=float, default=1.0, help="size of the bandwidth probes' weights")
    pr = sub.add_parser("profile", help="per-operator share of a decode step's kernel time (onnxruntime's profiler)")
    pr.add_argument("bundle", type=Path)
    pr.add_argument("--threads", type=int, default=os.cpu_count())
    pr.add_argument("--steps", type=int, default=16)
    m = sub.add_parser("measure")
    m.add_argument("bundle", type=Path)
    m.add_argument("--threads", type=int, default=os.cpu_count())
    m.add_argument("--no-prepack", default=None,
                   help="graphs run without onnxruntime's prepacking (comma-separated; '' for none; "
                        "default: the bridge when packed copies of every graph would not fit in 60%% of RAM)")
    m.add_argument("--gemv-gib", type=float, default=1.0, help="size of the bandwidth probe's weight")
    args = ap.parse_args(argv)
    if args.cmd == "decode":
        d = decode_compare(args.bundles, args.threads, args.steps, args.rounds, args.gemv_gib)
        print(format_decode(d), file=sys.stderr)
        print(json.dumps(d))  # last line: what `run` reads
        return
    if args.cmd == "profile":
        print(json.dumps(profile_decode(args.bundle, args.threads, args.steps), indent=1))
        return
    if args.cmd == "measure":
        print(json.dumps(measure(args.bundle, args.threads,
                                 no_prepack=None if args.no_prepack is None else
                                 tuple(g for g in args.no_prepack.split(",") if g),
                                 gemv_gib=args.gemv_gib)))
        return
    table = run(args.work, args.preset, args.threads, args.keep, tuple(p for p in args.precisions.split(",") if p),
                args.gemv_gib)
    (args.work / "fullsize.json").write_text(json.dumps(table, indent=2))
    print(format_table(table))


if __name__ == "__main__":
    main()
