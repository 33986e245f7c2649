"""Fused vs portable text decoder on onnxruntime, side by side in one process: decode tokens/s and ratios.

    python -m bridge_export.exporter.bench.fused --preset small --precisions int4-cpu fp32 \\
        --batches 1 4 --pasts 16 256
    python -m bridge_export.exporter.bench.fused --preset real-width --precisions int4-cpu --random-checkpoint

For each precision the same weights are exported twice (streamed): the onnxruntime-target decoder
(GroupQueryAttention over the shared KV buffer, exporter.export.fused_decoder) and the portable one.
Two figures per (precision, batch, past):
* graph: one decode step of the text decoder alone, as the runtime calls it (portable: OrtSession.run
  with past K/V of `past` positions; fused: FusedStep.run on a SharedKVCache holding `past` slots);
* generate: Pipeline.generate's decode rate: one greedy call of 1 + n tokens, the time from the end of
  its prompt prefill to its return divided by n (decode steps plus the search loop around them), the
  prompt sized so that the first step's past is max(past, queries + 1).
Rounds are interleaved (every variant once per round) and each figure is the median over rounds, so
a drifting shared CPU moves both sides alike. Everything exported goes to a temporary folder (or
--work) and is deleted at the end.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _export(source_dir: Path | None, preset: str, seed: int, out: Path, precision: str, fused: bool) -> Path:
    from bridge_export.exporter.export.stream_export import export_checkpoint, export_model

    kw = dict(precision=precision, progress=lambda s: None, fused_decoder=fused,
              target="onnxruntime" if fused or precision in ("int8-cpu", "int4-cpu") else "tensorrt")
    if source_dir is not None:
        return export_checkpoint(source_dir, out, **kw)
    from bridge_export import reference_model

    return export_model(reference_model.from_preset(preset, seed=seed), out, **kw)


def graph_step(pipe, batch: int, past: int):
    """A callable running one decode step of `pipe`'s text decoder alone at `past` cached positions."""
    from bridge_export.runtime.kv_cache import SharedKVCache

    kv = pipe.manifest.kv_layout
    ids = np.full((batch, 1), 5, np.int64)
    if pipe.fused_step is not None:
        dtype = pipe.sessions["text_decoder"].inputs[kv.past(0)[0]].dtype
        cache = SharedKVCache(kv.num_layers, batch, kv.num_heads, past + 1, kv.head_dim, dtype)
        ones = np.ones(batch, np.int32)

        def step():
            cache.lengths[:] = past  # the same past every call: the new slot is rewritten in place
            pipe.fused_step.run(cache, ids, ones)
        return step
    sess = pipe.sessions["text_decoder"]
    feeds = {"input_ids": ids, "position_ids": np.full((batch, 1), past, np.int64),
             "attention_mask": np.ones((batch, past + 1), np.int64)}
    for name in kv.names("past"):
        feeds[name] = np.zeros((batch, kv.num_heads, past, kv.head_dim), np.float32)
    return lambda: sess.run(feeds)


def generate_run(pipe, batch: int, past: int, new_tokens: int):
    """A callable timing one Pipeline.generate of 1 + new_tokens greedy tokens; returns seconds per decode
    step: the time from the end of the prompt prefill to the end of the call (the decode steps and the
    search loop around them), divided by new_tokens. Also returns the first step's past."""
    q = pipe.num_query
    prompt = np.full((batch, max(1, past - q)), 5, np.int64)
    prompt[:, 0] = pipe.special.bos
    pix = np.random.default_rng(0).standard_normal((batch, 3, pipe.preprocessing.image_size,
                                                    pipe.preprocessing.image_size), dtype=np.float32)
    make, mark = pipe._decoder, {}

    def timed_decoder(*a, **k):  # the pipeline's own decoder, its prefill's end recorded
        dec = make(*a, **k)
        prefill = dec.prefill

        def timed_prefill():
            out = prefill()
            mark["prefilled"] = time.perf_counter()
            return out
        dec.prefill = timed_prefill
        return dec

    def run() -> float:
        pipe._decoder = timed_decoder
        try:
            pipe.generate(pix, prompt, max_new_tokens=1 + new_tokens, min_new_tokens=1 + new_tokens)
            return (time.perf_counter() - mark["prefilled"]) / new_tokens
        finally:
            del pipe._decoder  # the class's method again
    return run, q + prompt.shape[1]


def interleaved(tasks: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median over `rounds` of each task's seconds, every task once per round, in turn."""
    times = {k: [] for k in tasks}
    for _ in range(rounds):
        for k, t in tasks.items():
            times[k].append(t())
    return {k: statistics.median(v) for k, v in times.items()}


def _per_step(fn, steps: int):
    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps
    return run


def bench(pipes: dict[str, object], batches: list[int], pasts: list[int], steps: int, rounds: int,
          new_tokens: int, generate: bool = True) -> list[dict]:
    """Rows of {what, batch, past, portable tok/s, fused tok/s, ratio} for one precision's two pipelines."""
    rows = []
    for batch in batches:
        for past in pasts:
            tasks = {k: _per_step(graph_step(p, batch, past), steps) for k, p in pipes.items()}
            for t in tasks.values():
                t()  # warm-up (allocations, first-touch)
            med = interleaved(tasks, rounds)
            rows.append({"what": "graph", "batch": batch, "past": past,
                         **{k: batch / v for k, v in med.items()}})
            if generate:
                runs = {k: generate_run(p, batch, past, new_tokens) for k, p in pipes.items()}
                start = next(iter(runs.values()))[1]
                for r, _ in runs.values():
                    r()
                med = interleaved({k: r for k, (r, _) in runs.items()}, rounds)
                rows.append({"what": "generate", "batch": batch, "past": start,
                             **{k: batch / v for k, v in med.items()}})
            print(f"[fused-bench] batch {batch} past {past} done", file=sys.stderr)
    return rows


def format_rows(precision: str, rows: list[dict]) -> str:
    """One table: decode tokens/s of both decoders and fused / portable."""
    lines = [f"{'precision':<10} {'measure':<9} {'batch':>5} {'past':>5} {'portable tok/s':>15} "
             f"{'fused tok/s':>12} {'fused/portable':>15}"]
    for r in rows:
        lines.append(f"{precision:<10} {r['what']:<9} {r['batch']:>5} {r['past']:>5} {r['portable']:>15.1f} "
                     f"{r['fused']:>12.1f} {r['fused'] / r['portable']:>15.2f}")
    return "\n".join(lines)


def node_counts(bundle: Path) -> tuple[int, int]:
    """(decoder nodes as written, decoder layers) of a bundle."""
    import onnx

    from bridge_export.runtime.manifest import read_manifest

    man = read_manifest(bundle)
    return (len(onnx.load(str(man.graph_path("text_decoder")), load_external_data=False).graph.node),
            man.kv_layout.num_layers)


def main(argv=None) -> None:
    """Export, measure, print one table per precision, delete what was written."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", nargs="+", default=["int4-cpu", "fp32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--pasts", nargs="+", type=int, default=[16, 256])
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round (graph)")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps per round (generate)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-checkpoint", action="store_true",
                    help="write a seeded random bf16 checkpoint of the preset and stream from it (large presets)")
    ap.add_argument("--no-generate", action="store_true", help="graph figures only")
    ap.add_argument("--work", type=Path, default=None, help="folder for the temporary bundles (default: a temp dir)")
    args = ap.parse_args(argv)

    from bridge_export import runtime

    work = Path(tempfile.mkdtemp(prefix="fused-bench-", dir=args.work))
    try:
        source = None
        if args.random_checkpoint:
            from bridge_export.reference_model.checkpoint_writer import write_random_checkpoint

            source = write_random_checkpoint(work / "checkpoint", args.preset, seed=args.seed, progress=False)
        for prec in args.precisions:
            pipes, nodes = {}, {}
            for kind, fused in (("portable", False), ("fused", True)):
                t0 = time.perf_counter()
                b = _export(source, args.preset, args.seed, work / f"{prec}-{kind}", prec, fused)
                nodes[kind] = node_counts(b)
                pipes[kind] = runtime.load(b, threads=args.threads)
                print(f"[fused-bench] {prec} {kind}: exported and loaded in {time.perf_counter() - t0:.0f}s",
                      file=sys.stderr)
            if pipes["fused"].fused_step is None:
                raise SystemExit(f"{args.preset}: the decoder could not be fused (see the export's message)")
            rows = bench(pipes, args.batches, args.pasts, args.steps, args.rounds, args.new_tokens,
                         not args.no_generate)
            layers = nodes["fused"][1]
            print(f"\n{args.preset} {prec}, {args.threads} threads; decoder nodes per layer as written: portable "
                  f"{nodes['portable'][0] / layers:.0f}, fused {nodes['fused'][0] / layers:.0f} "
                  f"(graph totals {nodes['portable'][0]} / {nodes['fused'][0]})")
            print(format_rows(prec, rows))
            for p in pipes.values():
                p.close()
            for kind in pipes:
                shutil.rmtree(work / f"{prec}-{kind}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
