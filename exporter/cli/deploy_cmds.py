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
@threads_option
@friendly
def serve(bundle, http_port, grpc_port, metrics_port, max_batch, instances, threads):
    """Serve a bundle on Triton Inference Server through PyTriton (HTTP, gRPC, metrics)."""
    from bridge_export.runtime.serve.pytriton_server import ServeOptions, serve as run

    run(bundle, ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                             max_batch=max_batch, instances=instances, threads=threads))


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
