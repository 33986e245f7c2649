"""Checkpoint tensors into weights.bin one at a time: read lazily, convert, write aligned, once.

Sources: an original-format checkpoint directory (safetensors shards opened with `safe_open`,
each tensor read on request; `pytorch_model.bin` shards with `torch.load(mmap=True)`) or an
in-memory state dict (presets). Memory: the tensor being converted and its converted copy, never
the model (peak RSS of an export ~ base + 2x the largest tensor).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from bridge_export.reference_model.checkpoint_reader import (IGNORED_PREFIXES, CheckpointError, model_shapes, plan_checkpoint,
                                               raise_mismatch)
from bridge_export.reference_model.checkpoint_reader import materialize as materialize_entry
from bridge_export.reference_model.checkpoint_writer import SAFETENSORS_DTYPES
from bridge_export.reference_model.config import InternVLConfig

from bridge_export.exporter.export.graph_builder import WeightRef
from bridge_export.exporter.export.onnx_export import ALIGN


class StateDictSource:
    """Tensors from an in-memory state dict (a preset's seeded weights)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        """Every key the source holds."""
        return list(self.state)

    def shape(self, key: str) -> tuple:
        """Shape of `key` without reading it."""
        return tuple(self.state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` (detached, on CPU)."""
        return self.state[key].detach()


_ST_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()} | {"F64": torch.float64, "I16": torch.int16}


class _SafetensorsFile:
    """A safetensors file read with plain file reads, one tensor at a time.

    Not `safe_open`: it memory-maps the file, and every page a read touches stays in the process's
    resident set until the file is closed (the whole checkpoint, by the end of an export).
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.header = header

    def get_tensor(self, key: str) -> torch.Tensor:
        """Read `key` into a fresh tensor (and tell the kernel its pages are not needed again)."""
        h = self.header[key]
        begin, end = h["data_offsets"]
        out = torch.empty(h["shape"], dtype=_ST_DTYPES[h["dtype"]])
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(bytearray(0))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            got = 0
            while got < end - begin:
                n = f.readinto(buf[got:])
                if not n:
                    raise CheckpointError(f"{self.path} is truncated at {key}: re-download it")
                got += n
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), self.start + begin, end - begin, os.POSIX_FADV_DONTNEED)
        return out


def _drop_pages(t: torch.Tensor) -> None:
    """madvise(DONTNEED) the mmapped pages under `t` (a tensor of a torch.load(mmap=True) dict):
    they are re-read from the file if touched again, and leave the resident set now."""
    import ctypes
    import mmap

    nbytes = t.untyped_storage().nbytes()
    if nbytes < mmap.PAGESIZE:
        return
    start = t.untyped_storage().data_ptr()
    lo = start - start % mmap.PAGESIZE
    hi = start + nbytes - (start + nbytes) % mmap.PAGESIZE
    if hi > lo:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


class CheckpointSource:
    """Tensors of an original-format checkpoint directory, read one at a time from its shards.

    Names are the original state-dict names whatever the storage: reference_model's
    `plan_checkpoint` maps peft-wrapped keys and pairs LoRA adapters, which are merged here per
    tensor exactly as the reference loader merges them (W + scale * B @ A in float32).
    """

    def __init__(self, directory, config: InternVLConfig | None = None, lora_alpha: float | None = None):
        self.directory = Path(directory)
        self._entries = {e.name: e for e in plan_checkpoint(self.directory, config, lora_alpha)}
        self._open: dict[Path, object] = {}

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    self._open[f] = _SafetensorsFile(f)
                else:
                    self._open[f] = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # corrupt files raise many types; name the file either way
                raise CheckpointError(f"cannot read weights from {f}: {e}; re-download it") from e
        return self._open[f]

    def _read(self, t) -> torch.Tensor:
        h = self._handle(t.file)
        try:
            if isinstance(h, _SafetensorsFile):
                return h.get_tensor(t.key)
            out = h[t.key].clone()
            _drop_pages(h[t.key])
            return out
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {t.key} from {t.file}: {e}; re-download it") from e

    def keys(self) -> list[str]:
        """Every (original) tensor name the checkpoint holds."""
        return list(self._entries)

    def location(self, key: str) -> tuple[str, int]:
        """(file, position) of `key`: streaming in this order reads the shards front to back."""
        base = self._entries[key].base
        h = self._handle(base.file)
        return str(base.file), h.header[base.key]["data_offsets"][0] if isinstance(h, _SafetensorsFile) else 0

    def shape(self, key: str) -> tuple:
        """Shape of `key` (from the plan: no data read)."""
        return tuple(self._entries[key].shape)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a private copy; LoRA adapters merged in float32)."""
        return materialize_entry(self._entries[key], self._read, None)

    def close(self) -> None:
        """Drop the shard handles (and their mappings)."""
        self._open.clear()


def expected_shapes(config: InternVLConfig) -> dict[str, tuple]:
    """Every state-dict key the model needs and its shape (from a meta-device model: no memory)."""
    return {k: s for k, s in model_shapes(config).items() if not k.startswith(IGNORED_PREFIXES)}


def resolve_keys(source, config: InternVLConfig) -> tuple[dict[str, str], dict[str, tuple]]:
    """Map every model key to the source key that holds it, checking names and shapes.

    Mirrors reference_model.load_state: itm_head ignored; with tie_word_embeddings lm_head and
    embed_tokens are one tensor (lm_head wins when both are stored). Raises CheckpointError
    listing missing, unexpected and mis-shaped keys.
    """
    want = expected_shapes(config)
    have = {k for k in source.keys() if not k.startswith(IGNORED_PREFIXES)}
    mapping = {k: k for k in want if k in have}
    tied = ("qllama.lm_head.weight", "qllama.model.embed_tokens.weight")
    if config.tie_word_embeddings:
        src = next((k for k in tied if k in have), None)
        if src is not None:
            mapping.update({k: src for k in tied})
    missing = sorted(set(want) - set(mapping))
    unexpected = sorted(have - set(want))
    shapes = [f"{k}: checkpoint {list(source.shape(s))} vs model {list(want[k])}"
              for k, s in mapping.items() if tuple(source.shape(s)) != want[k]]
    raise_mismatch(missing, unexpected, shapes)
    return mapping, want


# -- conversion ------------------------------------------------------------------------------------
def quantize_columns(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column asymmetric uint8 of a [K, N] fp32 matrix (overwritten: pass a scratch copy; a
    transposed view of [N, K] rows is fine), as onnxruntime's quantize_dynamic does for a MatMul
    weight (QUInt8, per_channel, no reduced range): range always includes 0,
    scale = (max - min) / 255, zero point = round(-min / scale), q = clip(round(w / scale) + zp)."""
    lo = w.amin(0).clamp(max=0.0)
    hi = w.amax(0).clamp(min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round(-lo / scale).clamp(0, 255)
    q = w.div_(scale).round_().add_(zp).clamp_(0, 255).to(torch.uint8)  # keeps w's memory layout
    return q.numpy(), scale.numpy().astype(np.float32), zp.to(torch.uint8).numpy()


def _transposed(t: torch.Tensor, dtype: torch.dtype, rows: int = 1024) -> torch.Tensor:
    """t.T (2-D) as a contiguous `dtype` tensor, converted and copied a block of rows at a time
    (about twice as fast here as one strided copy, and no full-size temporary)."""
    out = torch.empty((t.shape[1], t.shape[0]), dtype=dtype)
    for i in range(0, t.shape[0], rows):
        out[:, i:i + rows].copy_(t[i:i + rows].to(dtype).t())
    return out


def _int4_arrays(ref: WeightRef, tensor: torch.Tensor) -> list[np.ndarray]:
    """MatMulNBits / GatherBlockQuantized arrays of one checkpoint tensor (bridge_export.exporter.quantize.int4's packing,
    the maintained quantizer's own routines), in `ref.names` order."""
    from bridge_export.exporter.quantize.int4 import Int4Options, quantize_embedding_rows, quantize_matmul_weight

    kind, block, symmetric = ref.int4
    opts = Int4Options(block_size=block, symmetric=symmetric)
    try:
        if kind == "gather":  # [V, D] quantized along D, a few thousand rows at a time
            arrays = quantize_embedding_rows(tensor, opts, to_numpy=lambda t: t.to(torch.float32).numpy())
        else:  # nn.Linear [N, K] -> the MatMul weight [K, N] in fp32 (one copy), blocks along K
            q = quantize_matmul_weight(_transposed(tensor, torch.float32).numpy(), opts)
            arrays = (q.packed, q.scales, q.zero_points)
    except ValueError as e:  # NaN / Inf in the checkpoint
        raise CheckpointError(f"{ref.key}: {e}") from e
    return [a for a in arrays if a is not None]


def materialize(ref: WeightRef, tensor: torch.Tensor) -> list[np.ndarray]:
    """The stored array(s) of `ref` from the checkpoint tensor (one copy in the target layout)."""
    if ref.int4 is not None:
        return _int4_arrays(ref, tensor)
    if ref.storage == "uint8-cols":
        # quantize the [out, in] rows (contiguous), then transpose the 4x smaller uint8 result
        w = torch.empty(tensor.shape, dtype=torch.float32).copy_(tensor)
        q, scale, zp = quantize_columns(w.t())
        del w
        qt = torch.from_numpy(q)  # a transposed view of the quantized [out, in] rows
        return [_transposed(qt.t(), torch.uint8).numpy() if ref.transpose else np.ascontiguousarray(q), scale, zp]
    dtype = torch.float16 if ref.storage == "float16" else torch.float32
    if ref.transpose:
        out = _transposed(tensor, dtype)
    elif tensor.dtype == dtype and tensor.is_contiguous():
        out = tensor
    else:
        out = torch.empty(tensor.shape, dtype=dtype).copy_(tensor)
    if dtype == torch.float16 and tensor.is_floating_point() and not torch.isfinite(out).all():
        raise CheckpointError(f"{ref.key} has values beyond fp16's range (|x| > 65504): export it with "
                              "--precision fp32")
    return [out.numpy()]


class WeightWriter:
    """Appends arrays to weights.bin at 4 KiB-aligned offsets, hashing the bytes as they go."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = open(self.path, "wb")
        self.sha = hashlib.sha256()
        self.pos = 0
        self._literals: dict[str, tuple[int, int]] = {}

    def _write(self, data: memoryview) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def write(self, arr: np.ndarray) -> tuple[int, int]:
        """Write one array; returns (offset, length)."""
        pad = (-self.pos) % ALIGN
        if pad:
            self._write(memoryview(b"\0" * pad))
        offset = self.pos
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        self._write(data)
        return offset, len(data)

    def write_literal(self, arr: np.ndarray) -> tuple[int, int]:
        """Write a computed constant once, however many graphs use it (by content)."""
        key = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() + arr.dtype.str + str(arr.shape)
        if key not in self._literals:
            self._literals[key] = self.write(arr)
        return self._literals[key]

    def close(self) -> str:
        """Flush, fsync and close; returns the file's sha256."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.sha.hexdigest()
