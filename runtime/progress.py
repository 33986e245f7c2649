"""One progress mechanism: `logging` for messages, `tqdm` for long loops; third-party noise silenced.

Library code logs to loggers under "bridge_export" and never prints; the CLI (or the user's own
program) decides where messages go. Functions that take a `progress=` callable keep it for
compatibility: given one, it receives each message instead of the log.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

ROOT = "bridge_export"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (a child of "bridge_export")."""
    return logging.getLogger(f"{ROOT}.{name.rsplit('.', 1)[-1]}" if not name.startswith(ROOT) else name)


def reporter(progress: Callable[[str], None] | None, logger: logging.Logger) -> Callable[[str], None]:
    """`progress` when given (old call sites pass a callable), else the logger's info()."""
    return progress if progress is not None else logger.info


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show bridge-export's messages on stderr, one plain line each (what the CLI does)."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(level)
    root.propagate = False


def quiet_third_party() -> None:
    """Silence messages the user cannot act on (onnxruntime's quantizer advice, exporter chatter)."""
    for name in ("onnxruntime", "onnxruntime.quantization", "root.onnxruntime", "onnxscript", "torch.onnx",
                 "torch.export", "torch._dynamo", "polygraphy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # onnxruntime.quantization logs "Please consider to run pre-processing before quantization" through
    # the root logger once per graph; filter exactly that advice there.
    logging.getLogger().addFilter(_drop_quantizer_advice)


def _drop_quantizer_advice(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not ("pre-process" in msg and "quantiz" in msg)
