"""With one client the load test pairs the servers request by request: every job reaches every server,
the order rotates, and each server's wall time is its own pauses and latencies."""
import asyncio

from bridge_export.runtime.serve import load_bench


class _Server:
    def __init__(self, name: str, grpc: int):
        self.scheduler, self.grpc = name, grpc
        self.counter = 0

    def step_counters(self):
        self.counter += 10
        return float(self.counter), 2.0 * self.counter


class _Client:
    def __init__(self, port):
        self.port = port
        self.closed = False

    async def close(self):
        self.closed = True


def test_each_job_reaches_every_server_in_rotating_order(monkeypatch):
    sent, made = [], []

    async def one(client, job, phase, i):
        sent.append((client.port, i))
        await asyncio.sleep(0.01)
        phase.latencies.append(0.01)
        phase.texts[i] = f"text {i}"

    monkeypatch.setattr(load_bench, "_one", one)
    monkeypatch.setattr(load_bench, "_client", lambda port: made.append(_Client(port)) or made[-1])
    jobs = [load_bench.Job(b"", "", 8, False, 0.05) for _ in range(3)]
    a, b = _Server("step", 1), _Server("static", 2)
    phases = asyncio.run(load_bench.drive_paired([a, b], jobs, first=1))
    assert sent == [(2, 0), (1, 0), (1, 1), (2, 1), (2, 2), (1, 2)]
    assert [p.scheduler for p in phases] == ["step", "static"]
    assert all(sorted(p.texts) == [0, 1, 2] and len(p.latencies) == 3 for p in phases)
    assert all(0.18 <= p.wall < 0.33 for p in phases)  # its own 3 pauses + 3 latencies (0.18 s), not both (0.36)
    assert all(c.closed for c in made) and len(made) == 2
    assert phases[0].steps == 10 and phases[0].step_rows == 20  # counters read before and after the round
