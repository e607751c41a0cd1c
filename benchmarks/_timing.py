"""Timing and reporting helpers shared by the benchmark scripts.

Rules (kornia's benchmarks/README.md): warm up, report median and IQR over repeats, pin seeds,
save run metadata with the JSON, and publish losses too. Absolute times on a shared 2-core
machine are noisy; the ratios measured in the same run are what the results claim.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    repeats: int

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def measure(fn: Callable[[], Any], *, repeats: int = 15, warmup: int = 2,
            min_time_s: float = 0.0) -> Timing:
    """Median and inter-quartile range of ``fn()`` wall time over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


def measure_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 15,
                        warmup: int = 1) -> dict[str, Timing]:
    """Median and IQR of each callable's wall time, timed round-robin.

    Each repeat runs every callable once, in turn, so that a change of load on a shared
    machine (another job starting or ending) hits all of them alike and their ratios stay
    comparable; timing one method's repeats after another's does not have that property.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[k] = Timing(statistics.median(ts), q[2] - q[0], len(ts))
    return out


def metadata() -> dict[str, Any]:
    import numpy as np

    meta: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import cv2

        meta["opencv"] = cv2.__version__
    except ImportError:
        pass
    try:
        import deepalign_fast

        meta["deepalign_fast"] = deepalign_fast.__version__
    except ImportError:
        pass
    return meta


def save_json(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    payload = {"meta": metadata(), "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def update_results(name: str, markdown: str) -> None:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in
    RESULTS.md (appending the block if absent), so a benchmark can rewrite its own tables
    without touching the prose around them."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text()
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
