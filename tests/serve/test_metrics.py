"""The scheduler's metrics endpoint (Prometheus text) and serve's option checks, without Triton."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from bridge_export.runtime.serve.metrics import MetricsServer, render
from bridge_export.runtime.serve.pytriton_server import ServeOptions, check_options
from bridge_export.runtime.serve.scheduler import Stats


def test_render_and_serve_metrics():
    stats = Stats(queue_length=3, active_rows=5, rows=8, last_step_batch=5, steps=10, step_rows_total=42,
                  ttft_seconds_sum=1.5, ttft_count=4)
    text = render(stats)
    assert "# TYPE bridge_export_queue_length gauge\nbridge_export_queue_length 3\n" in text
    assert "bridge_export_step_batch_size 5\n" in text and "bridge_export_step_rows_total 42\n" in text
    assert "bridge_export_time_to_first_token_seconds_sum 1.500000\n" in text
    assert "bridge_export_time_to_first_token_seconds_count 4\n" in text
    server = MetricsServer(0, lambda: stats, host="127.0.0.1")  # port 0: any free port
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        assert body == text
        stats.queue_length = 0  # read live on every scrape
        assert "bridge_export_queue_length 0\n" in urllib.request.urlopen(
            f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.close()


@pytest.mark.parametrize("kw,match", [(dict(models=("caption", "captions")), "models must name some of"),
                                      (dict(models=()), "models must name some of"),
                                      (dict(scheduler="dynamic"), "scheduler must be step or static"),
                                      (dict(backend="cuda"), "backend must be"),
                                      (dict(rows=0), "rows must be an integer from 1")])
def test_bad_serve_options(kw, match):
    with pytest.raises(ValueError, match=match):
        check_options(ServeOptions(**kw))
