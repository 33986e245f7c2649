"""Nothing lost: outputs replace only what bridge-export wrote, and no temporaries survive any failure.

Table-driven: one row per kind of existing --out; a new case is one line.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from bridge_export.exporter import output
from bridge_export.exporter.output import OWNER_FILE, OutputError, output_dir
from bridge_export.runtime.write_guard import OutputBusy, host_key, lock_path


def _foreign_dir(p):
    p.mkdir()
    (p / "thesis.tex").write_text("years of work")


def _foreign_file(p):
    p.write_text("precious")


def _foreign_manifest(p):  # a manifest.json of some other tool
    p.mkdir()
    (p / "manifest.json").write_text(json.dumps({"format": "someone-else", "files": {}}))
    (p / "data.bin").write_bytes(b"x")


def _bad_json_manifest(p):
    p.mkdir()
    (p / "manifest.json").write_text("{not json")


def _symlink_to_bundle(p):
    target = p.parent / "real"
    _our_bundle(target)
    p.symlink_to(target)


def _our_bundle(p):
    p.mkdir()
    (p / "manifest.json").write_text(json.dumps({"format": "bridge-export-bundle",
                                                 "files": {"old.onnx": {"size": 3, "sha256": ""}}}))
    (p / "old.onnx").write_bytes(b"old")


def _our_bundle_with_notes(p):  # the user keeps notes in the bundle folder
    _our_bundle(p)
    (p / "notes.txt").write_text("the user's")


def _our_bundle_with_engines(p):  # `bridge-export engine` writes BUNDLE/engines by default
    _our_bundle(p)
    (p / "engines").mkdir()
    (p / "engines" / OWNER_FILE).write_text("{}")


def _empty_dir(p):
    p.mkdir()


def _our_demo_folder(p):  # folders we add to are not replaced as a whole
    p.mkdir()
    (p / OWNER_FILE).write_text("{}")
    (p / "notes.txt").write_text("the user's")


# (make the existing --out, overwrite?, expected: "replaced" or a regex of the refusal)
CASES = [
    (None, False, "replaced"),
    (_foreign_dir, True, "not written by bridge-export"),
    (_foreign_dir, False, "already exists"),
    (_foreign_file, True, "is a file"),
    (_foreign_manifest, True, "not written by bridge-export"),
    (_bad_json_manifest, True, "not written by bridge-export"),
    (_symlink_to_bundle, True, "symbolic link"),
    (_our_demo_folder, True, "not written by bridge-export"),
    (_our_bundle, False, "already exists"),
    (_our_bundle, True, "replaced"),
    (_our_bundle_with_notes, True, r"also holds files bridge-export did not write there \(notes.txt\)"),
    (_our_bundle_with_engines, True, r"also holds .*\(engines\): --overwrite would delete them"),
    (_empty_dir, True, "replaced"),
]


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                  for p in root.rglob("*"))


@pytest.mark.parametrize("make,overwrite,expect", CASES,
                         ids=[f"{m.__name__ if m else 'absent'}-{o}" for m, o, _ in CASES])
def test_existing_out(tmp_path, make, overwrite, expect):
    out = tmp_path / "out"
    if make:
        make(out)
    before = _snapshot(tmp_path)
    if expect == "replaced":
        with output_dir(out, overwrite) as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"format": "bridge-export-bundle"}))
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    else:
        with pytest.raises(OutputError, match=expect):
            with output_dir(out, overwrite):
                pytest.fail("refused outputs must be refused before any work")
        assert _snapshot(tmp_path) == before  # nothing touched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["while writing", "during the swap"])
def test_failures_leave_the_old_bundle_and_no_temporaries(tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    _our_bundle(out)
    before = _snapshot(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        with output_dir(out, overwrite=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
            if where == "while writing":
                _enospc()
            monkeypatch.setattr(output.Path, "rename", _failing_rename(output.Path.rename))
    assert _snapshot(tmp_path) == before


def _failing_rename(real):
    """Path.rename that fails when moving a partial build into place (the old output was moved aside)."""
    def rename(self, target):
        if ".partial-" in self.name:
            _enospc()
        return real(self, target)
    return rename


@pytest.mark.parametrize("exporter_kind", ["stream", "torchscript"])
def test_export_on_full_disk_leaves_nothing(tmp_path, monkeypatch, tiny_model, exporter_kind):
    """A real export whose write fails: the earlier bundle is intact and no .partial/.old remains."""
    import bridge_export.exporter.export.bundle as bundle
    import bridge_export.exporter.export.stream_export as stream_export

    out = tmp_path / "b"
    (tmp_path / "b").mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "bridge-export-bundle"}))
    before = _snapshot(tmp_path)

    def export_graph(model, spec, config, path, **kw):  # the disk fills while the first graph is written
        path.write_bytes(b"half a graph")
        _enospc()

    def stream_weights(models, refs, source, *args, **kw):  # the disk fills while weights.bin is written
        _enospc()

    monkeypatch.setattr(bundle, "export_graph", export_graph)
    monkeypatch.setattr(stream_export, "stream_weights", stream_weights)
    with pytest.raises(OSError):
        bundle.export_bundle(tiny_model, out, overwrite=True, progress=lambda s: None, exporter=exporter_kind)
    assert _snapshot(tmp_path) == before


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _partial_dir(p):
    p.mkdir()
    (p / output.PARTIAL_MARKER).write_text("")


def _partial_file(p):
    p.write_bytes(b"half an embeddings file")


HERE = host_key()
OTHER = "0123456789ab"  # another host's or container's key: its PIDs mean nothing here


# (id, name of the leftover beside "out" given a dead pid and a live one, make it, removed?)
LEFTOVERS = [
    ("dead, ours, folder", lambda dead, live: f".out.partial-{dead}-{HERE}-abc", _partial_dir, True),
    ("dead, ours, old bundle", lambda dead, live: f".out.old-{dead}-{HERE}-abc", _our_bundle, True),
    ("dead, ours, file", lambda dead, live: f".out.partial-{dead}-{HERE}-abc.npz", _partial_file, True),
    ("dead, folder not ours", lambda dead, live: f".out.partial-{dead}-{HERE}-xyz", _foreign_dir, False),
    ("still running", lambda dead, live: f".out.partial-{live}-{HERE}-live", _partial_dir, False),
    ("another host's folder", lambda dead, live: f".out.partial-{dead}-{OTHER}-abc", _partial_dir, False),
    ("another host's file", lambda dead, live: f".out.partial-{dead}-{OTHER}-abc.npz", _partial_file, False),
    ("no host key (older version)", lambda dead, live: f".out.partial-{dead}-abc", _partial_dir, False),
]


@pytest.mark.parametrize("name,make,removed", [r[1:] for r in LEFTOVERS], ids=[r[0] for r in LEFTOVERS])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_leftovers_are_removed_only_when_their_owner_is_provably_gone(tmp_path, name, make, removed, kind):
    """Every output kind (bundle folders, single files) cleans the leftovers of a killed run beside it."""
    from bridge_export.exporter.output import atomic_file

    out = tmp_path / "out"
    left = tmp_path / name(_dead_pid(), os.getpid())
    make(left)
    if kind == "folder":
        with output_dir(out, overwrite=False) as tmp:
            (tmp / "manifest.json").write_text("{}")
    else:
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"x")
    assert left.exists() != removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + ([] if removed else [left.name]))


def test_a_second_writer_refuses_naming_the_first(tmp_path):
    from bridge_export.exporter.output import atomic_file

    out = tmp_path / "b"
    with output_dir(out, overwrite=False) as tmp:
        with pytest.raises(OutputBusy, match=r"another bridge-export run \(pid \d+ on .*\) is writing .*b: wait"):
            output.prepare_output(out, overwrite=True)
        (tmp / "manifest.json").write_text(json.dumps({"format": "bridge-export-bundle", "files": {}}))
    with atomic_file(tmp_path / "e.npz") as tmp:
        with pytest.raises(OutputBusy, match="is writing"):
            with atomic_file(tmp_path / "e.npz"):
                pass
        tmp.write_bytes(b"first")
    assert (tmp_path / "e.npz").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "e.npz"]  # locks released


def test_a_lock_is_taken_over_only_from_a_dead_local_owner(tmp_path):
    out = tmp_path / "b"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": _dead_pid(), "host_key": HERE, "host": "here", "started": "then"}))
    with output_dir(out, overwrite=False) as tmp:  # the owner died: taken over
        (tmp / "manifest.json").write_text(json.dumps({"format": "bridge-export-bundle", "files": {}}))
    lock.write_text(json.dumps({"pid": _dead_pid(), "host_key": OTHER, "host": "node7", "started": "then"}))
    with pytest.raises(OutputBusy, match="pid \\d+ on node7 since then.*if that run is known to be over, delete"):
        output_dir(tmp_path / "b", overwrite=True).__enter__()
    assert lock.exists()


def test_a_bundle_appearing_while_writing_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(OutputError, match="appeared while writing"):
        with output_dir(out, overwrite=False) as tmp:
            (tmp / "manifest.json").write_text("{}")
            _our_bundle(out)  # another writer (one without the lock) finished first
    assert (out / "old.onnx").read_bytes() == b"old"


def test_precision_refuses_its_own_source(tiny_bundle):
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    with pytest.raises(OutputError, match="source bundle itself"):
        make_precision_bundle(tiny_bundle, tiny_bundle, "fp16", overwrite=True)


def test_engine_folder_must_be_ours(tiny_bundle, tmp_path):
    from bridge_export.exporter.tensorrt.engines import EngineOptions, write_trtexec_script

    _foreign_dir(tmp_path / "e")
    with pytest.raises(OutputError, match="did not write"):
        write_trtexec_script(tiny_bundle, tmp_path / "e", EngineOptions())
    assert not (tmp_path / "e" / "build_engines.sh").exists()
    path = write_trtexec_script(tiny_bundle, tmp_path / "e2", EngineOptions())
    assert path.is_file() and write_trtexec_script(tiny_bundle, tmp_path / "e2", EngineOptions()) == path


def test_demo_refuses_a_foreign_folder_before_any_work(tmp_path):
    from bridge_export.exporter.demo import run_demo

    _foreign_dir(tmp_path / "d")
    with pytest.raises(OutputError, match="did not write"):
        run_demo(tmp_path / "d", limit=2, precisions=["fp32"], progress=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["thesis.tex"]


def test_outputs_get_the_usual_permissions(tmp_path):
    """Temporaries are created private; the finished output has the mode mkdir/open would give it."""
    from bridge_export.exporter.output import atomic_file

    mask = os.umask(0o022)
    try:
        with output_dir(tmp_path / "b", overwrite=False) as tmp:
            (tmp / "manifest.json").write_text("{}")
        with atomic_file(tmp_path / "e.npy") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "e.npy").stat().st_mode & 0o777 == 0o644
