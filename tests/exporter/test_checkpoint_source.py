"""--checkpoint as a Hugging Face repo id: read from a hub cache laid out as huggingface_hub writes it.

Offline (HF_HUB_OFFLINE=1) and with a private HF_HUB_CACHE: no network is touched. huggingface_hub reads
those variables when it is imported, so each case runs in a fresh interpreter.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("huggingface_hub")

REPO = "OpenGVLab/InternVL-14B-224px"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path, checkpoint):
    """models--ORG--NAME/snapshots/<commit>/... and refs/main, as snapshot_download leaves them."""
    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snap)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return cache, snap


def _python(code: str, cache, *args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_repo_id_resolves_to_its_cached_snapshot_offline(tmp_path, tiny_checkpoint):
    cache, snap = _hub_cache(tmp_path, tiny_checkpoint)
    out = _python("import sys; from bridge_export.exporter.export.checkpoint_source import resolve_checkpoint; "
                  "print(resolve_checkpoint(sys.argv[1]))", cache, REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snap)


def test_onnx_exports_from_a_repo_id(tmp_path, tiny_checkpoint):
    cache, _ = _hub_cache(tmp_path, tiny_checkpoint)
    out = _python("import sys; from bridge_export.exporter.cli import main; main(sys.argv[1:])", cache,
                  "onnx", "--checkpoint", REPO, "--out", tmp_path / "b")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_not_cached_and_offline_says_how_to_download(tmp_path):
    out = _python("import sys; from bridge_export.exporter.cli import main; main(sys.argv[1:])", tmp_path / "empty",
                  "onnx", "--checkpoint", REPO, "--out", tmp_path / "b")
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"hf download {REPO} --local-dir InternVL-14B-224px" in lines[0]
    assert not (tmp_path / "b").exists()


def test_without_huggingface_hub_says_how_to_download(tmp_path):
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'huggingface_hub':\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from bridge_export.exporter.export.checkpoint_source import resolve_checkpoint\n"
            "resolve_checkpoint(sys.argv[1])\n")
    out = _python(code, tmp_path, REPO)
    assert out.returncode == 1 and "install huggingface_hub, or download it: hf download" in out.stderr


def test_local_paths_are_never_taken_for_repo_ids(tmp_path):
    from bridge_export.exporter.export.checkpoint_source import CheckpointNotFound, resolve_checkpoint

    assert resolve_checkpoint(tmp_path) == tmp_path
    with pytest.raises(CheckpointNotFound, match="no such directory"):
        resolve_checkpoint("./missing/model")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointNotFound, match="is a file"):
        resolve_checkpoint(tmp_path / "f")
