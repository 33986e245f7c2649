"""Crafted and damaged bundles are refused in one line before anything runs or is printed.

Table-driven: one row per bad bundle (a change to a copy of the tiny bundle, the manifest
re-signed as a crafted bundle would be) and the message it must raise, from runtime.load and
from read_manifest with and without full checksums.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.manifest import BundleError, manifest_digest, read_manifest, sample_sha256, sha256_file


def _resign(bundle: Path, edit) -> None:
    """Apply `edit(manifest dict, bundle)` and write the manifest back with a valid digest."""
    path = bundle / "manifest.json"
    d = json.loads(path.read_text())
    edit(d, bundle)
    d["manifest_sha256"] = manifest_digest(d)
    path.write_text(json.dumps(d))


def _relist(d: dict, bundle: Path, name: str) -> None:
    """Record `name`'s current size and digests in the manifest (a crafted bundle that is self-consistent)."""
    p = bundle / name
    d["files"][name] = {"size": p.stat().st_size, "sha256": sha256_file(p), "sample": sample_sha256(p)}


def _rename_file(old: str, new: str):
    def edit(d, b):
        d["files"][new] = d["files"].pop(old)
        if d["weights"] == old:
            d["weights"] = new
        for g in d["graphs"].values():
            if g["file"] == old:
                g["file"] = new
        d["host_tensors"] = {k: (new if v == old else v) for k, v in d["host_tensors"].items()}
    return edit


def _outside_weights(loc_of):
    """Move weights.bin out of the bundle and point the vision graph's external data at it via `loc_of(path)`."""
    def edit(d, b):
        import onnx

        outside = b.parent / "outside.bin"
        shutil.copy(b / "weights.bin", outside)
        m = onnx.load(str(b / "vision_encoder.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc_of(outside)
        onnx.save(m, str(b / "vision_encoder.onnx"))
        _relist(d, b, "vision_encoder.onnx")
    return edit


def _symlink_weights(d, b):
    outside = b.parent / "outside.bin"
    shutil.move(b / "weights.bin", outside)
    os.symlink(outside, b / "weights.bin")


def _symlinked_folder(d, b):
    (b.parent / "elsewhere").mkdir()
    shutil.move(b / "weights.bin", b.parent / "elsewhere" / "weights.bin")
    os.symlink(b.parent / "elsewhere", b / "sub")
    _rename_file("weights.bin", "sub/weights.bin")(d, b)


def _fifo_tokenizer(d, b):
    """A tokenizer the manifest names but does not list: reading a FIFO would block forever."""
    os.mkfifo(b / "tokenizer.json")
    d.update(tokenizer={"file": "tokenizer.json"})


# (id, edit(manifest dict, bundle dir), message regex)
CONFINEMENT = [
    ("absolute file name", _rename_file("logit_scale.npy", "/etc/hostname"), "outside the bundle"),
    ("dot-dot file name", _rename_file("logit_scale.npy", "../logit_scale.npy"), "outside the bundle"),
    ("graph outside", lambda d, b: d["graphs"]["query_bridge"].update(file="../query_bridge.onnx"),
     "graph query_bridge '../query_bridge.onnx', which lies outside"),
    ("weights absolute", lambda d, b: d.update(weights="/etc/passwd"), "weights '/etc/passwd'"),
    ("tokenizer outside", lambda d, b: d.update(tokenizer={"file": "../../tokenizer.json"}),
     "tokenizer '../../tokenizer.json'"),
    ("tokenizer scores outside",
     lambda d, b: d.update(tokenizer={"file": "tok.json", "exact_bpe": {"scores": "/root/scores.json"}}),
     "tokenizer scores"),
    ("host tensor outside", lambda d, b: d["host_tensors"].update(logit_scale="../../x.npy"),
     "host tensor logit_scale"),
    ("weights.bin a link out", _symlink_weights, "'weights.bin', which lies outside"),
    ("folder a link out", _symlinked_folder, "'sub/weights.bin', which lies outside"),
    ("external data ../", _outside_weights(lambda p: "../outside.bin"), "vision_encoder.onnx's external data"),
    ("external data absolute", _outside_weights(str), "vision_encoder.onnx's external data"),
    ("tokenizer a FIFO", _fifo_tokenizer, r"tokenizer.json \(tokenizer\) is not a regular file"),
]


def _zero_half(d, b):
    """A preallocated copy that never finished: right size, second half zeros."""
    p = b / "weights.bin"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))


def _swap_graph(d, b):
    """query_bridge.onnx replaced by vision_encoder.onnx (a same-size swap is what the sample digest sees; the
    manifest then re-listed so only the graph's inputs and outputs can tell)."""
    shutil.copy(b / "vision_encoder.onnx", b / "query_bridge.onnx")
    _relist(d, b, "query_bridge.onnx")


def _nan_weights(d, b):
    """A region of NaN in weights.bin, re-listed in the manifest: only the outputs can tell."""
    p = b / "weights.bin"
    with open(p, "r+b") as f:
        f.write(np.full(4096, np.nan, np.float32).tobytes())
    _relist(d, b, "weights.bin")


CORRUPTION = [
    ("zeroed second half", _zero_half, "weights.bin is damaged.*verify --checksums"),
    ("graph swapped", _swap_graph, "query_bridge in .* is not the graph its manifest describes"),
]


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.mark.parametrize("edit,match", [r[1:] for r in CONFINEMENT], ids=[r[0] for r in CONFINEMENT])
@pytest.mark.parametrize("how", ["load", "checksums"])
def test_files_outside_the_bundle_are_refused(copy, edit, match, how):
    _resign(copy, edit)
    with pytest.raises(BundleError, match=match) as e:
        if how == "load":
            runtime.load(copy)
        else:
            read_manifest(copy, verify_checksums=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,match", [r[1:] for r in CORRUPTION], ids=[r[0] for r in CORRUPTION])
def test_damaged_bundle_refused_at_load(copy, edit, match):
    _resign(copy, edit)
    with pytest.raises(BundleError, match=match) as e:
        runtime.load(copy)
    assert "\n" not in str(e.value)


def test_nan_weights_never_become_an_answer(copy):
    _resign(copy, _nan_weights)
    pipe = runtime.load(copy)
    with pytest.raises(BundleError, match=r"vision_encoder produced NaN or infinite values.*verify --checksums"):
        pipe.encode_image(np.zeros((1, 3, 32, 32), np.float32))


def test_full_checksums_name_the_changed_file(copy):
    p = copy / "weights.bin"
    with open(p, "r+b") as f:
        f.seek(70_000)
        b = f.read(1)
        f.seek(70_000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="is corrupt: sha256"):
        read_manifest(copy, verify_checksums=True)


def test_links_inside_the_bundle_are_fine(copy):
    (copy / "data").mkdir()
    shutil.move(copy / "weights.bin", copy / "data" / "weights.bin")
    os.symlink("data/weights.bin", copy / "weights.bin")
    assert read_manifest(copy).files["weights.bin"].size > 0
