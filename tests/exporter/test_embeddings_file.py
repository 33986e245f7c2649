"""`embed --out`: embeddings and names are one file; a failure or a kill leaves the previous result whole."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bridge_export.exporter.embeddings_file import read_embeddings, write_embeddings

NAMES = ["photos/a\nb.png", "tab\there.jpg", "a text with\r\nnewlines", "ünïcödé ✓"]
KINDS = ["image", "image", "text", "text"]


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_names_survive_newlines_and_any_character(tmp_path, suffix):
    emb = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = write_embeddings(tmp_path / f"e{suffix}", emb, NAMES, KINDS)
    got, names, kinds = read_embeddings(out)
    assert names == NAMES and kinds == KINDS and np.array_equal(got, emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"e{suffix}"]


def _previous(tmp_path):
    out = tmp_path / "e.npz"
    write_embeddings(out, np.ones((1, 2), np.float32), ["old.png"], ["image"])
    return out, out.read_bytes()


def test_full_disk_keeps_the_previous_result(tmp_path, monkeypatch):
    import errno

    out, before = _previous(tmp_path)

    def savez(f, **arrays):
        f.write(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError):
        write_embeddings(out, np.zeros((2, 2), np.float32), ["x", "y"], ["image", "text"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]


def test_a_killed_run_keeps_the_previous_result_and_the_next_run_cleans_up(tmp_path):
    out, before = _previous(tmp_path)
    killed = textwrap.dedent(f"""
        import os, numpy as np
        from bridge_export.exporter.embeddings_file import write_embeddings
        def savez(f, **arrays):
            f.write(b"PK half a zip"); f.flush()
            os._exit(9)  # killed mid-write
        np.savez = savez
        write_embeddings({str(out)!r}, np.zeros((2, 2), np.float32), ["x", "y"], ["image", "text"])
    """)
    assert subprocess.run([sys.executable, "-c", killed]).returncode == 9
    assert out.read_bytes() == before  # the previous result, whole
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "e.npz")
    assert any(n.startswith(".e.npz.partial-") for n in left), left  # the killed run's temporary and lock
    write_embeddings(out, np.zeros((2, 2), np.float32), ["x", "y"], ["image", "text"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]
    assert read_embeddings(out)[1] == ["x", "y"]
    assert os.stat(out).st_size > 0
