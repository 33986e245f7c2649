"""The tensors of a streamed fp32 bundle read back by checkpoint key, to rebuild a graph from them.

`bridge-export precision` makes int8-cpu / int4-cpu bundles from an fp32 bundle; their text decoder
is the fused one (exporter.export.fused_decoder), whose q/k/v weight is the three projections
concatenated. The streamed exporter names every weight initializer after its checkpoint key (`.T`
when stored transposed), so the fp32 bundle is a checkpoint in disguise: this source hands those
tensors to the same streaming path (stream_export.stream_weights) that writes the fused decoder
from a checkpoint. A traced (TorchScript/dynamo) fp32 bundle has lost the key names: it is refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bridge_export.exporter.errors import ExportError

_FLOAT = {onnx.TensorProto.FLOAT: np.float32}


class BundleSource:
    """keys() / shape(key) / get(key) (CheckpointSource's interface) over an fp32 bundle's graph initializers."""

    def __init__(self, manifest, graphs: tuple[str, ...] = ("text_decoder",)):
        self.root = Path(manifest.root)
        self._index: dict[str, tuple[bool, onnx.TensorProto]] = {}
        for g in graphs:
            m = onnx.load(str(manifest.graph_path(g)), load_external_data=False)
            for t in m.graph.initializer:
                if t.data_type not in _FLOAT:
                    continue
                transposed = t.name.endswith(".T")
                self._index[t.name[:-2] if transposed else t.name] = (transposed, t)

    def keys(self) -> list[str]:
        """Checkpoint keys the bundle's graphs hold."""
        return list(self._index)

    def shape(self, key: str) -> tuple:
        """The checkpoint-side shape of `key` (untransposed)."""
        transposed, t = self._index[key]
        return tuple(reversed(t.dims)) if transposed else tuple(t.dims)

    def get(self, key: str) -> torch.Tensor:
        """The tensor of `key` in the checkpoint's layout (a transposed view of what the bundle stores)."""
        transposed, t = self._index[key]
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            dtype = _FLOAT[t.data_type]
            count = int(info.get("length", 0)) // np.dtype(dtype).itemsize
            arr = np.fromfile(self.root / info["location"], dtype=dtype, count=count,
                              offset=int(info.get("offset", 0))).reshape(tuple(t.dims))
        else:
            arr = numpy_helper.to_array(t)
        out = torch.from_numpy(arr)
        return out.t() if transposed else out


def decoder_source(manifest, keys: list[str]) -> tuple[BundleSource, dict[str, str]]:
    """(source, key -> key mapping) for the keys a rebuilt decoder needs; ExportError in one line when the
    bundle does not hold them by name (a traced export)."""
    src = BundleSource(manifest)
    missing = [k for k in keys if k not in src._index]
    if missing:
        raise ExportError(f"{manifest.root} holds its decoder weights under traced names (no {missing[0]}), so the "
                          "fused decoder cannot be rebuilt from it: export int8-cpu/int4-cpu directly with "
                          "`bridge-export onnx --precision ...`, or re-export the fp32 bundle streamed")
    return src, {k: k for k in keys}
