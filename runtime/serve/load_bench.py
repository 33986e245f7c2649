"""Load generator for `bridge-export serve`: step-level against static batching, side by side in one run.

    python -m bridge_export.runtime.serve.load_bench BUNDLE --clients 8 --rate 40 --requests 48 --rounds 2

Starts two servers on the bundle (`--scheduler step` and `--scheduler static`, each its own ports,
caption models only) and drives them in turn with the same seeded workload, interleaved round by
round (step, static; then static, step; ...) so machine load drifts hit both alike. K asynchronous
gRPC clients (tritonclient.grpc.aio) each send one request at a time with exponential pauses
between (together a Poisson stream of `--rate` requests/s while the server keeps up); requests mix
prompts and max_new_tokens (`--max-new LO-HI`), greedy, and a share are streamed (`caption_stream`:
time to first piece). Prints per scheduler requests/s, tokens/s, p50/p95 latency, p50/p95 time to
first streamed piece, the step scheduler's mean decode batch, the step/static ratios, and whether
both servers returned the same text for every request (they must: greedy, same model).
With one client the servers are paired request by request instead (`--interleave request`, the
default there): each request goes to one server and then the other, the order rotating, so the
single-request latencies compare like for like however the machine's speed drifts.
Tokens are counted by the bundle's tokenizer on the returned text (the same count on both sides).

Runs where tritonclient's gRPC client and PyTriton are installed (the [serve] venv: PyTriton pins
numpy<2). A measurement tool, not a test: figures depend on the machine and what else runs on it.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = ["", "a photo of", "an image of", "a picture showing", "this is"]


@dataclass
class Job:
    """One request of the workload."""

    image: bytes
    prompt: str
    max_new_tokens: int
    stream: bool
    pause: float  # seconds the client waits before sending it


@dataclass
class Phase:
    """What one server answered in one round."""

    scheduler: str
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    steps: float = 0.0
    step_rows: float = 0.0


def workload(n: int, clients: int, rate: float, max_new: tuple[int, int], stream_share: float, seed: int,
             prompts: list[str] = PROMPTS) -> list[Job]:
    """`n` seeded requests; each client's pauses are exponential with mean clients / rate."""
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        a = rng.integers(0, 255, (int(rng.integers(32, 96)), int(rng.integers(32, 96)), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        jobs.append(Job(buf.getvalue(), prompts[int(rng.integers(len(prompts)))],
                        int(rng.integers(max_new[0], max_new[1] + 1)), bool(rng.random() < stream_share),
                        float(rng.exponential(clients / rate)) if rate > 0 else 0.0))
    return jobs


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """One `bridge-export serve` subprocess (caption models), stopped with SIGTERM."""

    def __init__(self, bundle: Path, scheduler: str, rows: int, threads: int | None, max_length: int | None,
                 log_dir: Path):
        self.scheduler = scheduler
        self.http, self.grpc, metrics, self.stats = _ports(4)
        cmd = [sys.executable, "-m", "bridge_export.exporter.cli", "serve", str(bundle), "--scheduler", scheduler,
               "--models", "caption,caption_stream", "--http-port", str(self.http), "--grpc-port", str(self.grpc),
               "--metrics-port", str(metrics), "--scheduler-metrics-port", str(self.stats), "--rows", str(rows),
               "--max-batch", str(rows)]
        if threads:
            cmd += ["--threads", str(threads)]
        if max_length:
            cmd += ["--max-length", str(max_length)]
        self.log = log_dir / f"serve-{scheduler}.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        """Block until both caption models answer ready; RuntimeError with the log's tail if the server died."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.scheduler} server exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if all(urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/models/{m}/ready", timeout=2).status
                       == 200 for m in ("caption", "caption_stream")):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.scheduler} server not ready after {timeout:.0f}s")

    def step_counters(self) -> tuple[float, float]:
        """(decode steps, rows over steps) from the scheduler's metrics; zeros for static."""
        if self.scheduler != "step":
            return 0.0, 0.0
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.stats}/metrics", timeout=5).read().decode()
        vals = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return float(vals["bridge_export_decode_steps_total"]), float(vals["bridge_export_step_rows_total"])

    def stop(self) -> None:
        """SIGTERM, then wait (kill after 30 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def _one(client, job: Job, phase: Phase, i: int) -> None:
    import tritonclient.grpc.aio as tga

    def inp(name, arr, dtype):
        x = tga.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(arr)
        return x

    inputs = [inp("image", np.array([[job.image]], dtype=object), "BYTES"),
              inp("max_new_tokens", np.array([[job.max_new_tokens]], np.int32), "INT32")]
    if job.prompt:
        inputs.append(inp("prompt", np.array([[job.prompt.encode()]], dtype=object), "BYTES"))
    t0 = time.perf_counter()
    try:
        if job.stream:
            async def requests():
                yield {"model_name": "caption_stream", "inputs": inputs, "request_id": str(i),
                       "enable_empty_final_response": True}

            pieces = []
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    raise error
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
                if not pieces:
                    phase.ttft.append(time.perf_counter() - t0)
                pieces.append(result.as_numpy("text")[0][0].decode())
            text = "".join(pieces)
        else:
            inputs.append(inp("num_beams", np.array([[1]], np.int32), "INT32"))
            text = (await client.infer("caption", inputs)).as_numpy("text")[0][0].decode()
    except Exception as e:  # noqa: BLE001 - a failed request is counted and shown, the run goes on
        phase.errors.append(f"request {i}: {str(e)[:200]}")
        return
    phase.latencies.append(time.perf_counter() - t0)
    phase.texts[i] = text


def _client(port: int):
    """An asynchronous gRPC client of the server on `port`."""
    import tritonclient.grpc.aio as tga

    return tga.InferenceServerClient(f"127.0.0.1:{port}")


async def drive(server: Server, jobs: list[Job], clients: int) -> Phase:
    """K clients, client k sending jobs k, k+K, ... one at a time, each after its pause."""
    phase = Phase(server.scheduler)
    steps0 = server.step_counters()

    async def client_loop(k: int):
        client = _client(server.grpc)
        try:
            for i in range(k, len(jobs), clients):
                await asyncio.sleep(jobs[i].pause)
                await _one(client, jobs[i], phase, i)
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    phase.wall = time.perf_counter() - t0
    steps1 = server.step_counters()
    phase.steps, phase.step_rows = steps1[0] - steps0[0], steps1[1] - steps0[1]
    return phase


async def drive_paired(servers: list[Server], jobs: list[Job], first: int = 0) -> list[Phase]:
    """One client sending each job to every server in turn (the order rotating job by job, starting at
    server `first`), each send after the job's pause: paired requests, so a slow patch of the machine
    hits every server alike. A server's wall time is its own pauses and latencies."""
    phases = [Phase(s.scheduler) for s in servers]
    steps0 = [s.step_counters() for s in servers]
    clients = [_client(s.grpc) for s in servers]
    try:
        for i, job in enumerate(jobs):
            for k in range(len(servers)):
                j = (first + i + k) % len(servers)
                t0 = time.perf_counter()
                await asyncio.sleep(job.pause)
                await _one(clients[j], job, phases[j], i)
                phases[j].wall += time.perf_counter() - t0
    finally:
        for c in clients:
            await c.close()
    for p, s, (st0, rows0) in zip(phases, servers, steps0):
        st1, rows1 = s.step_counters()
        p.steps, p.step_rows = st1 - st0, rows1 - rows0
    return phases


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summary(phases: list[Phase], count_tokens) -> dict:
    """Pooled figures of one scheduler's phases."""
    wall = sum(p.wall for p in phases)
    lat = [x for p in phases for x in p.latencies]
    ttft = [x for p in phases for x in p.ttft]
    done = sum(len(p.texts) for p in phases)
    tokens = sum(count_tokens(t) for p in phases for t in p.texts.values())
    steps = sum(p.steps for p in phases)
    return {"req_s": done / wall, "tok_s": tokens / wall, "p50": _pct(lat, 50), "p95": _pct(lat, 95),
            "ttft50": _pct(ttft, 50), "ttft95": _pct(ttft, 95), "done": done,
            "errors": sum(len(p.errors) for p in phases),
            "batch": sum(p.step_rows for p in phases) / steps if steps else float("nan")}


def start_server(bundle: Path, scheduler: str, rows: int, threads: int | None, max_length: int | None,
                 log_dir: Path, attempts: int = 3) -> Server:
    """A ready Server; one that exits while starting is started again, up to `attempts` times (PyTriton's
    proxy gives its model a fixed handshake time, which a busy machine can miss), then its error is raised."""
    for attempt in range(1, attempts + 1):
        server = Server(bundle, scheduler, rows, threads, max_length, log_dir)
        try:
            server.wait_ready()
            return server
        except RuntimeError as e:
            exited = server.proc.poll() is not None  # still running but never ready: no retry
            server.stop()
            if attempt == attempts or not exited:
                raise
            print(f"{scheduler} server exited while starting (attempt {attempt}/{attempts}), starting it again: "
                  f"{str(e).splitlines()[-1][:200]}", file=sys.stderr)
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    """Run the comparison and print the table; exit status 1 if a request failed or the texts differ."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s over all clients (0: no pauses)")
    ap.add_argument("--requests", type=int, default=48, help="requests per round and scheduler")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new", default="8-32", help="max_new_tokens range LO-HI")
    ap.add_argument("--stream-share", type=float, default=0.25, help="share of requests streamed")
    ap.add_argument("--rows", type=int, default=8, help="step: scheduler rows; static: Triton's max batch")
    ap.add_argument("--max-length", type=int, help="step: positions per row (default: serve's)")
    ap.add_argument("--threads", type=int, help="onnxruntime threads per server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated prompts to mix (empty: the "
                    "bundle's default prompt)")
    ap.add_argument("--schedulers", default="step,static")
    ap.add_argument("--interleave", choices=("auto", "round", "request"), default="auto",
                    help="request: one client sends each request to every server in turn (paired, the order "
                    "rotating); round: each server gets the whole round, the order alternating by round; auto: "
                    "request with one client, else round")
    args = ap.parse_args(argv)
    interleave = args.interleave if args.interleave != "auto" else ("request" if args.clients == 1 else "round")
    if interleave == "request" and args.clients != 1:
        ap.error("--interleave request pairs one client's requests: use it with --clients 1")
    lo, hi = (int(x) for x in args.max_new.split("-"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))

    def count_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids) if text else 0

    names = args.schedulers.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="serve-load-"))
    servers: dict[str, Server] = {}
    phases: dict[str, list[Phase]] = {s: [] for s in names}
    try:
        for s in names:  # one after the other: starting two Tritons at once slows both model loads
            servers[s] = start_server(args.bundle, s, args.rows, args.threads, args.max_length, log_dir)
        warm = workload(2, 1, 0, (lo, hi), 0.5, args.seed + 999)
        for s in servers.values():  # first requests pay one-off costs (sessions' first runs, the stream channel)
            asyncio.run(drive(s, warm, 1))
        for r in range(args.rounds):
            jobs = workload(args.requests, args.clients, args.rate, (lo, hi), args.stream_share, args.seed + r,
                            args.prompts.split(","))
            if interleave == "request":
                done = asyncio.run(drive_paired([servers[n] for n in names], jobs, first=r % len(names)))
                for name, p in zip(names, done):
                    phases[name].append(p)
                    print(f"round {r + 1} {name:6s}: {len(p.texts)}/{len(jobs)} answered in {p.wall:.2f} s "
                          "(paired)", file=sys.stderr)
                continue
            for name in (names if r % 2 == 0 else names[::-1]):
                phases[name].append(asyncio.run(drive(servers[name], jobs, args.clients)))
                p = phases[name][-1]
                print(f"round {r + 1} {name:6s}: {len(p.texts)}/{len(jobs)} answered in {p.wall:.2f} s",
                      file=sys.stderr)
    finally:
        for s in servers.values():
            s.stop()
    res = {s: summary(phases[s], count_tokens) for s in names}
    cpu = sorted({f for f in ("avx512_vnni", "avx2") if f in Path("/proc/cpuinfo").read_text()}) \
        if Path("/proc/cpuinfo").exists() else []
    print(f"bundle {args.bundle.name}: {args.clients} clients, {args.rate:g} req/s offered, {args.requests} requests "
          f"x {args.rounds} rounds per scheduler, max_new_tokens {lo}-{hi}, "
          f"{args.stream_share:.0%} streamed, greedy, {args.rows} rows, interleaved by {interleave}; "
          f"{os.cpu_count()} CPUs {' '.join(cpu)}")
    print(f"{'scheduler':10s} {'req/s':>7s} {'tok/s':>8s} {'p50 s':>7s} {'p95 s':>7s} {'TTFT p50':>9s} "
          f"{'TTFT p95':>9s} {'batch':>6s} {'failed':>6s}")
    for s in names:
        x = res[s]
        print(f"{s:10s} {x['req_s']:7.2f} {x['tok_s']:8.1f} {x['p50']:7.3f} {x['p95']:7.3f} {x['ttft50']:9.3f} "
              f"{x['ttft95']:9.3f} {x['batch']:6.2f} {x['errors']:6d}")
    ok = all(res[s]["errors"] == 0 for s in names)
    if len(names) == 2:
        a, b = (res[s] for s in names)
        print(f"{names[0]}/{names[1]}: tokens/s {a['tok_s'] / b['tok_s']:.2f}x, requests/s {a['req_s'] / b['req_s']:.2f}x, "
              f"p50 latency {a['p50'] / b['p50']:.2f}x, p95 latency {a['p95'] / b['p95']:.2f}x, "
              f"TTFT p50 {a['ttft50'] / b['ttft50']:.2f}x")
        same = [all(pa.texts.get(i) == pb.texts.get(i) for i in pa.texts.keys() | pb.texts.keys())
                for pa, pb in zip(phases[names[0]], phases[names[1]])]
        print(f"same text from both servers for every request: {all(same)}")
        ok = ok and all(same)
    for s in names:
        for p in phases[s]:
            for e in p.errors[:3]:
                print(f"{s}: {e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
