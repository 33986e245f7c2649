"""Our text decoder against onnxruntime-genai's, same LLaMA shape, same precision, one process.

    python -m bridge_export.exporter.bench.genai --preset small --precision int4-cpu,fp32
    bridge-export tools genai-bench --preset small --precision int4-cpu

onnxruntime-genai cannot build InternVL-14B (its model builder has no cross-attention, query
tokens or pooling heads), but our text decoder step is a plain LLaMA step, so the yardstick is a
Hugging Face `LlamaForCausalLM` with exactly that step's shape (hidden, heads, MLP, layers, vocab,
positions of the preset's QLLaMA; random weights, which do not change speed) built by genai's own
model builder with our int4 settings (block 32, asymmetric, accuracy level 4), against our bundle
of the same preset and precision. Both decoders are timed interleaved in one process, batch 1 and
4, at each past length:

- `graph`: bare onnxruntime sessions (same session options) running one decode step at the given
  past, feeds made once;
- `api`: whole tokens as a user gets them: our public generation loop (`Pipeline.iter_generate`, the
  loop `Pipeline.generate` runs: search -> iter_tokens_with) against genai's `og.Generator` loop
  (`generate_next_token` + `get_next_tokens`), greedy; each token's arrival is stamped and the rate
  counts the tokens after the first, so the prefill (and on our side the vision encoder and bridge)
  is left out. Our context always starts with the visual prefix (the query tokens), so a past
  shorter than it is
  raised to prefix + 1 on both sides; the table prints the past used.

onnxruntime-genai is the `bench` extra (pip install 'bridge-export[bench]'), never a dependency of
the runtime.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bridge_export.runtime.errors import UserError

from bridge_export.exporter.bench.throughput import interleaved_best

PRECISIONS = ("int4-cpu", "fp32")
GENAI_PRECISION = {"int4-cpu": "int4", "fp32": "fp32"}
# our int4-cpu defaults (exporter.cli int4_options), spelled as genai's builder takes them
GENAI_INT4 = ["block_size=32", "accuracy_level=4", "is_symmetric=false"]


class GenaiMissing(UserError):
    """onnxruntime-genai (or transformers) is not installed."""


def require_genai():
    """Import onnxruntime_genai, or say how to install it."""
    try:
        import onnxruntime_genai as og
    except ModuleNotFoundError as e:
        raise GenaiMissing("the genai benchmark needs onnxruntime-genai: pip install 'bridge-export[bench]' "
                           f"(onnxruntime-genai==0.18.0, transformers) ({e})") from e
    return og


# -- the two models ---------------------------------------------------------------------------------
def write_hf_llama(preset: str, out: Path, seed: int = 0) -> Path:
    """A random `LlamaForCausalLM` with the preset's QLLaMA text-decoder shape, plus a minimal tokenizer
    (genai's builder insists on one; the benchmark feeds token ids and never uses it)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bridge_export.reference_model.config import preset_config

    q = preset_config(preset).qllama
    cfg = transformers.LlamaConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
        num_key_value_heads=q.num_attention_heads, max_position_embeddings=q.max_position_embeddings,
        rms_norm_eps=q.rms_norm_eps, rope_theta=q.rope_theta, hidden_act=q.hidden_act, tie_word_embeddings=False,
        bos_token_id=q.bos_token_id, eos_token_id=q.eos_token_id, pad_token_id=q.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                         pad_token="<unk>").save_pretrained(out)
    return Path(out)


def _run(cmd: list[str], log: Path) -> None:
    """Run a build step with its (chatty) output in `log`; one line naming the log if it fails."""
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}); see {log}")


def build_genai(preset: str, precision: str, out: Path, threads: int, work: Path) -> Path:
    """genai's model builder on the preset-shaped Hugging Face model; its config set to `threads`."""
    hf = work / f"hf-{preset}"
    if not (hf / "config.json").is_file():  # in its own process: torch's memory goes back when it exits
        _run([sys.executable, "-m", "bridge_export.exporter.bench.genai", "hf-model", "--preset", preset, "--out", str(hf)], work / "hf.log")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", GENAI_PRECISION[precision], "-e", "cpu"]
    if precision == "int4-cpu":
        cmd += ["--extra_options"] + GENAI_INT4
    _run(cmd, work / f"genai-{preset}-{precision}.log")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return out


def export_ours(preset: str, precision: str, out: Path, work: Path, target: str | None = None,
                portable_decoder: bool = False) -> Path:
    """Our bundle of the preset at `precision`, streamed as `bridge-export onnx --preset` writes it (in its
    own process, so the reference model's memory is gone before the timing starts)."""
    cmd = [sys.executable, "-m", "bridge_export.exporter.bench.genai", "ours-bundle", "--preset", preset,
           "--precision", precision, "--out", str(out)]
    cmd += (["--target", target] if target else []) + (["--portable-decoder"] if portable_decoder else [])
    _run(cmd, work / f"ours-{preset}-{precision}.log")
    return out


def write_ours(preset: str, precision: str, out: Path, target: str | None = None,
               portable_decoder: bool = False) -> Path:
    """The streamed exporter on the preset's seeded reference model (int4 at its defaults: block 32,
    asymmetric, accuracy level 4, the settings genai's builder is given)."""
    from bridge_export.exporter.export.bundle import load_source
    from bridge_export.exporter.export.stream_export import export_model

    kw = {"target": target} if target is not None else {}
    if portable_decoder:
        kw["fused_decoder"] = False
    model, source = load_source(None, preset, 0)
    return export_model(model, out, source_desc=source, precision=precision, overwrite=True, **kw)


def shapes(ours: Path, genai: Path) -> dict:
    """The decoder shape each side declares (our manifest, genai's config); they must agree."""
    from bridge_export.runtime.manifest import read_manifest

    man = read_manifest(ours)
    kv = man.kv_layout
    d = json.loads((genai / "genai_config.json").read_text())["model"]
    dec = d["decoder"]
    mine = {"layers": kv.num_layers, "heads": kv.num_heads, "head_dim": kv.head_dim,
            "vocab": man.dims.vocab_size}
    theirs = {"layers": dec["num_hidden_layers"], "heads": dec["num_attention_heads"], "head_dim": dec["head_size"],
              "vocab": d["vocab_size"]}
    if mine != theirs or dec["num_key_value_heads"] != dec["num_attention_heads"]:
        raise RuntimeError(f"shapes differ: ours {mine}, genai {theirs}: the comparison would mean nothing")
    return {"ours": mine, "genai": theirs, "prefix_length": kv.prefix_length}


# -- graph alone ------------------------------------------------------------------------------------
def _step_feeds(sess, batch: int, past: int, heads: int, head_dim: int, past_names: set[str]) -> dict:
    """One decode step's feeds for a bare session: new token at position `past`, zero K/V of `past`
    positions (values do not change the time), a mask over past + 1."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name in past_names:  # a buffer of capacity past + 1 where the graph takes one (shared-buffer GQA)
            length = past + 1 if i.shape[2] == "capacity" else past
            feeds[i.name] = np.zeros((batch, heads, length, head_dim), np.float32)
        elif i.name == "seqlens_k":  # GroupQueryAttention's per-row total length - 1
            feeds[i.name] = np.full((batch,), past, np.int32)
        elif i.name == "query_seqlens":
            feeds[i.name] = np.ones((batch,), np.int32)
        elif i.name == "total_sequence_length":
            feeds[i.name] = np.array(past + 1, np.int32)
        elif i.name == "input_ids":
            feeds[i.name] = np.full((batch, 1), 5, np.int64 if "int64" in i.type else np.int32)
        elif i.name == "position_ids":
            feeds[i.name] = np.full((batch, 1), past, np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, past + 1), np.int64 if "int64" in i.type else np.int32)
        else:
            raise RuntimeError(f"decoder input {i.name!r} is not one the graph benchmark knows how to feed")
    return feeds


def graph_rates(ours: Path, genai: Path, batches, pasts, threads: int, steps: int, rounds: int) -> list[dict]:
    """Tokens/s of one decode step run by bare sessions of each side's decoder graph."""
    import onnxruntime as ort

    from bridge_export.runtime.manifest import read_manifest
    from bridge_export.runtime.sessions import ort_session_options

    man = read_manifest(ours)
    kv = man.kv_layout
    gcfg = json.loads((genai / "genai_config.json").read_text())["model"]["decoder"]
    sess = {"ours": ort.InferenceSession(str(man.graph_path("text_decoder")), ort_session_options(threads),
                                         providers=["CPUExecutionProvider"]),
            "genai": ort.InferenceSession(str(genai / gcfg["filename"]), ort_session_options(threads),
                                          providers=["CPUExecutionProvider"])}
    names = {"ours": set(kv.names("past")),
             "genai": {gcfg["inputs"][k] % i for k in ("past_key_names", "past_value_names")
                       for i in range(gcfg["num_hidden_layers"])}}
    rows = []
    for b in batches:
        for p in pasts:
            feeds = {s: _step_feeds(sess[s], b, p, kv.num_heads, kv.head_dim, names[s]) for s in sess}
            fns = {s: (lambda s=s: [sess[s].run(None, feeds[s]) for _ in range(steps)]) for s in sess}
            best = dict(zip(fns, interleaved_best(list(fns.values()), rounds)))
            rows.append(_row("graph", man.precision.mode, b, p, b * steps / best["ours"], b * steps / best["genai"]))
    return rows


def _decode_rates(fns: dict, batch: int, tokens: int, rounds: int) -> dict:
    """Best tokens/s of each generation callable, called in turn `rounds` times after one warm-up;
    a call returns the time each token arrived, and its rate counts the tokens after the first (the
    first waits for the prefill)."""
    best = {k: 0.0 for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            stamps = fn()
            if len(stamps) != tokens:
                raise RuntimeError(f"{k} produced {len(stamps)} tokens, not {tokens}")
            if r:
                best[k] = max(best[k], batch * (tokens - 1) / (stamps[-1] - stamps[0]))
    return best


# -- as a user gets them ----------------------------------------------------------------------------
def api_rates(ours: Path, genai: Path, batches, pasts, threads: int, tokens: int, rounds: int) -> list[dict]:
    """Tokens/s of whole greedy tokens: our Pipeline.generate against genai's Generator loop."""
    from bridge_export import runtime

    og = require_genai()
    pipe = runtime.load(ours, threads=threads)
    model = og.Model(str(genai))
    man = pipe.manifest
    q, vocab, size = man.kv_layout.prefix_length, man.dims.vocab_size, man.preprocessing.image_size
    rng = np.random.default_rng(0)
    rows = []
    try:
        for b in batches:
            px = rng.standard_normal((b, 3, size, size), dtype=np.float32)
            for p in pasts:
                past = max(p, q + 1)  # our context starts with the q query tokens
                prompt = rng.integers(3, vocab, (b, past - q))
                genai_ids = np.concatenate([np.ones((b, q), np.int64) * 3, prompt], axis=1).astype(np.int32)

                def ours_decode(prompt=prompt, px=px):
                    stamps = []  # the loop Pipeline.generate runs (search -> iter_tokens_with), token by token
                    for _ in pipe.iter_generate(px, prompt, max_new_tokens=tokens, min_new_tokens=tokens):
                        stamps.append(time.perf_counter())
                    return stamps

                def genai_decode(ids=genai_ids, b=b, past=past):
                    params = og.GeneratorParams(model)
                    params.set_search_options(max_length=past + tokens, min_length=past + tokens, batch_size=b,
                                              do_sample=False)
                    gen = og.Generator(model, params)
                    gen.append_tokens(ids)
                    stamps = []
                    while not gen.is_done():
                        gen.generate_next_token()
                        gen.get_next_tokens()
                        stamps.append(time.perf_counter())
                    return stamps

                rate = _decode_rates({"ours": ours_decode, "genai": genai_decode}, b, tokens, rounds)
                rows.append(_row("api", man.precision.mode, b, past, rate["ours"], rate["genai"]))
    finally:
        pipe.close()
        del model
    return rows


def _row(mode: str, precision: str, batch: int, past: int, ours: float, genai: float) -> dict:
    for side, r in (("ours", ours), ("genai", genai)):
        if not (math.isfinite(r) and r > 0):
            raise RuntimeError(f"{mode} {precision} batch {batch} past {past}: {side} rate {r} is not a positive "
                               "number (timing noise larger than the work: raise --tokens/--rounds)")
    o, g = round(ours, 2), round(genai, 2)
    return {"mode": mode, "precision": precision, "batch": batch, "past": past, "ours_tok_s": o,
            "genai_tok_s": g, "ratio": round(o / g, 3)}


def format_table(rows: list[dict], preset: str) -> str:
    """Markdown table: tokens/s of each side and ours / genai (computed from the printed rates)."""
    out = [f"preset {preset}: tokens/s, ours / onnxruntime-genai",
           "| mode | precision | batch | past | ours tok/s | genai tok/s | ours/genai |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['precision']} | {r['batch']} | {r['past']} | {r['ours_tok_s']} | "
                   f"{r['genai_tok_s']} | {r['ratio']} |")
    return "\n".join(out)


@dataclass
class Settings:
    """What one benchmark run measures."""

    preset: str = "small"
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1, 4)
    pasts: tuple[int, ...] = (16, 256)
    threads: int = 2
    steps: int = 8        # graph mode: decode steps per timed call
    tokens: int = 17      # api mode: tokens per generation (16 decode steps after the first token)
    rounds: int = 3
    modes: tuple[str, ...] = ("graph", "api")
    target: str | None = None  # our bundles' operator target (None: the precision's default)
    portable_decoder: bool = False  # keep our portable decoder in an onnxruntime-target bundle


def run(s: Settings, work: Path | None = None, keep: bool = False, rebuild_ours: bool = False) -> dict:
    """Build both sides for every precision (reusing what `work` already holds), time them, return
    {"settings", "shapes", "rows"}. A temporary `work` is deleted afterwards unless `keep`."""
    from bridge_export.reference_model.config import preset_config

    for p in s.precisions:
        if p not in PRECISIONS:
            raise UserError(f"precision {p!r} is not benchmarked against genai: use {' or '.join(PRECISIONS)}")
    if s.tokens < 2:
        raise UserError("tokens must be at least 2 (the rate counts the tokens after the first)")
    q = preset_config(s.preset).qllama
    if q.head_dim % 8:
        raise UserError(f"preset {s.preset!r} has head_dim {q.head_dim}; onnxruntime-genai's GroupQueryAttention "
                        "needs a multiple of 8: use small, real-width, digits or internvl-14b-224px")
    top = max(s.pasts, default=0)
    if max(top, preset_config(s.preset).num_query_token + 1) + s.tokens > q.max_position_embeddings or min(s.pasts, default=0) < 1:
        raise UserError(f"pasts must be >= 1 and past + tokens within preset {s.preset!r}'s "
                        f"{q.max_position_embeddings} positions, got pasts {list(s.pasts)}, tokens {s.tokens}")
    require_genai()  # after the arguments: a bad one is reported whether or not the extra is installed
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="genai-bench-")) if own else Path(work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    result = {"settings": asdict(s), "shapes": {}, "rows": []}
    try:
        for p in s.precisions:
            ours = work / (f"ours-{s.preset}-{p}" + (f"-{s.target}" if s.target else "")
                           + ("-portable" if s.portable_decoder else ""))
            genai = work / f"genai-{s.preset}-{p}"
            if rebuild_ours or not (ours / "manifest.json").is_file():
                export_ours(s.preset, p, ours, work, s.target, s.portable_decoder)
            if not (genai / "genai_config.json").is_file():
                build_genai(s.preset, p, genai, s.threads, work)
            result["shapes"][p] = shapes(ours, genai)
            if "graph" in s.modes:
                result["rows"] += graph_rates(ours, genai, s.batches, s.pasts, s.threads, s.steps, s.rounds)
            if "api" in s.modes:
                result["rows"] += api_rates(ours, genai, s.batches, s.pasts, s.threads, s.tokens, s.rounds)
            print(format_table([r for r in result["rows"] if r["precision"] == p], s.preset), file=sys.stderr,
                  flush=True)
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> None:
    """Command line (see the module docstring); prints the table, and the JSON with --json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    h = sub.add_parser("hf-model", help="(internal) write the preset-shaped Hugging Face LLaMA")
    h.add_argument("--preset", required=True)
    h.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--precision", default=",".join(PRECISIONS), help="int4-cpu and/or fp32, comma-separated")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--pasts", default="16,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=17, help="api mode: tokens per generation (the first is not timed)")
    ap.add_argument("--steps", type=int, default=8, help="graph mode: steps per timed call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="graph,api")
    ap.add_argument("--target", choices=("onnxruntime", "tensorrt"),
                    help="our bundles' operator target (default: the precision's; fp32 is portable)")
    ap.add_argument("--work", type=Path, help="keep both sides' models here (reused when present)")
    ap.add_argument("--portable-decoder", action="store_true",
                    help="our portable decoder even where the fused one applies (the figures before it)")
    ap.add_argument("--rebuild-ours", action="store_true", help="re-export our bundles even if --work holds them")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    o = sub.add_parser("ours-bundle", help="(internal) export our bundle of the preset")
    o.add_argument("--preset", required=True)
    o.add_argument("--precision", required=True)
    o.add_argument("--out", required=True, type=Path)
    o.add_argument("--target")
    o.add_argument("--portable-decoder", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "ours-bundle":
        write_ours(args.preset, args.precision, args.out, args.target, args.portable_decoder)
        return
    if args.cmd == "hf-model":
        write_hf_llama(args.preset, args.out)
        return
    s = Settings(args.preset, tuple(p for p in args.precision.split(",") if p), _ints(args.batches),
                 _ints(args.pasts), args.threads, args.steps, args.tokens, args.rounds,
                 tuple(m for m in args.modes.split(",") if m), args.target, args.portable_decoder)
    res = run(s, args.work, keep=args.work is not None, rebuild_ours=args.rebuild_ours)
    print(format_table(res["rows"], s.preset))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
