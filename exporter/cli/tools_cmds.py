"""`bridge-export demo` and `bridge-export tools ...`: the measuring and maintenance programs as subcommands.

Each tool keeps its own argument parser (they also run as `python -m MODULE`); the subcommand hands
its arguments over unchanged, so `bridge-export tools NAME --help` prints the tool's own help.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import click

from bridge_export.exporter.cli.app import main
from bridge_export.exporter.cli.common import friendly
from bridge_export.exporter.cli.group import SectionedGroup


@main.command(section="start")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="directory for the bundles and the report")
@click.option("--limit", default=0, type=click.IntRange(0), help="use only the first N test digits (0: all)")
@click.option("--precisions", default="fp32,fp16,int8,int8-cpu,int4-cpu", show_default=True,
              help="comma-separated precisions to export and compare")
@friendly
def demo(out, limit, precisions):
    """Run the whole path on the shipped digits model: export, every precision, onnxruntime, accuracy/speed report."""
    from bridge_export.exporter.demo import run_demo

    run_demo(out, limit=limit, precisions=[p for p in precisions.split(",") if p])


# name -> (module whose main(argv) runs it, one-line description). The description is the tool's.
TOOLS = {
    "gpu-check": ("bridge_export.runtime.gpu.check",
                  "Check copy geometry, stream order and the device KV cache at full shape on a real GPU "
                  "(PASS/FAIL per item)"),
    "trt-stamp": ("bridge_export.runtime.gpu.trt_compat",
                  "Stamp a trtexec-built engine's sidecar on the device: trt-stamp stamp GRAPH.json.in"),
    "tritonserver": ("bridge_export.runtime.serve.tritonserver",
                     "Run the tritonserver PyTriton bundles on a `triton-repo --backend python` repository"),
    "fullsize": ("bridge_export.exporter.bench.fullsize",
                 "InternVL-14B at full size on one machine: random checkpoint -> streamed bundles -> run, measured"),
    "fullsize-parity": ("bridge_export.exporter.bench.fullsize_parity",
                        "Full-size parity: a random checkpoint -> fp32 bundle -> runtime against the reference"),
    "graphs-bench": ("bridge_export.exporter.bench.graphs",
                     "Decoder nodes per layer and decode-step time, traced against streamed export"),
    "tokenizer-bench": ("bridge_export.exporter.bench.tokenizer",
                        "Tokenizer speed and ids against SentencePiece itself, side by side"),
    "genai-bench": ("bridge_export.exporter.bench.genai",
                    "Our text decoder against onnxruntime-genai's on the same LLaMA shape, interleaved"),
    "vision-bench": ("bridge_export.exporter.bench.vision_fused",
                     "Image embeddings/s, fused (onnxruntime target) vision encoder and bridge vs portable"),
    "qdq-variants": ("bridge_export.exporter.bench.qdq_variants",
                     "INT8 8-bit (TensorRT) / 7-bit (onnxruntime) / FP8 from one bundle: cosines and demo accuracy"),
    "int4-sweep": ("bridge_export.exporter.bench.int4_sweep",
                   "INT4 settings side by side: block size, symmetric or not, lm_head and embeddings"),
    "train-demo": ("bridge_export.reference_model.train_demo",
                   "Train the shipped demo digits model (about an hour on 2 cores)"),
    "load-bench": ("bridge_export.runtime.serve.load_bench",
                   "Load generator for serve: step-level against static batching, side by side ([serve] venv)"),
    "fused-bench": ("bridge_export.exporter.bench.fused",
                    "Fused against portable text decoder on onnxruntime: decode tokens/s side by side"),
    "integrity-cost": ("bridge_export.exporter.bench.integrity_cost",
                       "What the default integrity checks cost at load, cold and warm cache, side by side"),
}


@main.group(cls=SectionedGroup, section="tools")
def tools():
    """Measuring and maintenance programs (GPU check, full-size runs, benchmarks, demo training)."""


def _tool(name: str, module: str, description: str) -> click.Command:
    @click.pass_context
    def run(ctx):
        import inspect
        import sys

        entry = importlib.import_module(module).main
        if isinstance(entry, click.Command):  # a click tool: run it with its own parser
            entry.main(list(ctx.args), prog_name=f"bridge-export tools {name}")
        if inspect.signature(entry).parameters:
            code = entry(list(ctx.args))
        else:  # a tool that reads sys.argv itself
            sys.argv = [f"bridge-export tools {name}", *ctx.args]
            code = entry()
        ctx.exit(code if isinstance(code, int) else 0)

    return click.Command(name, callback=run, help=description, add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


for _name, (_module, _description) in TOOLS.items():
    tools.add_command(_tool(_name, _module, _description))
