"""Backends behind one small session interface: `run(feeds) -> outputs`, input metadata, `close()`.

The generation loop takes a Session and never knows which backend it has. The onnxruntime
session feeds numpy buffers through I/O binding (the buffer's own memory, no copy), so a
preallocated KV cache is read in place every step. Sessions on a device (bridge_export.runtime.gpu.ort_session,
bridge_export.runtime.gpu.trt_session) also take DeviceBuffers and return the outputs named in `on_device` as
DeviceBuffers. Use a session as a context manager, or call `close()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge_export.runtime.errors import SessionClosed, UserError
from bridge_export.runtime.manifest import BundleError


class BackendUnavailable(UserError, RuntimeError):
    """The requested backend is not installed on this machine."""

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclass
class TensorMeta:
    """One graph input: name, numpy dtype, shape (str for a symbolic dim)."""

    name: str
    dtype: type
    shape: list


class Session:
    """Base class: checks feeds against the input metadata before the backend runs them."""

    inputs: dict[str, TensorMeta]
    output_names: list[str]
    name: str = "graph"
    max_batch: int | None = None  # largest batch the backend accepts (TensorRT profiles); None: any

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise ValueError naming the first missing, extra, mistyped or mis-shaped input."""
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise ValueError(f"{self.name}: missing inputs {missing}, unexpected inputs {extra}")
        for k, meta in self.inputs.items():
            a = feeds[k]
            if a.dtype != meta.dtype:
                raise ValueError(f"{self.name}: input {k} must be {np.dtype(meta.dtype).name}, got {a.dtype}")
            if a.ndim != len(meta.shape) or any(isinstance(d, int) and d != s for d, s in zip(meta.shape, a.shape)):
                raise ValueError(f"{self.name}: input {k} must have shape {meta.shape}, got {list(a.shape)}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on numpy feeds; returns every output by name."""
        raise NotImplementedError

    def finite(self, outputs: dict) -> dict:
        """`outputs`, after checking every float array on the host holds no NaN or infinity.

        Inputs are checked finite before a run, so a non-finite output means the graph or its
        weights are damaged (a zero-filled or overwritten stretch of weights.bin): refused with
        BundleError instead of handing back NaN embeddings, probabilities or logits.
        """
        for k, a in outputs.items():
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not np.isfinite(a).all():
                where = getattr(self, "path", None)
                bundle = Path(where).parent if where else "the bundle"
                raise BundleError(f"{self.name} produced NaN or infinite values in {k}: the weights or graph of "
                                  f"{bundle} are damaged; check them with `bridge-export verify --checksums "
                                  f"{bundle}`, then re-copy or re-export the bundle")
        return outputs

    def check_against(self, info, bundle) -> None:
        """BundleError unless this graph's inputs and outputs are the ones the manifest's GraphInfo lists
        (names, input ranks and fixed sizes): a graph swapped for another bundle's is caught at load."""
        want_in = {t.name: t for t in info.inputs}
        want_out = {t.name for t in info.outputs}
        problems = []
        if set(self.inputs) != set(want_in):
            problems.append(f"inputs {sorted(self.inputs)} (manifest: {sorted(want_in)})")
        if set(self.output_names) != want_out:
            problems.append(f"outputs {sorted(self.output_names)} (manifest: {sorted(want_out)})")
        for k in sorted(set(self.inputs) & set(want_in)):
            got, want = self.inputs[k].shape, want_in[k].shape
            fixed = [(g, w) for g, w in zip(got, want) if isinstance(g, int) and isinstance(w, int) and g > 0 and w > 0]
            if len(got) != len(want) or any(g != w for g, w in fixed):
                problems.append(f"input {k} of shape {got} (manifest: {want})")
        if problems:
            raise BundleError(f"{self.name} in {bundle} is not the graph its manifest describes: it has "
                              f"{'; '.join(problems[:2])}; the file was replaced: re-copy or re-export the bundle")

    def close(self) -> None:
        """Release the backend's resources (idempotent)."""
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PREPACK_SHARE = 0.6  # packed weight copies may take this share of the machine's memory
NO_PREPACK = {"session.disable_prepacking": "1"}
# The image graphs run once per image, the decoder once per token. onnxruntime's intra-op threads spin
# after a run by default; the image graphs' spinning threads then take the cores from the decoder's first
# steps (measured on `small` int4-cpu, 2 threads: 8 ms instead of 2.2 ms per token until they stop). So
# only the decoder spins: the image graphs' threads sleep when their run ends.
NO_SPIN = {"session.intra_op.allow_spinning": "0"}
NO_SPIN_GRAPHS = ("vision_encoder", "query_bridge")


def default_session_config(graph: str, config: dict[str, str] | None) -> dict[str, str] | None:
    """`config` (the caller's entries for `graph`) completed with the runtime's defaults for onnxruntime:
    the image graphs do not spin (NO_SPIN); an entry the caller set is kept as given."""
    if graph not in NO_SPIN_GRAPHS:
        return config
    return {**NO_SPIN, **(config or {})}


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (16 GiB assumed where the OS cannot say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 16 << 30


def prepacking_plan(manifest, memory: int | None = None, share: float = PREPACK_SHARE) -> tuple[str, ...]:
    """Graphs to open with onnxruntime's prepacking off, so that the packed copies fit in memory.

    onnxruntime copies every prepacked weight onto the heap, per session: QLLaMA is packed twice
    (bridge and decoder). If all graphs' weights (the manifest's `weight_bytes`) fit in `share` of
    RAM, everything is packed (the 14B int4-cpu bundle here: 13.3 GB of 24); otherwise the bridge,
    which runs once per image, stays unpacked in weights.bin's shared, reclaimable page cache (14B
    int8-cpu: 21 GB would not fit). The decoder is always packed: unpacked, a decode step was 3.5x
    (int8-cpu) and 100x (int4-cpu) slower. Bundles without `weight_bytes` count weights.bin twice.
    """
    memory = memory_bytes() if memory is None else memory
    per_graph = [g.weight_bytes for g in manifest.graphs.values()]
    if all(per_graph):
        need = sum(per_graph)
    else:
        entry = manifest.files.get(manifest.weights)
        need = 2 * entry.size if entry else 0
    return () if need <= share * memory else ("query_bridge",)


def max_threads() -> int:
    """The most threads a session may ask for: 4x this machine's cores (more only thrashes, or hangs)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(threads) -> None:
    """ValueError unless `threads` is None or an int in [1, max_threads()]."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= max_threads():
        raise ValueError(f"threads must be an integer from 1 to {max_threads()} (4 x this machine's cores), "
                         f"got {threads!r}")


_shared_pool: list[int] = []  # the process-wide intra-op pool's size once share_threads() ran (0: the cores)


def share_threads(threads: int | None = None) -> None:
    """Run every onnxruntime session this process opens from now on on one process-wide intra-op thread pool
    (onnxruntime's global thread pools) of `threads` threads (default: the cores).

    Per-session pools (onnxruntime's default) give each graph its own threads: a server that runs the
    image graphs between decode steps then has the decoder's threads spinning on the cores the image
    graphs need. One pool serves every graph with the same threads. It is a property of the process
    (onnxruntime refuses a per-session pool once the global one exists), so `serve` sets it at start;
    a library user opts in the same way, before loading. Calling it again with the same size does
    nothing; another size is a ValueError (the pool cannot be resized)."""
    check_threads(threads)
    size = int(threads or 0)
    if _shared_pool:
        if _shared_pool[0] != size:
            raise ValueError(f"this process already shares one pool of {_shared_pool[0] or 'all the cores'} "
                             f"threads: it cannot become {size or 'all the cores'}; start another process")
        return
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(size, 1)  # intra-op, inter-op (sequential graphs: unused)
    _shared_pool.append(size)


def ort_session_options(threads: int | None = None, session_config: dict[str, str] | None = None):
    """The onnxruntime SessionOptions every runtime session uses: quiet, all graph optimisations,
    `threads` intra-op threads (checked; after share_threads() the process-wide pool, and `threads` is not
    used), and the given config entries."""
    import onnxruntime as ort

    from bridge_export.runtime.progress import is_verbose

    opts = ort.SessionOptions()
    opts.log_severity_level = 2 if is_verbose() else 3  # onnxruntime's warnings only with --verbose
    check_threads(threads)
    if _shared_pool:
        opts.use_per_session_threads = False
    elif threads is not None:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in (session_config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts


class OrtSession(Session):
    """An onnxruntime InferenceSession over one graph, run through I/O binding."""

    def __init__(self, path: Path, providers=None, threads: int | None = None, check: bool = True,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.name, self.path = Path(path).stem, Path(path)
        opts = ort_session_options(threads, session_config)
        check_providers(providers)
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise BundleError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:300]}; "
                              "the graph is corrupt or mismatched: re-export the bundle") from e
        self.inputs = {i.name: TensorMeta(i.name, _ORT_TYPES.get(i.type, np.float32), list(i.shape))
                       for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.check = check

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bind every feed's memory (contiguous arrays are not copied) and return all outputs."""
        if self.sess is None:
            raise SessionClosed(f"{self.name}: session is closed; load the bundle again")
        if self.check:
            self.check_feeds(feeds)
        binding = self.sess.io_binding()
        keep = []
        for k, a in feeds.items():
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            keep.append(a)
            binding.bind_input(k, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for k in self.output_names:
            binding.bind_output(k, "cpu")
        try:
            self.sess.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime's RuntimeException: its arena's allocation failure is a user matter
            raise out_of_memory(e, self.name, feeds) or e
        return self.finite(dict(zip(self.output_names, binding.copy_outputs_to_cpu())))

    def close(self) -> None:
        """Release the backend's resources."""
        self.sess = None


class OutOfMemory(UserError, MemoryError):
    """A graph ran out of memory: the message names the graph and the batch; the caller lowers its batch."""


def out_of_memory(e: BaseException, graph: str, feeds: dict) -> OutOfMemory | None:
    """OutOfMemory for an onnxruntime failure that is an allocation failure, else None."""
    text = str(e)
    if not any(m in text for m in ("Failed to allocate memory", "bad_alloc", "out of memory", "OUT_OF_MEMORY")):
        return None
    batch = next((a.shape[0] for a in feeds.values() if getattr(a, "ndim", 0)), None)
    return OutOfMemory(f"onnxruntime ran out of memory running {graph}" +
                       (f" on a batch of {batch}" if batch else ""))


def check_providers(providers) -> None:
    """ValueError naming a requested onnxruntime execution provider this onnxruntime does not have."""
    if providers is None:
        return
    import onnxruntime as ort

    if isinstance(providers, str):
        raise ValueError(f"providers must be a list, e.g. [{providers!r}], got one string")
    have = ort.get_available_providers()
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) else p
        if name not in have:
            raise ValueError(f"onnxruntime here has no {name!r} provider (it has {have}): install the matching "
                             "onnxruntime build or leave providers unset")
