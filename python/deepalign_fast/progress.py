"""A one-line progress indicator for long commands: count, percentage, rate and ETA.

Written to stderr and only when it is a terminal (or when asked), so logs and pipes stay
clean; every command's ``--quiet`` turns it off.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType

__all__ = ["Progress", "StageTimes"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``label: 12/165 slices  7% 3.2/s ETA 0:47`` on one line of stderr.

    Parameters
    ----------
    total : int or None
        Number of steps (None: unknown; no percentage or ETA).
    label : str
        What is being done.
    enabled : bool or None
        None (default): only when stderr is a terminal.
    unit : str
        What a step is.
    """

    def __init__(self, total: int | None, label: str, enabled: bool | None = None,
                 unit: str = "slices") -> None:
        self.total, self.label, self.unit = total, label, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.done = 0
        self._start = 0  # steps done before this run (a resumed run)
        self._shown = 0.0

    def resume_at(self, done: int) -> None:
        """Count ``done`` steps as already finished (they do not enter the rate)."""
        self.done = self._start = done

    def step(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if now - self._shown < 0.1 and not finished:
            return  # at most ten updates a second
        self._shown = now
        sys.stderr.write("\r" + self.line(now))
        sys.stderr.flush()

    def line(self, now: float | None = None) -> str:
        """The text shown for the current state."""
        now = time.perf_counter() if now is None else now
        elapsed = max(1e-9, now - self.t0)
        rate = (self.done - self._start) / elapsed
        text = f"{self.label}: {self.done}"
        if self.total:
            pct = 100.0 * self.done / self.total
            text += f"/{self.total} {self.unit} {pct:3.0f}% {rate:.1f}/s"
            if rate > 0 and self.done < self.total:
                text += f" ETA {_clock((self.total - self.done) / rate)}"
            else:
                text += f" in {_clock(elapsed)}"
        else:
            text += f" {self.unit} {rate:.1f}/s"
        return text

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + self.line() + "\n")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class StageTimes:
    """Seconds spent per stage, summed over the threads that ran it (stages overlap, so the
    sum can exceed the wall time; the wall time is reported separately as ``total``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - t0
        return now
