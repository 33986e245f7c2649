"""Lean graphs, measured: decoder nodes per layer and decode-step time, traced vs streamed export.

    python -m bridge_export.exporter.bench.graphs --preset small

Exports the preset twice (TorchScript-traced and streamed), counts the text decoder's nodes
before and after onnxruntime's own optimisation (ORT_ENABLE_ALL, as the runtime opens it), and
times a batch-1 decode step on both interleaved in one run (robust to a drifting shared CPU).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx


def optimized_node_count(graph: Path, work: Path, threads: int) -> int:
    """Nodes onnxruntime executes after its graph optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    out = work / f"{graph.parent.name}-{graph.stem}.opt.onnx"
    opts.optimized_model_filepath = str(out)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    return len(onnx.load(str(out), load_external_data=False).graph.node)


def decode_feeds(config, past: int) -> dict:
    """A batch-1 decode step with `past` cached positions."""
    q = config.qllama
    H, Dh = q.num_attention_heads, q.head_dim
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[5]]), "position_ids": np.array([[past]]),
             "attention_mask": np.ones((1, past + 1), np.int64)}
    for i in range(q.num_hidden_layers):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = rng.standard_normal((1, H, past, Dh), dtype=np.float32)
    return feeds


def main(argv=None) -> None:
    """Print the node counts and the decode-step times side by side."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from bridge_export import reference_model
    from bridge_export.exporter.export.bundle import export_bundle
    from bridge_export.runtime.sessions import OrtSession

    model = reference_model.from_preset(args.preset, seed=0)
    L = model.config.qllama.num_hidden_layers
    deeper = reference_model.config.preset_config(args.preset)
    deeper.qllama.num_hidden_layers = 2 * L  # the difference isolates what one layer costs
    model2 = reference_model.InternVLModel(deeper)
    reference_model.loading.init_weights(model2, 0)
    with tempfile.TemporaryDirectory(prefix="bench-graphs-") as tmp:
        tmp = Path(tmp)
        rows, sessions = {}, {}
        for name in ("torchscript", "stream"):
            counts = []
            for tag, m in (("", model), ("-2x", model2)):
                b = export_bundle(m, tmp / (name + tag), exporter=name, progress=lambda s: None)
                g = b / "text_decoder.onnx"
                counts.append((len(onnx.load(str(g), load_external_data=False).graph.node),
                               optimized_node_count(g, tmp, args.threads)))
            (raw, opt), (raw2, opt2) = counts
            rows[name] = (raw, (raw2 - raw) / L, opt, (opt2 - opt) / L)
            sessions[name] = OrtSession(tmp / name / "text_decoder.onnx", threads=args.threads)
        feeds = decode_feeds(model.config, args.past)
        times = {n: [] for n in sessions}
        for _ in range(10):
            for s in sessions.values():
                s.run(feeds)
        for _ in range(args.steps):  # interleaved
            for n, s in sessions.items():
                t0 = time.perf_counter()
                s.run(feeds)
                times[n].append(time.perf_counter() - t0)
    print(f"text decoder of preset {args.preset!r} ({L} layers), batch 1, past {args.past}, {args.threads} threads")
    print("nodes per layer = (nodes with 2x layers - nodes) / layers; 'after ORT' = after ORT_ENABLE_ALL")
    print(f"{'exporter':<12} {'nodes':>7} {'per layer':>10} {'after ORT':>10} {'per layer':>10} {'step ms':>9}")
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    for n, (raw, per, opt, per_opt) in rows.items():
        print(f"{n:<12} {raw:>7} {per:>10.1f} {opt:>10} {per_opt:>10.1f} {med[n]:>9.3f}")
    print(f"streamed / traced decode step time: {med['stream'] / med['torchscript']:.2f}")


if __name__ == "__main__":
    main()
