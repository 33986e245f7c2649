"""bridge-export runtime: runs a bundle on onnxruntime (or TensorRT) with numpy, tokenizers and Pillow.

No torch here: `import bridge_export.runtime` must work where torch is not installed.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bridge_export.runtime.manifest import GRAPHS, BundleError, Manifest, read_manifest
from bridge_export.runtime.pipeline import Caption, Pipeline
from bridge_export.runtime.progress import get_logger
from bridge_export.runtime.text import TextCodec, TokenizerMissing


def _per_graph(session_config) -> dict[str, dict[str, str]]:
    """{graph: config entries} from load()'s `session_config` (one dict for all graphs, or per graph)."""
    if not session_config:
        return {}
    if not isinstance(session_config, dict):
        raise ValueError(f"session_config must be a dict, got {type(session_config).__name__}")

    def entries(d: dict, where: str) -> dict[str, str]:
        bad = [k for k, v in d.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"session_config{where} entries must map strings to strings (e.g. "
                             f"{{'session.disable_prepacking': '1'}}), got {bad[0]!r}: {d[bad[0]]!r}")
        return dict(d)

    if any(k in GRAPHS and not isinstance(v, dict) for k, v in session_config.items()):
        raise ValueError("session_config names a graph without a dict of entries: give {graph: {key: value}}")
    per_graph = {k: entries(v, f"[{k!r}]") for k, v in session_config.items() if isinstance(v, dict)}
    if per_graph and len(per_graph) != len(session_config):
        raise ValueError("session_config mixes graph names and config entries: give either "
                         "{key: value} for every graph or {graph: {key: value}}")
    unknown = sorted(set(per_graph) - set(GRAPHS))
    if unknown:
        raise ValueError(f"session_config names unknown graphs {unknown}: the graphs are {list(GRAPHS)}")
    return per_graph or {name: entries(session_config, "") for name in GRAPHS}


TASK_GRAPHS = {  # what each task runs: load(graphs=graphs_for(...)) opens only these
    "embed_image_c": ("vision_encoder",),  # InternVL-C image embeddings
    "embed_image": ("vision_encoder", "query_bridge"),  # C and G (G adds the bridge's head)
    "embed_text": ("text_decoder",),
    "caption": GRAPHS,
}


def graphs_for(*tasks: str) -> tuple[str, ...]:
    """The graphs the given tasks (keys of TASK_GRAPHS) need, in the bundle's order."""
    unknown = [t for t in tasks if t not in TASK_GRAPHS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown}: choose from {list(TASK_GRAPHS)}" if unknown else
                         f"no tasks given: choose from {list(TASK_GRAPHS)}")
    need = {g for t in tasks for g in TASK_GRAPHS[t]}
    return tuple(g for g in GRAPHS if g in need)


def _check_graphs(graphs) -> tuple[str, ...]:
    if graphs is None:
        return tuple(GRAPHS)
    if isinstance(graphs, str) or not hasattr(graphs, "__iter__"):
        raise ValueError(f"graphs must be a list of graph names from {list(GRAPHS)}, got {graphs!r}")
    graphs = list(graphs)
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown or not graphs:
        raise ValueError(f"graphs must name at least one of {list(GRAPHS)}"
                         + (f", got unknown {unknown}" if unknown else "") + " (runtime.graphs_for(task) gives a "
                         "task's: embed_image_c, embed_image, embed_text, caption)")
    return tuple(g for g in GRAPHS if g in graphs)


def load(bundle, backend: str = "onnxruntime", providers=None, threads: int | None = None,
         verify_checksums: bool = False, device=None, session_config: dict[str, str] | None = None,
         graphs=None) -> Pipeline:
    """Open a bundle directory and return a Pipeline (sessions for all three graphs, or `graphs`).

    Checks what is cheap (the manifest's digest, file sizes, graph headers); `verify_checksums=True`
    also hashes every byte of the bundle (slow on a bundle of many GB).
    `device`: "cpu" (onnxruntime's default; numpy in and out), "cuda" / "cuda:N" (onnxruntime's CUDA
    provider or TensorRT, with the KV cache in device memory and I/O bound there), or a
    bridge_export.runtime.gpu.memory.DeviceMemory to bind onnxruntime's I/O in (the tests' host stand-in).
    TensorRT defaults to "cuda:0". Close the pipeline (or use `with`) to free the device memory.
    `graphs`: open only these graphs (names from GRAPHS; `graphs_for("embed_image")` gives a task's), so
    a process serving image embeddings never maps the text decoder's weights; a call that needs a
    graph left out raises GraphNotOpen naming it.
    `session_config`: onnxruntime session config entries for every graph, or per graph as
    {graph name: {key: value}}, e.g. {"query_bridge": {"session.disable_prepacking": "1"}}, which
    keeps the bridge's weights in the bundle's memory-mapped file instead of a packed copy on the
    heap. When it is not given, onnxruntime on the CPU follows `bridge_export.runtime.sessions.prepacking_plan`:
    everything packed unless the packed copies would not fit in 60% of RAM, then the bridge
    unpacked (logged). Prepacking is what makes onnxruntime's integer kernels fast (unpacked, a
    decode step was 3.5x slower in int8-cpu and 100x in int4-cpu), so the decoder always keeps it.
    """
    from bridge_export.runtime.backends import open_session, tensorrt_available
    from bridge_export.runtime.sessions import (NO_PREPACK, BackendUnavailable, check_threads,
                                                default_session_config, prepacking_plan)

    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}: use 'onnxruntime' or 'tensorrt'")
    if backend == "tensorrt" and device != "cpu" and not tensorrt_available():
        raise BackendUnavailable("backend='tensorrt' needs TensorRT, which is not installed here: pip install "
                                 "tensorrt on a machine with an NVIDIA GPU, or use backend='onnxruntime'")
    check_threads(threads)
    graphs = _check_graphs(graphs)
    configs = _per_graph(session_config)
    memory, providers = _device(device, backend, providers)
    manifest = read_manifest(bundle, verify_checksums=verify_checksums)
    if session_config is None and backend == "onnxruntime" and memory is None:  # CPU kernels prepack
        unpacked = prepacking_plan(manifest)
        if unpacked:
            get_logger(__name__).info(f"runtime: {', '.join(unpacked)} opened without onnxruntime's prepacking: "
                                      "packed copies of every graph's weights would not fit in 60% of this "
                                      "machine's memory")
        configs = {g: dict(NO_PREPACK) for g in unpacked}
    sessions = {}
    # The tokenizer (tokenizers, Rust) is parsed on a thread while onnxruntime opens the graphs.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridge-export-tokenizer")
    codec = pool.submit(TextCodec.from_manifest, manifest)
    pool.shutdown(wait=False)
    try:
        for name in graphs:
            path = manifest.graph_path(name)
            if backend == "tensorrt":
                path = Path(bundle) / "engines" / f"{name}.engine"
            config = configs.get(name) if backend == "tensorrt" else default_session_config(name, configs.get(name))
            sessions[name] = open_session(path, backend, providers=providers, threads=threads, memory=memory,
                                          session_config=config)
            sessions[name].check_against(manifest.graph(name), manifest.root)
        text_codec = codec.result()
    except BaseException:
        for s in sessions.values():
            s.close()
        if memory is not None:
            memory.close()
        raise
    return Pipeline(manifest, sessions, text_codec, memory=memory)


def _device(device, backend: str, providers):
    """(DeviceMemory or None, onnxruntime providers) for `load`'s device argument."""
    from bridge_export.runtime.gpu.memory import DeviceMemory

    if isinstance(device, DeviceMemory):
        return device, providers
    if device is None:
        device = "cuda:0" if backend == "tensorrt" else "cpu"
    if device == "cpu":
        if backend == "tensorrt":
            raise ValueError("TensorRT runs on a GPU: use device='cuda:0' (or backend='onnxruntime' on the CPU)")
        return None, providers
    from bridge_export.runtime.gpu.cuda import CudaMemory, parse_device
    from bridge_export.runtime.sessions import BackendUnavailable

    ordinal = parse_device(device)
    if backend == "onnxruntime" and providers is None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(f"device={device!r} needs onnxruntime's CUDA provider, and this onnxruntime "
                                     f"has only {ort.get_available_providers()}: pip install onnxruntime-gpu (in "
                                     "place of onnxruntime), or use device='cpu'")
        providers = [("CUDAExecutionProvider", {"device_id": ordinal}), "CPUExecutionProvider"]
    return CudaMemory(ordinal), providers


__all__ = ["load", "graphs_for", "TASK_GRAPHS", "Pipeline", "Caption", "BundleError", "TokenizerMissing", "read_manifest", "Manifest", "GRAPHS"]
