"""End to end on real Triton servers, with tritonclient over HTTP and gRPC (8 concurrent clients):
`bridge-export serve` (PyTriton) and a `triton-repo --backend python` repository on the tritonserver
that PyTriton bundles. Results must equal the Python API's; bad requests get errors and the server
stays up; SIGTERM stops it within seconds.

Needs the [serve] venv (PyTriton pins numpy<2, so it cannot share this environment): set
BRIDGE_EXPORT_SERVE_PYTHON to its python, or make it at ../venvs/serve beside the clone (README,
"Serving on Triton"). Building that venv takes minutes (torch + PyTriton wheels), and each server
takes 20-60 s to start here, so these tests are slow: they run with BRIDGE_EXPORT_SLOW=1.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = Path(os.environ.get("BRIDGE_EXPORT_SERVE_PYTHON", ROOT.parent / "venvs" / "serve" / "bin" / "python"))

MODELS = ("embed_image", "embed_text", "caption", "caption_stream")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BRIDGE_EXPORT_SLOW") != "1",
                       reason="starts Triton servers (minutes): set BRIDGE_EXPORT_SLOW=1 to run"),
    pytest.mark.skipif(not SERVE_PYTHON.is_file(),
                       reason=f"no [serve] venv at {SERVE_PYTHON}: make one (README) or set BRIDGE_EXPORT_SERVE_PYTHON"),
]


def _ports(n=3):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_ready(proc, port, log, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:  # PyTriton's server is ready before it has loaded the models: wait for each of them
            if all(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{m}/ready", timeout=2).status == 200
                   for m in MODELS):
                return
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    pytest.fail(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("served_images")
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (36 + 4 * i, 44, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def _run(cmd, tmp_path, images, bundle):
    """Start a server, run the client job against it, SIGTERM it; the report and the stop time."""
    http, grpc, metrics = _ports()
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd(http, grpc, metrics), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        _wait_ready(proc, http, log)
        out = tmp_path / "report.json"
        job = subprocess.run([str(SERVE_PYTHON), str(ROOT / "tests" / "serve" / "client_job.py"), "127.0.0.1",
                              str(http), str(grpc), str(metrics), str(images), str(out)],
                             capture_output=True, text=True, timeout=600, env=env)
        assert job.returncode == 0, job.stderr[-3000:] + log.read_text()[-3000:]
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        stopped = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    with socket.socket() as s:  # the port is free again: nothing left behind
        assert s.connect_ex(("127.0.0.1", http)) != 0
    return json.loads(out.read_text()), rc, stopped, log


def _check(report, bundle, images, per_request_errors: bool):
    from bridge_export import runtime

    TEXTS = report["texts"]
    pipe = runtime.load(bundle)
    files = sorted(images.glob("*.png"))
    want = {}
    for f in files:
        for mode in ("C", "G"):
            want[f"image/{mode}/{f.name}"] = pipe.embed_images([str(f)], mode)[0]
        want[f"caption/default/{f.name}"] = pipe.caption(str(f)).text
        want[f"caption/options/{f.name}"] = pipe.caption(str(f), "a photo of", max_new_tokens=10, num_beams=2).text
    for t in TEXTS:
        want[f"text/{t}"] = pipe.embed_texts([t])[0]
    assert len(report["clients"]) == 8
    for client, got in report["clients"].items():
        assert set(got) == set(want), client
        for k, v in want.items():
            if isinstance(v, str):
                assert got[k] == v, (client, k)
            else:
                np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5, err_msg=f"{client} {k}")
    errors = report["errors"]
    assert all(errors.values()), {k: v for k, v in errors.items() if not v}  # every bad request got an error
    assert "not a readable image" in errors["garbage_image_http"] and "C or G" in errors["bad_mode"]
    assert "UTF-8" in errors["not_utf8"] and "num_beams" in errors["zero_beams"]
    if per_request_errors:  # Triton's Python backend: a client error is a 400, not a server failure
        assert errors["garbage_image_http"].startswith("[400]")
    stream = report["stream"][files[0].name]
    assert len(stream) > 1 and "".join(stream) == "".join(pipe.caption_stream(str(files[0])))
    np.testing.assert_allclose(report["after_errors"], want[f"text/{TEXTS[0]}"], rtol=1e-4, atol=1e-5)
    assert report["live"] and report["ready"] and all(report["models_ready"].values())
    assert report["dynamic_batching"] and report["config_max_batch"] >= 2
    assert report["metrics_success"] >= 8 * (len(files) * 4 + len(TEXTS))


@pytest.mark.parametrize("instances,scheduler", [(1, "step"), (2, "step"), (1, "static")])
def test_pytriton_serve(tiny_text_bundle, tmp_path, images, instances, scheduler):
    def cmd(http, grpc, metrics):
        return [str(SERVE_PYTHON), "-m", "bridge_export.exporter.cli", "serve", str(tiny_text_bundle), "--http-port", str(http),
                "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "4", "--threads", "1",
                "--instances", str(instances), "--scheduler", scheduler, "--scheduler-metrics-port", "0"]

    report, rc, stopped, log = _run(cmd, tmp_path, images, tiny_text_bundle)
    print(f"PyTriton serve, {instances} instance(s), {scheduler} scheduler: SIGTERM -> exit in {stopped:.1f}s")
    _check(report, tiny_text_bundle, images, per_request_errors=False)
    assert rc == 0 and stopped < 30, (rc, stopped)
    assert "server stopped" in log.read_text()


def test_triton_repo_on_bundled_tritonserver(tiny_text_bundle, tmp_path, images):
    from bridge_export.runtime.serve.triton_repo import RepoOptions, write_repo

    repo = write_repo(tiny_text_bundle, tmp_path / "repo", RepoOptions(backend="python", gpu=False, threads=1))

    def cmd(http, grpc, metrics):
        return [str(SERVE_PYTHON), "-m", "bridge_export.runtime.serve.tritonserver", str(repo), "--http-port", str(http),
                "--grpc-port", str(grpc), "--metrics-port", str(metrics)]

    report, rc, stopped, _ = _run(cmd, tmp_path, images, tiny_text_bundle)
    print(f"tritonserver on the repository: SIGTERM -> exit in {stopped:.1f}s")
    _check(report, tiny_text_bundle, images, per_request_errors=True)
    assert rc == 0 and stopped < 30, (rc, stopped)
