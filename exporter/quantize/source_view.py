"""A private view of a source graph, so tools that write beside their input never touch the bundle.

onnxruntime's quantizers (quantize_dynamic, quantize_static) run shape inference by writing
`<graph>-inferred.onnx` next to the graph they are given, and a read-only bundle (a shared
model store, a container layer) would make them fail. They are given the graph in a temporary
folder instead (inside `work`, the output being built), with each external-data file it names
copied there, and whatever they write lands there. A copy, not a link: onnx (>= 1.17) refuses
external data reached through a symbolic link or a file with several hard links (its guard
against link attacks), which would also make hard-linked bundles (`cp -al`, triton-repo's)
fail. The quantizers hold every weight in memory anyway; the copy adds one read and one write.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bridge_export.runtime.onnx_refs import external_locations


@contextmanager
def source_view(graph, work=None) -> Iterator[Path]:
    """`with source_view(bundle / "g.onnx", work) as g:` a path to the same graph (and its external data) in
    a temporary folder under `work` (default: the system's), removed afterwards; writes beside `g` never
    reach the bundle."""
    graph = Path(graph).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=".bridge-export-src-", dir=work))
    try:
        shutil.copyfile(graph, tmp / graph.name)
        for loc in sorted(external_locations(graph)):
            target, link = graph.parent / loc, tmp / loc
            if target.exists() and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, link)
        yield tmp / graph.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)





def load_with_weights(path):
    """`onnx.load(path, load_external_data=True)` for a graph whose external data may be hard-linked.

    onnx refuses external data in a file with several hard links, so a bundle made by `cp -al` or
    by triton-repo (which hard-links) could not be converted. The bytes are read here instead,
    from the locations the graph names, each of which must resolve inside the graph's folder (the
    same confinement runtime.manifest applies to every bundle file). Hard links themselves are
    harmless here: reading one gives the reader nothing the file's own permissions did not.
    """
    import onnx

    from bridge_export.runtime.manifest import confined

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    handles = {}
    try:
        for t in _tensors(model.graph):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info["location"]
            if loc not in handles:
                handles[loc] = open(confined(path.parent, loc, f"(in {path.name}'s external data) file"), "rb")
            f = handles[loc]
            f.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            t.raw_data = f.read(length)
            if length >= 0 and len(t.raw_data) != length:
                raise ValueError(f"{path}: external data of {t.name} ends early in {loc}: the bundle is truncated")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    finally:
        for f in handles.values():
            f.close()
    return model


def _tensors(graph):
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)
__all__ = ["source_view", "load_with_weights"]
