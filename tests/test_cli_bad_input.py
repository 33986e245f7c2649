"""Every bad command line gets one line saying what was wrong, a failing exit status and no traceback.

Table-driven: one row per bad input; `{b}` is the tiny text bundle, `{t}` a fresh temporary folder,
`{img}` a folder of 3 good images, `{bad}` a folder of 2 good images and 1 unreadable one.
"""
import errno

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bridge_export.exporter.cli import main

# (id, argv, exit code, message regex, paths under {t} that must NOT exist afterwards)
CASES = [
    ("opset too high", "onnx --preset tiny --out {t}/o --opset 99", 1, "--opset 99 is not supported: use 13-20",
     ["o"]),
    ("opset too low", "onnx --preset tiny --out {t}/o --opset 5", 1, "--opset 5 is not supported", ["o"]),
    ("max-batch 0", "onnx --preset tiny --out {t}/o --max-batch 0", 1, "--max-batch must be between 1", ["o"]),
    ("max-batch negative", "onnx --preset tiny --out {t}/o --max-batch -3", 1, "--max-batch must be", ["o"]),
    ("max-seq 0", "onnx --preset tiny --out {t}/o --max-seq 0", 1, "--max-seq must be a positive", ["o"]),
    ("tokenizer missing", "onnx --preset tiny --out {t}/o --tokenizer {t}/nope", 1, "is not a directory", ["o"]),
    ("tokenizer corrupt", "onnx --preset tiny --out {t}/o --tokenizer {t}/badtok", 1,
     "is not a SentencePiece model", ["o"]),
    ("tokenizer.json corrupt", "onnx --preset tiny --out {t}/o --tokenizer {t}/badjson", 1,
     "cannot be read by `tokenizers`", ["o"]),
    ("int8 without calib", "onnx --preset tiny --out {t}/o --precision int8", 1, "needs --calib", ["o"]),
    ("overwrite a foreign folder", "onnx --preset tiny --out {t}/foreign --overwrite", 1,
     "not written by bridge-export", []),
    ("out is a file", "onnx --preset tiny --out {t}/file.txt --overwrite", 1, "is a file", []),
    ("out inside a file", "onnx --preset tiny --out {t}/file.txt/o", 1, "is a file, not a folder", []),
    ("neither checkpoint nor preset", "onnx --out {t}/o", 1, "exactly one of --checkpoint", ["o"]),
    ("embed nothing", "embed {b}", 1, "nothing to embed", []),
    ("embed batch-size 0", "embed {b} {img} --batch-size 0", 2, "batch-size", []),
    ("embed batch-size -1", "embed {b} {img} --batch-size -1", 2, "batch-size", []),
    ("embed --out .txt", "embed {b} {img} --out {t}/e.txt", 1, "must end in .npz or .parquet", ["e.txt", "e.txt.npz"]),
    ("embed --out .npy", "embed {b} {img} --out {t}/e.npy", 1, "cannot hold the names.*use e.npz", ["e.npy"]),
    ("embed --out unwritable", "embed {b} {img} --out {t}/file.txt/e.npz", 1, "is a file, not a folder", []),
    ("embed --out exists", "embed {b} {img} --out {t}/file.npz", 1, "already exists", []),
    ("embed unknown text", "embed {b} --texts zebra", 1, "no word of the text 'zebra'", []),
    ("embed empty text", "embed {b} --texts ''", 1, "non-empty strings", []),
    ("embed a missing image", "embed {b} {t}/missing.png", 1, "cannot read image", []),
    ("caption beams 100000", "caption {b} {img} --beams 100000", 2, "--beams", []),
    ("caption max-new-tokens 0", "caption {b} {img} --max-new-tokens 0", 2, "--max-new-tokens", []),
    ("caption min above max", "caption {b} {img} --min-new-tokens 9 --max-new-tokens 3", 1,
     "--min-new-tokens 9 is above --max-new-tokens 3", []),
    ("caption unknown prompt", "caption {b} {img} --prompt Légende:", 1, "no word of the prompt", []),
    ("caption max-new-tokens too long", "caption {b} {img} --max-new-tokens 500", 1, "max_", []),
    ("classify template without {}", "classify {b} {img} --labels cat,dog --template photo", 1, "exactly once", []),
    ("classify template {x}", "classify {b} {img} --labels cat,dog --template {{x}}", 1, "no other", []),
    ("classify no labels", "classify {b} {img} --labels ,", 1, "no labels", []),
    ("classify duplicate labels", "classify {b} {img} --labels cat,cat", 1, "distinct", []),
    ("classify unknown labels", "classify {b} {img} --labels cat,zebra --template {{}}", 1, "no word of the text", []),
    ("bench threads 10**6", "bench {b} --threads 1000000", 2, "--threads", []),
    ("bench bad pasts", "bench {b} --pasts 8,x", 1, "--pasts must be comma-separated", []),
    ("precision over its source", "precision {b} --precision fp16 --out {b} --overwrite", 1, "source bundle itself", []),
    ("precision no mode", "precision {b} --out {t}/p", 1, "choose a precision: --precision", ["p"]),
    ("precision for the wrong target", "precision {b} --precision int4-cpu --target tensorrt --out {t}/p", 1,
     "written for onnxruntime only", ["p"]),
    ("precision and an old flag disagree", "precision {b} --precision fp16 --int8 --out {t}/p", 1, "disagree", ["p"]),
    ("onnx unknown preset", "onnx --preset huge --out {t}/o", 2, "not a preset: choose one of", ["o"]),
    ("inspect not a bundle", "inspect {t}", 1, "no manifest.json", []),
    ("inspect missing", "inspect {t}/missing", 1, "is not a directory", []),
    ("engine into a foreign folder", "engine {b} --emit-trtexec --out {t}/foreign", 1, "did not write", []),
    ("engine into the bundle itself", "engine {b} --emit-trtexec --out {b}", 1, "is a bundle", []),
    ("demo into a bundle", "demo --out {b} --limit 2 --precisions fp32", 1, "is a bundle", []),
    ("caption stream with beams", "caption {b} {img} --stream --beams 3", 1, "drop --beams", []),
    ("engine max-batch 0", "engine {b} --emit-trtexec --max-batch 0", 2, "--max-batch", []),
    ("engine workspace 0", "engine {b} --emit-trtexec --workspace 0", 2, "--workspace", []),
    ("demo limit -1", "demo --limit -1 --out {t}/d", 2, "--limit", ["d"]),
    ("demo unknown precision", "demo --out {t}/d --precisions fp32,fp8", 1, "unknown precisions", ["d"]),
    ("demo into a foreign folder", "demo --out {t}/foreign --limit 2 --precisions fp32", 1, "did not write", []),
]


@pytest.fixture(scope="module")
def env(tiny_text_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_images")
    (d / "img").mkdir()
    (d / "bad").mkdir()
    for i in range(3):
        im = Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8))
        im.save(d / "img" / f"{i}.png")
        if i < 2:
            im.save(d / "bad" / f"{i}.png")
    (d / "bad" / "2.png").write_text("not a png")
    return {"b": tiny_text_bundle, "img": d / "img", "bad": d / "bad"}


def _fill(t):
    (t / "foreign").mkdir()
    (t / "foreign" / "thesis.tex").write_text("years of work")
    (t / "file.txt").write_text("precious")
    (t / "file.npz").write_bytes(b"precious")
    (t / "badtok").mkdir()
    (t / "badtok" / "tokenizer.model").write_bytes(b"\x00garbage")
    (t / "badjson").mkdir()
    (t / "badjson" / "tokenizer.json").write_text("{")


def _snapshot(t):
    return sorted((str(p.relative_to(t)), p.read_bytes() if p.is_file() else None) for p in t.rglob("*"))


def _run(argv, **fmt):
    import shlex

    return CliRunner().invoke(main, [a.format(**{k: str(v) for k, v in fmt.items()}) for a in shlex.split(argv)])


@pytest.mark.parametrize("argv,code,match,absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line(env, tmp_path, argv, code, match, absent):
    import re

    _fill(tmp_path)
    before = _snapshot(tmp_path)
    r = _run(argv, t=tmp_path, **env)
    assert r.exit_code == code, r.output
    assert re.search(match, r.output), r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, KeyError))
    if code == 1:
        assert len([ln for ln in r.output.splitlines() if ln.startswith("Error:")]) == 1
    for a in absent:
        assert not (tmp_path / a).exists()
    assert _snapshot(tmp_path) == before  # nothing lost, nothing left behind (no .partial / .old)


def test_one_bad_image_among_many(env, tmp_path):
    """The readable images are embedded and written; the bad one is named; the exit status is 1."""
    from bridge_export.exporter.embeddings_file import read_embeddings

    out = tmp_path / "e.npz"
    r = _run("embed {b} {bad} --out {o}", o=out, **env)
    assert r.exit_code == 1 and "skipped: cannot read image" in r.output and "2.png" in r.output
    assert "1 of 3 images could not be read" in r.output
    emb, names, _ = read_embeddings(out)
    assert emb.shape[0] == 2 and names == [str(env["bad"] / "0.png"), str(env["bad"] / "1.png")]
    for cmd in ("caption {b} {bad} --max-new-tokens 2 --beams 1", "classify {b} {bad} --labels cat,dog"):
        r = _run(cmd, **env)
        assert r.exit_code == 1 and "1 of 3 images could not be read" in r.output
        assert sum(line.startswith(str(env["bad"])) for line in r.output.splitlines()) == 2


def test_embed_out_writes_exactly_that_file(env, tmp_path):
    r = _run("embed {b} {img} --out {o}", o=tmp_path / "e.npz", **env)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]
    r = _run("embed {b} {img} --out {o}", o=tmp_path / "e.npz", **env)
    assert r.exit_code == 1 and "already exists" in r.output
    assert _run("embed {b} {img} --out {o} --overwrite", o=tmp_path / "e.npz", **env).exit_code == 0


def test_disk_full_while_writing_embeddings(env, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    r = _run("embed {b} {img} --out {o}", o=tmp_path / "e.npz", **env)
    assert r.exit_code == 1 and "No space left on device" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e.npz").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_caption_defaults_adapt_to_a_small_max(env):
    r = _run("caption {b} {img} --max-new-tokens 3 --beams 2", **env)
    assert r.exit_code == 0, r.output


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path)])
    assert r.exit_code == 1 and r.exception is not None and type(r.exception).__name__ == "BundleError"
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert isinstance(r.exception, SystemExit)


def test_a_real_bug_keeps_its_traceback(env, monkeypatch):
    from bridge_export import runtime

    def bug(*a, **k):
        raise RuntimeError("internal invariant broken")

    monkeypatch.setattr(runtime, "load", bug)
    r = CliRunner().invoke(main, ["caption", str(env["b"]), str(env["img"])])
    assert isinstance(r.exception, RuntimeError) and "internal invariant" in str(r.exception)
