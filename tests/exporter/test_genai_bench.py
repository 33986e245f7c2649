"""The onnxruntime-genai peer benchmark's harness on a tiny shape (the figures themselves are in
docs/performance.md; timing here only proves the harness measures something)."""
import math
import re

import pytest

from bridge_export.exporter.bench import genai
from bridge_export.runtime.errors import UserError


def _printed(table: str) -> list[tuple[float, float, float]]:
    """(ours, genai, ratio) of every row of the printed table."""
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"\d+", cells[2]):
            rows.append(tuple(float(c) for c in cells[4:]))
    return rows


def test_rates_must_be_positive_numbers_and_ratios_come_from_the_printed_rates():
    row = genai._row("api", "fp32", 1, 16, 123.456, 61.7)
    assert row["ratio"] == round(123.46 / 61.7, 3)
    for bad in (math.nan, math.inf, -3.0, 0.0):
        with pytest.raises(RuntimeError, match="not a positive number"):
            genai._row("api", "fp32", 1, 16, bad, 10.0)


def test_presets_genai_cannot_build_and_pasts_beyond_the_positions_are_refused():
    with pytest.raises(UserError, match="multiple of 8"):  # tiny: head_dim 12
        genai.run(genai.Settings(preset="tiny"))
    with pytest.raises(UserError, match="positions"):  # digits: 64 positions
        genai.run(genai.Settings(preset="digits", pasts=(60,), tokens=8))


def test_harness_times_both_sides_on_the_same_shape(tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the bench extra (not installed)")
    pytest.importorskip("transformers", reason="transformers is the bench extra (not installed)")
    s = genai.Settings(preset="digits", precisions=("int4-cpu",), batches=(1, 4), pasts=(8,), threads=1,
                       steps=4, tokens=24, rounds=3)
    res = genai.run(s, work=tmp_path)
    sh = res["shapes"]["int4-cpu"]
    assert sh["ours"] == sh["genai"] == {"layers": 4, "heads": 4, "head_dim": 16, "vocab": 24}
    # genai's graph really is int4 with that many layers
    import onnx

    m = onnx.load(str(tmp_path / "genai-digits-int4-cpu" / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GroupQueryAttention") == 4 and "MatMulNBits" in ops
    rows = res["rows"]
    assert {(r["mode"], r["batch"]) for r in rows} == {("graph", 1), ("graph", 4), ("api", 1), ("api", 4)}
    assert all(r["past"] == 8 for r in rows if r["mode"] == "graph")
    assert all(r["past"] == 8 for r in rows if r["mode"] == "api")  # digits' prefix is 4 query tokens
    printed = _printed(genai.format_table(rows, "digits"))
    assert len(printed) == len(rows)
    for ours, theirs, ratio in printed:
        assert math.isfinite(ours) and math.isfinite(theirs) and ours > 0 and theirs > 0
        assert ratio == round(ours / theirs, 3)
