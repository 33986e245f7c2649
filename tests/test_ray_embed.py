"""`bridge-export embed --ray`: Ray Data on a local cluster writes the same embeddings as the runtime."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'bridge-export[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed: pip install 'bridge-export[ray]'")


def test_ray_job_matches_runtime_and_keeps_bad_images_as_rows(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from bridge_export import runtime
    from bridge_export.exporter.cli import main

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "emb.parquet"
    r = CliRunner().invoke(main, ["embed", str(tiny_bundle), str(images), "--ray", "--workers", "1",
                                  "--batch-size", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.schema.field("embedding").type.value_type.bit_width == 32
    rows = table.to_pylist()
    files = sorted(str(p) for p in images.iterdir())
    assert [row["path"] for row in rows] == files  # one row per input, in input order
    bad = [row for row in rows if row["error"] is not None]
    assert [b["path"] for b in bad] == [str(images / "broken.png")] and bad[0]["embedding"] is None
    good = [row for row in rows if row["error"] is None]
    pipe = runtime.load(tiny_bundle)
    want = pipe.embed_images([row["path"] for row in good])
    np.testing.assert_allclose(np.array([row["embedding"] for row in good]), want, rtol=1e-5, atol=1e-6)
    again = CliRunner().invoke(main, ["embed", str(tiny_bundle), str(images), "--ray", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output  # never replaces output silently


def test_ray_option_errors(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from bridge_export.exporter.cli import main

    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    r = CliRunner().invoke(main, ["embed", str(tiny_bundle), str(img), "--ray", "--out", str(tmp_path / "x.npz")])
    assert r.exit_code != 0 and "--out OUT.parquet" in r.output
    r = CliRunner().invoke(main, ["embed", str(tiny_bundle), str(img), "--ray", "--texts", "a cat",
                                  "--out", str(tmp_path / "x.parquet")])
    assert r.exit_code != 0 and "images only" in r.output
