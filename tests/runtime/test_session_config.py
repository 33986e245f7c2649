"""runtime.load(session_config=...): reaches device sessions too; bad entries are one-line ValueErrors, never a crash."""
import subprocess
import sys

import pytest

from bridge_export import runtime
from bridge_export.runtime.gpu.memory import HostMemory

KEY = "session.disable_prepacking"


def _entry(sess):
    try:
        return sess.sess.get_session_options().get_session_config_entry(KEY)
    except RuntimeError:
        return None


def test_session_config_reaches_device_sessions(tiny_bundle):
    """With a DeviceMemory (onnxruntime with device I/O) the caller's entries reach every session too."""
    with runtime.load(tiny_bundle, device=HostMemory(), session_config={KEY: "1"}) as p:
        assert {n: _entry(s) for n, s in p.sessions.items()} == {n: "1" for n in p.sessions}


def test_non_string_config_value_is_a_clear_error(tiny_bundle):
    """A value of 1 instead of "1" is a one-line ValueError (not pybind11's multi-line TypeError)."""
    with pytest.raises(ValueError, match="session_config"):
        runtime.load(tiny_bundle, session_config={KEY: 1})


def test_graph_name_with_none_does_not_abort_the_interpreter(tiny_bundle):
    """{graph: None} is refused with a ValueError; passed on, onnxruntime's C++ would abort the process."""
    code = ("from bridge_export import runtime\n"
            "try:\n"
            f"    runtime.load({str(tiny_bundle)!r}, session_config={{'query_bridge': None}})\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused:" in r.stdout, (r.returncode, r.stderr[-300:])


def _spins(session) -> str:
    return session.sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_only_the_decoder_spins_by_default(tiny_bundle):
    """The image graphs' threads sleep after their run (their spinning took the cores from the decoder's
    first steps); the decoder keeps onnxruntime's default."""
    with runtime.load(tiny_bundle) as pipe:
        assert _spins(pipe.sessions["vision_encoder"]) == "0"
        assert _spins(pipe.sessions["query_bridge"]) == "0"
        with pytest.raises(Exception):  # not set: onnxruntime's default (spin)
            _spins(pipe.sessions["text_decoder"])


def test_a_callers_spinning_entry_is_kept(tiny_bundle):
    cfg = {"vision_encoder": {"session.intra_op.allow_spinning": "1"}}
    with runtime.load(tiny_bundle, session_config=cfg) as pipe:
        assert _spins(pipe.sessions["vision_encoder"]) == "1"
        assert _spins(pipe.sessions["query_bridge"]) == "0"
