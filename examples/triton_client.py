"""Call a bridge-export Triton server (`bridge-export serve` or a `triton-repo` repository) with tritonclient.

    pip install "tritonclient[all]"
    python examples/triton_client.py photo.jpg --text "a photo of a cat"                 # gRPC on localhost:8001
    python examples/triton_client.py photo.jpg --protocol http --url localhost:8000 --mode G

Prints the image and text embeddings (first values) and their cosine, a caption with the model's
defaults, and the same caption streamed token by token (gRPC only).
"""
from __future__ import annotations

import argparse
import queue
from pathlib import Path

import numpy as np


def _bytes(x: bytes) -> np.ndarray:
    return np.array([[x]], dtype=object)  # [batch 1, 1] BYTES


def main() -> None:
    """Embed, caption and stream-caption one image on the server."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("--text", default="a photo of a cat")
    ap.add_argument("--mode", choices=["C", "G"], default="C")
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    ap.add_argument("--url", help="host:port (default localhost:8001 for gRPC, localhost:8000 for HTTP)")
    args = ap.parse_args()
    if args.protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    client = tc.InferenceServerClient(args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000"))

    def inp(name, arr, dtype="BYTES"):
        i = tc.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        return i

    image = args.image.read_bytes()  # the encoded file: the server decodes and preprocesses it
    img = client.infer("embed_image", [inp("image", _bytes(image)), inp("mode", _bytes(args.mode.encode()))])
    txt = client.infer("embed_text", [inp("text", _bytes(args.text.encode()))])
    e_img, e_txt = img.as_numpy("embedding")[0], txt.as_numpy("embedding")[0]
    cos = float(e_img @ e_txt / np.linalg.norm(e_img) / np.linalg.norm(e_txt))
    print(f"image embedding ({args.mode}) {e_img[:4]} ... dim {e_img.shape[0]}")
    print(f"text embedding {e_txt[:4]} ...   cosine {cos:.4f}")
    cap = client.infer("caption", [inp("image", _bytes(image))])  # unset options: the bundle's defaults
    print("caption:", cap.as_numpy("text")[0][0].decode())
    if args.protocol == "grpc":  # the decoupled model streams over gRPC only
        q: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer("caption_stream", [inp("image", _bytes(image))], enable_empty_final_response=True)
        print("streamed: ", end="", flush=True)
        while True:
            result, error = q.get(timeout=300)
            if error is not None:
                raise SystemExit(f"stream failed: {error}")
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            print(result.as_numpy("text")[0][0].decode(), end="", flush=True)
        client.stop_stream()
        print()


if __name__ == "__main__":
    main()
