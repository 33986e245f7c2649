"""Image embeddings/s of the fused (onnxruntime target) vision encoder and bridge against the portable ones.

    python -m bridge_export.exporter.bench.vision_fused --preset small [--batch 4] [--ort-optimizer]

Two fp32 bundles of the preset (seeded weights): the portable one (`--target tensorrt`) and the
onnxruntime-target one (MultiHeadAttention, SkipSimplifiedLayerNormalization: exporter.export.
fused_vision). Both are loaded in this process and timed in turns: `encode_image` in InternVL-C mode
(vision encoder + pooling head) and InternVL-G mode (vision encoder + bridge), and each graph
alone; a figure is the best of `--rounds`. `--ort-optimizer` adds a third column: the portable
graphs run through onnxruntime's whole optimizer (`onnxruntime.transformers.optimizer.optimize_model`,
model type vit), which needs the weights in memory (small presets only).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bridge_export.exporter.bench.throughput import interleaved_best


def _ort_optimized(bundle: Path, graph: str, out: Path, heads: int, hidden: int) -> Path:
    """The portable graph through onnxruntime's optimizer (weights written beside it)."""
    from onnxruntime.transformers import optimizer

    m = optimizer.optimize_model(str(bundle / f"{graph}.onnx"), model_type="vit", num_heads=heads,
                                 hidden_size=hidden, opt_level=0, use_gpu=False)
    path = out / f"{graph}.onnx"
    m.save_model_to_file(str(path), use_external_data_format=True)
    return path


def measure(preset: str, batch: int, rounds: int, threads: int, work: Path, ort_optimizer: bool) -> dict:
    """Build both bundles in `work` (reused when present) and time them; returns the figures."""
    import onnxruntime as ort

    from bridge_export import runtime
    from bridge_export.exporter.bench.genai import export_ours
    from bridge_export.reference_model.config import preset_config
    from bridge_export.runtime.sessions import ort_session_options

    cfg = preset_config(preset)
    sides = {"portable": "tensorrt", "fused": "onnxruntime"}
    paths = {}
    for side, target in sides.items():
        paths[side] = work / f"{preset}-fp32-{target}"
        if not (paths[side] / "manifest.json").is_file():
            export_ours(preset, "fp32", paths[side], work, target)
    s = cfg.image_size
    x = np.random.default_rng(0).standard_normal((batch, 3, s, s), dtype=np.float32)
    pipes = {k: runtime.load(p, threads=threads, graphs=("vision_encoder", "query_bridge")) for k, p in paths.items()}
    res = {"preset": preset, "batch": batch, "threads": threads, "rows": []}
    try:
        emb = {k: {m: p.encode_image(x, m) for m in ("C", "G")} for k, p in pipes.items()}
        res["max_abs_diff"] = {m: float(np.abs(emb["fused"][m] - emb["portable"][m]).max()) for m in ("C", "G")}
        for mode in ("C", "G"):
            best = dict(zip(pipes, interleaved_best([lambda p=p: p.encode_image(x, mode) for p in pipes.values()], rounds)))
            res["rows"].append({"what": f"encode_image {mode}", **{k: batch / t for k, t in best.items()}})
        hidden = pipes["portable"].vision(x)[0]
        feeds = {"vision_encoder": {"pixel_values": x}, "query_bridge": {"vision_hidden": hidden}}
        sess = {}
        for g in feeds:
            sess[g] = {k: ort.InferenceSession(str(p / f"{g}.onnx"), ort_session_options(threads),
                                               providers=["CPUExecutionProvider"]) for k, p in paths.items()}
            if ort_optimizer:
                d = work / f"{preset}-fp32-ortopt"
                d.mkdir(exist_ok=True)
                heads, width = ((cfg.vision.num_attention_heads, cfg.vision.hidden_size) if g == "vision_encoder"
                                else (cfg.qllama.num_attention_heads, cfg.qllama.hidden_size))
                sess[g]["ort-optimizer"] = ort.InferenceSession(
                    str(_ort_optimized(paths["portable"], g, d, heads, width)), ort_session_options(threads),
                    providers=["CPUExecutionProvider"])
        for g, by_side in sess.items():
            best = dict(zip(by_side, interleaved_best([lambda s=s: s.run(None, feeds[g]) for s in by_side.values()],
                                                       rounds)))
            res["rows"].append({"what": f"{g} alone", **{k: batch / t for k, t in best.items()}})
    finally:
        for p in pipes.values():
            p.close()
    return res


def format_table(res: dict) -> str:
    """Images/s per side and fused / portable (computed from the printed rates)."""
    cols = [c for c in ("portable", "fused", "ort-optimizer") if any(c in r for r in res["rows"])]
    out = [f"preset {res['preset']}, fp32, batch {res['batch']}, {res['threads']} threads: images/s",
           "| measured | " + " | ".join(cols) + " | fused / portable |", "|---" * (len(cols) + 2) + "|"]
    for r in res["rows"]:
        vals = {c: round(r[c], 2) for c in cols if c in r}
        out.append(f"| {r['what']} | " + " | ".join(str(vals.get(c, "-")) for c in cols)
                   + f" | {round(vals['fused'] / vals['portable'], 3)} |")
    out.append(f"max |fused - portable| of the embeddings: C {res['max_abs_diff']['C']:.2e}, "
               f"G {res['max_abs_diff']['G']:.2e}")
    return "\n".join(out)


def main(argv=None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the bundles here (reused when present)")
    ap.add_argument("--ort-optimizer", action="store_true", help="also time onnxruntime's optimizer's graphs")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="vision-fused-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = measure(a.preset, a.batch, a.rounds, a.threads, work.absolute(), a.ort_optimizer)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
