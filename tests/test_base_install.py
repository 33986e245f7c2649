"""The base install is torch-free and runs bundles: a fresh venv, `pip install <project>`, every bundle command.

The bundle is exported beforehand in this (full) environment; the venv has no system site packages
and gets only the base dependencies (pip's cache is reused, so this is seconds when warm).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NETWORK_TROUBLE = ("Could not fetch URL", "Temporary failure in name resolution", "NewConnectionError",
                   "Network is unreachable", "ConnectTimeoutError")


def _source_copy(dst: Path) -> Path:
    """The project's files without build outputs (pip builds in the tree it is given)."""
    skip = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "*.onnx",
                                  "demo-out", ".venv")
    return Path(shutil.copytree(REPO, dst, ignore=skip))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(*args, cwd) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], capture_output=True, text=True, env=_env(),
                         cwd=cwd, timeout=600)
    if out.returncode != 0 and any(s in out.stderr for s in NETWORK_TROUBLE):
        pytest.skip(f"no package index reachable to build a fresh venv: {out.stderr.strip().splitlines()[-1]}")
    return out


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    """A venv with the project's wheel and its base dependencies only; (python, bridge-export, seconds taken).

    Made quickly: the wheel is built with this environment's setuptools, the venv has no pip of its
    own (this pip installs into it with --python), and nothing is byte-compiled.
    """
    import pip

    tmp = tmp_path_factory.mktemp("base_install")
    t0 = time.perf_counter()
    if os.environ.get("BRIDGE_EXPORT_WHEEL"):  # CI: the wheel `python -m build` made, as a user would get it
        whl = Path(os.environ["BRIDGE_EXPORT_WHEEL"]).absolute()
        assert whl.is_file(), f"BRIDGE_EXPORT_WHEEL={whl} is not a file"
    else:
        src = _source_copy(tmp / "src")
        wheel = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp / "dist", cwd=tmp)
        if wheel.returncode != 0:  # no setuptools >= 77 here: let pip build in an isolated environment
            wheel = _pip("wheel", "-q", "--no-deps", src, "-w", tmp / "dist", cwd=tmp)
        assert wheel.returncode == 0, wheel.stderr[-3000:]
        (whl,) = (tmp / "dist").glob("bridge_export-*.whl")
    venv = tmp / "venv"
    py = venv / "bin" / "python"
    if tuple(int(x) for x in pip.__version__.split(".")[:2]) >= (22, 3):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        out = _pip("--python", py, "install", "-q", "--no-compile", whl, cwd=tmp)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        out = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", str(whl)], capture_output=True,
                             text=True, env=_env(), cwd=tmp, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return py, venv / "bin" / "bridge-export", time.perf_counter() - t0


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300)


def test_base_install_has_no_torch_and_runs_bundle_commands(base_venv, tiny_text_bundle, tmp_path):
    py, cli, seconds = base_venv
    r = _run([py, "-c", "import torch"], tmp_path)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = _run([py, "-c", "import onnx"], tmp_path)
    assert r.returncode != 0 and "No module named 'onnx'" in r.stderr
    r = _run([py, "-c", "from bridge_export import runtime, exporter; print(runtime.__file__)"], tmp_path)
    assert r.returncode == 0 and "site-packages" in r.stdout, r.stderr  # the installed copy, not the tree

    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    b = tiny_text_bundle

    r = _run([cli, "inspect", b], tmp_path)
    assert r.returncode == 0 and "past_key_values.{i}.key" in r.stdout, r.stderr
    r = _run([cli, "caption", b, images / "0.png", "--max-new-tokens", "4", "--min-new-tokens", "1"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(str(images / "0.png")), r.stderr
    r = _run([cli, "classify", b, images, "--labels", "cat,dog,mat"], tmp_path)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2, r.stderr
    r = _run([cli, "embed", b, images, "--texts", "a cat", "--out", tmp_path / "e.npz"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "e.npz")["embeddings"].shape == (3, 24)
    r = _run([cli, "engine", b, "--emit-trtexec", "--max-batch", "2", "--out", tmp_path / "eng"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "eng" / "build_engines.sh").read_text().count("trtexec ") == 3
    r = _run([cli, "verify", b, "--checksums"], tmp_path)
    assert r.returncode == 0 and "files match the manifest" in r.stdout, r.stderr

    # A command whose extra is missing: one line naming the extra, no traceback.
    r = _run([cli, "onnx", "--preset", "tiny", "--out", tmp_path / "x"], tmp_path)
    assert r.returncode == 1 and 'pip install "bridge-export[export]"' in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    print(f"fresh venv + base install: {seconds:.1f} s")


def _listed_packages() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_in_the_distribution():
    """pyproject lists the packages by hand (package-dir maps folders into bridge_export): none left out."""
    folders = {"bridge_export." + ".".join(p.parent.relative_to(REPO).parts)
               for top in ("runtime", "exporter", "reference_model") for p in (REPO / top).rglob("__init__.py")}
    assert folders - _listed_packages() == set()


@pytest.mark.skipif(not os.environ.get("BRIDGE_EXPORT_SDIST"), reason="CI builds the sdist (set BRIDGE_EXPORT_SDIST)")
def test_sdist_holds_everything_a_wheel_needs():
    import tarfile

    with tarfile.open(os.environ["BRIDGE_EXPORT_SDIST"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "exporter/cli/__init__.py", "runtime/serve/templates/entry_model.py",
                   "reference_model/demo_checkpoint/model.safetensors", "exporter/data/calibration_texts.txt"):
        assert needed in names, needed
