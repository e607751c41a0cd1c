"""The progress line: count, percentage, rate, ETA; silent unless enabled."""

from __future__ import annotations

import pytest
from deepalign_fast.progress import Progress


def test_line_has_percentage_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(10, "estimate", enabled=True)
    bar.t0 -= 4.0  # 4 s ago
    bar.done = 4
    line = bar.line()
    assert line.startswith("estimate: 4/10 slices")
    assert " 40%" in line and "1.0/s" in line and "ETA 0:06" in line
    bar.done = 10
    assert "ETA" not in bar.line() and " in 0:04" in bar.line()


def test_resumed_steps_do_not_count_in_the_rate() -> None:
    bar = Progress(100, "estimate", enabled=False)
    bar.resume_at(50)
    bar.t0 -= 10.0
    bar.step(10)
    assert bar.done == 60 and "1.0/s" in bar.line()


def test_silent_when_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(3, "x", enabled=False) as bar:
        for _ in range(3):
            bar.step()
    assert capsys.readouterr().err == ""
    with Progress(3, "y", enabled=True) as bar:
        for _ in range(3):
            bar.step()
    err = capsys.readouterr().err
    assert "y: 3/3 slices 100%" in err and err.endswith("\n")
