"""Deploy commands: serve a bundle (PyTriton) or write a Triton model repository."""
from __future__ import annotations

from pathlib import Path

import click

from bridge_export.exporter.cli.app import main
from bridge_export.exporter.cli.common import deprecated_alias, friendly, threads_option


@main.command(section="deploy")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535), help="gRPC port")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="Prometheus metrics port")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="largest batch the server accepts (Triton's max_batch_size, dynamic batching)")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="instances of each entry-point model (they share one pipeline)")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda:N (onnxruntime's CUDA provider or "
              "TensorRT)")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="what runs the graphs (tensorrt: the bundle's engines/, on --device cuda:N)")
@click.option("--models", default="embed_image,embed_text,caption,caption_stream", show_default=True,
              help="comma-separated models to serve; only the graphs they need are loaded (embed_image: vision "
                   "encoder + bridge, embed_text: the decoder)")
@click.option("--scheduler", type=click.Choice(["step", "static"]), default="step", show_default=True,
              help="captions: step = every request joins one shared decode batch between steps and leaves when "
                   "done; static = Triton's batches, each decoded to its end")
@click.option("--rows", default=8, show_default=True, type=click.IntRange(1, 256),
              help="--scheduler step: KV cache rows decoding together (a beam request takes num_beams)")
@click.option("--max-length", type=click.IntRange(2), help="--scheduler step: positions per row (visual queries + "
              "prompt + new tokens; default queries + 128); longer requests are refused")
@click.option("--scheduler-metrics-port", default=8003, show_default=True, type=click.IntRange(0, 65535),
              help="--scheduler step: port of the scheduler's Prometheus metrics (queue, rows, step batch, time "
                   "to first token) at /metrics; 0: none")
@lambda f: threads_option(f, "onnxruntime threads, one pool that every graph of the server shares")
@friendly
def serve(bundle, http_port, grpc_port, metrics_port, max_batch, instances, device, backend, models, scheduler, rows,
          max_length, scheduler_metrics_port, threads):
    """Serve a bundle on Triton Inference Server through PyTriton (HTTP, gRPC, metrics)."""
    from bridge_export.runtime.serve.pytriton_server import ServeOptions, serve as run

    run(bundle, ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                             max_batch=max_batch, instances=instances, threads=threads, device=device,
                             backend=backend, models=tuple(m.strip() for m in models.split(",") if m.strip()),
                             scheduler=scheduler, rows=rows, max_length=max_length,
                             scheduler_metrics_port=scheduler_metrics_port))


@main.command("triton-repo", section="deploy")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="model repository to write")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default="onnxruntime",
              show_default=True, help="what runs the graph models (python: a CPU variant for Python-only Triton "
                                      "builds)")
@click.option("--max-batch", type=click.IntRange(1, 4096),
              help="largest batch the models accept (default: the bundle's / the engines' limit)")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="instances of each entry-point model")
@deprecated_alias("--entry-instances", "--instances")
@click.option("--graph-instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="instances of each graph model")
@click.option("--ort-tensorrt", is_flag=True, help="onnxruntime backend: TensorRT provider with the profiles")
@click.option("--cpu", is_flag=True, help="KIND_CPU instances instead of KIND_GPU")
@click.option("--overwrite", is_flag=True, help="replace a repository triton-repo wrote before")
@friendly
def triton_repo(bundle, out, backend, max_batch, instances, entry_instances, graph_instances, ort_tensorrt, cpu,
                overwrite):
    """Write a Triton model repository (for NVIDIA's tritonserver image) from a bundle."""
    from bridge_export.runtime.serve.triton_repo import RepoOptions, write_repo

    if entry_instances is not None:
        instances = int(entry_instances)
    opts = RepoOptions(backend=backend, max_batch=max_batch, instances=graph_instances, entry_instances=instances,
                       ort_tensorrt=ort_tensorrt, gpu=not cpu)
    click.echo(f"wrote {write_repo(bundle, out, opts, overwrite=overwrite)}")
