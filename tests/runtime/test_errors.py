"""Bad inputs and corrupted bundles get clear errors."""
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime import BundleError, TokenizerMissing


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return runtime.load(tiny_bundle)


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "b")


def test_prompt_longer_than_cache(pipe):
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 128"):
        pipe.generate(x, np.ones((1, 100), np.int64), max_new_tokens=30)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate(x, np.ones((1, 4), np.int64), max_new_tokens=200)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        pipe.encode_text(np.ones((1, 129), np.int64))


def test_empty_batch_and_wrong_size(pipe):
    with pytest.raises(ValueError, match="empty batch"):
        pipe.encode_image(np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 32, 32\]"):
        pipe.encode_image(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        pipe.encode_text(np.zeros((0, 4), np.int64))
    with pytest.raises(ValueError, match="no images"):
        pipe.embed_images([])
    with pytest.raises(ValueError, match="num_beams"):
        pipe.generate(np.zeros((1, 3, 32, 32), np.float32), np.ones((1, 2), np.int64), num_beams=0)


def test_missing_tokenizer_is_explained(pipe):
    with pytest.raises(TokenizerMissing, match="--tokenizer"):
        pipe.embed_texts(["a cat"])


def test_missing_graph(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (b / "query_bridge.onnx").unlink()
    with pytest.raises(BundleError, match=r"incomplete: missing \['query_bridge.onnx'\]"):
        runtime.load(b)


def test_checksum_mismatch(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    data = bytearray((b / "weights.bin").read_bytes())
    data[5000] ^= 0xFF
    (b / "weights.bin").write_bytes(bytes(data))
    # by default a sample of blocks is hashed: in a file this small the sample is every byte
    with pytest.raises(BundleError, match="weights.bin is damaged.*verify --checksums"):
        runtime.load(b)
    with pytest.raises(BundleError, match="weights.bin is corrupt: sha256"):
        runtime.load(b, verify_checksums=True)


def test_newer_format_version(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 99, newer than this runtime reads.*upgrade"):
        runtime.load(b)


def test_corrupt_graph_without_checksums(tiny_bundle, tmp_path):
    """The cheap checks on load: size, ONNX header; past them onnxruntime's own parse error is explained."""
    b = _copy(tiny_bundle, tmp_path)
    path = b / "text_decoder.onnx"
    n = path.stat().st_size
    path.write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"text_decoder.onnx is 7 bytes but the manifest says \d+: .*re-copy"):
        runtime.load(b)
    path.write_bytes(b"g" * n)
    with pytest.raises(BundleError, match="text_decoder.onnx is not an ONNX model .bad header.*re-export"):
        runtime.load(b)
    path.write_bytes(b"\x08\x08" + b"\xff" * (n - 2))
    with pytest.raises(BundleError, match="text_decoder.onnx is not a well-formed ONNX model.*re-export"):
        runtime.load(b)


def test_edited_manifest_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["prompts"]["caption"]["num_beams"] = 2
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json was edited after export.*re-export"):
        runtime.load(b)


def test_older_format_version_says_reexport(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 1
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"bridge-export-bundle v1 bundle; .* reads v2 only: re-export it"):
        runtime.load(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        runtime.load(tmp_path)


def test_runtime_needs_no_torch(tiny_text_bundle):
    """Import and run the runtime with torch made unimportable."""
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np, runtime
        p = runtime.load({str(tiny_text_bundle)!r})
        e = p.embed_texts(["a cat"])
        t = p.generate(np.zeros((1, 3, 32, 32), np.float32), np.array([[1, 5]]), max_new_tokens=3, num_beams=2)
        assert "torch" not in sys.modules
        print("ok", e.shape, t.shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok (1, 24)")
