"""Write checkpoints in the published layout one tensor at a time (bounded memory at any model size).

`safetensors.torch.save_file` needs every tensor of a file in one dict in memory, i.e. a whole
13.8 GB shard set for InternVL-14B; so the safetensors format is written here directly: an 8-byte
little-endian header length, the JSON header (dtype / shape / data_offsets per tensor, padded with
spaces to a multiple of 8) and then the raw bytes, tensor by tensor. The header only needs shapes
and dtypes, which the meta-device model gives without allocating anything.

`write_random_checkpoint` uses it for seeded random checkpoints of any preset (the `bridge-export
random-checkpoint` command): sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`
+ `config.json`, original key names, as `load_pretrained` and transformers read them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.write_guard import OutputLock, abandoned, temp_prefix

from bridge_export.reference_model.config import InternVLConfig, preset_config
from bridge_export.reference_model.loading import DTYPES, init_rule
from bridge_export.reference_model.model import InternVLModel

log = logging.getLogger("reference_model")

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"
# Elements generated per random draw. Each chunk has its own seed, so the values do not depend on how
# the writer is called, and memory stays at one chunk (64 MB of fp32) whatever the tensor's size.
CHUNK = 1 << 24


class CheckpointWriteError(UserError, ValueError):
    """A checkpoint that cannot be written as asked; the message says what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and storage dtype of one tensor to write."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as transformers' shard sizes; 'GiB' is binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.I)
    if not m:
        raise CheckpointWriteError(f"shard size {text!r} is not a size: write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] != "B" else 0
    return int(float(m.group(1)) * base ** power)


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors into shards in order, as transformers does: a new shard when the next tensor
    would overflow this one; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' file names: model.safetensors alone, else model-0000k-of-0000n.safetensors."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The length prefix plus padded JSON header for tensors stored back to back in `specs` order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointWriteError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                      on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write one safetensors file, taking the tensors (or chunks of them, in order) one at a time.

    `tensors` yields, for each spec in order, one or more contiguous CPU tensors of the spec's dtype
    whose sizes add up to the spec's; nothing is held beyond the piece being written.
    """
    if sys.byteorder != "little":
        raise CheckpointWriteError("safetensors stores little-endian bytes; this writer needs a little-endian host")
    expected = sum(s.nbytes for s in specs)
    written = 0
    with open(path, "wb") as f:
        f.write(safetensors_header(specs))
        for piece in tensors:
            piece = piece.detach().contiguous()
            buf = piece.reshape(-1).view(torch.uint8).numpy()  # a view: no copy of the bytes
            f.write(memoryview(buf))
            written += buf.nbytes
            on_bytes(buf.nbytes)
    if written != expected:
        raise CheckpointWriteError(f"{path}: wrote {written} bytes of tensor data, the header promises {expected}")


def _seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_chunk(spec: TensorSpec, seed: int, chunk: int) -> torch.Tensor:
    """Chunk `chunk` (flat, at most CHUNK elements) of the tensor `spec.name` of a seeded random checkpoint.

    Its generator is seeded from (seed, name, chunk index): the same seed gives the same tensor
    whatever order, subset or parallelism writes it. Scales follow `loading.init_rule`.
    """
    kind, value = init_rule(spec.name)
    n = spec.numel
    size = min(CHUNK, n - chunk * CHUNK)
    if kind == "fill":
        return torch.full((size,), value, dtype=spec.dtype)
    g = torch.Generator().manual_seed(_seed(seed, spec.name, chunk))
    return torch.empty(size, dtype=torch.float32).normal_(0.0, value, generator=g).to(spec.dtype)


def num_chunks(spec: TensorSpec) -> int:
    """How many CHUNK-sized pieces the tensor is drawn in."""
    n = spec.numel
    return -(-n // CHUNK)


def random_tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """The tensor `spec.name` of a seeded random checkpoint, as its flat chunks in order."""
    for c in range(num_chunks(spec)):
        yield random_chunk(spec, seed, c)


def ordered_parallel(jobs: list, fn: Callable, workers: int) -> Iterator:
    """fn(*job) for each job, computed by `workers` threads, yielded in order with at most 2 * workers
    results in memory (torch's kernels release the GIL, so the threads draw in parallel)."""
    if workers <= 1:
        for job in jobs:
            yield fn(*job)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def checkpoint_specs(config: InternVLConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor an original checkpoint of `config` holds, in state-dict order (built on meta).

    With tied embeddings the lm_head is left out, as transformers saves tied weights once.
    """
    with torch.device("meta"):
        model = InternVLModel(config)
    specs = []
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "qllama.lm_head.weight":
            continue
        specs.append(TensorSpec(name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype))
    return specs


_LOCKS: dict[Path, OutputLock] = {}  # temporary directory -> the lock on its output, held until commit or discard


def _foreign(out: Path) -> list[str]:
    """Entries of an existing `out` that a checkpoint this writer makes never holds (the user's files)."""
    ours = re.compile(r"(config\.json|model\.safetensors\.index\.json|model(-\d+-of-\d+)?\.safetensors)")
    return sorted(p.name for p in out.iterdir() if not ours.fullmatch(p.name))


def prepare_directory(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `out` to write into (renamed into place by `commit_directory`).

    `overwrite` replaces only a checkpoint folder holding nothing but what this writer writes; one
    other run writes `out` at a time (write_guard.OutputLock), and temporaries of killed runs are
    removed when their owner is provably gone.
    """
    out = Path(out).absolute()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CheckpointWriteError(f"{out} exists and is not a folder: choose another --out")
    if out.exists() and not overwrite:
        raise CheckpointWriteError(f"{out} already exists: choose another --out or pass --overwrite")
    if out.exists() and _foreign(out):
        extra = _foreign(out)
        raise CheckpointWriteError(f"{out} holds files a random checkpoint does not ({', '.join(extra[:8])}): "
                                   "--overwrite would delete them; move them out or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(f"cannot create {out.parent}: {e.strerror}; choose a writable --out") from e
    if not os.access(out.parent, os.W_OK):
        raise CheckpointWriteError(f"{out.parent} is not writable: choose a writable --out")
    lock = OutputLock(out).acquire()
    for left in abandoned(out):
        shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
    tmp = out.parent / (temp_prefix(out, "partial") + "ckpt")
    try:
        tmp.mkdir()
    except BaseException:
        lock.release()
        raise
    _LOCKS[tmp] = lock
    return tmp


def discard_directory(tmp: Path) -> None:
    """Remove a temporary directory after a failure and release its output's lock (never raises)."""
    shutil.rmtree(tmp, ignore_errors=True)
    lock = _LOCKS.pop(tmp, None)
    if lock:
        lock.release()


def commit_directory(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing an old `out` only after the new one is complete."""
    out = Path(out).absolute()
    try:
        if out.exists():
            old = out.parent / (temp_prefix(out, "old") + "ckpt")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        lock = _LOCKS.pop(tmp, None)
        if lock:
            lock.release()


def write_sharded(directory: Path, specs: list[TensorSpec],
                  pieces: Callable[[list[TensorSpec]], Iterable[torch.Tensor]],
                  shard_size: int | str = "5GB", progress: bool = True) -> list[str]:
    """Write `specs` as (sharded) safetensors plus index into an existing `directory`; returns the files.

    `pieces(shard_specs)` yields the shard's tensors in order (whole or as flat chunks) as they are
    written, so only the pieces in flight are ever in memory.
    """
    from bridge_export.runtime.progress import progress as progress_bar

    shards = plan_shards(specs, parse_size(shard_size))
    names = shard_names(len(shards))
    total = sum(s.nbytes for s in specs)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="writing", enabled=progress) as bar:
        for name, shard in zip(names, shards):
            log.info("writing %s (%d tensors)", name, len(shard))
            write_safetensors(directory / name, shard, pieces(shard), bar.update)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
    return names


def write_random_checkpoint(out, preset: str | None = None, *, config: InternVLConfig | None = None,
                            dtype: str | torch.dtype = "bf16", seed: int = 0, shard_size: int | str = "5GB",
                            overwrite: bool = False, progress: bool = True, workers: int | None = None) -> Path:
    """Write a seeded random checkpoint of `preset` (or `config`) in the published layout at `out`.

    Peak memory is the meta model plus 2 * workers CHUNKs of random numbers (64 MB of fp32 each),
    whatever the model's size; `workers` threads draw them (default: the cores, at most 8; the
    values do not depend on it). Written into a temporary sibling, renamed into place when complete.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    if (preset is None) == (config is None):
        raise CheckpointWriteError("give a preset name or a config, not both")
    config = config or preset_config(preset)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if torch_dtype is None:
        raise CheckpointWriteError(f"--dtype must be one of bf16, fp16, fp32, got {dtype!r}")
    specs = checkpoint_specs(config, torch_dtype)
    total = sum(s.nbytes for s in specs)
    free = shutil.disk_usage(Path(out).absolute().parent if Path(out).absolute().parent.exists() else ".").free
    if total > free:
        raise CheckpointWriteError(f"the checkpoint needs {total / 1e9:.1f} GB and the disk has {free / 1e9:.1f} GB "
                                   "free: free space or choose another --out")
    tmp = prepare_directory(Path(out), overwrite)
    try:
        def pieces(shard: list[TensorSpec]) -> Iterator[torch.Tensor]:
            jobs = [(s, seed, c) for s in shard for c in range(num_chunks(s))]
            return ordered_parallel(jobs, random_chunk, workers)

        write_sharded(tmp, specs, pieces, shard_size, progress)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        commit_directory(tmp, Path(out))
    except BaseException:
        discard_directory(tmp)
        raise
    log.info("wrote %s: %d tensors, %.2f GB", out, len(specs), total / 1e9)
    return Path(out)
