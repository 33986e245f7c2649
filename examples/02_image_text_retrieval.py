"""Image-text retrieval: index a folder of images with InternVL-C embeddings, search it by text and by image.

Exports the shipped digits model into a temporary directory, fills a folder with 200 digit
images (handwritten and, when the checkpoint carries them, typeset), embeds them once into a
small index (a normalised float32 matrix saved with numpy, plus the file list), then answers
text queries ("the digit seven") and an image query with the top-k files by cosine similarity.

    python examples/02_image_text_retrieval.py
"""
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bridge_export import runtime
from bridge_export.exporter.export.bundle import export_bundle
from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
from bridge_export.reference_model.digits import WORDS, load_heldout_style, load_test_split

TOP_K = 5


def fill_folder(folder: Path, n: int = 200) -> dict[str, int]:
    """Write n digit PNGs into folder; return {file name: true digit} (only to score the answers)."""
    folder.mkdir()
    images, labels = load_test_split(DEMO_CHECKPOINT)
    items = list(zip(images, labels))
    held = load_heldout_style(DEMO_CHECKPOINT)
    if held is not None:
        items = items[: n // 2] + list(zip(held[0], held[1]))[: n - n // 2]
    truth = {}
    for i, (im, y) in enumerate(items[:n]):
        name = f"img_{i:03d}.png"
        Image.fromarray(im).save(folder / name)
        truth[name] = int(y)
    return truth


def build_index(pipe, folder: Path, index_dir: Path) -> None:
    """Embed every image of folder (InternVL-C) into index_dir/embeddings.npy + files.json."""
    files = sorted(p.name for p in folder.glob("*.png"))
    emb = pipe.embed_images([folder / f for f in files], mode="C", batch_size=32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index_dir.mkdir()
    np.save(index_dir / "embeddings.npy", emb.astype(np.float32))
    (index_dir / "files.json").write_text(json.dumps(files))


def load_index(index_dir: Path) -> tuple[np.ndarray, list[str]]:
    """The saved index: normalised embeddings and the file of each row (load once, query many times)."""
    return np.load(index_dir / "embeddings.npy"), json.loads((index_dir / "files.json").read_text())


def search(index: tuple[np.ndarray, list[str]], query: np.ndarray, k: int = TOP_K) -> list[tuple[str, float]]:
    """The k files whose embeddings have the highest cosine similarity with the query embedding."""
    emb, files = index
    scores = emb @ (query / np.linalg.norm(query))
    top = np.argsort(-scores)[:k]
    return [(files[i], float(scores[i])) for i in top]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = export_bundle(load_pretrained(DEMO_CHECKPOINT), tmp / "bundle", checkpoint=DEMO_CHECKPOINT)
        truth = fill_folder(tmp / "photos")
        pipe = runtime.load(bundle)
        build_index(pipe, tmp / "photos", tmp / "index")
        print(f"\nindexed {len(truth)} images: {tmp / 'index'}")

        index = load_index(tmp / "index")
        text_emb = pipe.embed_texts([f"the digit {w}" for w in WORDS])
        hits = []
        for d, word in enumerate(WORDS):
            found = search(index, text_emb[d])
            hits.append(sum(truth[f] == d for f, _ in found))
            if d in (3, 7):
                print(f"\ntext query 'the digit {word}': top {TOP_K}")
                for f, s in found:
                    print(f"  {f}  cosine {s:.3f}  (is a {WORDS[truth[f]]})")
        print(f"\ntext -> image precision@{TOP_K} over the ten digits: {sum(hits) / (10 * TOP_K):.0%}")

        query_file = sorted(truth)[0]
        q = pipe.embed_images([tmp / "photos" / query_file], mode="C")[0]
        print(f"\nimage query {query_file} (a {WORDS[truth[query_file]]}): top {TOP_K}")
        for f, s in search(index, q):
            print(f"  {f}  cosine {s:.3f}  (is a {WORDS[truth[f]]})")
        pipe.close()


if __name__ == "__main__":
    main()
