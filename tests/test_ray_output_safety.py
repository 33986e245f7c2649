"""`embed --ray` never deletes what it did not write and runs one writer per --out (checked before Ray starts).
Table-driven: one row per existing --out."""
import pytest

from bridge_export.runtime.serve.ray_embed import embed_with_ray
from bridge_export.runtime.write_guard import OutputBusy, OutputLock


def _folder_with_notes(p):
    p.mkdir()
    (p / "part-0.parquet").write_bytes(b"PAR1")
    (p / "notes.txt").write_text("the user's")


def _a_user_file(p):
    p.write_text("precious")


# (id, make the existing --out, message regex)
REFUSED = [
    ("parquet folder plus a user's file", _folder_with_notes, r"holds files this job did not write \(notes.txt\)"),
    ("a file that is not parquet", _a_user_file, r"holds files this job did not write \(e.parquet.d\)"),
]


@pytest.mark.parametrize("make,match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_overwrite_refuses_what_it_did_not_write(tiny_bundle, tmp_path, make, match):
    out = tmp_path / ("e.parquet.d" if make is _a_user_file else "e.parquet")
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=match):
        embed_with_ray(tiny_bundle, [tmp_path / "a.png"], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_second_writer_refuses_before_ray_starts(tiny_bundle, tmp_path):
    with OutputLock(tmp_path / "e.parquet"):
        with pytest.raises(OutputBusy, match="is writing .*e.parquet"):
            embed_with_ray(tiny_bundle, [tmp_path / "a.png"], tmp_path / "e.parquet")
