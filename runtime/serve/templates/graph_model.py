"""Triton Python-backend model running one bundle graph on onnxruntime (written by `bridge-export triton-repo
--backend python`): the CPU variant for Triton builds without the onnxruntime backend, e.g. PyTriton's.

Requests that Triton's dynamic batcher groups are concatenated along the batch axis, run once and split.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the copied `bridge_export.runtime` package

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from bridge_export.runtime import read_manifest  # noqa: E402
from bridge_export.runtime.sessions import OrtSession  # noqa: E402


class TritonPythonModel:
    """One graph of the bundle behind Triton's batching."""

    def initialize(self, args):
        """Open the graph named by the `graph` parameter."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        manifest = read_manifest(os.path.join(HERE, "bundle"), verify_checksums=False)
        threads = int(params.get("threads", "0")) or None
        self.session = OrtSession(manifest.graph_path(params["graph"]), threads=threads)
        self.inputs = list(self.session.inputs)

    def execute(self, requests):
        """Run all requests as one batch; a failure answers every request with its message."""
        feeds, sizes = {n: [] for n in self.inputs}, []
        for request in requests:
            for n in self.inputs:
                feeds[n].append(pb_utils.get_input_tensor_by_name(request, n).as_numpy())
            sizes.append(feeds[self.inputs[0]][-1].shape[0])
        try:
            out = self.session.run({n: np.concatenate(v) for n, v in feeds.items()})
        except ValueError as e:
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                    for _ in requests]
        responses, at = [], 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v[at:at + n])) for k, v in out.items()]))
            at += n
        return responses

    def finalize(self):
        """Release the session."""
        self.session.close()
