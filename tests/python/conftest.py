from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deepalign_fast import datasets

# The exact references in oracles/ import as top-level modules (only that folder goes on the
# path: the test folders are named like packages, e.g. onnx/, and must not shadow them).
sys.path.insert(0, str(Path(__file__).parent / "oracles"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def num_threads(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _loader(fn, **kw):
    try:
        return fn(**kw)
    except datasets.DataUnavailable as exc:
        pytest.skip(f"shared EM data unavailable: {exc}")


@pytest.fixture(scope="session")
def lucchi():
    return _loader(datasets.load_lucchi, labels=True)


@pytest.fixture(scope="session")
def isbi():
    return _loader(datasets.load_isbi2012, labels=True)


@pytest.fixture(scope="session")
def drosophila():
    return _loader(datasets.load_drosophila, labels=True)


#: The tiny test stack (8 x 224 x 224 uint8, a crop of the bundled sample with known integer
#: offsets per slice; tests/data/README.md): runs on a clean clone without the shared data.
TINY_STACK = Path(__file__).resolve().parents[1] / "data" / "tiny_stack.tif"


@pytest.fixture
def tiny_stack() -> Path:
    return TINY_STACK


@contextlib.contextmanager
def _lock_held(output: Path) -> Iterator[int]:
    """Another process holding ``output``'s lock (:func:`deepalign_fast.outputs.output_lock`)
    for the block; yields its pid and kills it (SIGKILL: the lock file stays) at the end."""
    import deepalign_fast

    package_parent = str(Path(deepalign_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_parent, *filter(None, [os.environ.get("PYTHONPATH")])])}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from deepalign_fast.outputs import output_lock
        with output_lock([{str(output)!r}]):
            print("locked", flush=True)
            time.sleep(60)
    """)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.communicate()


@pytest.fixture
def lock_held() -> Callable[[Path], contextlib.AbstractContextManager[int]]:
    """``with lock_held(output) as pid:``: another process holds ``output``'s lock."""
    return _lock_held


@pytest.fixture
def nan_flow_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[int]]:
    """``nan_flow_at(k)``: the learned flow's ``k``-th prediction (counted from 1) is all
    NaN: in a stack, the flow between slices k - 1 and k, so both their elastic refinements
    fail; returns the list of calls (clear it to count again)."""
    def arm(k: int) -> list[int]:
        from deepalign_fast.refine import flow

        real = flow.FlowPredictor.predict
        calls: list[int] = []

        def predict(self: Any, previous: Any, moving: Any) -> Any:
            calls.append(1)
            out = real(self, previous, moving)
            return out * np.nan if len(calls) == k else out

        monkeypatch.setattr(flow.FlowPredictor, "predict", predict)
        return calls
    return arm
