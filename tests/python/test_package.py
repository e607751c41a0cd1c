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


def test_the_cli_starts_without_the_heavy_imports() -> None:
    """`import deepalign_fast.cli` (what the console script runs before `main`) loads
    neither numpy nor OpenCV: they are imported inside `main`, where a Ctrl-C is one line
    (it was a traceback while the package imported them)."""
    code = ("import sys, deepalign_fast.cli; "
            "print(sorted(m for m in ('numpy', 'cv2') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "[]"


def test_ctrl_c_while_the_cli_loads_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from deepalign_fast import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["--version"]) == 130
    assert capsys.readouterr().err == "deepalign-fast: interrupted\n"


def test_public_names_load_on_first_use() -> None:
    """Every name of ``__all__`` and every subpackage resolves from the package; an unknown
    name is an AttributeError naming it."""
    for name in deepalign_fast.__all__:
        assert getattr(deepalign_fast, name) is not None, name
    assert deepalign_fast.Aligner is deepalign_fast.alignment.Aligner
    assert deepalign_fast.io.open_stack is deepalign_fast.open_stack
    with pytest.raises(AttributeError, match="no_such_name"):
        deepalign_fast.no_such_name  # noqa: B018
    namespace: dict[str, object] = {}
    exec("from deepalign_fast import *", namespace)  # noqa: S102
    assert set(deepalign_fast.__all__) <= set(namespace)
