"""Commands that check and measure a bundle: verify, inspect, bench, bench-load."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bridge_export.exporter.cli.app import main
from bridge_export.exporter.cli.common import PRESET, deprecated_alias, friendly, threads_option


@main.command(section="check")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--checkpoint", help="the checkpoint the bundle came from (directory or Hugging Face repo id)")
@click.option("--preset", type=PRESET, help="or the preset (with --seed) it came from")
@click.option("--seed", default=0, show_default=True, help="random weights' seed for --preset")
@click.option("--checksums", is_flag=True, help="hash every file against the manifest's sha256 (no torch needed)")
@friendly
def verify(bundle, checkpoint, preset, seed, checksums):
    """Check every graph and the end-to-end outputs against the PyTorch reference (and/or every file's sha256)."""
    from bridge_export.runtime.manifest import read_manifest

    man = read_manifest(bundle, verify_checksums=checksums)
    if checksums:
        click.echo(f"checksums: all {len(man.files)} files match the manifest "
                   f"({sum(e.size for e in man.files.values()) / 1e6:.1f} MB hashed)")
        if checkpoint is None and preset is None:
            return
    if man.precision.mode != "fp32":
        raise click.ClickException(f"{bundle} is a {man.precision.mode} bundle: verify checks fp32 parity with the "
                                   "reference; its accuracy against fp32 is in its manifest (bridge-export inspect)")
    from bridge_export.exporter.export.checkpoint_source import resolve_checkpoint
    from bridge_export.exporter.verify.parity import verify_bundle
    from bridge_export.exporter.verify.parts import reference_source

    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint)
    report = verify_bundle(bundle, reference_source(checkpoint, preset, seed))
    click.echo(report.format())
    if not report.passed:
        sys.exit(1)


@main.command(section="check")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the raw manifest")
@friendly
def inspect(bundle, as_json):
    """Print a bundle's manifest as a readable table: graphs, inputs and outputs, precision, limits."""
    from bridge_export.runtime.manifest import read_manifest

    from bridge_export.exporter.inspect_bundle import format_manifest

    man = read_manifest(bundle, verify_checksums=False)
    click.echo(json.dumps(man.to_dict(), indent=2) if as_json else format_manifest(man))


@main.command(section="check")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="run the PyTorch reference from this checkpoint side by side")
@click.option("--preset", type=PRESET, help="or a preset (with --seed) as the reference")
@deprecated_alias("--reference", "--checkpoint")
@deprecated_alias("--reference-preset", "--preset")
@click.option("--seed", default=0, show_default=True, help="random weights' seed for --preset")
@click.option("--pasts", default="16,256,1024", show_default=True, help="past lengths for decode speed")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="decode steps timed per past length")
@click.option("--compare", multiple=True, type=click.Path(path_type=Path),
              help="other bundles (e.g. fp16 / int8-cpu) to time and check against BUNDLE in the same run")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="--compare: interleaved rounds per past length, best kept (raise it on a busy machine)")
@lambda f: threads_option(f, "threads for both sides")
@friendly
def bench(bundle, checkpoint, preset, reference, reference_preset, seed, pasts, tokens, compare, repeats, threads):
    """Throughput and memory of a bundle, and of the reference side by side in the same process."""
    from bridge_export.exporter.bench.throughput import run_bench
    from bridge_export.exporter.export.bundle import load_source

    checkpoint = checkpoint or (Path(reference) if reference else None)
    preset = preset or reference_preset

    def load_reference():  # called after the runtime's memory is measured
        return load_source(checkpoint, preset, seed)[0]

    try:
        past_list = [int(p) for p in pasts.split(",") if p.strip()]
    except ValueError:
        raise click.ClickException(f"--pasts must be comma-separated whole numbers, got {pasts!r}") from None
    if not past_list or min(past_list) < 1:
        raise click.ClickException(f"--pasts must list positive past lengths, got {pasts!r}")
    run_bench(bundle, reference=load_reference if (checkpoint or preset) else None, threads=threads,
              pasts=past_list, steps=tokens, compare=list(compare), repeats=repeats)


@main.command("bench-load", section="check")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="timed rounds (after one warm-up)")
@threads_option
@click.option("--no-checksums", is_flag=True, help="skip timing runtime.load(verify_checksums=True)")
@friendly
def bench_load(bundle, repeats, threads, no_checksums):
    """Time runtime.load() against onnxruntime opening the same graphs, side by side."""
    from bridge_export.exporter.bench.load import format_load, measure_load

    click.echo(format_load(bundle, measure_load(bundle, repeats, threads, checksums=not no_checksums)))
