"""One progress mechanism: nothing for short work, a delayed bar on a terminal, periodic lines in a log."""
import io
import logging

from bridge_export.runtime import progress as P


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _capture():
    logger = logging.getLogger("bridge_export.test_progress")
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.getLogger("bridge_export").setLevel(logging.INFO)
    return logger, records


def test_not_a_terminal_logs_a_line_every_10_seconds_and_10_percent():
    logger, records = _capture()
    clock = _Clock()
    total = 27_700_000_000
    with P.progress(total=total, desc="writing", unit="B", unit_scale=True, logger=logger, clock=clock,
                    stream=io.StringIO()) as bar:
        for _ in range(1000):  # 1000 updates over 100 s: a carriage-return bar would redraw 1000 times
            clock.t += 0.1
            bar.update(total // 1000)
    assert 5 <= len(records) <= 11, records
    assert records[0].startswith("writing: 1") and "GB of 27.7 GB" in records[0]
    assert all("\r" not in r for r in records)


def test_short_work_prints_nothing():
    logger, records = _capture()
    clock = _Clock()
    with P.progress(total=3, desc="steps", logger=logger, clock=clock, stream=io.StringIO()) as bar:
        for _ in range(3):
            clock.t += 0.001
            bar.update()
    assert records == []


def test_a_terminal_gets_a_delayed_tqdm_bar():
    bar = P.progress(total=10, desc="x", stream=_Tty())
    assert isinstance(bar, P._Bar) and bar._bar.delay == P.DELAY_S
    bar.close()


def test_progress_iter_yields_everything():
    assert list(P.progress_iter(range(5), desc="n", enabled=False)) == [0, 1, 2, 3, 4]
