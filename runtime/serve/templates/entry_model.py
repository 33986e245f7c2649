"""Triton Python-backend model for one bridge-export entry point (written by `bridge-export triton-repo`).

The config.pbtxt beside this file names the entry point (`entry`: embed_image, embed_text, caption or
caption_stream) and the graph models it calls through BLS (`bls_models`). The vision encoder and the
query bridge run as their own Triton models (onnxruntime or TensorRT backend, dynamically batched);
the text decoder runs here, in this process, with the runtime's preallocated KV cache, because a
decode step through BLS would copy the whole cache every token. The `runtime` package and the bundle
(`bundle/`) lie beside this file.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the copied `bridge_export.runtime` package

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from bridge_export.runtime import read_manifest  # noqa: E402
from bridge_export.runtime.pipeline import Pipeline  # noqa: E402
from bridge_export.runtime.serve.handlers import Handlers, RequestError  # noqa: E402
from bridge_export.runtime.backends import open_session  # noqa: E402
from bridge_export.runtime.sessions import Session, TensorMeta  # noqa: E402
from bridge_export.runtime.text import TextCodec  # noqa: E402

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
_INPUTS = {"embed_image": ("image", "mode"), "embed_text": ("text",),
           "caption": ("image", "prompt", "max_new_tokens", "num_beams"),
           "caption_stream": ("image", "prompt", "max_new_tokens", "num_beams")}


def _meta(graph) -> dict:
    """Input name -> TensorMeta of a manifest GraphInfo."""
    return {t.name: TensorMeta(t.name, _NP.get(t.dtype, np.float32), t.shape) for t in graph.inputs}


class BlsSession(Session):
    """A graph served by another Triton model, called through BLS (Triton batches it with other callers)."""

    def __init__(self, model_name: str, graph, max_batch: int):
        self.name, self.inputs = model_name, _meta(graph)
        self.output_names = [t.name for t in graph.outputs]
        self.max_batch = max_batch

    def run(self, feeds):
        """Send the feeds to the graph model and return its outputs as host numpy arrays."""
        kw = {}
        if hasattr(pb_utils, "PreferredMemory"):  # ask for host outputs (the graph model may run on a GPU)
            kw["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(model_name=self.name, requested_output_names=self.output_names,
                                            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v))
                                                    for k, v in feeds.items()], **kw)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.name}: {response.error().message()}")
        out = {}
        for n in self.output_names:
            t = pb_utils.get_output_tensor_by_name(response, n)
            out[n] = t.as_numpy() if t.is_cpu() else np.from_dlpack(t.to_dlpack())
        return out


class Unloaded(Session):
    """A graph this entry point never runs: its metadata only (the pipeline reads the KV shapes from it)."""

    def __init__(self, name: str, graph):
        self.name, self.inputs = name, _meta(graph)
        self.output_names = [t.name for t in graph.outputs]

    def run(self, feeds):
        """Never called by this entry point."""
        raise RuntimeError(f"{self.name} is not loaded in this model")


class TritonPythonModel:
    """One entry point over a Pipeline whose vision/bridge graphs are BLS calls."""

    def initialize(self, args):
        """Open the bundle: BLS sessions for the graph models, the text decoder in process if needed."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.entry = params["entry"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        manifest = read_manifest(os.path.join(HERE, "bundle"), verify_checksums=False)
        graphs = manifest.graphs
        sessions = {}
        for graph, model in json.loads(params["bls_models"]).items():
            sessions[graph] = BlsSession(model, graphs[graph], int(params["bls_max_batch"]))
        if self.entry in ("embed_text", "caption", "caption_stream"):
            backend = params.get("decoder_backend", "onnxruntime")
            path = manifest.graph_path("text_decoder")
            if backend == "tensorrt":
                path = os.path.join(HERE, "bundle", "engines", "text_decoder.engine")
            memory, providers = None, None
            if backend == "tensorrt" or args.get("model_instance_kind") == "GPU":
                from bridge_export.runtime import _device  # runtime.load's own setup: the KV cache in device memory

                memory, providers = _device(f"cuda:{int(args.get('model_instance_device_id', 0))}", backend, None)
            threads = int(params.get("threads", "0")) or None
            sessions["text_decoder"] = open_session(path, backend, providers=providers, threads=threads,
                                                    memory=memory)
        else:
            memory = None
            sessions["text_decoder"] = Unloaded("text_decoder", graphs["text_decoder"])
        self.handlers = Handlers(Pipeline(manifest, sessions, TextCodec.from_manifest(manifest), memory=memory))

    def _request(self, request) -> dict:
        out = {}
        for name in _INPUTS[self.entry]:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                out[name] = t.as_numpy()
        return out

    @staticmethod
    def _response(result) -> "pb_utils.InferenceResponse":
        if isinstance(result, RequestError):  # the client's fault: 400 over HTTP, INVALID_ARGUMENT over gRPC
            code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
            error = pb_utils.TritonError(str(result), code) if code is not None else pb_utils.TritonError(str(result))
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()])

    def execute(self, requests):
        """Answer every request: a response per request, a per-request error for a bad one."""
        if self.decoupled:
            for request in requests:
                sender = request.get_response_sender()
                try:
                    for piece in self.handlers.caption_stream(self._request(request)):
                        sender.send(self._response(piece))
                except RequestError as e:
                    sender.send(self._response(e))
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        results = getattr(self.handlers, self.entry)([self._request(r) for r in requests])
        return [self._response(r) for r in results]

    def finalize(self):
        """Release the sessions."""
        self.handlers.pipe.close()
