"""The external-data file names an ONNX graph refers to, read from the serialized graph alone.

Why hand-written: the base install (the runtime) has onnxruntime but not `onnx`, and onnxruntime
offers no call that lists a graph's external data without opening (and so reading) it. Only the
few protobuf fields on the way are decoded; everything else is skipped by its length:

    ModelProto.graph (7) -> GraphProto.initializer (5) / sparse_initializer (15) / node (1)
    NodeProto.attribute (5) -> AttributeProto.t (5) / tensors (9) / g (6) / graphs (10)
    TensorProto.external_data (13) -> StringStringEntryProto key (1) / value (2)

Field numbers are those of onnx/onnx.proto (stable since IR version 3).
"""
from __future__ import annotations

from pathlib import Path

# field numbers on the way from a ModelProto to its tensors' external data
_GRAPH_IN_MODEL = 7
_GRAPH_TENSOR_FIELDS = (5,)  # initializer
_GRAPH_SPARSE = 15  # SparseTensorProto: values (1), indices (2) are TensorProtos
_GRAPH_NODE = 1
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 9, 10
_TENSOR_EXTERNAL_DATA = 13


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtoError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message; length-delimited values as memoryviews."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ProtoError("truncated field")
            value, i = buf[i:i + n], i + n
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ProtoError("truncated field")
        yield num, wire, value


def _entry_locations(buf: memoryview, out: set[str]) -> None:
    key = val = None
    for n, w, v in _fields(buf):
        if w == 2 and n == 1:
            key = bytes(v).decode("utf-8", "replace")
        elif w == 2 and n == 2:
            val = bytes(v).decode("utf-8", "replace")
    if key == "location" and val is not None:
        out.add(val)


def _tensor(buf: memoryview, out: set[str]) -> None:
    for num, wire, value in _fields(buf):
        if num == _TENSOR_EXTERNAL_DATA and wire == 2:
            _entry_locations(value, out)


def _graph(buf: memoryview, out: set[str], depth: int) -> None:
    if depth > 32:
        raise ProtoError("graphs nested too deeply")
    for num, wire, value in _fields(buf):
        if wire != 2:
            continue
        if num in _GRAPH_TENSOR_FIELDS:
            _tensor(value, out)
        elif num == _GRAPH_SPARSE:
            for n, w, v in _fields(value):
                if w == 2 and n in (1, 2):
                    _tensor(v, out)
        elif num == _GRAPH_NODE:
            for n, w, attr in _fields(value):
                if n == _NODE_ATTRIBUTE and w == 2:
                    _attribute(attr, out, depth)


def _attribute(buf: memoryview, out: set[str], depth: int) -> None:
    for num, wire, value in _fields(buf):
        if wire != 2:
            continue
        if num in (_ATTR_TENSOR, _ATTR_TENSORS):
            _tensor(value, out)
        elif num in (_ATTR_GRAPH, _ATTR_GRAPHS):
            _graph(value, out, depth + 1)


def external_locations(path) -> set[str]:
    """Every `location` an initializer, sparse initializer or constant attribute of the ONNX file at
    `path` names for its external data (relative to the graph's folder, as written); ProtoError if
    the file is not a well-formed ModelProto."""
    data = memoryview(Path(path).read_bytes())
    out: set[str] = set()
    for num, wire, value in _fields(data):
        if num == _GRAPH_IN_MODEL and wire == 2:
            _graph(value, out, 0)
    return out


__all__ = ["external_locations", "ProtoError"]
