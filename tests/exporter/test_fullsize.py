"""The full-size driver at tiny size: checkpoint -> int4-cpu / int8-cpu / fp16 bundles, each measured,
the two integer decoders timed against each other, everything deleted, one table."""
import json
import shutil
import sys

import pytest

from bridge_export.exporter.bench import fullsize


@pytest.mark.skipif(shutil.which("time") is None and not __import__("os").path.exists("/usr/bin/time"),
                    reason="needs /usr/bin/time -v for peak RSS")
def test_run_measures_every_precision_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(fullsize.__file__).parents[1])  # PYTHONPATH=. for the children
    work = tmp_path / "work"
    table = fullsize.run(work, "tiny", threads=1, gemv_gib=0.02)
    assert table["checkpoint"]["peak_rss_gb"] > 0 and sorted(p.name for p in work.iterdir()) == sorted(
        ["checkpoint.log", "export-int4-cpu.log", "export-int8-cpu.log", "export-fp16.log", "measure-int4-cpu.log",
         "measure-int8-cpu.log", "decode.log"])  # bundles and checkpoint deleted, logs kept
    for p in ("int4-cpu", "int8-cpu", "fp16"):
        assert table[p]["export_peak_rss_gb"] > 0 and "weights.bin" in table[p]["files"]
    for p in fullsize.PAIR:
        t = table[p]
        assert t["decode_tokens_per_s"] > 0 and 0 < t["fraction_of_bound"] and t["prepacking_off"] == []  # fits: all packed
        assert len(t["caption_tokens"]) == 20
    d = table["decode"]
    assert d["bundle-int8-cpu"]["vs_first"] == 1.0 and d["bundle-int4-cpu"]["precision"] == "int4-cpu"
    assert d["bundle-int4-cpu"]["weight_bytes_per_token_gb"] <= d["bundle-int8-cpu"]["weight_bytes_per_token_gb"]
    text = fullsize.format_table(table)
    assert "| figure | int4-cpu | int8-cpu | fp16 |" in text and "decoders interleaved: int4-cpu" in text
    json.dumps(table)  # the JSON the command writes


def test_prepacking_plan_leaves_the_bridge_unpacked_only_when_packed_copies_do_not_fit(tiny_bundle, monkeypatch,
                                                                                        caplog):
    import logging

    from bridge_export import runtime
    from bridge_export.runtime import sessions
    from bridge_export.runtime.manifest import read_manifest

    man = read_manifest(tiny_bundle)
    w = {n: g.weight_bytes for n, g in man.graphs.items()}
    assert all(v > 0 for v in w.values())  # recorded at export
    total = sum(w.values())
    assert sessions.prepacking_plan(man, memory=int(total / 0.6) + 1) == ()
    assert sessions.prepacking_plan(man, memory=int(total / 0.6) - 1) == ("query_bridge",)
    for g in man.graphs.values():  # an older bundle without weight_bytes: weights.bin counted twice
        g.weight_bytes = 0
    size = man.files[man.weights].size
    assert sessions.prepacking_plan(man, memory=int(2 * size / 0.6) + 1) == ()
    assert sessions.prepacking_plan(man, memory=int(2 * size / 0.6) - 1) == ("query_bridge",)

    def entry(pipe, name):
        try:
            return pipe.sessions[name].sess.get_session_options().get_session_config_entry(
                "session.disable_prepacking")
        except RuntimeError:
            return None

    assert all(entry(runtime.load(tiny_bundle), g) is None for g in w)  # fits here: all packed
    monkeypatch.setattr(sessions, "memory_bytes", lambda: total)  # a machine too small for the packed copies
    with caplog.at_level(logging.INFO):
        small = runtime.load(tiny_bundle)
    assert {g: entry(small, g) for g in w} == {"vision_encoder": None, "query_bridge": "1", "text_decoder": None}
    assert "query_bridge opened without onnxruntime's prepacking" in caplog.text
    explicit = runtime.load(tiny_bundle, session_config={})  # the caller's config wins: nothing changed
    assert entry(explicit, "query_bridge") is None
