"""random-checkpoint never deletes what it did not write, runs one writer per --out, and cleans only
provably abandoned leftovers. Table-driven: one row per existing --out."""
import os

import pytest

from bridge_export.reference_model.checkpoint_writer import CheckpointWriteError, write_random_checkpoint
from bridge_export.runtime.write_guard import OutputBusy, OutputLock, host_key


def _thesis(p):
    p.mkdir()
    (p / "thesis.tex").write_text("years of work")


def _our_checkpoint_plus_notes(p):
    write_random_checkpoint(p, "tiny", dtype="bf16", progress=False, workers=1)
    (p / "notes.txt").write_text("the user's")


def _file(p):
    p.write_text("precious")


# (id, make the existing --out, message regex)
REFUSED = [
    ("a user's folder", _thesis, r"holds files a random checkpoint does not \(thesis.tex\)"),
    ("our checkpoint plus a user's file", _our_checkpoint_plus_notes, r"\(notes.txt\): --overwrite would delete"),
    ("a file", _file, "is not a folder"),
]


@pytest.mark.parametrize("make,match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_overwrite_refuses_what_it_did_not_write(tmp_path, make, match):
    out = tmp_path / "ck"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointWriteError, match=match):
        write_random_checkpoint(out, "tiny", dtype="bf16", overwrite=True, progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_its_own_checkpoint_and_cleans_leftovers(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ck"
    write_random_checkpoint(out, "tiny", dtype="bf16", progress=False, workers=1)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = tmp_path / f".ck.partial-{p.pid}-{host_key()}-ckpt"  # a killed run's temporary
    dead.mkdir()
    other = tmp_path / f".ck.partial-{p.pid}-0123456789ab-ckpt"  # another host's: not provably abandoned
    other.mkdir()
    write_random_checkpoint(out, "tiny", dtype="bf16", seed=1, overwrite=True, progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", other.name])


def test_a_second_writer_refuses(tmp_path):
    with OutputLock(tmp_path / "ck"):
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()} .* is writing"):
            write_random_checkpoint(tmp_path / "ck", "tiny", dtype="bf16", progress=False, workers=1)
    assert not (tmp_path / "ck").exists()
