"""The load test starts a server again when it exits while starting, and only then."""
import pytest

from bridge_export.runtime.serve import load_bench


class _Proc:
    def __init__(self, exits: bool):
        self.exits = exits

    def poll(self):
        return 1 if self.exits else None


def _fake_server(outcomes: list[str], made: list):
    class FakeServer:
        def __init__(self, *a, **kw):
            self.outcome = outcomes.pop(0)
            self.proc = _Proc(self.outcome == "exit")
            self.stopped = False
            made.append(self)

        def wait_ready(self):
            if self.outcome != "ready":
                raise RuntimeError(f"step server {self.outcome}:\nhandshake timed out")

        def stop(self):
            self.stopped = True
    return FakeServer


def test_retries_a_server_that_exited(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(load_bench, "Server", _fake_server(["exit", "exit", "ready"], made))
    s = load_bench.start_server(tmp_path, "step", 8, None, None, tmp_path)
    assert s is made[-1] and len(made) == 3 and made[0].stopped and made[1].stopped and not s.stopped


def test_gives_up_after_the_attempts(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(load_bench, "Server", _fake_server(["exit"] * 3, made))
    with pytest.raises(RuntimeError, match="exit"):
        load_bench.start_server(tmp_path, "step", 8, None, None, tmp_path, attempts=3)
    assert len(made) == 3


def test_no_retry_when_it_never_became_ready(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(load_bench, "Server", _fake_server(["hang", "ready"], made))
    with pytest.raises(RuntimeError, match="hang"):
        load_bench.start_server(tmp_path, "step", 8, None, None, tmp_path)
    assert len(made) == 1 and made[0].stopped
