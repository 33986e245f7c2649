"""triton-repo checks its options before writing, never deletes what it did not write, and carries only the
bundle's own files. Table-driven: one row per bad option or bad --out."""
import json
import os

import pytest

from bridge_export.runtime.serve.triton_repo import MARKER, RepoError, RepoOptions, write_repo
from bridge_export.runtime.write_guard import OutputBusy, OutputLock

CPU = dict(backend="python", gpu=False)

OPTIONS = [
    ("instances 0", dict(instances=0), "instances must be an integer from 1 to 64, got 0"),
    ("instances 1000", dict(instances=1000), "instances must be"),
    ("entry instances -1", dict(entry_instances=-1), "entry_instances must be"),
    ("max batch 0", dict(max_batch=0), "max_batch must be an integer from 1 to 4096"),
    ("max batch 10**6", dict(max_batch=10 ** 6), "max_batch must be"),
    ("max batch 2.5", dict(max_batch=2.5), "max_batch must be"),
]


@pytest.mark.parametrize("opts,match", [r[1:] for r in OPTIONS], ids=[r[0] for r in OPTIONS])
def test_options_out_of_range_are_refused_before_writing(tiny_text_bundle, tmp_path, opts, match):
    with pytest.raises(RepoError, match=match):
        write_repo(tiny_text_bundle, tmp_path / "repo", RepoOptions(**CPU, **opts), validate=False)
    assert list(tmp_path.iterdir()) == []


def _user_file_in_repo(repo):
    (repo / "my_notes.txt").write_text("the user's")


def _user_model_in_repo(repo):
    (repo / "my_model").mkdir()


def _marker_edited_away(repo):
    (repo / MARKER).unlink()


OUTS = [
    ("a user's file", _user_file_in_repo, r"also holds files triton-repo did not write \(my_notes.txt\)"),
    ("a user's model", _user_model_in_repo, r"\(my_model\): --overwrite would delete them"),
    ("no marker", _marker_edited_away, "was not written by triton-repo"),
]


@pytest.mark.parametrize("spoil,match", [r[1:] for r in OUTS], ids=[r[0] for r in OUTS])
def test_overwrite_never_deletes_what_it_did_not_write(tiny_text_bundle, tmp_path, spoil, match):
    repo = write_repo(tiny_text_bundle, tmp_path / "repo", RepoOptions(**CPU), validate=False)
    spoil(repo)
    before = sorted(p.name for p in repo.iterdir())
    with pytest.raises(RepoError, match=match):
        write_repo(tiny_text_bundle, repo, RepoOptions(**CPU), overwrite=True, validate=False)
    assert sorted(p.name for p in repo.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temporaries, no lock left


def test_only_the_bundles_own_files_are_carried(tiny_text_bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_text_bundle, b)
    (b / "private.key").write_text("secret")
    os.mkfifo(b / "pipe")  # copying a FIFO would block
    repo = write_repo(b, tmp_path / "repo", RepoOptions(**CPU), validate=False)
    carried = {p.name for p in repo.rglob("*") if p.parent.name == "bundle"}
    listed = set(json.loads((b / "manifest.json").read_text())["files"]) | {"manifest.json"}
    assert carried == listed


def test_a_second_writer_refuses(tiny_text_bundle, tmp_path):
    with OutputLock(tmp_path / "repo"):  # another triton-repo run holds --out
        with pytest.raises(OutputBusy, match="is writing .*repo"):
            write_repo(tiny_text_bundle, tmp_path / "repo", RepoOptions(**CPU), validate=False)
    assert not (tmp_path / "repo").exists()
