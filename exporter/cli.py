"""The `bridge-export` command line: a thin layer over the Python API."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from runtime.manifest import GRAPHS

# Errors that carry a message fit for the user: shown as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, RuntimeError)

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
    """Turn user errors into one-line messages and Ctrl-C into a clean exit (code 130)."""

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
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from e

    return wrapper


def run_options(fn):
    """--backend and --device for the commands that run a bundle (see runtime.load)."""
    fn = click.option("--device", default=None,
                      help="cpu (onnxruntime's default) or cuda / cuda:N (KV cache on the GPU; TensorRT's default)")(fn)
    return click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                        show_default=True, help="tensorrt runs the engines/ that `bridge-export engine` built")(fn)


def load_pipeline(bundle, backend: str, device):
    """runtime.load, closed when the command ends (frees device memory on a GPU)."""
    import runtime

    pipe = runtime.load(bundle, backend=backend, device=device)
    click.get_current_context().call_on_close(pipe.close)
    return pipe


@click.group()
@click.version_option(package_name="bridge-export", message="%(version)s")
@click.option("-q", "--quiet", is_flag=True, help="show warnings and errors only")
def main(quiet):
    """Export InternVL-14B (InternVL-C / InternVL-G) to ONNX and TensorRT, and run the result."""
    import logging

    from runtime.progress import log_to_stderr, quiet_third_party

    log_to_stderr(logging.WARNING if quiet else logging.INFO)
    quiet_third_party()


@main.command("onnx")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="original-format model directory")
@click.option("--preset", help="a preset instead of a checkpoint (tiny, small, internvl-14b-224px)")
@click.option("--seed", default=0, show_default=True, help="weights seed for --preset")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (TensorRT 10 parses 17-20)")
@click.option("--max-batch", default=8, show_default=True, help="largest batch (TensorRT profiles)")
@click.option("--max-seq", default=0, help="longest sequence incl. queries (default: max positions)")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="directory with tokenizer.model/json")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-cpu"]), default="fp32",
              show_default=True, help="also make a reduced-precision bundle (see `precision`)")
@click.option("--calib", type=click.Path(path_type=Path), help="calibration images folder (int8)")
@click.option("--dynamo", is_flag=True, help="use the torch.export-based exporter (slower)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@friendly
def onnx_cmd(checkpoint, preset, seed, out, opset, max_batch, max_seq, tokenizer, precision, calib, dynamo,
             overwrite):
    """Export a checkpoint or preset into a bundle of ONNX graphs plus manifest."""
    from .bundle import export_bundle, load_source
    from .specs import Limits

    model, source = load_source(checkpoint, preset, seed)
    path = export_bundle(model, out, checkpoint=checkpoint, tokenizer=tokenizer, opset=opset,
                         limits=Limits(max_batch, max_seq), overwrite=overwrite, dynamo=dynamo, source=source)
    if precision != "fp32":
        from .precision import make_precision_bundle

        make_precision_bundle(path, Path(f"{path}-{precision}"), precision, calib=calib, overwrite=overwrite)


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
    from reference_model.checkpoint_writer import write_random_checkpoint

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
    from runtime.manifest import read_manifest

    man = read_manifest(bundle, verify_checksums=checksums)
    if checksums:
        click.echo(f"checksums: all {len(man.files)} files match the manifest "
                   f"({sum(e.size for e in man.files.values()) / 1e6:.1f} MB hashed)")
        if checkpoint is None and preset is None:
            return
    if man.precision.mode != "fp32":
        raise click.ClickException(f"{bundle} is a {man.precision.mode} bundle: verify checks fp32 parity with the "
                                   "reference; its accuracy against fp32 is in its manifest (bridge-export inspect)")
    from .verify import verify_bundle
    from .verify_parts import reference_source

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
    from runtime.manifest import read_manifest

    from .inspect_bundle import format_manifest

    man = read_manifest(bundle, verify_checksums=False)
    click.echo(json.dumps(man.to_dict(), indent=2) if as_json else format_manifest(man))


def _expand_images(images) -> list[Path]:
    out = []
    for p in map(Path, images):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
        else:
            out.append(p)
    if not out:
        raise click.ClickException("no images found: give image files or folders holding .png/.jpg files")
    return out


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1)
@click.option("--texts", multiple=True, help="texts to embed as well (repeatable)")
@click.option("--mode", type=click.Choice(["C", "G"]), default="C", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="embeddings.npy or .parquet")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--ray", "use_ray", is_flag=True, help="run on Ray Data (images only; --out must be .parquet)")
@click.option("--address", help="--ray: cluster address (default: start a local cluster)")
@click.option("--workers", default=1, show_default=True, help="--ray: actors, one pipeline each")
@click.option("--gpus-per-worker", default=0.0, show_default=True, help="--ray: GPUs per actor")
@run_options
@friendly
def embed(bundle, images, texts, mode, out, batch_size, use_ray, address, workers, gpus_per_worker, backend, device):
    """Embed images (files or folders) and texts."""
    import numpy as np
    from tqdm import tqdm

    if use_ray:
        from .ray_embed import run_cli

        return run_cli(bundle, _expand_images(images), texts, mode, out, batch_size, address, workers,
                       gpus_per_worker)
    pipe = load_pipeline(bundle, backend, device)
    files = _expand_images(images) if images else []
    parts = []
    for i in tqdm(range(0, len(files), batch_size), desc="images", disable=len(files) <= batch_size, file=sys.stderr):
        parts.append(pipe.embed_images([str(f) for f in files[i:i + batch_size]], mode))
    img = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    txt = pipe.embed_texts(list(texts)) if texts else np.zeros((0, 0), np.float32)
    names = [str(f) for f in files] + list(texts)
    kinds = ["image"] * len(files) + ["text"] * len(texts)
    rows = [r for r in (img, txt) if r.size]
    emb = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    if out is None:
        for n, e in zip(names, emb):
            click.echo(f"{n}\t" + " ".join(f"{v:.5f}" for v in e[:8]) + (" ..." if e.shape[0] > 8 else ""))
    elif out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise click.ClickException("writing .parquet needs pyarrow: pip install pyarrow, or use .npy") from e
        pq.write_table(pa.table({"source": names, "kind": kinds, "embedding": [list(map(float, e)) for e in emb]}),
                       out)
    else:
        np.save(out, emb)
        Path(str(out) + ".names.txt").write_text("\n".join(names) + "\n")
    if out:
        click.echo(f"wrote {emb.shape[0]} embeddings of dim {emb.shape[1] if emb.size else 0} to {out}", err=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--beams", type=int, help="beam width (default: the manifest's, 5 as the original)")
@click.option("--max-new-tokens", type=int, help="(default: the manifest's, 30)")
@click.option("--min-new-tokens", type=int, help="(default: the manifest's, 8)")
@click.option("--prompt", help="(default: the manifest's, 'English caption:')")
@click.option("--stream", is_flag=True, help="print tokens as they arrive (greedy)")
@run_options
@friendly
def caption(bundle, images, beams, max_new_tokens, min_new_tokens, prompt, stream, backend, device):
    """Caption images."""
    pipe = load_pipeline(bundle, backend, device)
    for f in _expand_images(images):
        if stream:
            click.echo(f"{f}\t", nl=False)
            for piece in pipe.caption_stream(str(f), prompt, max_new_tokens, min_new_tokens):
                click.echo(piece, nl=False)
            click.echo()
        else:
            c = pipe.caption(str(f), prompt, max_new_tokens, min_new_tokens, num_beams=beams)
            click.echo(f"{f}\t{c.text}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--labels", required=True, help="comma-separated class names")
@click.option("--template", default="a photo of a {}.", show_default=True)
@click.option("--mode", type=click.Choice(["C", "G"]), default="C", show_default=True)
@run_options
@friendly
def classify(bundle, images, labels, template, mode, backend, device):
    """Zero-shot classification of images over --labels."""
    pipe = load_pipeline(bundle, backend, device)
    names = [s.strip() for s in labels.split(",") if s.strip()]
    files = _expand_images(images)
    probs = pipe.classify([str(f) for f in files], names, template=template, mode=mode)
    for f, p in zip(files, probs):
        best = int(p.argmax())
        click.echo(f"{f}\t{names[best]}\t{p[best]:.3f}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", "reference", type=click.Path(path_type=Path),
              help="checkpoint directory to run the PyTorch reference side by side")
@click.option("--reference-preset", help="or a preset (with --seed) as the reference")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=None, type=int, help="threads for both sides (default: all cores)")
@click.option("--pasts", default="16,256,1024", show_default=True, help="past lengths for decode speed")
@click.option("--tokens", default=16, show_default=True, help="decode steps timed per past length")
@click.option("--compare", multiple=True, type=click.Path(path_type=Path),
              help="other bundles (e.g. fp16 / int8-cpu) to time and check against BUNDLE in the same run")
@friendly
def bench(bundle, reference, reference_preset, seed, threads, pasts, tokens, compare):
    """Throughput and memory of a bundle (and the reference, side by side, in this one process)."""
    from .bench import run_bench

    from .bundle import load_source

    def load_reference():  # called after the runtime's memory is measured
        return load_source(reference, reference_preset, seed)[0]

    run_bench(bundle, reference=load_reference if (reference or reference_preset) else None, threads=threads, pasts=[int(p) for p in pasts.split(",")], steps=tokens,
              compare=list(compare))


@main.command("bench-load")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repeats", default=3, show_default=True, help="timed rounds (after one warm-up)")
@click.option("--threads", default=None, type=int)
@click.option("--no-checksums", is_flag=True, help="skip timing runtime.load(verify_checksums=True)")
@friendly
def bench_load(bundle, repeats, threads, no_checksums):
    """Time runtime.load() against onnxruntime opening the graphs, side by side."""
    from .bench_load import format_load, measure_load

    click.echo(format_load(bundle, measure_load(bundle, repeats, threads, checksums=not no_checksums)))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--limit", default=0, help="use only the first N test digits (0: all)")
@click.option("--precisions", default="fp32,fp16,int8,int8-cpu", show_default=True)
@friendly
def demo(out, limit, precisions):
    """The main job: shipped digits model -> bundle(s) -> onnxruntime, with an accuracy/speed report."""
    from .demo import run_demo

    run_demo(out, limit=limit, precisions=[p for p in precisions.split(",") if p])


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--fp16", "mode", flag_value="fp16", help="FP16 weights/compute, sensitive ops in fp32")
@click.option("--int8", "mode", flag_value="int8", help="static Q/DQ INT8 (TensorRT and onnxruntime)")
@click.option("--int8-cpu", "mode", flag_value="int8-cpu", help="dynamic INT8 MatMuls for onnxruntime CPUs")
@click.option("--calib", type=click.Path(path_type=Path), help="folder of calibration images (--int8)")
@click.option("--calib-texts", type=click.Path(path_type=Path), help="file of calibration texts, one per line")
@click.option("--method", type=click.Choice(["max", "entropy", "percentile"]), default="max", show_default=True)
@click.option("--exclude", default="", help="comma-separated op types to keep in fp32 (replaces the default)")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@friendly
def precision(bundle, mode, calib, calib_texts, method, exclude, out, overwrite):
    """Make an FP16 or INT8 bundle from an fp32 one, and print its accuracy report."""
    from .precision import make_precision_bundle

    if mode is None:
        raise click.ClickException("choose one of --fp16, --int8 or --int8-cpu")
    make_precision_bundle(bundle, out, mode, calib=calib, calib_texts=calib_texts, method=method,
                          exclude=[s for s in exclude.split(",") if s] or None, overwrite=overwrite)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--graphs", default=",".join(GRAPHS), show_default=True)
@click.option("--max-batch", default=None, type=int)
@click.option("--max-seq", default=None, type=int)
@click.option("--workspace", default=4.0, show_default=True, help="GiB")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="persistent timing cache file")
@click.option("--version-compatible", is_flag=True)
@click.option("--hardware-compatible", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), help="engine directory (default BUNDLE/engines)")
@click.option("--emit-trtexec", is_flag=True, help="only write build_engines.sh with trtexec commands")
@friendly
def engine(bundle, graphs, max_batch, max_seq, workspace, timing_cache, version_compatible, hardware_compatible,
           out, emit_trtexec):
    """Build TensorRT engines (one per graph) or write the equivalent trtexec script."""
    from .tensorrt import EngineOptions, build_engines, write_trtexec_script

    opts = EngineOptions(graphs=[g for g in graphs.split(",") if g], max_batch=max_batch, max_seq=max_seq,
                         workspace_gib=workspace, timing_cache=timing_cache, version_compatible=version_compatible,
                         hardware_compatible=hardware_compatible)
    out = out or Path(bundle) / "engines"
    if emit_trtexec:
        click.echo(f"wrote {write_trtexec_script(bundle, out, opts)}")
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
    from .serve.pytriton_server import ServeOptions, serve as run

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
    from .serve.triton_repo import RepoOptions, write_repo

    opts = RepoOptions(backend=backend, max_batch=max_batch, instances=instances, entry_instances=entry_instances,
                       ort_tensorrt=ort_tensorrt, gpu=not cpu)
    click.echo(f"wrote {write_repo(bundle, out, opts, overwrite=overwrite)}")


if __name__ == "__main__":
    main()
