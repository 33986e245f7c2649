"""The vision encoder and query bridge for the onnxruntime target: fused contrib operators.

A pass over the graphs the builder writes (internvl_graphs.build_vision / build_bridge), run before
weights are attached, so it costs nothing at any model size:

* every attention core the builder writes without RoPE (InternViT's self-attention, the bridge's
  cross-attention, both pooling heads) -- q, k, v split into heads by Reshape + Transpose, q scaled,
  MatMul, Softmax, MatMul, heads merged -- becomes one com.microsoft `MultiHeadAttention` on the
  unsplit [B, S, D] projections (`num_heads`, `scale` taken from the pattern). The bridge's
  self-attention over the queries keeps its unfused form: its q/k are rotated per head, and
  MultiHeadAttention takes a query only as [B, S, D];
* the norms: onnxruntime's own fusion classes (`onnxruntime.transformers`) turn a residual Add
  feeding the builder's RMSNorm pattern into `SkipSimplifiedLayerNormalization` (com.microsoft). The
  norms without a residual (InternViT's q_norm/k_norm over the whole 3200-dim q/k, the first norm,
  the cross-attention's norms) stay the plain pattern, which onnxruntime's session optimiser fuses
  into SimplifiedLayerNormalization by itself, as it does GELU; Skip fusion and attention it does
  not (measured in docs/design.md).

Only fp32-activation graphs (fp32, int8-cpu, int4-cpu) are rewritten; fp16 graphs, with their
Cast islands, are left as written.
"""
from __future__ import annotations

import onnx
import numpy as np
from onnx import helper, numpy_helper

FUSED_GRAPHS = ("vision_encoder", "query_bridge")


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _literal(graph, name: str):
    """The value of an inline initializer (the builder's literal constants), else None."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t) if _has_data(t) else None
    return None


def _has_data(t: onnx.TensorProto) -> bool:
    """Whether an initializer holds its values inline (a literal; weights are placeholders or external)."""
    return t.data_location != onnx.TensorProto.EXTERNAL and bool(
        t.raw_data or t.float_data or t.int64_data or t.int32_data or t.double_data)


def _heads_of(graph, producers, name: str, perm: list[int]):
    """If `name` = Transpose(Reshape(x, [0, 0, H, Dh]), perm): (x, H, Dh, [the two nodes]), else None."""
    t = producers.get(name)
    if t is None or t.op_type != "Transpose" or list(helper.get_attribute_value(t.attribute[0])) != perm:
        return None
    r = producers.get(t.input[0])
    if r is None or r.op_type != "Reshape":
        return None
    shape = _literal(graph, r.input[1])
    if shape is None or shape.tolist()[:2] != [0, 0] or len(shape) != 4:
        return None
    return r.input[0], int(shape[2]), int(shape[3]), [t, r]


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace each unrotated attention core with MultiHeadAttention; returns how many."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    fused, dead = 0, []
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        scores = producers.get(sm.input[0])
        users = consumers.get(sm.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul":
            continue
        pv = users[0]
        scaled = producers.get(scores.input[0])
        if scaled is None or scaled.op_type != "Mul":
            continue
        scale = _literal(g, scaled.input[1])
        q = _heads_of(g, producers, scaled.input[0], [0, 2, 1, 3])
        k = _heads_of(g, producers, scores.input[1], [0, 2, 3, 1])
        v = _heads_of(g, producers, pv.input[1], [0, 2, 1, 3])
        merge_t = consumers.get(pv.output[0], [])
        if scale is None or scale.size != 1 or not (q and k and v) or len(merge_t) != 1:
            continue
        mt = merge_t[0]
        merge_r = consumers.get(mt.output[0], [])
        if (mt.op_type != "Transpose" or list(helper.get_attribute_value(mt.attribute[0])) != [0, 2, 1, 3]
                or len(merge_r) != 1 or merge_r[0].op_type != "Reshape"):
            continue
        if len({(q[1], q[2]), (k[1], k[2]), (v[1], v[2])}) != 1:
            continue
        out = merge_r[0].output[0]
        mha = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out], domain="com.microsoft",
                               name=f"{sm.name.rsplit('/', 1)[0]}/MultiHeadAttention", num_heads=q[1],
                               scale=float(scale.reshape(-1)[0]))
        g.node.insert(list(g.node).index(merge_r[0]), mha)
        dead += [merge_r[0], mt, pv, sm, scores, scaled]
        fused += 1
    for n in dead:
        g.node.remove(n)
    _drop_unused(model)
    return fused


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (the heads' Reshape/Transpose left by fusion)."""
    g = model.graph
    keep_out = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | keep_out
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used and _has_data(t)]:
        g.initializer.remove(t)


def fuse_norms(model: onnx.ModelProto) -> dict[str, int]:
    """onnxruntime's fusion classes: residual Add + RMSNorm -> SkipSimplifiedLayerNormalization (by way of
    SimplifiedLayerNormalization, which the Skip fusion searches for). Returns the count."""
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization
    from onnxruntime.transformers.fusion_skiplayernorm import FusionSkipLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(model)
    FusionSimplifiedLayerNormalization(m).apply()
    # without symbolic shape inference (it needs the weights, which are not attached yet): every
    # residual Add the builder writes adds two [B, S, D] tensors, the case the fusion checks shapes for
    FusionSkipLayerNormalization(m, "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                                 shape_infer=False).apply()
    _unfuse_plain_norms(model)
    m.prune_graph()
    m.topological_sort()  # the fused nodes are appended at the end
    ops = [n.op_type for n in model.graph.node]
    return {"SkipSimplifiedLayerNormalization": ops.count("SkipSimplifiedLayerNormalization")}


def _unfuse_plain_norms(model: onnx.ModelProto) -> None:
    """Write the norms left without a residual back as the RMSNorm pattern: SimplifiedLayerNormalization
    is an onnxruntime operator in the ONNX domain, which onnx's checker rejects; onnxruntime's session
    optimiser fuses the pattern again when it loads the graph (as it does for the fused decoder's)."""
    g = model.graph
    for n in [n for n in g.node if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]:
        eps = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "epsilon"), 1e-5)
        x, w, y, p = n.input[0], n.input[1], n.output[0], n.name
        consts = {f"{p}/two": np.array(2.0, np.float32), f"{p}/eps": np.array(eps, np.float32),
                  f"{p}/axes": np.array([-1], np.int64)}
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        nodes = [helper.make_node("Pow", [x, f"{p}/two"], [f"{p}/sq"], name=f"{p}/Pow"),
                 helper.make_node("ReduceMean", [f"{p}/sq", f"{p}/axes"], [f"{p}/var"], name=f"{p}/ReduceMean",
                                  keepdims=1),
                 helper.make_node("Add", [f"{p}/var", f"{p}/eps"], [f"{p}/var_eps"], name=f"{p}/Add"),
                 helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/rms"], name=f"{p}/Sqrt"),
                 helper.make_node("Div", [x, f"{p}/rms"], [f"{p}/normed"], name=f"{p}/Div"),
                 helper.make_node("Mul", [f"{p}/normed", w], [y], name=f"{p}/Mul")]
        at = list(g.node).index(n)
        g.node.remove(n)
        for i, new in enumerate(nodes):
            g.node.insert(at + i, new)


def fuse_graph(model: onnx.ModelProto) -> dict[str, int]:
    """Both passes on one vision_encoder / query_bridge graph (in place); the fused operator counts.
    Graphs with fp16 activations are returned unchanged (empty counts)."""
    if any(n.op_type == "Cast" for n in model.graph.node):  # the fp16 graphs' fp32 islands
        return {}
    counts = {"MultiHeadAttention": fuse_attention(model)}
    counts.update(fuse_norms(model))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def fused_copy(src, dst) -> dict[str, int]:
    """Write the fused form of graph file `src` (external weights stay where `src` points: write `dst`
    into the same folder) and return the counts. For measuring and tests."""
    m = onnx.load(str(src), load_external_data=False)
    counts = fuse_graph(m)
    onnx.save(m, str(dst))
    return counts





def fuse_models(models: dict[str, onnx.ModelProto], progress=None) -> dict[str, dict[str, int]]:
    """`fuse_graph` on the vision encoder and bridge of a bundle's built graphs (in place), said through
    `progress`; the counts per graph."""
    counts = {}
    for name in FUSED_GRAPHS:
        if name in models:
            counts[name] = fuse_graph(models[name])
            if progress is not None and counts[name]:
                progress(f"[export] {name}: fused for onnxruntime ("
                         + ", ".join(f"{n} {op}" for op, n in counts[name].items()) + ")")
    return counts
