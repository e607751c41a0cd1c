"""Distributed alignment on a Dask LocalCluster (2 single-threaded worker processes on
127.0.0.1): equal to the single-machine result, survives a killed worker, resumes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

from deepalign_fast import Aligner, AlignOptions, DeepAlignError  # noqa: E402
from deepalign_fast.alignment.distributed import (  # noqa: E402
    LOOPBACK_ANY_PORT,
    align_distributed,
    connect,
)
from deepalign_fast.cli import main  # noqa: E402
from deepalign_fast.datasets import sample_stack_path  # noqa: E402
from deepalign_fast.io import open_stack, open_writer  # noqa: E402
from deepalign_fast.qc.synth import misalign_stack  # noqa: E402
from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

# Same arithmetic on both paths: the transforms agree to rounding of the JSON/npz round trips
# (exactly, in practice).
TOL_PX = 1e-9
OPTS = AlignOptions(model="rigid", offsets=(1, 2), num_threads=1)


@pytest.fixture(scope="module")
def cluster() -> Any:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=LOOPBACK_ANY_PORT,
                      worker_dashboard_address=LOOPBACK_ANY_PORT) as lc, \
            Client(lc, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        yield lc, client


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A misaligned OME-Zarr input with one blank slice, and the single-machine result."""
    root = tmp_path_factory.mktemp("dask")
    with open_stack(sample_stack_path()) as r:
        clean = np.stack([r.read(i) for i in range(len(r))])
    stack, _ = misalign_stack(clean, 7, profile="fibsem")
    stack[5] = 40  # blank: flagged and interpolated, later slices match past it
    src = root / "input.ome.zarr"
    with open_writer(src, stack.shape, stack.dtype) as w:
        for z, sl in enumerate(stack):
            w.write(z, sl)
    ref = Aligner(OPTS).align_stack(src, root / "ref.ome.zarr", progress=False)
    with open_stack(root / "ref.ome.zarr") as r:
        ref_out = np.stack([r.read(i) for i in range(len(r))])
    return {"root": root, "input": src, "ref": ref, "ref_out": ref_out}


def _check_equal(result: Any, output: Path, data: dict[str, Any]) -> None:
    ref = data["ref"].transforms
    got = result.transforms
    assert np.abs(got.affines - ref.affines).max() <= TOL_PX
    assert got.flagged == ref.flagged == [5]
    assert got.output_shape == ref.output_shape
    assert got.residuals == pytest.approx(ref.residuals, abs=1e-12)
    with open_stack(output) as r:
        out = np.stack([r.read(i) for i in range(len(r))])
    np.testing.assert_array_equal(out, data["ref_out"])
    assert not output.with_name(output.name + ".partial").exists()
    assert not output.with_name(output.name + ".work").exists()


def test_cluster_is_loopback_only(cluster: Any) -> None:
    lc, client = cluster
    addrs = [lc.scheduler_address, *client.scheduler_info()["workers"]]
    assert addrs and all(a.startswith("tcp://127.0.0.1:") for a in addrs), addrs


def _listening(pid: int) -> list[str]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sorted({c.laddr.ip for p in procs for c in p.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN})


def test_local_cluster_listens_on_loopback_only_even_where_8787_is_taken() -> None:
    """``local:N`` opens nothing reachable from the network, dashboard included, and starts
    without a warning where another Dask dashboard holds the default port 8787 (with dask
    2024.1 the default dashboard listened on 0.0.0.0:8787, and a taken port failed this
    suite, where warnings are errors)."""
    import socket

    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        taken.bind(("127.0.0.1", 8787))
        taken.listen()
    except OSError:
        pass  # already taken by someone else: the case this test is about
    try:
        with connect("local:1") as client:
            assert client.scheduler_info()["workers"]
            ips = _listening(os.getpid())
    finally:
        taken.close()
    assert ips and set(ips) <= {"127.0.0.1", "::1"}, ips


def test_equals_single_machine(cluster: Any, data: dict[str, Any], tmp_path: Path) -> None:
    _, client = cluster
    out = tmp_path / "out.ome.zarr"
    tpath = tmp_path / "out.transforms.json"
    res = align_distributed(data["input"], out, scheduler=client, options=OPTS,
                            transforms_path=tpath, progress=False)
    _check_equal(res, out, data)
    n = len(res.transforms)
    assert res.tasks["prepare"] == n and res.tasks["render"] == n
    assert res.tasks["match_cached"] == 0
    assert json.loads(tpath.read_text())["flagged"] == [5]
    assert res.summary()["tasks"]["render_skipped"] == 0
    # what the solve measured is reported as on one machine
    ref_summary = data["ref"].summary()
    assert ref_summary["neighbour_correlation"] is not None
    for key in ("neighbour_correlation", "neighbour_noise_discounted", "stage_motion",
                "outliers", "per_slice_affine_pct"):
        assert res.summary()[key] == ref_summary[key]


def _kill_busy_worker(client: Any, killed: list[tuple[str, list[str]]]) -> None:
    """SIGKILL the process of a worker (we started it) that has tasks in flight or holds
    prepared slices that later tasks need."""
    busy = {w: keys for w, keys in client.processing().items() if keys}
    if not busy:
        busy = {w: [k for k in keys if "prepare" in k] for w, keys in client.has_what().items()}
        busy = {w: keys for w, keys in busy.items() if keys}
    if not busy:
        return
    addr, keys = next(iter(busy.items()))
    try:
        pid = client.run(os.getpid, workers=[addr])[addr]
        os.kill(pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - the worker went away or is restarting: try next call
        return
    killed.append((addr, list(keys)))


class _SlowRender(WorkerPlugin):
    """A worker plugin that makes each render task take 0.2 s longer, so the render stage
    still has tasks in flight when the first slice comes back (on a loaded machine the whole
    stage could otherwise finish before the client sees its first result). Registered with
    the scheduler, it is set up again on a worker the nanny restarts."""

    name = "deepalign-test-slow-render"

    def setup(self, worker: Any) -> None:
        from deepalign_fast.alignment import distributed as d

        original = d.render_task

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.2)
            return original(*args, **kwargs)

        slow.original = original  # type: ignore[attr-defined]
        d.render_task = slow

    def teardown(self, worker: Any) -> None:
        from deepalign_fast.alignment import distributed as d

        d.render_task = getattr(d.render_task, "original", d.render_task)


def test_worker_killed_mid_run(cluster: Any, data: dict[str, Any], tmp_path: Path) -> None:
    import cloudpickle

    _, client = cluster
    # The plugin class lives in this test module, which workers cannot import: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    killed: list[tuple[str, list[str]]] = []
    stages: set[str] = set()

    def on_progress(stage: str, z: int) -> None:
        # One kill while estimating (prepared slices and matches in flight), one while
        # rendering (slices being written).
        if stage not in stages and z >= 1:
            before = len(killed)
            _kill_busy_worker(client, killed)
            if len(killed) > before:
                stages.add(stage)

    out = tmp_path / "out.ome.zarr"
    try:
        client.register_plugin(_SlowRender(), name=_SlowRender.name)
        try:
            res = align_distributed(data["input"], out, scheduler=client, options=OPTS,
                                    on_progress=on_progress, progress=False)
        finally:
            client.unregister_worker_plugin(_SlowRender.name)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert stages == {"solve", "render"}, killed  # both kills hit a worker with tasks
    _check_equal(res, out, data)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


class _Stop(Exception):
    pass


def test_resume_after_interruption(cluster: Any, data: dict[str, Any], tmp_path: Path) -> None:
    _, client = cluster
    out = tmp_path / "out.ome.zarr"
    work = tmp_path / "out.ome.zarr.work"

    def stop_at(stage: str, at: int) -> Any:
        def on_progress(s: str, z: int) -> None:
            if s == stage:
                on_progress.count += 1  # type: ignore[attr-defined]
                if on_progress.count >= at:  # type: ignore[attr-defined]
                    raise _Stop
        on_progress.count = 0  # type: ignore[attr-defined]
        return on_progress

    # 1. Interrupted while estimating: the matches done so far are in the work folder.
    with pytest.raises(_Stop):
        align_distributed(data["input"], out, scheduler=client, options=OPTS,
                          on_progress=stop_at("solve", 8), progress=False)
    n_cached = len(list((work / "pairs").glob("*.npz")))
    assert n_cached >= 7 and not out.exists()

    # A rerun with other options must not mix results.
    with pytest.raises(DeepAlignError, match="another input or other options"):
        align_distributed(data["input"], out, scheduler=client,
                          options=AlignOptions(model="affine", num_threads=1), progress=False)

    # 2. Resumed, then interrupted while rendering: finished slices are recorded.
    with pytest.raises(_Stop):
        align_distributed(data["input"], out, scheduler=client, options=OPTS,
                          on_progress=stop_at("render", 5), progress=False)
    assert out.with_name(out.name + ".partial").is_dir()

    # 3. Resumed to the end: cached matches are reused, rendered slices skipped.
    res = align_distributed(data["input"], out, scheduler=client, options=OPTS, progress=False)
    n = len(res.transforms)
    assert res.tasks["match"] == 0 and res.tasks["prepare"] == 0
    assert res.tasks["match_cached"] >= n - 1
    assert res.tasks["render_skipped"] >= 5
    assert res.tasks["render"] + res.tasks["render_skipped"] == n
    _check_equal(res, out, data)


def test_cli_scheduler_address(cluster: Any, data: dict[str, Any], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    lc, _ = cluster
    out = tmp_path / "cli.ome.zarr"
    rc = main(["align", str(data["input"]), "-o", str(out), "--model", "rigid", "--threads", "1",
               "--offsets", "1,2", "--scheduler", lc.scheduler_address, "--json", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["flagged"] == [5] and summary["tasks"]["render"] == summary["slices"]
    assert summary["flag_reasons"] == {"5": "blank"}
    with open_stack(out) as r:
        np.testing.assert_array_equal(np.stack([r.read(i) for i in range(len(r))]),
                                      data["ref_out"])


def test_interrupted_report_is_finished_by_the_rerun(cluster: Any, data: dict[str, Any],
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Interrupted after the output is published, while the report is written: the same
    command again writes the report without the cluster and without --overwrite."""
    import deepalign_fast.qc.report as rp

    lc, _ = cluster
    out, report = tmp_path / "o.ome.zarr", tmp_path / "r.html"
    argv = ["align", str(data["input"]), "-o", str(out), "--model", "rigid", "--threads", "1",
            "--offsets", "1,2", "--scheduler", lc.scheduler_address, "--report", str(report),
            "--json", "--quiet"]

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(rp, "write_report", interrupted)
        assert main(argv) == 130
    capsys.readouterr()
    assert out.is_dir() and not report.exists()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"]["render"] == 0 and summary["flagged"] == [5]
    assert summary["flag_reasons"] == {"5": "blank"}  # kept by the checkpoint
    assert report.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["o.ome.zarr", "o.ome.zarr.transforms.json", "r.html"])


def test_refusals(cluster: Any, data: dict[str, Any], tmp_path: Path) -> None:
    _, client = cluster
    with pytest.raises(DeepAlignError, match="Zarr"):
        align_distributed(data["input"], tmp_path / "out.tif", scheduler=client, options=OPTS)
    with pytest.raises(TypeError, match="path"):
        align_distributed(np.zeros((2, 8, 8), np.uint8), tmp_path / "o.zarr",  # type: ignore[arg-type]
                          scheduler=client)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DeepAlignError, match=r"\(transforms_path\) is the input"):
        align_distributed(data["input"], tmp_path / "o.zarr", scheduler=client, options=OPTS,
                          transforms_path=data["input"], overwrite=True)
    assert sorted(tmp_path.iterdir()) == before  # the input intact, nothing written
    for bad in ("local:0", "local:x", "127.0.0.1:8786"):
        with pytest.raises(ValueError, match="scheduler"), connect(bad):
            pass


def test_unreachable_scheduler_creates_nothing(data: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """No scheduler at the address: one line naming it (exit 1), and no work folder, output
    folder or record left behind."""
    import deepalign_fast.alignment.distributed as dist

    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)
    rc = main(["align", str(data["input"]), "-o", str(tmp_path / "new" / "o.ome.zarr"),
               "--scheduler", "tcp://127.0.0.1:1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--scheduler tcp://127.0.0.1:1" in err and "no Dask scheduler answered" in err
    assert list(tmp_path.iterdir()) == []


def test_work_dir_never_deletes_user_data(cluster: Any, data: dict[str, Any],
                                          tmp_path: Path) -> None:
    """--work-dir pointing at a folder with user files (`.`, the input's folder) is refused
    before any work and left untouched; an empty existing folder is used and kept; a new one
    is created and removed with only the tool's files."""
    _, client = cluster
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(DeepAlignError, match="not created by deepalign-fast"):
        align_distributed(data["input"], out, scheduler=client, options=OPTS, work_dir=user,
                          progress=False)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and not out.exists()
    # The CLI refuses the input's own folder (the work folder would hold the input).
    rc = main(["align", str(data["input"]), "-o", str(out), "--scheduler", "local:1",
               "--work-dir", str(data["input"].parent), "--quiet"])
    assert rc == 2 and data["input"].is_dir() and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    align_distributed(data["input"], out, scheduler=client, options=OPTS, work_dir=empty,
                      progress=False)
    assert out.is_dir() and empty.is_dir() and not any(empty.iterdir())
    fresh = tmp_path / "fresh.work"
    align_distributed(data["input"], tmp_path / "o2.ome.zarr", scheduler=client, options=OPTS,
                      work_dir=fresh, progress=False)
    assert not fresh.exists()


@pytest.mark.parametrize("left", [".deepalign-work", "manifest.json"])
def test_a_run_killed_while_making_its_work_folder_is_rerun(
        cluster: Any, data: dict[str, Any], tmp_path: Path, left: str) -> None:
    """Killed while writing the work folder's marker (the folder then held only its
    temporary file, and every rerun, --overwrite too, was refused as "not created by
    deepalign-fast"), or its manifest (the temporary file was left after the rerun, and
    blocked every later run): the rerun goes ahead and leaves nothing."""
    _, client = cluster
    out = tmp_path / "o.ome.zarr"
    work = tmp_path / "o.ome.zarr.work"
    if left == ".deepalign-work":
        work.mkdir()
    else:  # the marker in place, the manifest not yet
        with pytest.raises(_Stop):
            align_distributed(data["input"], out, scheduler=client, options=OPTS,
                              on_progress=_stop_now, progress=False)
        (work / "manifest.json").unlink()
    (work / f".{left}.tmp-4242").write_text("{")
    res = align_distributed(data["input"], out, scheduler=client, options=OPTS,
                            progress=False)
    _check_equal(res, out, data)
    align_distributed(data["input"], tmp_path / "o2.ome.zarr", scheduler=client,
                      options=OPTS, work_dir=work, progress=False)  # not blocked either


def _stop_now(stage: str, z: int) -> None:
    raise _Stop


def test_the_output_keeps_its_voxel_size(cluster: Any, data: dict[str, Any],
                                         tmp_path: Path) -> None:
    """--scheduler dropped the voxel size (--pixel-size/--unit, or the input's): the output
    records it as a single-machine run does."""
    import json

    _, client = cluster
    out = tmp_path / "o.ome.zarr"
    align_distributed(data["input"], out, scheduler=client, options=OPTS, progress=False,
                      voxel_size=(10.0, 5.0, 5.0), unit="nm")
    ref = tmp_path / "ref.ome.zarr"
    Aligner(OPTS).align_stack(data["input"], ref, progress=False, voxel_size=(10.0, 5.0, 5.0),
                              unit="nm")
    ms = [json.loads((p / ".zattrs").read_text())["multiscales"][0] for p in (out, ref)]
    assert ms[0]["axes"] == ms[1]["axes"] and ms[0]["datasets"] == ms[1]["datasets"]
    assert ms[0]["axes"][0]["unit"] == "nanometer"
    assert ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [10.0, 5.0, 5.0]


def test_a_run_killed_while_removing_its_work_folder_leaves_none(
        cluster: Any, data: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the work folder's marker was removed, before the (empty) folder: the
    rerun finished the run but left the folder for good (without its marker, not ours)."""
    import os

    _, client = cluster
    out = tmp_path / "o.ome.zarr"
    work = tmp_path / "o.ome.zarr.work"
    real = os.rmdir

    def killed(path: Any, *a: Any, **k: Any) -> None:
        if Path(path) == work:
            raise KeyboardInterrupt
        real(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "rmdir", killed)
        with pytest.raises(KeyboardInterrupt):
            align_distributed(data["input"], out, scheduler=client, options=OPTS,
                              progress=False, side_outputs=[])
    assert out.is_dir() and work.is_dir() and not any(work.iterdir())
    res = align_distributed(data["input"], out, scheduler=client, options=OPTS,
                            progress=False)
    _check_equal(res, out, data)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_of_a_local_cluster_run_prints_one_line(tmp_path: Path) -> None:
    """Ctrl-C at a terminal reaches every process of the group, the workers included: the
    run stops with status 130 and the one-line message, and no worker prints a traceback
    of its own (each printed its KeyboardInterrupt, dozens of lines)."""
    import subprocess

    import tifffile

    with open_stack(sample_stack_path()) as r:
        clean = np.stack([r.read(i)[:128, :128] for i in range(len(r))])
    src = tmp_path / "long.tif"
    tifffile.imwrite(src, np.concatenate([clean] * 80))  # long enough to be stopped
    out = tmp_path / "out.ome.zarr"

    def terminal() -> None:  # a session of its own, SIGINT as at a terminal
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "deepalign_fast", "align", str(src), "-o", str(out),
         "--scheduler", "local:2", "--threads", "1"], cwd=tmp_path, env=env,
        preexec_fn=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pairs = tmp_path / "out.ome.zarr.work" / "pairs"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                not (pairs.is_dir() and any(pairs.glob("*.npz"))):
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.skip(f"the run ended (status {proc.returncode}) before it could be "
                        f"interrupted: {proc.communicate()[1][-2000:]}")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "KeyboardInterrupt" not in err, err  # no worker's traceback
    assert err.strip().endswith("deepalign-fast: interrupted; no partial output was left "
                                "under the final name"), err
    assert not out.exists()


def test_a_local_cluster_keeps_the_configured_worker_preloads() -> None:
    """The workers' SIGINT preload comes after any the user configured (an explicit list
    would replace `distributed.worker.preload`)."""
    import dask
    from deepalign_fast.alignment import distributed as module

    with dask.config.set({"distributed.worker.preload": ["mine.setup"]}):
        assert module._preloads() == ["mine.setup", module.__name__]
    with dask.config.set({"distributed.worker.preload": "mine.setup"}):
        assert module._preloads() == ["mine.setup", module.__name__]
    with dask.config.set({"distributed.worker.preload": []}):
        assert module._preloads() == [module.__name__]


def test_bad_input_on_a_local_cluster_is_one_line(tmp_path: Path) -> None:
    """A slice of NaN read by a worker: the worker logs neither the failed task (a traceback
    of several KB) nor tifffile's diagnostics; the command prints its one line."""
    import subprocess

    import tifffile

    with open_stack(sample_stack_path()) as r:
        stack = np.stack([r.read(i)[:96, :96] for i in range(6)]).astype(np.float32)
    stack[3, 10:20, 10:20] = np.nan
    src = tmp_path / "nan.tif"
    tifffile.imwrite(src, stack)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "deepalign_fast", "align", str(src), "-o",
         str(tmp_path / "x.ome.zarr"), "--scheduler", "local:1", "--threads", "1", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "slice 3" in lines[0] and "NaN" in lines[0], done.stderr
