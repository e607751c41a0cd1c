from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from deepalign_fast import DeepAlignError
from deepalign_fast.cli import main
from deepalign_fast.qc.bench import STAGES, available_providers, run_bench


def test_bench_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--slices", "4", "--size", "256", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    assert row["features"] == "blocks" and row["slices"] == 4 and row["shape"] == "256x256"
    assert row["flagged"] == 0
    assert row["slices_per_s"] > 0 and row["mpx_per_s"] > 0
    assert row["match_s"] > 0 and row["features_s"] > 0 and row["render_s"] > 0
    assert all(f"{s}_s" in row for s in STAGES)


def test_bench_rejects_unavailable_provider() -> None:
    if "cuda" in available_providers():
        pytest.skip("CUDA provider installed")
    with pytest.raises(DeepAlignError, match="onnxruntime-gpu"):
        run_bench(slices=2, size=128, features=("learned",), providers=("cuda",))


def test_bench_refuses_options_that_do_not_apply(tmp_path, capsys: pytest.CaptureFixture[str],
                                                tiny_stack) -> None:  # type: ignore[no-untyped-def]
    """--slices/--size shape the synthetic stack only (they were ignored with a stack given);
    a model that does not exist is refused by the parser (it failed inside the child run)."""
    assert main(["bench", str(tiny_stack), "--slices", "4"]) == 2
    assert "--slices and --size shape the synthetic stack" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "bogus"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_a_killed_bench_leaves_no_run_and_no_folder(tmp_path, monkeypatch) -> None:
    """`kill -9` of bench: its running align gets SIGTERM (was: it went on alone), and the
    next bench removes the dead one's temporary folder, never a live one's."""
    import os
    import subprocess
    import tempfile
    import time

    from deepalign_fast.qc import bench

    parent = subprocess.Popen(  # noqa: S603 - a bench-like parent: one child, then waits
        [sys.executable, "-c",
         "import functools, os, subprocess; from deepalign_fast.qc.bench import _with_parent; "
         "p = subprocess.Popen(['sleep', '60'], "
         "preexec_fn=functools.partial(_with_parent, os.getpid())); "
         "print(p.pid, flush=True); p.wait()"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            sys.path)})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.stdout.close()
    parent.kill()
    parent.wait()

    def running(pid: int) -> bool:  # (a zombie waiting for init counts as gone)
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and running(child):
        time.sleep(0.05)
    assert not running(child)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],  # noqa: S603
                          capture_output=True, text=True, check=True)
    import socket

    host = socket.gethostname()
    dead = tmp_path / f"{bench._TEMP_PREFIX}{int(gone.stdout)}@{host}-abc"
    live = tmp_path / f"{bench._TEMP_PREFIX}{os.getpid()}@{host}-def"
    elsewhere = tmp_path / f"{bench._TEMP_PREFIX}{int(gone.stdout)}@not-{host}-ghi"
    other = tmp_path / f"{bench._TEMP_PREFIX}old-style"
    for folder in (dead, live, elsewhere, other):
        folder.mkdir()
        (folder / "synthetic.tif").write_bytes(b"x")
    bench._remove_stale_temps()
    assert not dead.exists() and live.exists() and elsewhere.exists() and other.exists()
    assert bench._temp_prefix().startswith(f"{bench._TEMP_PREFIX}{os.getpid()}@{host}-")
