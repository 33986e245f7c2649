"""Failures deep inside a run (out of memory, a damaged tokenizer, bytes that are not text) end in one line
naming what to change, never a traceback. Table-driven: one row per failure, with how to provoke it."""
import json
import re
import shlex
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bridge_export.exporter.cli import main
from bridge_export.runtime.manifest import manifest_digest, sample_sha256, sha256_file


def _oom(monkeypatch, env):
    import onnxruntime as ort

    def run_with_iobinding(self, *a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                           "running MatMul node. Status Message: bfc_arena.cc:376 AllocateRawInternal Failed to "
                           "allocate memory for requested buffer of size 68719476736")

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run_with_iobinding)


def _tokenizer_damaged(monkeypatch, env, resign: bool):
    b = env["copy"]
    (b / "tokenizer.json").write_bytes(b"{" + b" " * ((b / "tokenizer.json").stat().st_size - 1))
    if resign:  # a crafted bundle: the manifest agrees with the damaged file
        d = json.loads((b / "manifest.json").read_text())
        p = b / "tokenizer.json"
        d["files"]["tokenizer.json"].update(sha256=sha256_file(p), sample=sample_sha256(p))
        d["manifest_sha256"] = manifest_digest(d)
        (b / "manifest.json").write_text(json.dumps(d))


# (id, provoke(monkeypatch, env) or None, argv, exit code, message regex)
CASES = [
    ("out of memory in embed", _oom, "embed {b} {img}", 1,
     "onnxruntime ran out of memory running vision_encoder on a batch of 1: lower --batch-size$"),
    ("out of memory in caption", _oom, "caption {b} {img} --max-new-tokens 2", 1,
     "ran out of memory running .*: lower --batch-size or --beams or --max-new-tokens$"),
    ("out of memory in classify", _oom, "classify {b} {img} --labels cat,dog", 1,
     r"ran out of memory running .*: (lower --|close other programs)"),
    ("tokenizer.json damaged", lambda m, e: _tokenizer_damaged(m, e, False), "embed {copy} --texts cat", 1,
     "tokenizer.json is damaged.*verify --checksums"),
    ("tokenizer.json crafted", lambda m, e: _tokenizer_damaged(m, e, True), "embed {copy} --texts cat", 1,
     "tokenizer file .*tokenizer.json cannot be read by `tokenizers`"),
    ("texts not UTF-8", None, "embed {b} --texts a\udcffb", 1, r"--texts 'a\\\\udcffb' is not valid UTF-8 text"),
    ("labels not UTF-8", None, "classify {b} {img} --labels cat,d\udce9g", 1, "--labels .* is not valid UTF-8"),
    ("prompt not UTF-8", None, "caption {b} {img} --prompt \udcff", 1, "--prompt .* is not valid UTF-8"),
    ("bench-load --repeats 0", None, "bench-load {b} --repeats 0", 2, "--repeats"),
    ("triton-repo --instances 0", None, "triton-repo {b} --out {t}/r --instances 0", 2, "--instances"),
    ("triton-repo --max-batch 0", None, "triton-repo {b} --out {t}/r --max-batch 0", 2, "--max-batch"),
    ("a FIFO among the images", None, "embed {b} {t}/pipe.png", 1, r"is a named pipe \(FIFO\)"),
    ("only a FIFO in --calib", lambda m, e: _calib_fifo(e), "precision {b} --precision int8 --calib {t}/calib "
     "--out {t}/p", 1, r"none of its 1 images could be read"),
    ("onnx while another run writes --out", lambda m, e: _held(e, "o"), "onnx --preset tiny --out {t}/o", 1,
     r"another bridge-export run \(pid \d+ on .*\) is writing .*o: wait for it"),
    ("embed while another run writes --out", lambda m, e: _held(e, "e.npz"), "embed {b} {img} --out {t}/e.npz", 1,
     "another bridge-export run .* is writing .*e.npz"),
    ("triton-repo while another run writes --out", lambda m, e: _held(e, "r"),
     "triton-repo {b} --out {t}/r --backend python --cpu", 1, "another bridge-export run .* is writing"),
    ("--calib-texts not UTF-8", lambda m, e: (e["t"] / "texts.txt").write_bytes(b"a cat\n\xff\xfe\n"),
     "precision {b} --precision int8 --calib {img} --calib-texts {t}/texts.txt --out {t}/p", 1,
     r"texts.txt is not UTF-8 text \(byte 6\)"),
]


def _held(env, name):
    """Another run (here: this process, alive) is writing {t}/name."""
    from bridge_export.runtime.write_guard import OutputLock

    OutputLock(env["t"] / name).acquire()


def _calib_fifo(env):
    import os

    (env["t"] / "calib").mkdir()
    os.mkfifo(env["t"] / "calib" / "0.png")  # read with Image.open, this blocked forever


@pytest.fixture
def env(tiny_text_bundle, tmp_path):
    import os

    (tmp_path / "img").mkdir()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "img" / "0.png")
    os.mkfifo(tmp_path / "pipe.png")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_text_bundle, copy)
    return {"b": tiny_text_bundle, "img": tmp_path / "img", "t": tmp_path, "copy": copy}


@pytest.mark.parametrize("provoke,argv,code,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_not_a_traceback(env, monkeypatch, provoke, argv, code, match):
    if provoke:
        provoke(monkeypatch, env)
    r = CliRunner().invoke(main, [a.format(**{k: str(v) for k, v in env.items()}) for a in shlex.split(argv)])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, KeyError))
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:") or "skipped:" in ln]
    assert errors and any(re.search(match, ln) for ln in r.output.splitlines()), r.output
