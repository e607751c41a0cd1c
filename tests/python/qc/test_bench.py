from __future__ import annotations

import json

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
