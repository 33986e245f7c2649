"""trtexec script and sidecar stamping: corrupt templates and bad graph lists are refused cleanly, nothing left behind."""
import sys
import types

import pytest

from bridge_export.exporter.tensorrt.engines import EngineOptions, write_trtexec_script
from bridge_export.runtime.gpu import trt_compat
from bridge_export.runtime.gpu.trt_compat import TEMPLATE_SUFFIX, EngineMismatch, stamp_sidecar


def _corrupt_template(tmp_path):
    (tmp_path / "text_decoder.engine").write_bytes(b"plan")
    t = tmp_path / f"text_decoder{TEMPLATE_SUFFIX}"
    t.write_text('{"graph": "text_decoder", "tensorrt_m')  # truncated (interrupted copy to the device)
    return t


def test_corrupt_template_is_an_engine_mismatch(tmp_path):
    """A truncated template (an interrupted copy to the device) is an EngineMismatch saying what to do."""
    with pytest.raises(EngineMismatch):
        stamp_sidecar(_corrupt_template(tmp_path), "10.3.0", "Orin", "8.7")


def test_stamp_main_reports_a_corrupt_template_in_one_line(tmp_path, monkeypatch, capsys):
    """`python -m bridge_export.runtime.gpu.trt_compat stamp` reports a corrupt template in one line and exits 1."""
    import bridge_export.runtime.gpu.cuda

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(bridge_export.runtime.gpu.cuda, "device_info", lambda i=0: ("Orin", "8.7"))
    assert trt_compat.main(["stamp", str(_corrupt_template(tmp_path))]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a valid sidecar template" in err and "\n" not in err


def test_failed_emit_leaves_nothing_behind(tiny_bundle, tmp_path):
    """An unknown graph in --graphs is refused before the folder, its owner marker or any template is written."""
    out = tmp_path / "eng"
    with pytest.raises(ValueError, match="no graph 'bogus'"):
        write_trtexec_script(tiny_bundle, out, EngineOptions(graphs=["vision_encoder", "bogus"]))
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_empty_graph_list_is_refused(tiny_bundle, tmp_path):
    """`--graphs ,` is refused: a script that builds nothing is not written."""
    with pytest.raises(ValueError, match="no graphs to build"):
        write_trtexec_script(tiny_bundle, tmp_path / "eng", EngineOptions(graphs=[]))
