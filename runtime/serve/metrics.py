"""The step-level scheduler's metrics as Prometheus text on an HTTP port of its own (`serve --scheduler-metrics-port`).

PyTriton runs the inference callables in this process, while Triton's custom-metrics API
(`pb_utils.MetricFamily`) exists only inside Triton's Python-backend stubs, so these gauges cannot
join Triton's own /metrics page: they are served beside it, at /metrics on their own port, in the
same exposition format (a scrape config lists both targets). The format is a few lines of text, so
it is written here rather than adding prometheus_client to the serve extra.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from bridge_export.runtime.serve.scheduler import Stats

# (name, type, help, value from Stats)
METRICS = [
    ("bridge_export_queue_length", "gauge", "Caption requests waiting for free rows", lambda s: s.queue_length),
    ("bridge_export_active_rows", "gauge", "KV cache rows decoding now", lambda s: s.active_rows),
    ("bridge_export_active_requests", "gauge", "Caption requests decoding now", lambda s: s.active_requests),
    ("bridge_export_rows", "gauge", "KV cache rows of the scheduler", lambda s: s.rows),
    ("bridge_export_step_batch_size", "gauge", "Rows the last decode step ran", lambda s: s.last_step_batch),
    ("bridge_export_decode_steps_total", "counter", "Decode steps run", lambda s: s.steps),
    ("bridge_export_step_rows_total", "counter", "Rows summed over decode steps (mean batch = this / steps)",
     lambda s: s.step_rows_total),
    ("bridge_export_tokens_generated_total", "counter", "Tokens chosen (one per request per step)",
     lambda s: s.tokens_generated),
    ("bridge_export_requests_completed_total", "counter", "Caption requests answered", lambda s: s.requests_done),
    ("bridge_export_requests_failed_total", "counter", "Caption requests failed", lambda s: s.requests_failed),
]


def render(stats: Stats) -> str:
    """The Prometheus text exposition of `stats` (time to first token as a summary's _sum and _count)."""
    lines = []
    for name, kind, text, value in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value(stats)}"]
    ttft = "bridge_export_time_to_first_token_seconds"
    lines += [f"# HELP {ttft} Submit to first chosen token of a caption request", f"# TYPE {ttft} summary",
              f"{ttft}_sum {stats.ttft_seconds_sum:.6f}", f"{ttft}_count {stats.ttft_count}"]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves `render(stats())` at /metrics on `port` from a daemon thread until `close()`."""

    def __init__(self, port: int, stats: Callable[[], Stats], host: str = "0.0.0.0"):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = render(stats()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # one line per scrape is noise
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bridge-export-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
