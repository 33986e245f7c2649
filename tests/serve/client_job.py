"""Client side of the Triton end-to-end tests; runs in the [serve] venv (tritonclient's gRPC client pins protobuf<7).

usage: python client_job.py HOST HTTP_PORT GRPC_PORT METRICS_PORT IMAGES_DIR OUT.json
8 concurrent clients (4 HTTP, 4 gRPC) embed every image (C and G), a few texts, caption every image
(defaults and set options); then bad requests one by one; then a stream; then a good request again.
Everything the server answered goes to OUT.json for the test to compare with the Python API.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th

TEXTS = ["a photo of a cat", "a dog on the mat", "the digit seven"]


def _inp(mod, name, arr, dtype):
    i = mod.InferInput(name, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    return i


def _b(x: bytes):
    return np.array([[x]], dtype=object)


def _i(v: int):
    return np.array([[v]], dtype=np.int32)


def one_client(kind, url, images, results, k):
    mod = th if kind == "http" else tg
    c = mod.InferenceServerClient(url)
    out = {}
    for name, data in images:
        for mode in ("C", "G"):
            inputs = [_inp(mod, "image", _b(data), "BYTES")]
            if mode == "G" or k % 2:  # odd clients send mode C explicitly, even ones leave it unset
                inputs.append(_inp(mod, "mode", _b(mode.encode()), "BYTES"))
            out[f"image/{mode}/{name}"] = c.infer("embed_image", inputs).as_numpy("embedding")[0].tolist()
        r = c.infer("caption", [_inp(mod, "image", _b(data), "BYTES")])
        out[f"caption/default/{name}"] = r.as_numpy("text")[0][0].decode()
        r = c.infer("caption", [_inp(mod, "image", _b(data), "BYTES"), _inp(mod, "prompt", _b(b"a photo of"), "BYTES"),
                                _inp(mod, "max_new_tokens", _i(10), "INT32"), _inp(mod, "num_beams", _i(2), "INT32")])
        out[f"caption/options/{name}"] = r.as_numpy("text")[0][0].decode()
    for t in TEXTS:
        out[f"text/{t}"] = c.infer("embed_text", [_inp(mod, "text", _b(t.encode()), "BYTES")]).as_numpy(
            "embedding")[0].tolist()
    results[f"{kind}{k}"] = out


def bad_requests(http_url, grpc_url, image):
    c, g = th.InferenceServerClient(http_url), tg.InferenceServerClient(grpc_url)
    errors = {}
    cases = {
        "garbage_image_http": (c, th, "embed_image", [("image", _b(b"\x89PNG not really"), "BYTES")]),
        "garbage_image_grpc": (g, tg, "embed_image", [("image", _b(b"\x00" * 64), "BYTES")]),
        "bad_mode": (c, th, "embed_image", [("image", _b(image), "BYTES"), ("mode", _b(b"Z"), "BYTES")]),
        "wrong_type": (c, th, "embed_image", [("image", np.ones((1, 1), np.float32), "FP32")]),
        "not_utf8": (g, tg, "embed_text", [("text", _b(b"\xff\xfe\xfd"), "BYTES")]),
        "zero_beams": (c, th, "caption", [("image", _b(image), "BYTES"), ("num_beams", _i(0), "INT32")]),
        "missing_input": (g, tg, "caption", [("prompt", _b(b"a photo of"), "BYTES")]),
    }
    for key, (client, mod, model, ins) in cases.items():
        try:
            client.infer(model, [_inp(mod, n, a, d) for n, a, d in ins])
            errors[key] = None
        except Exception as e:  # tritonclient raises InferenceServerException for every server error
            errors[key] = str(e)
    return errors


def stream(grpc_url, image):
    g = tg.InferenceServerClient(grpc_url)
    q: queue.Queue = queue.Queue()
    g.start_stream(callback=lambda result, error: q.put((result, error)))
    g.async_stream_infer("caption_stream", [_inp(tg, "image", _b(image), "BYTES")], enable_empty_final_response=True)
    pieces = []
    while True:
        result, error = q.get(timeout=120)
        if error is not None:
            raise RuntimeError(f"stream error: {error}")
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
        pieces.append(result.as_numpy("text")[0][0].decode())
    g.stop_stream()
    return pieces


def main(host, http_port, grpc_port, metrics_port, images_dir, out_path):
    http_url, grpc_url = f"{host}:{http_port}", f"{host}:{grpc_port}"
    images = [(p.name, p.read_bytes()) for p in sorted(Path(images_dir).glob("*.png"))]
    results: dict = {}
    threads = [threading.Thread(target=one_client, args=("http" if k < 4 else "grpc",
                                                         http_url if k < 4 else grpc_url, images, results, k))
               for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = {"texts": TEXTS, "clients": results, "errors": bad_requests(http_url, grpc_url, images[0][1]),
              "stream": {images[0][0]: stream(grpc_url, images[0][1])}}
    c = th.InferenceServerClient(http_url)
    report["after_errors"] = c.infer("embed_text", [_inp(th, "text", _b(TEXTS[0].encode()), "BYTES")]).as_numpy(
        "embedding")[0].tolist()
    report["live"], report["ready"] = c.is_server_live(), c.is_server_ready()
    report["models_ready"] = {m: c.is_model_ready(m) for m in ("embed_image", "embed_text", "caption",
                                                               "caption_stream")}
    report["config_max_batch"] = c.get_model_config("embed_image")["max_batch_size"]
    report["dynamic_batching"] = "dynamic_batching" in c.get_model_config("embed_image")
    metrics = urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10).read().decode()
    report["metrics_success"] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                    if line.startswith("nv_inference_request_success{"))
    Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
