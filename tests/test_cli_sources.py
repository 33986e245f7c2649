"""No command writes into the bundle it reads, and bundles made of hard links work as input to every command.

Table-driven: one row per command reading a bundle. The source is a hard-linked copy of the tiny text
bundle (as `cp -al` or triton-repo make them), made read-only where the test does not run as root;
its listing, sizes, times and inodes must be the same afterwards, and the command must succeed.
"""
import os
import shlex
import stat

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bridge_export.exporter.cli import main

# (id, argv: {b} the source bundle, {t} a temporary folder for outputs, {img} an image folder)
COMMANDS = [
    ("inspect", "inspect {b}"),
    ("verify --checksums", "verify {b} --checksums"),
    ("embed", "embed {b} {img} --texts cat --out {t}/e.npz"),
    ("classify", "classify {b} {img} --labels cat,dog"),
    ("caption", "caption {b} {img} --max-new-tokens 2 --beams 1"),
    ("precision int8-cpu", "precision {b} --precision int8-cpu --out {t}/p8"),
    ("precision fp16", "precision {b} --precision fp16 --out {t}/p16"),
    ("precision int4-cpu", "precision {b} --precision int4-cpu --out {t}/p4"),
    ("engine --emit-trtexec", "engine {b} --emit-trtexec --out {t}/engines"),
    ("triton-repo", "triton-repo {b} --out {t}/repo --backend python --cpu"),
]


def _state(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
                  for p in [root, *root.rglob("*")])


@pytest.fixture(scope="module")
def linked(tiny_text_bundle, tmp_path_factory):
    """A copy of the tiny text bundle whose every file is a hard link (two names, one inode), read-only."""
    d = tmp_path_factory.mktemp("linked")
    src = d / "bundle"
    src.mkdir()
    for f in tiny_text_bundle.iterdir():
        os.link(f, src / f.name)
    (d / "img").mkdir()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(d / "img" / "0.png")
    for f in src.iterdir():
        f.chmod(0o444)
    src.chmod(0o555)  # refuses writes unless the tests run as root; the snapshot below checks either way
    yield {"b": src, "img": d / "img"}
    src.chmod(0o755)
    for f in src.iterdir():  # the same inodes as the shared tiny bundle's files: give their mode back
        f.chmod(0o644)


@pytest.mark.parametrize("argv", [c[1] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_sources_are_read_only_and_may_be_hard_links(linked, tmp_path, argv):
    before = _state(linked["b"])
    fmt = {"t": tmp_path, **{k: str(v) for k, v in linked.items()}}
    r = CliRunner().invoke(main, [a.format(**fmt) for a in shlex.split(argv)])
    assert r.exit_code == 0, r.output
    assert _state(linked["b"]) == before  # nothing written, renamed or removed in the source
    assert stat.S_IMODE(linked["b"].stat().st_mode) == 0o555
