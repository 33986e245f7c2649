"""A small ONNX graph builder whose weights are references into a checkpoint, not data.

The graphs are written node by node (as onnxruntime-genai's model builder does) instead of
traced: tracing needs the weights in memory (TorchScript) or is slow (torch.export took 46 s for
the tiny decoder here), and a hand-written graph has no shape-arithmetic chains. Every weight
initializer is a `WeightRef` -- checkpoint key, layout, storage dtype -- that `weight_stream`
fills tensor by tensor later, so a graph of any size is built in milliseconds and a few MB.

Precision is decided here, per node, so reduced-precision bundles are written directly:
* fp32      everything fp32.
* fp16      fp16 weights and activations; fp32 islands as onnxruntime's converter made them with
            our block list: norms, the softmax chain (scores, mask, softmax), the RoPE tables and
            the logits (lm_head in fp32); graph inputs/outputs stay fp32 (keep_io_types).
* int8-cpu  MatMuls with constant weights as onnxruntime's dynamic quantizer writes them
            (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, uint8 weights, per output
            column); norms and the pooling heads stay fp32.
* int4-cpu  MatMuls with constant weights as MatMulNBits and the token embedding table as
            GatherBlockQuantized, exactly as onnxruntime's MatMulNBitsQuantizer writes them (same
            initializer names, layouts and attributes; exporter/int4.py packs them with the
            quantizer's own routines); norms and the pooling heads stay fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRECISIONS = ("fp32", "fp16", "int8-cpu", "int4-cpu")
QUANTIZED = ("int8-cpu", "int4-cpu")  # MatMul weights stored as integers (onnxruntime-only graphs)
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64}
INLINE_BYTES = 1024  # smaller constants live inside the graph file


@dataclass(frozen=True)
class WeightRef:
    """How to make one stored tensor from the checkpoint: key, transposed or not, storage kind.

    `storage` is "float32", "float16", "uint8-cols" (per-column asymmetric uint8: three tensors,
    the quantized matrix, its scales and zero points), or 4-bit blocks along the input dimension:
    "int4-matmul:<block>:<sym|asym>" (MatMulNBits inputs) and "int4-gather:<block>:<sym|asym>"
    (GatherBlockQuantized inputs of an embedding table); asymmetric ones add zero points.
    """

    key: str
    transpose: bool
    storage: str
    # checkpoint keys concatenated along the output dimension to make `key` (the fused decoder's
    # q/k/v projection: one [3D, D] matrix); empty for a tensor read as is
    parts: tuple[str, ...] = ()

    def shape(self, shapes: dict[str, tuple]) -> tuple:
        """The checkpoint-side shape of this tensor ([out, in] for a linear weight)."""
        if not self.parts:
            return tuple(shapes[self.key])
        first = tuple(shapes[self.parts[0]])
        return (sum(shapes[p][0] for p in self.parts),) + first[1:]

    @property
    def names(self) -> list[str]:
        """Initializer names this reference produces, in (data, scale, zero point) order."""
        base = self.key + (".T" if self.transpose else "")
        if self.storage == "uint8-cols":
            return [base + ".quantized", base + ".scale", base + ".zero_point"]
        if self.int4 is not None:  # the names MatMulNBitsQuantizer gives a weight it quantizes
            return [base + "_Q4", base + "_scales"] + ([] if self.int4[2] else [base + "_zero_points"])
        return [base + (".fp16" if self.storage == "float16" else "")]

    @property
    def int4(self) -> tuple[str, int, bool] | None:
        """(kind "matmul"/"gather", block size, symmetric) of a 4-bit storage, else None."""
        if not self.storage.startswith("int4-"):
            return None
        kind, block, sym = self.storage[5:].split(":")
        return kind, int(block), sym == "sym"


class GraphBuilder:
    """Collects nodes, inputs, outputs, literal constants and weight references for one graph."""

    def __init__(self, name: str, precision: str, int4=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.name, self.precision = name, precision
        if precision == "int4-cpu":
            from bridge_export.exporter.quantize.int4 import Int4Options

            self.int4 = int4 or Int4Options()
        else:
            self.int4 = None
        self.act = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.literals: dict[str, np.ndarray] = {}
        self.weights: dict[str, WeightRef] = {}  # initializer name -> reference
        self._literal_names: dict[tuple, str] = {}
        self._scope: list[str] = []
        self._count: dict[str, int] = {}
        self._quantized_inputs: dict[str, tuple[str, str, str]] = {}
        self._alias: dict[str, str] = {}
        self._nbits: dict[str, WeightRef] = {}  # MatMulNBits node name -> its weight (K, N set in model())

    # -- naming --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str):
        """Name nodes after the module they implement (`/qllama/layers.0/self_attn/MatMul`)."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _node_name(self, op: str) -> str:
        base = "/" + "/".join(self._scope + [op])
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # -- graph I/O and constants ------------------------------------------------------------------
    def input(self, name: str, elem: int, shape: list) -> str:
        """Declare a graph input; returns its name."""
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape: list) -> None:
        """Expose `value` as graph output `name` (renaming its producer's output: no Identity node)."""
        value = self._alias.get(value, value)
        producer = next((n for n in reversed(self.nodes) if value in n.output), None)
        if value != name and (producer is None or any(value == o.name for o in self.outputs)):
            self.op("Identity", [value], outputs=[name])  # a graph input, or already another output
        elif value != name:
            producer.output[list(producer.output).index(value)] = name
            for n in self.nodes:
                for j, i in enumerate(n.input):
                    if i == value:
                        n.input[j] = name
            self._quantized_inputs = {name if k == value else k: v for k, v in self._quantized_inputs.items()}
            self._alias[value] = name  # later nodes may still use the old name
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def const(self, value, dtype=np.float32) -> str:
        """A literal constant (deduplicated by content)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._literal_names:
            name = f"const.{len(self._literal_names)}"
            self._literal_names[key] = name
            self.literals[name] = arr
        return self._literal_names[key]

    def act_const(self, value) -> str:
        """A float constant in the activation dtype."""
        return self.const(value, _NP[self.act])

    def ints(self, values) -> str:
        """An int64 constant (shapes, axes)."""
        return self.const(values, np.int64)

    def weight(self, key: str, transpose: bool = False, storage: str | None = None, parts: tuple = ()) -> str:
        """An initializer read from the checkpoint key (transposed if asked); returns its name."""
        return self._ref(key, transpose, storage, parts).names[0]

    def _ref(self, key: str, transpose: bool = False, storage: str | None = None, parts: tuple = ()) -> WeightRef:
        """Register the initializer(s) made from checkpoint `key` (or `parts` concatenated); returns their reference."""
        storage = storage or ("float16" if self.act == TensorProto.FLOAT16 else "float32")
        ref = WeightRef(key, transpose, storage, tuple(parts))
        for n in ref.names:
            self.weights[n] = ref
        return ref

    # -- nodes ---------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names when n_out > 1)."""
        name = self._node_name(op_type)
        inputs = [self._alias.get(i, i) for i in inputs]
        outs = outputs or [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def cast(self, x: str, to: int) -> str:
        """Cast `x` to `to` (callers only call it where the dtype changes)."""
        return self.op("Cast", [x], to=to)

    def to_f32(self, x: str) -> str:
        """x in fp32 (a Cast only in fp16 graphs)."""
        return self.cast(x, TensorProto.FLOAT) if self.act != TensorProto.FLOAT else x

    def to_act(self, x: str) -> str:
        """fp32 `x` in the activation dtype (a Cast only in fp16 graphs)."""
        return self.cast(x, self.act) if self.act != TensorProto.FLOAT else x

    # -- building blocks ----------------------------------------------------------------------------
    def linear(self, x: str, key: str, bias: str | None = None, quantize: bool = True, parts: tuple = ()) -> str:
        """x @ W.T (+ bias) for the checkpoint's nn.Linear weight `key` ([out, in]); with `parts`,
        W is those checkpoint weights concatenated along the output dimension (named `key`)."""
        if self.precision == "int8-cpu" and quantize:
            out = self._dynamic_int8_matmul(x, key, parts)
        elif self.precision == "int4-cpu" and quantize and not self._kept_by_int4():
            out = self._nbits_matmul(x, key, parts)
        else:
            out = self.op("MatMul", [x, self.weight(key, transpose=True, parts=parts)])
        if bias is not None:
            out = self.op("Add", [out, self.weight(bias)])
        return out

    def _dynamic_int8_matmul(self, x: str, key: str, parts: tuple = ()) -> str:
        """The subgraph onnxruntime's quantize_dynamic writes for a MatMul (onnxruntime fuses it).

        Written by hand because onnxruntime's quantizer loads the whole model into memory; the
        weights are quantized tensor by tensor while streaming (weight_stream.quantize_columns).
        """
        wq, ws, wz = self._ref(key, True, "uint8-cols", parts).names
        if x not in self._quantized_inputs:  # one DynamicQuantizeLinear per activation, shared
            self._quantized_inputs[x] = tuple(self.op("DynamicQuantizeLinear", [x], n_out=3))
        xq, xs, xz = self._quantized_inputs[x]
        scale = self.op("Mul", [xs, ws])
        acc = self.op("MatMulInteger", [xq, wq, xz, wz])
        return self.op("Mul", [self.cast(acc, TensorProto.FLOAT), scale])

    def _kept_by_int4(self) -> bool:
        """Int4Options.keep names a part of this MatMul's node name (as the quantizer matches node names)."""
        name = "/" + "/".join(self._scope + ["MatMul"])
        return any(k in name for k in self.int4.keep)

    def _int4_storage(self, kind: str) -> str:
        return f"int4-{kind}:{self.int4.block_size}:{'sym' if self.int4.symmetric else 'asym'}"

    def _nbits_matmul(self, x: str, key: str, parts: tuple = ()) -> str:
        """MatMulNBits as MatMulNBitsQuantizer writes it (K and N are filled in from the shapes in model())."""
        ref = self._ref(key, True, self._int4_storage("matmul"), parts)
        out = self.op("MatMulNBits", [x] + ref.names, domain="com.microsoft", **self.int4.matmul_attrs(0, 0))
        self._nbits[self.nodes[-1].name] = ref
        return out

    def embedding(self, key: str, ids: str) -> str:
        """Rows `ids` of the embedding table `key` ([V, D]): a Gather, or GatherBlockQuantized in int4-cpu."""
        if self.int4 is None or not self.int4.embeddings:
            return self.op("Gather", [self.weight(key), ids])
        q, scales, *zp = self._ref(key, False, self._int4_storage("gather")).names
        return self.op("GatherBlockQuantized", [q, ids, scales] + zp, domain="com.microsoft",
                       **self.int4.gather_attrs())

    def rms_norm(self, x: str, key: str, eps: float) -> str:
        """RMSNorm in fp32 (the pattern onnxruntime fuses into SimplifiedLayerNormalization)."""
        with self.scope(key.split(".")[-2]):  # node names carry the module's name ("input_layernorm")
            x32 = self.to_f32(x)
            var = self.op("ReduceMean", [self.op("Pow", [x32, self.const(2.0)]), self.ints([-1])], keepdims=1)
            den = self.op("Sqrt", [self.op("Add", [var, self.const(eps)])])
            y = self.op("Mul", [self.op("Div", [x32, den]), self.weight(key, storage="float32")])
            return self.to_act(y)

    def skip_norm(self, x: str, skip: str, key: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(x + skip), x + skip) as one com.microsoft SkipSimplifiedLayerNormalization
        (the residual add fused into the next norm; the onnxruntime target only)."""
        with self.scope(key.split(".")[-2]):
            name = self._node_name("SkipSimplifiedLayerNormalization")
            outs = [f"{name}_output_0", "", "", f"{name}_output_3"]  # mean and inv_std_var not asked for
            inputs = [self._alias.get(i, i) for i in (x, skip, self.weight(key))]
            self.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", inputs, outs, name=name,
                                               domain="com.microsoft", epsilon=eps))
            return outs[0], outs[3]

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        """LayerNormalization in fp32 with `prefix`.weight / `prefix`.bias."""
        with self.scope(prefix.split(".")[-1]):
            y = self.op("LayerNormalization", [self.to_f32(x), self.weight(prefix + ".weight", storage="float32"),
                                               self.weight(prefix + ".bias", storage="float32")],
                        axis=-1, epsilon=eps)
            return self.to_act(y)

    def softmax(self, scores: str, mask: str | None = None) -> str:
        """Softmax over the last axis in fp32 (scores, mask and softmax are the fp32 island)."""
        s = self.to_f32(scores)
        if mask is not None:
            s = self.op("Add", [s, mask])
        return self.to_act(self.op("Softmax", [s], axis=-1))

    def heads(self, x: str, num_heads: int, head_dim: int, perm: list[int]) -> str:
        """(B, T, H*Dh) -> Reshape (B, T, H, Dh) -> Transpose `perm` (no shape arithmetic)."""
        return self.op("Transpose", [self.op("Reshape", [x, self.ints([0, 0, num_heads, head_dim])])], perm=perm)

    def merge_heads(self, x: str, width: int) -> str:
        """(B, H, T, Dh) -> (B, T, H*Dh)."""
        return self.op("Reshape", [self.op("Transpose", [x], perm=[0, 2, 1, 3]), self.ints([0, 0, width])])

    # -- the finished graph ----------------------------------------------------------------------------
    def model(self, opset: int, shapes: dict[str, tuple]) -> onnx.ModelProto:
        """The ModelProto: literal initializers inline, weight initializers as empty placeholders.

        `shapes` maps checkpoint keys to their shapes; `weight_stream` later points every
        placeholder at its bytes in weights.bin.
        """
        for node in self.nodes:
            if node.name in self._nbits:
                n_out, k_in = self._nbits[node.name].shape(shapes)
                for a in node.attribute:
                    if a.name in ("K", "N"):
                        a.i = k_in if a.name == "K" else n_out
        if any(r.int4 and r.int4[0] == "gather" for r in self.weights.values()):
            opset = max(opset, 21)  # 4-bit tensors (as MatMulNBitsQuantizer raises it for a quantized Gather)
        inits = []
        for name, arr in self.literals.items():
            inits.append(numpy_helper.from_array(arr, name))
        for name, ref in self.weights.items():
            inits.append(placeholder(name, ref, ref.shape(shapes)))
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)
        opsets = [helper.make_opsetid("", opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        return helper.make_model(graph, opset_imports=opsets, producer_name="bridge-export",
                                 ir_version=min(onnx.IR_VERSION, 10))


def lm_head(b: GraphBuilder, x: str, precision: str) -> str:
    """Logits of `x` (B, D) fp32 through QLLaMA's lm_head: integer weights in the onnxruntime CPU precisions
    (int4 unless the int4 options keep lm_head), else an fp32 MatMul (the logits stay fp32 in fp16 bundles)."""
    if precision in QUANTIZED:
        return b.linear(x, "qllama.lm_head.weight", quantize=b.int4 is None or b.int4.lm_head)
    return b.op("MatMul", [x, b.weight("qllama.lm_head.weight", transpose=True, storage="float32")])


def stored_shape(ref: WeightRef, name: str, shape: tuple) -> tuple:
    """Shape of initializer `name` made from a checkpoint tensor of `shape` by `ref`."""
    full = tuple(reversed(shape)) if ref.transpose else tuple(shape)
    if ref.int4 is not None:
        kind, block, _ = ref.int4
        if kind == "gather":  # [V, D]: data [V, D], scales and zero points [V, D / block]
            return tuple(shape) if name.endswith("_Q4") else (shape[0], -(-shape[1] // block))
        n, blocks = shape[0], -(-shape[1] // block)  # checkpoint [N, K]; blocks run along K
        if name.endswith("_Q4"):
            return n, blocks, block // 2
        return (n, blocks) if name.endswith("_scales") else (n, -(-blocks // 2))  # zero points: 2 per byte
    if ref.storage == "uint8-cols" and not name.endswith(".quantized"):
        return (full[-1],)
    return full


def stored_dtype(ref: WeightRef, name: str) -> int:
    """ONNX element type of initializer `name` of `ref`."""
    if ref.storage == "uint8-cols":
        return TensorProto.FLOAT if name.endswith(".scale") else TensorProto.UINT8
    if ref.int4 is not None:
        if name.endswith("_scales"):
            return TensorProto.FLOAT
        if ref.int4[0] == "gather":
            return TensorProto.INT4 if ref.int4[2] else TensorProto.UINT4
        return TensorProto.UINT8
    return TensorProto.FLOAT16 if ref.storage == "float16" else TensorProto.FLOAT


def placeholder(name: str, ref: WeightRef, shape: tuple) -> onnx.TensorProto:
    """An initializer with dtype and dims but no data yet."""
    t = onnx.TensorProto()
    t.name = name
    t.data_type = stored_dtype(ref, name)
    t.dims.extend(stored_shape(ref, name, shape))
    return t


def swiglu_mlp(b: GraphBuilder, x: str, p: str, packed: int | None = None) -> str:
    """SwiGLU MLP; `packed` (the MLP width): gate and up as one linear over the two weights concatenated
    (the fused decoder's `gate_up_proj`, so a bundle stores that weight once for the bridge and the decoder)."""
    if packed:
        gate_up = b.linear(x, f"{p}.gate_up_proj.weight", parts=(f"{p}.gate_proj.weight", f"{p}.up_proj.weight"))
        gate, up = b.op("Split", [gate_up, b.ints([packed, packed])], n_out=2, axis=-1)
    else:
        gate, up = b.linear(x, f"{p}.gate_proj.weight"), b.linear(x, f"{p}.up_proj.weight")
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    return b.linear(b.op("Mul", [act, up]), f"{p}.down_proj.weight")
