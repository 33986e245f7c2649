"""Export commands: checkpoint -> ONNX bundle (onnx), -> another precision (precision), -> TensorRT (engine)."""
from __future__ import annotations

from pathlib import Path

import click

from bridge_export.runtime.manifest import GRAPHS
from bridge_export.runtime.precisions import PRECISIONS

from bridge_export.exporter.cli.app import main
from bridge_export.exporter.cli.common import (PRESET, deprecated_alias, friendly, int4_options, int4_settings,
                                               precision_help, resolve_precision, target_option)

DIRECT = ("fp16", "int8-cpu", "int4-cpu")  # the streamed exporter writes these at --out, with no fp32 bundle first


@main.command("onnx", section="export")
@click.option("--checkpoint", help="the model to export: a directory in the published layout, or a Hugging Face "
                                   "repo id (e.g. OpenGVLab/InternVL-14B-224px; needs huggingface_hub)")
@click.option("--preset", type=PRESET, help="a preset with seeded random weights instead of a checkpoint")
@click.option("--seed", default=0, show_default=True, help="random weights' seed for --preset")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--precision", "precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help=precision_help() + ". fp16/int8-cpu/int4-cpu are written at --out directly; int8 or a traced "
                   "--exporter write an fp32 bundle at --out plus OUT-PRECISION")
@target_option
@click.option("--opset", default=18, show_default=True, help="ONNX opset (TensorRT 10 parses 17-20)")
@click.option("--max-batch", default=8, show_default=True,
              help="largest batch the bundle accepts (its limits and TensorRT profiles)")
@click.option("--max-seq", type=int, help="longest sequence including the query tokens "
                                                        "(default: the model's max positions)")
@click.option("--tokenizer", type=click.Path(path_type=Path, file_okay=False),
              help="directory with tokenizer.model or tokenizer.json (default: the checkpoint's)")
@int4_options
@click.option("--calib", type=click.Path(path_type=Path), help="int8/fp8: folder of calibration images")
@click.option("--exporter", "exporter", type=click.Choice(["stream", "torchscript", "dynamo"]), default="stream",
              show_default=True, help="stream: graphs written from the config, weights streamed tensor by "
              "tensor (bounded memory); torchscript/dynamo: trace the model in memory (legacy)")
@click.option("--dynamo", is_flag=True, hidden=True, help="deprecated spelling of --exporter dynamo")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@friendly
def onnx_cmd(checkpoint, preset, seed, out, precision, target, opset, max_batch, max_seq, tokenizer, block_size,
             symmetric, accuracy_level, calib, exporter, dynamo, overwrite):
    """Export a checkpoint (or a preset) to a bundle: ONNX graphs, weights and a manifest."""
    from bridge_export.exporter.export.bundle import check_export_args, export_bundle, load_source
    from bridge_export.exporter.export.checkpoint_source import resolve_checkpoint
    from bridge_export.exporter.export.specs import Limits
    from bridge_export.exporter.output import check_output_dir

    target = resolve_precision(precision, target)
    if max_seq is not None and max_seq <= 0:
        raise click.ClickException(f"--max-seq must be a positive number of positions, got {max_seq}")
    limits = Limits(max_batch, max_seq or 0)
    exporter = "dynamo" if dynamo else exporter
    direct = exporter == "stream" and precision in DIRECT
    int4 = int4_settings(block_size, symmetric, accuracy_level)
    # everything that can be refused is refused before any weight is read (or downloaded)
    check_export_args(opset, limits)
    check_output_dir(out, overwrite)
    if precision != "fp32" and not direct:
        check_output_dir(Path(f"{Path(out).absolute()}-{precision}"), overwrite, flag="--precision output")
        if precision in ("int8", "fp8") and calib is None:
            raise click.ClickException(f"--precision {precision} needs --calib IMAGES_DIR: its scales are calibrated "
                                       "on your images")
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint)
    if exporter == "stream":
        from bridge_export.exporter.export.stream_export import export_checkpoint, export_model

        # fp32 and the direct precisions are written for the chosen target; int8/fp8 convert an fp32 bundle
        # of the default target below, and make_precision_bundle applies theirs
        common = dict(precision=precision if direct else "fp32", tokenizer=tokenizer, opset=opset, limits=limits,
                      overwrite=overwrite, int4=int4 if precision == "int4-cpu" else None,
                      target=target if direct or precision == "fp32" else None)
        if checkpoint is not None and preset is None:  # streamed from the files, never loaded whole
            path = export_checkpoint(checkpoint, out, **common)
        else:
            model, source = load_source(checkpoint, preset, seed)  # a preset (or the refusal of both/neither)
            path = export_model(model, out, source_desc=source, **common)
    else:
        if target == "onnxruntime" and precision in ("fp32", "fp16"):
            raise click.ClickException("--target onnxruntime is written by the streamed exporter only: drop "
                                       f"--exporter {exporter}")
        model, source = load_source(checkpoint, preset, seed)
        path = export_bundle(model, out, checkpoint=checkpoint, tokenizer=tokenizer, opset=opset, limits=limits,
                             overwrite=overwrite, exporter=exporter, source=source)
    if precision != "fp32" and not direct:
        from bridge_export.exporter.quantize.precision import make_precision_bundle

        make_precision_bundle(path, Path(f"{path}-{precision}"), precision, calib=calib, overwrite=overwrite, int4=int4,
                              target=target)


def _legacy_precision_flags(f):
    """--fp16 / --int8 / --int8-cpu / --int4-cpu: the old spellings of `precision --precision NAME`, hidden."""
    for name in ("int4-cpu", "int8-cpu", "int8", "fp16"):
        f = click.option(f"--{name}", "legacy", flag_value=name, hidden=True,
                         help=f"deprecated spelling of --precision {name}")(f)
    return f


@main.command(section="export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precision", "precision", type=click.Choice([p for p in PRECISIONS if p != "fp32"]),
              help=precision_help())
@_legacy_precision_flags
@target_option
@int4_options
@click.option("--calib", type=click.Path(path_type=Path), help="int8/fp8: folder of calibration images")
@click.option("--calib-texts", type=click.Path(path_type=Path, dir_okay=False),
              help="int8: file of calibration texts, one per line (default: a built-in English set)")
@click.option("--method", type=click.Choice(["max", "entropy", "percentile"]), default="max", show_default=True,
              help="int8: how calibration turns activation ranges into scales")
@click.option("--target-cosine", type=click.FloatRange(0, 1), default=None,
              help="int8: keep the most sensitive MatMuls in fp32 until every output reaches this cosine to fp32 "
                   "on held-out inputs (e.g. 0.999); without it the achieved cosines are reported")
@click.option("--exclude", default="", help="comma-separated operator types to keep in fp32 (replaces the default)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@friendly
def precision(bundle, precision, legacy, target, block_size, symmetric, accuracy_level, calib, calib_texts, method,
              target_cosine, exclude, out, overwrite):
    """Convert an fp32 bundle to another precision (fp16, int8, int8-cpu, int4-cpu, fp8) and print its accuracy report."""
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    if legacy is not None:
        click.echo(f"warning: --{legacy} is deprecated: use --precision {legacy}", err=True)
        if precision is not None and precision != legacy:
            raise click.ClickException(f"--precision {precision} and --{legacy} disagree: give --precision only")
        precision = legacy
    if precision is None:
        raise click.ClickException("choose a precision: --precision " + "|".join(p for p in PRECISIONS if p != "fp32"))
    target = resolve_precision(precision, target)
    make_precision_bundle(bundle, out, precision, calib=calib, calib_texts=calib_texts, method=method,
                          exclude=[s for s in exclude.split(",") if s] or None, overwrite=overwrite,
                          target_cosine=target_cosine, int4=int4_settings(block_size, symmetric, accuracy_level),
                          target=target)


@main.command("random-checkpoint", section="export")
@click.option("--preset", required=True, type=PRESET, help="the preset (model size) to write")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="weights' data type (the published checkpoints are bf16)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="checkpoint directory to write")
@click.option("--seed", default=0, show_default=True, help="random weights' seed (same seed, same weights)")
@click.option("--shard-size", default="5GB", show_default=True, help="largest shard file (as transformers writes)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--threads", default=0, type=click.IntRange(0, 64),
              help="threads drawing random numbers (default: the cores, at most 8)")
@deprecated_alias("--workers", "--threads")
@friendly
def random_checkpoint(preset, dtype, out, seed, shard_size, overwrite, threads, workers):
    """Write a seeded random checkpoint in the published layout, in bounded memory (dry runs, scale tests)."""
    from bridge_export.reference_model.checkpoint_writer import write_random_checkpoint

    threads = threads or (int(workers) if workers else 0)
    path = write_random_checkpoint(out, preset, dtype=dtype, seed=seed, shard_size=shard_size, overwrite=overwrite,
                                   workers=threads or None)
    click.echo(f"wrote {path}")


@main.command(section="export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--graphs", default=",".join(GRAPHS), show_default=True, help="comma-separated graphs to build")
@click.option("--max-batch", default=None, type=click.IntRange(1, 4096),
              help="largest batch the engines accept (default: the bundle's)")
@click.option("--max-seq", default=None, type=click.IntRange(1),
              help="longest sequence the engines accept (default: the bundle's)")
@click.option("--workspace", default=4.0, show_default=True, type=click.FloatRange(0, 1024, min_open=True),
              help="TensorRT builder workspace in GiB")
@click.option("--timing-cache", type=click.Path(path_type=Path, dir_okay=False),
              help="persistent TensorRT timing cache file (reused across builds)")
@click.option("--version-compatible", is_flag=True, help="engines later TensorRT versions can run (slower)")
@click.option("--hardware-compatible", is_flag=True, help="engines for any Ampere-or-newer GPU (slower)")
@click.option("--out", type=click.Path(path_type=Path), help="engine directory (default: BUNDLE/engines)")
@click.option("--emit-trtexec", is_flag=True, help="only write build_engines.sh with trtexec commands (and sidecar "
              "templates the script stamps after each build, so the runtime accepts the engines)")
@click.option("--trt-major", type=click.Choice(["8", "10", "11"]), default="10", show_default=True,
              help="--emit-trtexec: TensorRT version on the device (10: JetPack 6, 11: JetPack 7: strongly typed; "
                   "8: JetPack 5: weakly typed with the fp32 islands pinned)")
@friendly
def engine(bundle, graphs, max_batch, max_seq, workspace, timing_cache, version_compatible, hardware_compatible,
           out, emit_trtexec, trt_major):
    """Build TensorRT engines (one per graph) from a bundle, or write the equivalent trtexec script."""
    from bridge_export.exporter.tensorrt.engines import EngineOptions, build_engines, write_trtexec_script

    opts = EngineOptions(graphs=[g for g in graphs.split(",") if g], max_batch=max_batch, max_seq=max_seq,
                         workspace_gib=workspace, timing_cache=timing_cache, version_compatible=version_compatible,
                         hardware_compatible=hardware_compatible)
    out = out or Path(bundle) / "engines"
    if emit_trtexec:
        click.echo(f"wrote {write_trtexec_script(bundle, out, opts, trt_major=int(trt_major))}")
    else:
        for p in build_engines(bundle, out, opts):
            click.echo(f"built {p}")
