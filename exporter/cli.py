"""The `bridge-export` command line: a thin layer over the Python API."""
from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path

import click

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.manifest import GRAPHS
from bridge_export.runtime.pipeline import MAX_BATCH, MAX_CAPTION_BATCH
from bridge_export.runtime.search import MAX_BEAMS
from bridge_export.runtime.sessions import max_threads

from bridge_export.exporter.quantize.calibration import IMAGE_SUFFIXES as CALIBRATION_SUFFIXES

# Errors a user can cause and fix: shown as one line, no traceback (--debug shows it). Anything else is a
# bug and keeps its traceback. ValueError is how every argument check reports; OSError covers a full
# disk, a missing or unreadable file; MemoryError a request too large for this machine.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, MemoryError)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}" + (" (free some disk space or choose another --out)"
                                         if e.errno == errno.ENOSPC else "")
    if isinstance(e, MemoryError):
        return "out of memory: use a smaller --batch-size or fewer --beams"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("debug")) or os.environ.get("BRIDGE_EXPORT_DEBUG") == "1"


# Top-level modules of each optional extra: a command that needs a missing one says which extra to install.
EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
          "transformers": "export", "sentencepiece": "export", "google": "export",
          "tensorrt": "tensorrt", "polygraphy": "tensorrt", "cuda": "tensorrt", "sklearn": "train",
          "pyarrow": "ray", "ray": "ray", "pytriton": "serve", "tritonclient": "serve"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line advice for a missing optional dependency, or None if it belongs to no extra."""
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f'this command needs {top}, which is not installed: pip install "bridge-export[{extra}]"'


def friendly(fn):
    """Turn user errors into one-line messages and Ctrl-C into a clean exit (code 130); --debug: tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written (partial output removed)", err=True)
            sys.exit(130)
        except click.ClickException:
            raise
        except ModuleNotFoundError as e:
            advice = missing_extra(e)
            if advice is None:
                raise
            raise click.ClickException(advice) from e
        except USER_ERRORS as e:
            if _debug():
                raise
            raise click.ClickException(_one_line(e)) from e

    return wrapper


def run_options(fn):
    """--backend and --device for the commands that run a bundle (see runtime.load)."""
    fn = click.option("--device", default=None,
                      help="cpu (onnxruntime's default) or cuda / cuda:N (KV cache on the GPU; TensorRT's default)")(fn)
    return click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                        show_default=True, help="tensorrt runs the engines/ that `bridge-export engine` built")(fn)


def load_pipeline(bundle, backend: str, device):
    """runtime.load, closed when the command ends (frees device memory on a GPU)."""
    from bridge_export import runtime

    pipe = runtime.load(bundle, backend=backend, device=device)
    click.get_current_context().call_on_close(pipe.close)
    return pipe


@click.group()
@click.version_option(package_name="bridge-export", message="%(version)s")
@click.option("--debug", is_flag=True, help="show full tracebacks for errors")
@click.option("-q", "--quiet", is_flag=True, help="show warnings and errors only")
def main(debug, quiet):
    """Export InternVL-14B (InternVL-C / InternVL-G) to ONNX and TensorRT, and run the result."""
    import logging

    from bridge_export.runtime.progress import log_to_stderr, quiet_third_party

    log_to_stderr(logging.WARNING if quiet else logging.INFO)
    quiet_third_party()


def int4_options(f):
    """--block-size / --symmetric / --accuracy-level (int4-cpu settings), for `onnx` and `precision`."""
    f = click.option("--accuracy-level", default=4, show_default=True,
                     help="int4: MatMulNBits compute (4 = int8 activations, fastest on CPU; 0 = fp32)")(f)
    f = click.option("--symmetric", is_flag=True, help="int4: no zero points")(f)
    return click.option("--block-size", default=32, show_default=True,
                        help="int4: weights per scale (16-256, power of 2)")(f)


def _int4(block_size: int, symmetric: bool, accuracy_level: int):
    from bridge_export.exporter.quantize.int4 import Int4Options

    return Int4Options(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)


@main.command("onnx")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="original-format model directory")
@click.option("--preset", help="a preset instead of a checkpoint (tiny, small, internvl-14b-224px)")
@click.option("--seed", default=0, show_default=True, help="weights seed for --preset")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (TensorRT 10 parses 17-20)")
@click.option("--max-batch", default=8, show_default=True, help="largest batch (TensorRT profiles)")
@click.option("--max-seq", type=int, help="longest sequence incl. queries (default: max positions)")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="directory with tokenizer.model/json")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-cpu", "int4-cpu"]), default="fp32",
              show_default=True, help="fp16/int8-cpu/int4-cpu: written directly at --out (streamed); int8 "
              "(calibrated Q/DQ) or a traced exporter: an fp32 bundle at --out plus OUT-PRECISION")
@int4_options
@click.option("--calib", type=click.Path(path_type=Path), help="calibration images folder (int8)")
@click.option("--exporter", "exporter", type=click.Choice(["stream", "torchscript", "dynamo"]), default="stream",
              show_default=True, help="stream: graphs written from the config, weights streamed tensor by "
              "tensor (bounded memory); torchscript/dynamo: trace the model in memory (legacy)")
@click.option("--dynamo", is_flag=True, help="same as --exporter dynamo")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@friendly
def onnx_cmd(checkpoint, preset, seed, out, opset, max_batch, max_seq, tokenizer, precision, block_size, symmetric,
             accuracy_level, calib, exporter, dynamo, overwrite):
    """Export a checkpoint or preset into a bundle of ONNX graphs plus manifest."""
    from bridge_export.exporter.export.bundle import check_export_args, export_bundle, load_source
    from bridge_export.exporter.output import check_output_dir
    from bridge_export.exporter.export.specs import Limits

    if max_seq is not None and max_seq <= 0:
        raise click.ClickException(f"--max-seq must be a positive number of positions, got {max_seq}")
    limits = Limits(max_batch, max_seq or 0)
    exporter = "dynamo" if dynamo else exporter
    direct = exporter == "stream" and precision in ("fp16", "int8-cpu", "int4-cpu")  # at --out, no fp32 bundle
    int4 = _int4(block_size, symmetric, accuracy_level)
    # everything that can be refused is refused before any weight is read
    check_export_args(opset, limits)
    check_output_dir(out, overwrite)
    if precision != "fp32" and not direct:
        check_output_dir(Path(f"{Path(out).absolute()}-{precision}"), overwrite, flag="--precision output")
        if precision == "int8" and calib is None:
            raise click.ClickException("--precision int8 needs --calib IMAGES_DIR: INT8 scales are calibrated on "
                                       "your images")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise click.ClickException(f"--tokenizer {tokenizer} is not a directory")
    if exporter == "stream":
        from bridge_export.exporter.export.stream_export import export_checkpoint, export_model

        common = dict(precision=precision if direct else "fp32", tokenizer=tokenizer, opset=opset, limits=limits,
                      overwrite=overwrite, int4=int4 if precision == "int4-cpu" else None)
        if checkpoint is not None and preset is None:  # streamed from the files, never loaded whole
            path = export_checkpoint(checkpoint, out, **common)
        else:
            model, source = load_source(checkpoint, preset, seed)  # a preset (or the refusal of both/neither)
            path = export_model(model, out, source_desc=source, **common)
    else:
        model, source = load_source(checkpoint, preset, seed)
        path = export_bundle(model, out, checkpoint=checkpoint, tokenizer=tokenizer, opset=opset, limits=limits,
                             overwrite=overwrite, exporter=exporter, source=source)
    if precision != "fp32" and not direct:
        from bridge_export.exporter.quantize.precision import make_precision_bundle

        make_precision_bundle(path, Path(f"{path}-{precision}"), precision, calib=calib, overwrite=overwrite, int4=int4)


@main.command("random-checkpoint")
@click.option("--preset", required=True, help="model size: tiny, small, real-width, internvl-14b-224px, ...")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="checkpoint directory to write")
@click.option("--seed", default=0, show_default=True, help="same seed, same weights")
@click.option("--shard-size", default="5GB", show_default=True, help="largest shard file (as transformers)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--workers", default=0, help="threads drawing random numbers (default: cores, at most 8)")
@friendly
def random_checkpoint(preset, dtype, out, seed, shard_size, overwrite, workers):
    """Write a seeded random checkpoint in the published layout, in bounded memory (dry runs, scale tests)."""
    from bridge_export.reference_model.checkpoint_writer import write_random_checkpoint

    path = write_random_checkpoint(out, preset, dtype=dtype, seed=seed, shard_size=shard_size, overwrite=overwrite,
                                  workers=workers or None)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="the model the bundle came from")
@click.option("--preset", help="or the preset (with --seed) it came from")
@click.option("--seed", default=0, show_default=True)
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
    from bridge_export.exporter.verify.parity import verify_bundle
    from bridge_export.exporter.verify.parts import reference_source

    report = verify_bundle(bundle, reference_source(checkpoint, preset, seed))
    click.echo(report.format())
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the raw manifest")
@friendly
def inspect(bundle, as_json):
    """Print a bundle's manifest as a readable table."""
    from bridge_export.runtime.manifest import read_manifest

    from bridge_export.exporter.inspect_bundle import format_manifest

    man = read_manifest(bundle, verify_checksums=False)
    click.echo(json.dumps(man.to_dict(), indent=2) if as_json else format_manifest(man))


IMAGE_SUFFIXES = CALIBRATION_SUFFIXES | {".gif"}


def _expand_images(images) -> list[Path]:
    out = []
    for p in map(Path, images):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    if not out:
        raise click.ClickException("no images found: give image files or folders holding .png/.jpg files")
    return out


class _ImageReader:
    """Reads image files a chunk at a time; an unreadable one is reported on stderr and skipped.

    The others are still processed; `finish()` then fails the command (exit status 1) naming how many.
    """

    def __init__(self, files: list[Path], chunk: int):
        self.files, self.chunk, self.failed = files, chunk, []

    def __iter__(self):
        from tqdm import tqdm

        from bridge_export.runtime.preprocess import ImageError, to_pil

        with tqdm(total=len(self.files), desc="images", unit="img", disable=len(self.files) <= self.chunk,
                  file=sys.stderr) as bar:
            for i in range(0, len(self.files), self.chunk):
                names, images = [], []
                for f in self.files[i:i + self.chunk]:
                    try:
                        images.append(to_pil(f))
                        names.append(f)
                    except ImageError as e:
                        self.failed.append(f)
                        tqdm.write(f"skipped: {e}", file=sys.stderr)
                bar.update(len(self.files[i:i + self.chunk]))
                if images:
                    yield names, images

    def finish(self, done: str) -> None:
        """Exit with status 1 if any image was skipped (after the others' results were written)."""
        if self.failed and len(self.failed) == len(self.files):
            raise click.ClickException(f"none of the {len(self.files)} images could be read (see above)")
        if self.failed:
            raise click.ClickException(f"{len(self.failed)} of {len(self.files)} images could not be read (see "
                                       f"above); {done}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1)
@click.option("--texts", multiple=True, help="texts to embed as well (repeatable)")
@click.option("--mode", type=click.Choice(["C", "G"]), default="C", show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              help="embeddings file: NAME.npy (names in NAME.npy.names.txt) or NAME.parquet")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("--ray", "use_ray", is_flag=True, help="run on Ray Data (images only; --out must be .parquet)")
@click.option("--address", help="--ray: cluster address (default: start a local cluster)")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="--ray: actors, one pipeline each")
@click.option("--gpus-per-worker", default=0.0, show_default=True, type=click.FloatRange(0, 64),
              help="--ray: GPUs per actor")
@run_options
@friendly
def embed(bundle, images, texts, mode, out, overwrite, batch_size, use_ray, address, workers, gpus_per_worker,
          backend, device):
    """Embed images (files or folders) and texts."""
    import numpy as np

    from bridge_export.exporter.output import atomic_file, check_output_file

    if not images and not texts:
        raise click.ClickException("nothing to embed: give image files or folders, and/or --texts")
    if out is not None:  # refused before any work
        out = check_output_file(out, overwrite, (".npy", ".parquet"))
        names_file = Path(str(out) + ".names.txt")
        if out.suffix.lower() == ".npy":
            check_output_file(names_file, overwrite, (".txt",))
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError as e:
                raise click.ClickException("writing .parquet needs pyarrow: pip install pyarrow, or use .npy") from e
    if use_ray:
        from bridge_export.runtime.serve.ray_embed import run_cli

        return run_cli(bundle, _expand_images(images), texts, mode, out, batch_size, address, workers,
                       gpus_per_worker)
    pipe = load_pipeline(bundle, backend, device)
    txt = pipe.embed_texts(list(texts)) if texts else None
    reader = _ImageReader(_expand_images(images), batch_size) if images else None
    files, parts = [], []
    for names, ims in reader or []:
        parts.append(pipe.embed_images(ims, mode, batch_size=batch_size))
        files += names
    rows = parts + ([txt] if txt is not None else [])
    if not rows:
        reader.finish("nothing was embedded")
    emb = np.concatenate(rows)
    names = [str(f) for f in files] + list(texts)
    kinds = ["image"] * len(files) + ["text"] * len(texts)
    if out is None:
        for n, e in zip(names, emb):
            click.echo(f"{n}\t" + " ".join(f"{v:.5f}" for v in e[:8]) + (" ..." if e.shape[0] > 8 else ""))
    elif out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"source": names, "kind": kinds, "embedding": [list(map(float, e)) for e in emb]})
        with atomic_file(out) as tmp:
            pq.write_table(table, tmp)
    else:
        with atomic_file(names_file) as tmp:
            tmp.write_text("\n".join(names) + "\n")
        with atomic_file(out) as tmp:
            with open(tmp, "wb") as f:  # np.save on a path would append .npy to a name without it
                np.save(f, emb)
    if out:
        click.echo(f"wrote {emb.shape[0]} embeddings of dim {emb.shape[1]} to {out}", err=True)
    if reader:
        reader.finish(f"the other {len(files)} were embedded")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--beams", type=click.IntRange(1, MAX_BEAMS),
              help="beam width (default: the manifest's, 5 as the original)")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), help="(default: the manifest's, 30)")
@click.option("--min-new-tokens", type=click.IntRange(0, 4096),
              help="at least this many tokens before EOS (default: the manifest's, 8, at most --max-new-tokens)")
@click.option("--prompt", help="(default: the manifest's, 'English caption:')")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, MAX_CAPTION_BATCH),
              help="images per generate call (bounds the KV cache's memory)")
@click.option("--stream", is_flag=True, help="print tokens as they arrive (greedy)")
@run_options
@friendly
def caption(bundle, images, beams, max_new_tokens, min_new_tokens, prompt, batch_size, stream, backend, device):
    """Caption images."""
    if stream and beams not in (None, 1):
        raise click.ClickException("--stream prints tokens as they are chosen, which beam search cannot: drop --beams")
    if min_new_tokens is not None and max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise click.ClickException(f"--min-new-tokens {min_new_tokens} is above --max-new-tokens {max_new_tokens}")
    pipe = load_pipeline(bundle, backend, device)
    pipe.codec.prompt_ids(pipe.caption_defaults.prompt if prompt is None else prompt)  # refused before any image
    reader = _ImageReader(_expand_images(images), batch_size)
    n = 0
    for names, ims in reader:
        if stream:
            for f, im in zip(names, ims):
                click.echo(f"{f}\t", nl=False)
                for piece in pipe.caption_stream(im, prompt, max_new_tokens, min_new_tokens):
                    click.echo(piece, nl=False)
                click.echo()
        else:
            caps = pipe.captions(ims, prompt, max_new_tokens, min_new_tokens, num_beams=beams, batch_size=batch_size)
            for f, c in zip(names, caps):
                click.echo(f"{f}\t{c.text}")
        n += len(names)
    reader.finish(f"the other {n} were captioned")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--labels", required=True, help="comma-separated class names")
@click.option("--template", default="a photo of a {}.", show_default=True, help="one {} where the label goes")
@click.option("--mode", type=click.Choice(["C", "G"]), default="C", show_default=True)
@run_options
@friendly
def classify(bundle, images, labels, template, mode, backend, device):
    """Zero-shot classification of images over --labels."""
    from bridge_export.runtime.pipeline import check_labels, check_template

    names = check_labels([s.strip() for s in labels.split(",") if s.strip()])
    check_template(template)
    pipe = load_pipeline(bundle, backend, device)
    reader = _ImageReader(_expand_images(images), 64)
    n = 0
    for files, ims in reader:
        for f, p in zip(files, pipe.classify(ims, names, template=template, mode=mode)):
            best = int(p.argmax())
            click.echo(f"{f}\t{names[best]}\t{p[best]:.3f}")
        n += len(files)
    reader.finish(f"the other {n} were classified")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", "reference", type=click.Path(path_type=Path),
              help="checkpoint directory to run the PyTorch reference side by side")
@click.option("--reference-preset", help="or a preset (with --seed) as the reference")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=None, type=click.IntRange(1, max_threads()),
              help="threads for both sides (default: all cores)")
@click.option("--pasts", default="16,256,1024", show_default=True, help="past lengths for decode speed")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="decode steps timed per past length")
@click.option("--compare", multiple=True, type=click.Path(path_type=Path),
              help="other bundles (e.g. fp16 / int8-cpu) to time and check against BUNDLE in the same run")
@click.option("--repeats", default=3, show_default=True,
              help="--compare: interleaved rounds per past length, best kept (raise it on a busy machine)")
@friendly
def bench(bundle, reference, reference_preset, seed, threads, pasts, tokens, compare, repeats):
    """Throughput and memory of a bundle (and the reference, side by side, in this one process)."""
    from bridge_export.exporter.bench.throughput import run_bench

    from bridge_export.exporter.export.bundle import load_source

    def load_reference():  # called after the runtime's memory is measured
        return load_source(reference, reference_preset, seed)[0]

    try:
        past_list = [int(p) for p in pasts.split(",") if p.strip()]
    except ValueError:
        raise click.ClickException(f"--pasts must be comma-separated whole numbers, got {pasts!r}") from None
    if not past_list or min(past_list) < 1:
        raise click.ClickException(f"--pasts must list positive past lengths, got {pasts!r}")
    run_bench(bundle, reference=load_reference if (reference or reference_preset) else None, threads=threads,
              pasts=past_list, steps=tokens,
              compare=list(compare), repeats=repeats)


@main.command("bench-load")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repeats", default=3, show_default=True, help="timed rounds (after one warm-up)")
@click.option("--threads", default=None, type=int)
@click.option("--no-checksums", is_flag=True, help="skip timing runtime.load(verify_checksums=True)")
@friendly
def bench_load(bundle, repeats, threads, no_checksums):
    """Time runtime.load() against onnxruntime opening the graphs, side by side."""
    from bridge_export.exporter.bench.load import format_load, measure_load

    click.echo(format_load(bundle, measure_load(bundle, repeats, threads, checksums=not no_checksums)))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--limit", default=0, type=click.IntRange(0), help="use only the first N test digits (0: all)")
@click.option("--precisions", default="fp32,fp16,int8,int8-cpu,int4-cpu", show_default=True)
@friendly
def demo(out, limit, precisions):
    """The main job: shipped digits model -> bundle(s) -> onnxruntime, with an accuracy/speed report."""
    from bridge_export.exporter.demo import run_demo

    run_demo(out, limit=limit, precisions=[p for p in precisions.split(",") if p])


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--fp16", "mode", flag_value="fp16", help="FP16 weights/compute, sensitive ops in fp32")
@click.option("--int8", "mode", flag_value="int8", help="static Q/DQ INT8 (TensorRT and onnxruntime)")
@click.option("--int8-cpu", "mode", flag_value="int8-cpu", help="dynamic INT8 MatMuls for onnxruntime CPUs")
@click.option("--int4-cpu", "mode", flag_value="int4-cpu",
              help="4-bit weights (MatMulNBits) for onnxruntime CPU/CUDA; the fastest decoding")
@int4_options
@click.option("--calib", type=click.Path(path_type=Path), help="folder of calibration images (--int8)")
@click.option("--calib-texts", type=click.Path(path_type=Path), help="file of calibration texts, one per line")
@click.option("--method", type=click.Choice(["max", "entropy", "percentile"]), default="max", show_default=True)
@click.option("--target-cosine", type=float, default=None,
              help="int8: keep the most sensitive MatMuls in fp32 until every output reaches this cosine to fp32 "
                   "on held-out inputs (e.g. 0.999); without it the achieved cosines are reported")
@click.option("--exclude", default="", help="comma-separated op types to keep in fp32 (replaces the default)")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@friendly
def precision(bundle, mode, block_size, symmetric, accuracy_level, calib, calib_texts, method, target_cosine, exclude,
              out, overwrite):
    """Make an FP16, INT8 or INT4 bundle from an fp32 one, and print its accuracy report."""
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    if mode is None:
        raise click.ClickException("choose one of --fp16, --int8, --int8-cpu or --int4-cpu")
    make_precision_bundle(bundle, out, mode, calib=calib, calib_texts=calib_texts, method=method,
                          exclude=[s for s in exclude.split(",") if s] or None, overwrite=overwrite,
                          target_cosine=target_cosine, int4=_int4(block_size, symmetric, accuracy_level))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--graphs", default=",".join(GRAPHS), show_default=True)
@click.option("--max-batch", default=None, type=click.IntRange(1, 4096))
@click.option("--max-seq", default=None, type=click.IntRange(1))
@click.option("--workspace", default=4.0, show_default=True, type=click.FloatRange(0, 1024, min_open=True), help="GiB")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="persistent timing cache file")
@click.option("--version-compatible", is_flag=True)
@click.option("--hardware-compatible", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), help="engine directory (default BUNDLE/engines)")
@click.option("--emit-trtexec", is_flag=True, help="only write build_engines.sh with trtexec commands (and sidecar "
              "templates the script stamps after each build, so the runtime accepts the engines)")
@click.option("--trt-major", type=click.Choice(["10", "11"]), default="10", show_default=True,
              help="--emit-trtexec: TensorRT version on the device (10: JetPack 6, 11: JetPack 7)")
@friendly
def engine(bundle, graphs, max_batch, max_seq, workspace, timing_cache, version_compatible, hardware_compatible,
           out, emit_trtexec, trt_major):
    """Build TensorRT engines (one per graph) or write the equivalent trtexec script."""
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


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--http-port", default=8000, show_default=True)
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--max-batch", default=8, show_default=True, help="Triton max_batch_size (dynamic batching)")
@click.option("--instances", default=1, show_default=True, help="model instances (share one pipeline)")
@click.option("--threads", type=int, help="onnxruntime threads (default: all cores)")
@friendly
def serve(bundle, http_port, grpc_port, metrics_port, max_batch, instances, threads):
    """Serve a bundle on Triton Inference Server through PyTriton (HTTP, gRPC, metrics)."""
    from bridge_export.runtime.serve.pytriton_server import ServeOptions, serve as run

    run(bundle, ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                             max_batch=max_batch, instances=instances, threads=threads))


@main.command("triton-repo")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="model repository to write")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default="onnxruntime",
              show_default=True, help="graph models' backend (python: CPU variant for Python-only Triton builds)")
@click.option("--max-batch", type=int, help="max_batch_size (default: the bundle's / the engines' limit)")
@click.option("--instances", default=1, show_default=True, help="instances of each graph model")
@click.option("--entry-instances", default=1, show_default=True, help="instances of each entry point model")
@click.option("--ort-tensorrt", is_flag=True, help="onnxruntime backend: TensorRT provider with the profiles")
@click.option("--cpu", is_flag=True, help="KIND_CPU instances instead of KIND_GPU")
@click.option("--overwrite", is_flag=True, help="replace a repository triton-repo wrote before")
@friendly
def triton_repo(bundle, out, backend, max_batch, instances, entry_instances, ort_tensorrt, cpu, overwrite):
    """Write a Triton model repository (for the NGC tritonserver image) from a bundle."""
    from bridge_export.runtime.serve.triton_repo import RepoOptions, write_repo

    opts = RepoOptions(backend=backend, max_batch=max_batch, instances=instances, entry_instances=entry_instances,
                       ort_tensorrt=ort_tensorrt, gpu=not cpu)
    click.echo(f"wrote {write_repo(bundle, out, opts, overwrite=overwrite)}")


if __name__ == "__main__":
    main()
