"""Streaming captions: print a caption word by word as the decoder produces it.

Exports the shipped digits model into a temporary directory, then for a few digit images calls
`Pipeline.caption_stream` (greedy decoding over the preallocated KV cache; each piece is printed
the moment its token is chosen) and, for comparison, `Pipeline.caption` (beam search, as the
original evaluates captions). The digits model says "the digit seven", so captions are capped at
a few tokens with no minimum length (InternVL-14B's defaults, 8 to 30 tokens, live in the manifest).

    python examples/03_streaming_captions.py
"""
import sys
import tempfile
import time
from pathlib import Path

from bridge_export import runtime
from bridge_export.exporter.export.bundle import export_bundle
from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
from bridge_export.reference_model.digits import CAPTION_TOKENS, WORDS, load_heldout_style, load_test_split


def main() -> None:
    images, labels = load_test_split(DEMO_CHECKPOINT)
    samples = list(zip(images[:4], labels[:4]))
    held = load_heldout_style(DEMO_CHECKPOINT)
    if held is not None:
        samples += list(zip(held[0][::97][:3], held[1][::97][:3]))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(load_pretrained(DEMO_CHECKPOINT), Path(tmp) / "bundle", checkpoint=DEMO_CHECKPOINT)
        pipe = runtime.load(bundle)
        print()
        for image, label in samples:
            print(f"true {WORDS[label]:<6} streamed: ", end="", flush=True)
            t0 = time.perf_counter()
            first = None
            for piece in pipe.caption_stream(image, max_new_tokens=CAPTION_TOKENS, min_new_tokens=0):
                first = first or time.perf_counter() - t0
                sys.stdout.write(piece)
                sys.stdout.flush()
            total = time.perf_counter() - t0
            beam = pipe.caption(image, max_new_tokens=CAPTION_TOKENS, min_new_tokens=0, num_beams=5)
            print(f"   | first piece {1000 * (first or total):.0f} ms, all {1000 * total:.0f} ms"
                  f" | beam search: {beam.text!r} (score {beam.score:.3f})")
        pipe.close()


if __name__ == "__main__":
    main()
