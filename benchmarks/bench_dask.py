"""Distributed alignment on Dask: 1 vs 2 workers, and the per-task overheads.

    python -m benchmarks.bench_dask                  # 32 slices of 1024^2 (default)
    python -m benchmarks.bench_dask --slices 16 --size 512

Measures, on a LocalCluster of single-threaded worker processes on 127.0.0.1:

1. the round trip of an empty task (submit + result, one at a time) and the throughput of
   many empty tasks;
2. the per-slice work (read + prepare + match with the predecessor) in-process against the same
   work as two tasks (prepare, match) on one worker, waited for one slice at a time;
3. the whole alignment file -> OME-Zarr: single-machine ``Aligner.align_stack`` (1 and 2 C++
   threads) against ``align_distributed`` on 1 and 2 workers (1 thread each), for
   ``neighbours`` 1 and 2. Cluster start-up is excluded (it is reported separately); the
   transforms of every distributed run are checked against the single-machine ones.

The input is the bundled shale sample, resized to ``--size`` and repeated to ``--slices``,
misaligned with seeded FIB-SEM jitter and stored as OME-Zarr. One run per configuration (the
machine is small and shared: read the ratios, not the absolute numbers).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from deepalign_fast import Aligner, AlignOptions
from deepalign_fast.datasets import sample_stack_path
from deepalign_fast.io import open_stack, open_writer
from deepalign_fast.qc.synth import misalign_stack

from benchmarks._timing import markdown_table, save_json


def make_input(root: Path, slices: int, size: int) -> Path:
    with open_stack(sample_stack_path()) as r:
        clean = np.stack([cv2.resize(r.read(i % len(r)), (size + 96, size + 96),
                                     interpolation=cv2.INTER_CUBIC) for i in range(slices)])
    stack, _ = misalign_stack(clean, 11, profile="fibsem", margin=48)
    path = root / "input.ome.zarr"
    with open_writer(path, stack.shape, stack.dtype) as w:
        for z, sl in enumerate(stack):
            w.write(z, sl)
    return path


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return statistics.median(xs), q[2] - q[0]


def overheads(client: Any, src: Path, opts: AlignOptions, root: Path) -> dict[str, Any]:
    from deepalign_fast.alignment.distributed import match_task, noop_task, prepare_task
    from deepalign_fast.alignment.matcher import backend_for

    out: dict[str, Any] = {}
    for i in range(20):  # warm-up
        client.submit(noop_task, i, pure=False).result()
    rt = []
    for i in range(200):
        t0 = time.perf_counter()
        client.submit(noop_task, i, pure=False).result()
        rt.append(time.perf_counter() - t0)
    out["empty_roundtrip_ms"], out["empty_roundtrip_iqr_ms"] = (v * 1e3 for v in _quartiles(rt))
    t0 = time.perf_counter()
    client.gather(client.map(noop_task, range(2000), pure=False))
    out["empty_tasks_per_s"] = 2000 / (time.perf_counter() - t0)

    # Per-slice work in-process vs as tasks (one worker, one slice at a time).
    backend = backend_for(opts)
    od = asdict(opts)
    with open_stack(src) as reader:
        n = len(reader)
        local, remote = [], []
        prev = backend.prepare(reader.read(0))
        for z in range(1, min(n, 9)):
            t0 = time.perf_counter()
            cur = backend.prepare(reader.read(z))
            backend.match(prev, cur, None)
            local.append(time.perf_counter() - t0)
            prev = cur
        worker = list(client.scheduler_info()["workers"])[:1]
        prev_f = client.submit(prepare_task, str(src), od, 0, pure=False, workers=worker)
        for z in range(1, min(n, 9)):
            t0 = time.perf_counter()
            cur_f = client.submit(prepare_task, str(src), od, z, pure=False, workers=worker)
            m = client.submit(match_task, od, prev_f, cur_f, None,
                              str(root / f"pair{z}.npz"), pure=False, workers=worker)
            m.result()
            remote.append(time.perf_counter() - t0)
            prev_f = cur_f
    out["slice_inprocess_ms"], out["slice_inprocess_iqr_ms"] = (
        v * 1e3 for v in _quartiles(local))
    out["slice_as_tasks_ms"], out["slice_as_tasks_iqr_ms"] = (v * 1e3 for v in _quartiles(remote))
    return out


def _warm() -> None:
    import cv2  # noqa: F401
    import deepalign_fast.alignment.distributed  # noqa: F401
    import zarr  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    from deepalign_fast.alignment.distributed import align_distributed, connect

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--model", default="rigid")
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_dask_"))
    rows: list[dict[str, Any]] = []
    try:
        src = make_input(root, args.slices, args.size)
        print(f"input: {args.slices} x {args.size}^2 uint8 OME-Zarr")
        ref: dict[int, np.ndarray] = {}
        for nb in (1, 2):
            for threads in (1, 2):
                opts = AlignOptions(model=args.model, neighbours=nb, num_threads=threads)
                out = root / f"local_{nb}_{threads}.ome.zarr"
                t0 = time.perf_counter()
                res = Aligner(opts).align_stack(src, out, progress=False)
                wall = time.perf_counter() - t0
                ref.setdefault(nb, res.transforms.affines)
                rows.append({"run": f"single machine, {threads} thread(s)", "neighbours": nb,
                             "wall_s": wall, "slices_per_s": args.slices / wall,
                             "estimate_s": res.timings.get("estimate", float("nan")),
                             "render_s": wall - res.timings.get("estimate", 0.0)})
                print(rows[-1])
                shutil.rmtree(out)
        over: dict[str, Any] = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            with connect(f"local:{workers}") as client:
                client.wait_for_workers(workers)
                startup = time.perf_counter() - t0
                client.run(_warm)  # imports in the workers, not counted in the runs
                for nb in (1, 2):
                    opts = AlignOptions(model=args.model, neighbours=nb, num_threads=1)
                    out = root / f"dask_{workers}_{nb}.ome.zarr"
                    t0 = time.perf_counter()
                    res = align_distributed(src, out, scheduler=client, options=opts,
                                            progress=False)
                    wall = time.perf_counter() - t0
                    diff = float(np.abs(res.transforms.affines - ref[nb]).max())
                    rows.append({"run": f"dask, {workers} worker(s) x 1 thread",
                                 "neighbours": nb, "wall_s": wall,
                                 "slices_per_s": args.slices / wall,
                                 "estimate_s": res.timings["estimate"],
                                 "render_s": res.timings["render"],
                                 "cluster_start_s": startup, "max_diff_px": diff})
                    print(rows[-1])
                    shutil.rmtree(out)
                if workers == 1:
                    over = overheads(client, src, AlignOptions(model=args.model, num_threads=1),
                                     root)
                    over["cluster_start_1_worker_s"] = startup
                    print(over)
        cols = ["run", "neighbours", "wall_s", "slices_per_s", "estimate_s", "render_s",
                "max_diff_px"]
        print(markdown_table(rows, cols))
        print(markdown_table([over], list(over)))
        path = save_json("bench_dask", rows, {"overheads": over, "slices": args.slices,
                                               "size": args.size, "model": args.model})
        print(f"saved {path}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
