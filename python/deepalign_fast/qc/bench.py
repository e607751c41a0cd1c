"""``deepalign-fast bench``: throughput of the whole pipeline on a synthetic or given stack.

Each configuration (features x execution provider) runs ``deepalign-fast align`` in a fresh
process, so its peak memory is its own, and reports slices/s, Mpx/s, seconds per stage (read,
features, match, solve, render, write; summed over the threads that ran them, so they overlap)
and peak memory. The synthetic stack is the bundled real FIB-SEM sample, tiled up to the
requested size, with known random shifts.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DeepAlignError

__all__ = ["available_providers", "make_synthetic_stack", "run_bench"]

STAGES = ("read", "features", "match", "solve", "render", "write")


def available_providers() -> list[str]:
    """onnxruntime execution providers usable here, by their CLI names."""
    import onnxruntime as ort

    names = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
             "TensorrtExecutionProvider": "tensorrt"}
    return [names[p] for p in ort.get_available_providers() if p in names]


_TEMP_PREFIX = "deepalign-bench-"


def _with_parent(parent: int) -> None:
    """In each run's process, before it starts (Linux): SIGTERM when the bench process
    ``parent`` dies, even by SIGKILL, so no run goes on alone (it removes its own temporary
    files on SIGTERM); if it died already, the run does not start."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(143)


def _temp_prefix() -> str:
    """This process's temporary folder prefix: its pid and host (a TMPDIR shared between
    machines holds other hosts' folders, whose pids say nothing here)."""
    import socket

    return f"{_TEMP_PREFIX}{os.getpid()}@{socket.gethostname()}-"


def _remove_stale_temps() -> None:
    """Remove the temporary folders of bench processes that were killed (``kill -9``): each
    is named after its process, and one whose process is gone is no one's."""
    import shutil
    import socket

    here = socket.gethostname()
    for folder in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*@*-*"):
        pid_text, _, rest = folder.name[len(_TEMP_PREFIX):].partition("@")
        if rest.rpartition("-")[0] != here or not pid_text.isdigit():
            continue
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # gone (a live process of another user: PermissionError)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def make_synthetic_stack(path: Path, *, slices: int, size: int, seed: int = 0) -> Path:
    """Write ``slices`` x ``size`` x ``size`` uint8 slices built from the bundled sample
    (mirrored tiles), each shifted by a random offset of up to 8 px."""
    import tifffile

    from ..datasets import sample_stack_path

    sample = tifffile.imread(sample_stack_path())
    rng = np.random.default_rng(seed)
    reps = (int(np.ceil((size + 16) / sample.shape[1])),
            int(np.ceil((size + 16) / sample.shape[2])))
    with tifffile.TiffWriter(path, bigtiff=slices * size * size > 3_900_000_000) as tw:
        for z in range(slices):
            src = sample[z % len(sample)]
            big = np.block([[src if (i + j) % 2 == 0 else src[:, ::-1] for j in range(reps[1])]
                            for i in range(reps[0])])
            dy, dx = rng.integers(0, 16, 2)
            tw.write(np.ascontiguousarray(big[dy:dy + size, dx:dx + size]),
                     photometric="minisblack", contiguous=True)
    return path


def run_bench(stack: str | os.PathLike[str] | None = None, *, slices: int = 16,
              size: int = 2048, features: tuple[str, ...] = ("blocks",),
              providers: tuple[str, ...] | None = None, model: str = "affine",
              threads: int = 0, progress: bool | None = False) -> list[dict[str, Any]]:
    """Run ``align`` once per (features, provider) and return one row of numbers per run.

    The provider only matters for ``features="learned"``; other features run once, on the
    CPU. ``providers=None`` means every provider available here.
    """
    provs = list(providers) if providers else available_providers()
    missing = [p for p in provs if p not in available_providers()]
    if missing:
        raise DeepAlignError(f"execution provider(s) {', '.join(missing)} not available here "
                             f"(available: {', '.join(available_providers())}); for cuda or "
                             "tensorrt install onnxruntime-gpu")
    from ..progress import Progress

    rows = []
    runs = [(f, p) for f in features for p in (provs if f == "learned" else ["cpu"])]
    bar = Progress(len(runs), "bench", progress, unit="runs")
    _remove_stale_temps()
    with tempfile.TemporaryDirectory(prefix=_temp_prefix()) as tmp, bar:
        src = Path(stack) if stack is not None else make_synthetic_stack(
            Path(tmp) / "synthetic.tif", slices=slices, size=size)
        for feat, prov in runs:  # one fresh process per configuration
            out = Path(tmp) / f"out-{feat}-{prov}.tif"
            cmd = [sys.executable, "-m", "deepalign_fast", "align", str(src), "-o", str(out),
                   "--features", feat, "--provider", prov, "--model", model,
                   "--threads", str(threads), "--json", "--quiet"]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  preexec_fn=functools.partial(_with_parent, os.getpid()))
            # exit status 3: the run finished but flagged most slices (the row says so)
            if proc.returncode not in (0, 3):
                raise DeepAlignError(f"bench run {feat}/{prov} failed: {proc.stderr.strip()}")
            summary = json.loads(proc.stdout)
            from ..io import open_stack

            with open_stack(out) as r:
                n, h, w = r.shape
            total = summary["time_s"]
            row: dict[str, Any] = {
                "features": feat, "provider": prov, "slices": n, "shape": f"{h}x{w}",
                "time_s": total, "slices_per_s": n / total,
                "mpx_per_s": n * h * w / 1e6 / total,
                "peak_memory_mb": summary.get("peak_memory_mb"),
                "flagged": len(summary["flagged"]),
            }
            for stage in STAGES:
                row[f"{stage}_s"] = summary["timings_s"].get(stage, 0.0)
            rows.append(row)
            out.unlink(missing_ok=True)
            bar.step()
    return rows
