"""The scripts in examples/ run with no arguments and print what they promise (so they don't rot).

Each runs in a subprocess exactly as a user would start it. The slower ones (precisions side by
side, a training run) only run with BRIDGE_EXPORT_SLOW=1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SLOW = os.environ.get("BRIDGE_EXPORT_SLOW") == "1"
slow = pytest.mark.skipif(not SLOW, reason="slow example: set BRIDGE_EXPORT_SLOW=1 to run it")


def run_example(name: str, tmp_path: Path) -> str:
    """Run examples/<name> with no arguments from a scratch directory; its stdout (fails with its stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def percent(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text}"
    return float(m.group(1)) / 100


def test_every_example_is_documented():
    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert len(scripts) >= 5
    readme = (EXAMPLES / "README.md").read_text()
    assert [s for s in scripts if s not in readme] == []


def test_01_zero_shot_classification(tmp_path):
    out = run_example("01_zero_shot_classification.py", tmp_path)
    assert percent(r"InternVL-C: (\d+)% of", out) >= 0.8
    assert percent(r"InternVL-G: (\d+)% of", out) >= 0.8


def test_02_image_text_retrieval(tmp_path):
    out = run_example("02_image_text_retrieval.py", tmp_path)
    assert "indexed 200 images" in out
    assert percent(r"precision@5 over the ten digits: (\d+)%", out) >= 0.8
    # the image query finds itself first
    first = re.search(r"image query (\S+) .*\n\s+(\S+)\s+cosine", out)
    assert first and first.group(1) == first.group(2)


def test_03_streaming_captions(tmp_path):
    out = run_example("03_streaming_captions.py", tmp_path)
    rows = re.findall(r"true (\w+)\s+streamed: (.*?)\s+\| first piece .*beam search: '(.*)'", out)
    assert len(rows) >= 4
    right = sum(f"the digit {true}" == streamed.strip() for true, streamed, _ in rows)
    assert right >= len(rows) - 1
    assert sum(streamed.strip() == beam for _, streamed, beam in rows) >= len(rows) - 1


def test_05_jetson_tensorrt(tmp_path):
    out = run_example("05_jetson_tensorrt.py", tmp_path)
    assert out.count("trtexec --onnx=") == 3
    assert "runtime.load(" in out and "backend='tensorrt'" in out
    assert "skipped the TensorRT run:" in out or "TensorRT zero-shot accuracy" in out


@pytest.mark.slow
@slow
def test_04_precisions_side_by_side(tmp_path):
    out = run_example("04_precisions_side_by_side.py", tmp_path)
    rows = re.findall(r"^(fp32|fp16|int8|int8-cpu|int4-cpu)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)", out, re.M)
    assert {r[0] for r in rows} >= {"fp32", "fp16", "int8", "int8-cpu"}
    sizes = {r[0]: float(r[3]) for r in rows}
    assert sizes["int8-cpu"] < sizes["fp32"] and sizes["fp16"] < sizes["fp32"]
    for name, c, cap, _ in rows:
        assert float(c) >= 85 and float(cap) >= 85, name


@pytest.mark.slow
@slow
def test_06_train_demo_model(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("06_train_demo_model.py", tmp_path)
    assert "[train] step 40/40" in out
    assert re.search(r"zero-shot accuracy \d+% on 100 test digits", out)
    assert "model.safetensors" in out and "test_digits.npz" in out
