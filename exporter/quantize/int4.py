"""INT4 weight-only tensors for onnxruntime: MatMulNBits weights and GatherBlockQuantized embeddings.

Two ways in, one format out:

* `quantize_graph` runs onnxruntime's maintained `MatMulNBitsQuantizer` over a whole graph
  (what `bridge-export precision --int4-cpu` does);
* `quantize_matmul_weight` / `quantize_embedding` quantize one fp32 tensor at a time, for an
  exporter that streams weights from the checkpoint and never holds a whole graph. They call the
  quantizer's own packing routines (onnxruntime's C++ `quantize_matmul_4bits` through
  `DefaultWeightOnlyQuantizer.qbits_block_quant`, and its numpy `quantize_ndarray` for Gather), and
  produce exactly the initializers, names and attributes the quantizer writes for that node
  (tests/exporter/test_int4.py checks this byte for byte).

Format (onnxruntime's com.microsoft contrib ops; CPU and CUDA run both):
  MatMulNBits(A, B_Q4 uint8 [N, K/bs, bs/2], scales float [N, K/bs], zero_points uint8 [N, ceil(K/bs/2)])
  GatherBlockQuantized(data_Q4 uint4 [V, D], ids, scales float [V, D/bs], zero_points uint4 [V, D/bs])
A GatherBlockQuantized with int4 data needs ONNX opset 21 / IR 10: the quantizer raises the
graph's opset when embeddings are quantized (int4-cpu bundles are onnxruntime-only anyway).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BITS = 4
QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


@dataclass(frozen=True)
class Int4Options:
    """How `int4-cpu` quantizes: chosen by the measurements in the README (block 32, asymmetric)."""

    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4  # 4: activations quantized to int8 inside MatMulNBits (the fast CPU kernels)
    lm_head: bool = True  # quantize the vocabulary projection too
    embeddings: bool = True  # token embedding table as GatherBlockQuantized
    keep: tuple[str, ...] = ("clip_projector",)  # node-name parts left in fp32 (the pooling heads)

    def __post_init__(self):
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"int4 block size must be a power of two from 16 to 256 (onnxruntime's MatMulNBits), "
                             f"got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4 (see MatMulNBits), got {self.accuracy_level}")

    def matmul_attrs(self, k: int, n: int) -> dict:
        """MatMulNBits' attributes for a [K, N] weight, as the maintained quantizer sets them."""
        attrs = {"K": k, "N": n, "bits": BITS, "block_size": self.block_size}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        return attrs

    def gather_attrs(self) -> dict:
        """GatherBlockQuantized's attributes for a token embedding table (rows gathered, blocks along D)."""
        return {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block_size}

    def as_dict(self) -> dict:
        """Plain fields, for the manifest."""
        return {"bits": BITS, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "lm_head": self.lm_head, "embeddings": self.embeddings,
                "keep_fp32": list(self.keep)}


def _quantizer_module():
    """onnxruntime's matmul_nbits_quantizer, imported with its INFO chatter turned down."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger(QUANTIZER_LOGGER).setLevel(logging.ERROR)
    return mnq


def _config(opts: Int4Options, op_types=("MatMul",)):
    mnq = _quantizer_module()
    return mnq.DefaultWeightOnlyQuantConfig(block_size=opts.block_size, is_symmetric=opts.symmetric,
                                            accuracy_level=opts.accuracy_level or None, bits=BITS,
                                            op_types_to_quantize=tuple(op_types))


@dataclass
class NBitsWeight:
    """One MatMul weight as MatMulNBits inputs, plus the node attributes."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks / 2)], None when symmetric
    attrs: dict = field(default_factory=dict)  # K, N, bits, block_size (, accuracy_level)

    def names(self, weight_name: str) -> list[str]:
        """Initializer names in MatMulNBits input order, as the maintained quantizer names them."""
        return [weight_name + f"_Q{BITS}", weight_name + "_scales"] + (
            [] if self.zero_points is None else [weight_name + "_zero_points"])

    def initializers(self, weight_name: str) -> list[TensorProto]:
        """The initializers (`<w>_Q4`, `<w>_scales`, `<w>_zero_points`) for weight `weight_name`."""
        arrays = [self.packed, self.scales] + ([] if self.zero_points is None else [self.zero_points])
        return [numpy_helper.from_array(a, n) for a, n in zip(arrays, self.names(weight_name))]

    def node(self, a_input: str, output: str, weight_name: str, node_name: str) -> onnx.NodeProto:
        """The MatMulNBits node replacing `MatMul(a_input, weight_name) -> output` named `node_name`."""
        return helper.make_node("MatMulNBits", [a_input] + self.names(weight_name), [output],
                                name=node_name + f"_Q{BITS}" if node_name else "", domain="com.microsoft",
                                **self.attrs)


def quantize_matmul_weight(w: np.ndarray, opts: Int4Options = Int4Options()) -> NBitsWeight:
    """Block-quantize one fp32 MatMul weight [K, N] (y = x @ w) to 4 bits along K.

    Uses onnxruntime's own packing (`quantize_matmul_4bits`, via `DefaultWeightOnlyQuantizer`),
    so the result is what `MatMulNBitsQuantizer` writes for that MatMul.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"a MatMul weight must be 2-D [K, N], got shape {w.shape}")
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise ValueError("the weight holds NaN or Inf values; fix the checkpoint before quantizing")
    mnq = _quantizer_module()
    packed, scales, zp = mnq.DefaultWeightOnlyQuantizer(_config(opts)).qbits_block_quant(np.ascontiguousarray(w))
    k, n = w.shape
    return NBitsWeight(packed, scales, None if opts.symmetric else zp, opts.matmul_attrs(k, n))


@dataclass
class BlockQuantizedTable:
    """An embedding table [V, D] as GatherBlockQuantized inputs (4-bit along D), plus attributes."""

    data: TensorProto  # int4/uint4 [V, D]
    scales: TensorProto  # float [V, D / block]
    zero_points: TensorProto | None
    attrs: dict

    def initializers(self) -> list[TensorProto]:
        """The initializers in input order (data, scales, zero points)."""
        return [t for t in (self.data, self.scales, self.zero_points) if t is not None]

    def node(self, ids_input: str, output: str, node_name: str) -> onnx.NodeProto:
        """The GatherBlockQuantized node replacing `Gather(table, ids_input) -> output`."""
        inputs = [self.data.name, ids_input, self.scales.name] + ([self.zero_points.name] if self.zero_points else [])
        return helper.make_node("GatherBlockQuantized", inputs, [output],
                                name=node_name + f"_Q{BITS}" if node_name else "", domain="com.microsoft",
                                **self.attrs)


def quantize_embedding(table: np.ndarray, name: str, opts: Int4Options = Int4Options()) -> BlockQuantizedTable:
    """Block-quantize an embedding table [V, D] along D with the maintained quantizer's routine."""
    table = np.asarray(table, np.float32)
    if table.ndim != 2:
        raise ValueError(f"an embedding table must be 2-D [V, D], got shape {table.shape}")
    mnq = _quantizer_module()
    q, scales, zp = mnq.DefaultWeightOnlyQuantizer.quantize_ndarray(table, 1, opts.block_size, opts.symmetric)
    qtype = TensorProto.INT4 if opts.symmetric else TensorProto.UINT4
    data = helper.make_tensor(name + f"_Q{BITS}", qtype, table.shape, q.tobytes(), True)
    zpt = None if opts.symmetric else helper.make_tensor(name + "_zero_points", qtype, scales.shape, zp.tobytes(), True)
    return BlockQuantizedTable(data, numpy_helper.from_array(scales, name + "_scales"), zpt,
                               opts.gather_attrs())


def quantize_embedding_rows(table, opts: Int4Options = Int4Options(), rows: int = 4096, to_numpy=np.asarray):
    """`quantize_embedding`'s bytes for a table too large to quantize at once: (packed 4-bit data as
    uint8 [V * D / 2], scales float32 [V, D / block], packed zero points as uint8 or None).

    Blocks run along D, so rows are independent: the table (any tensor with `[i:j]` row slices that
    `to_numpy` converts, e.g. a bf16 torch tensor) is quantized `rows` rows at a time with the
    quantizer's routine, and the byte strings concatenate to exactly the one-shot result (`rows` is
    even, so the two-per-byte packing never straddles a chunk)."""
    if rows < 2 or rows % 2:
        raise ValueError(f"rows must be a positive even number, got {rows}")
    mnq = _quantizer_module()
    v, d = table.shape
    data, scales, zps = [], [], []
    for i in range(0, v, rows):
        chunk = np.asarray(to_numpy(table[i:i + rows]), dtype=np.float32)
        if not np.isfinite(chunk).all():
            raise ValueError("the embedding table holds NaN or Inf values; fix the checkpoint before quantizing")
        q, s, z = mnq.DefaultWeightOnlyQuantizer.quantize_ndarray(chunk, 1, opts.block_size, opts.symmetric)
        data.append(np.frombuffer(q.tobytes(), np.uint8))
        scales.append(s)
        if z is not None and not opts.symmetric:
            zps.append(np.frombuffer(z.tobytes(), np.uint8))
    return (np.concatenate(data), np.concatenate(scales).astype(np.float32, copy=False),
            np.concatenate(zps) if zps else None)


# -- whole graphs ---------------------------------------------------------------------------------
def int4_plan(model: onnx.ModelProto, opts: Int4Options) -> dict[str, list[str]]:
    """Which nodes to quantize: MatMuls with a constant 2-D weight (and the token embedding Gather).

    Returns {"matmul": [...], "gather": [...], "kept": [...]} by node name; `kept` are the
    candidates left in fp32 by `opts` (pooling heads, and lm_head / embeddings when switched off).
    """
    inits = {t.name: t for t in model.graph.initializer}
    plan = {"matmul": [], "gather": [], "kept": []}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            kind = "matmul"
            off = any(k in n.name for k in opts.keep) or (not opts.lm_head and "lm_head" in n.name)
        elif n.op_type == "Gather" and n.input[0] in inits and "embed_tokens" in n.input[0] + n.name:
            kind = "gather"
            off = not opts.embeddings
        else:
            continue
        plan["kept" if off else kind].append(n.name)
    return plan


def quantize_graph(model: onnx.ModelProto, opts: Int4Options) -> tuple[onnx.ModelProto, dict]:
    """INT4 weight-only copy of `model` (weights loaded) through onnxruntime's MatMulNBitsQuantizer.

    Two passes of the maintained quantizer: MatMuls with the chosen settings, then (when asked)
    the token embedding Gather, so no other Gather is ever touched. Returns (model, record).
    """
    mnq = _quantizer_module()
    plan = int4_plan(model, opts)
    every = {n.name for n in model.graph.node}
    passes = [("MatMul", plan["matmul"])] + ([("Gather", plan["gather"])] if plan["gather"] else [])
    for op, chosen in passes:
        if not chosen:
            continue
        q = mnq.MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(every - set(chosen)),
                                     algo_config=_config(opts, (op,)))
        q.process()
        model = q.model.model
        every = {n.name for n in model.graph.node}
    record = {"method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (RTN, blockwise)",
              **opts.as_dict(), "quantized_matmuls": len(plan["matmul"]), "quantized_gathers": len(plan["gather"]),
              "kept_fp32": plan["kept"], "tensorrt": False}
    return model, record
