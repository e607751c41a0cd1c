from __future__ import annotations

import subprocess
import sys

import deepalign_fast
import pytest
from deepalign_fast import _core
from deepalign_fast.cli import main


def test_core_imports() -> None:
    assert _core.hardware_threads() >= 1


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert deepalign_fast.__version__ in capsys.readouterr().out


def test_cli_help_lists_program(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "deepalign-fast" in capsys.readouterr().out


def test_python_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deepalign_fast", "--version"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.startswith("deepalign-fast ")
