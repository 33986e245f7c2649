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


# --- progress bars -------------------------------------------------------------------------------
# Work that finishes within DELAY_S shows nothing; on a terminal a tqdm bar appears after that; when
# stderr is not a terminal (a log file, CI) a plain line is logged every LOG_EVERY_S seconds or
# LOG_EVERY_FRACTION of the work, whichever comes later, instead of carriage-return updates.
DELAY_S = 2.0
LOG_EVERY_S = 10.0
LOG_EVERY_FRACTION = 0.1
_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    """--verbose: third-party logs are not silenced (the serving and Ray layers read this too)."""
    global _VERBOSE
    _VERBOSE = bool(verbose)


def is_verbose() -> bool:
    """Whether the user asked for third-party logs (--verbose)."""
    return _VERBOSE


class _LogLines:
    """A progress 'bar' for a non-terminal: a log line every LOG_EVERY_S seconds and LOG_EVERY_FRACTION."""

    def __init__(self, total, desc: str, unit: str, unit_scale: bool, logger: logging.Logger, clock):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n, self.logger, self.clock = 0, logger, clock
        self.start = self.last_t = clock()
        self.last_n = 0

    def _fmt(self, v) -> str:
        if not self.unit_scale:
            return f"{v:g}"
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.1f} {prefix}"
        return f"{v:g} "

    def update(self, n=1) -> None:
        """Count `n` more units done; log a line when enough time and work have passed."""
        self.n += n
        now = self.clock()
        if now - self.start < DELAY_S or now - self.last_t < LOG_EVERY_S:
            return
        if self.total and (self.n - self.last_n) < LOG_EVERY_FRACTION * self.total and self.n < self.total:
            return
        self.last_t, self.last_n = now, self.n
        self.logger.info(self.line(now))

    def line(self, now) -> str:
        """`desc: 40% (11.1 GB of 27.7 GB), 52 s`: what a periodic log line says."""
        done = f"{self._fmt(self.n)}{self.unit}"
        if self.total:
            return (f"{self.desc}: {100 * self.n / self.total:.0f}% ({done} of {self._fmt(self.total)}{self.unit}), "
                    f"{now - self.start:.0f} s")
        return f"{self.desc}: {done}, {now - self.start:.0f} s"

    def write(self, msg: str) -> None:
        """Print a message (a skipped file, a warning) on stderr."""
        print(msg, file=sys.stderr)

    def close(self) -> None:
        """A last line when the work took long enough to have shown progress."""
        now = self.clock()
        if now - self.start >= LOG_EVERY_S and self.last_n != self.n:
            self.logger.info(self.line(now))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Bar:
    """tqdm on a terminal, shown only after DELAY_S (short steps show nothing)."""

    def __init__(self, **kwargs):
        from tqdm import tqdm

        self._bar = tqdm(delay=DELAY_S, file=sys.stderr, **kwargs)

    def update(self, n=1) -> None:
        """Count `n` more units done."""
        self._bar.update(n)

    def write(self, msg: str) -> None:
        """Print a message above the bar."""
        self._bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar (left on screen only when it was shown)."""
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress(total=None, desc: str = "", unit: str = "it", unit_scale: bool = False, enabled: bool = True,
             logger: logging.Logger | None = None, clock=None, stream=None):
    """The one progress mechanism: a delayed tqdm bar on a terminal, periodic log lines otherwise.

    Use as a context manager: `with progress(total=n, desc="weights") as bar: ... bar.update(k)`.
    `enabled=False` (or a bundle-export log level above INFO) shows nothing at all. `clock` and `stream`
    are for tests (a fake clock; the stream whose isatty() decides).
    """
    import time

    logger = logger or get_logger("progress")
    if not enabled or not logging.getLogger(ROOT).isEnabledFor(logging.INFO):
        return _LogLines(total, desc, unit, unit_scale, _Silent(), clock or time.monotonic)
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return _Bar(total=total, desc=desc, unit=unit, unit_scale=unit_scale)
    return _LogLines(total, desc, unit, unit_scale, logger, clock or time.monotonic)


class _Silent:
    """A logger stand-in that drops everything (progress switched off)."""

    def info(self, *args, **kwargs) -> None:
        """Drop the message."""


def progress_iter(iterable, total=None, desc: str = "", unit: str = "it", enabled: bool = True):
    """Iterate `iterable` with progress (see `progress`): a drop-in for `tqdm(iterable, ...)`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress(total=total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)
