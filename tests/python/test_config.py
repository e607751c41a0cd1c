"""align --config: options from a config file or an earlier run's transforms file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast import TransformSet
from deepalign_fast.cli import main


@pytest.fixture
def src(tmp_path: Path) -> Path:
    import cv2

    rng = np.random.default_rng(3)
    big = cv2.GaussianBlur((rng.random((100, 120)) * 255).astype(np.float32), (0, 0), 2.0)
    stack = np.stack([np.roll(big, (z % 3, 0), axis=(0, 1))[8:-8, 8:-8] for z in range(6)])
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack.astype(np.uint8), photometric="minisblack")
    return path


def _options(transforms: Path) -> dict:
    return TransformSet.load(transforms).options


def test_defaults_round_trip_and_flags_win(src: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--defaults"]) == 0
    defaults = json.loads(capsys.readouterr().out)
    assert defaults["slow_drift"] == "keep" and defaults["offsets"] == [1, 2, 4, 8]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**defaults, "slow_drift": "follow", "offsets": [1, 2],
                               "min_matches": 9}))
    assert main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--config", str(cfg),
                 "--quiet"]) == 0
    used = _options(tmp_path / "a.transforms.json")
    assert used["slow_drift"] == "follow" and list(used["offsets"]) == [1, 2]
    assert used["min_matches"] == 9
    assert main(["align", str(src), "-o", str(tmp_path / "b.tif"), "--config", str(cfg),
                 "--slow-drift", "keep", "--quiet"]) == 0
    assert _options(tmp_path / "b.transforms.json")["slow_drift"] == "keep"
    # Re-run from the first run's transforms file: the same options, the same transforms.
    assert main(["align", str(src), "-o", str(tmp_path / "c.tif"), "--config",
                 str(tmp_path / "a.transforms.json"), "--quiet"]) == 0
    assert _options(tmp_path / "c.transforms.json") == used
    np.testing.assert_allclose(TransformSet.load(tmp_path / "c.transforms.json").affines,
                               TransformSet.load(tmp_path / "a.transforms.json").affines)


def test_bad_config_files(src: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    for name, text, expect in [("u.json", '{"drift": "all"}', "unknown option"),
                               ("j.json", "{not json", "not valid JSON"),
                               ("l.json", "[1, 2]", "expected an object")]:
        (tmp_path / name).write_text(text)
        assert main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--config",
                     str(tmp_path / name), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert expect in err and name in err
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize(("text", "words"), [
    ("threshold: [1, 2]", "threshold must be a number, got [1, 2] (list)"),
    ("threshold: true", "threshold must be a number, got True (bool)"),
    ("min_matches: 2.5", "min_matches must be an integer, got 2.5"),
    ("offsets: 3", "offsets must be a list of integers, got 3"),
    ("offsets: [1, x]", "offsets must be a list of integers"),
    ("model: 5", "model must be one of translation, rigid"),
    ("model: foo", "model must be one of translation, rigid"),
    ("masks: [m.tif]", "masks must be a path"),
    ("drift_sigma: -1", "drift_sigma must be a finite number > 0"),
    ("regularise: strong", 'regularise must be "auto" or a number, got \'strong\''),
    ("regularise: -0.1", 'regularise must be "auto" or a finite number >= 0'),
    ("threshold: [1", "not valid YAML"),
])
def test_config_values_of_the_wrong_type(src: Path, tmp_path: Path, text: str, words: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Each value of a config file is checked against its option's type and range: one line
    naming the file, the option and what it takes (was: 'unexpected TypeError')."""
    pytest.importorskip("yaml")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    assert main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--config", str(cfg),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: (--config)" in err and words in err, err


def test_binary_file_as_config(src: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """A TIFF passed as --config: one line (was: a UnicodeDecodeError traceback)."""
    assert main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--config", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a JSON or YAML config file" in err and src.name in err


def test_options_check_types() -> None:
    from deepalign_fast import AlignOptions

    with pytest.raises(TypeError, match=r"threshold must be a number, got \[1, 2\]"):
        AlignOptions(threshold=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_threads must be an integer"):
        AlignOptions(num_threads=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='regularise must be "auto" or a number'):
        AlignOptions(regularise="strong")  # type: ignore[arg-type]
    assert AlignOptions().regularise == "auto"
    assert AlignOptions(regularise=0).regularise == 0
    assert AlignOptions(offsets=[2, 1], threshold=np.float32(3), min_matches=np.int64(9)) \
        == AlignOptions(offsets=(1, 2), threshold=3.0, min_matches=9)  # type: ignore[arg-type]


def test_align_flags_are_generated_from_the_options() -> None:
    """Every AlignOptions field is an align flag with the same name (num_threads: --threads)
    and default, and its help is the field's documentation."""
    import dataclasses

    from deepalign_fast import AlignOptions
    from deepalign_fast.alignment.options import option_docs
    from deepalign_fast.cli import build_parser, options_from_args

    parser = build_parser()
    args = parser.parse_args(["align", "in.tif", "-o", "out.tif"])
    assert options_from_args(args) == AlignOptions()
    values = {"min_matches": 20, "field_stride": 8, "drift_sigma": 12.0, "offsets": (1, 3),
              "slow_drift": "follow", "num_threads": 1, "masks": "m.tif", "mode": "elastic",
              "regularise": 0.01}
    argv = ["align", "in.tif", "-o", "out.tif"]
    for name, value in values.items():
        flag = "--threads" if name == "num_threads" else "--" + name.replace("_", "-")
        argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    assert options_from_args(parser.parse_args(argv)) == AlignOptions(**values)
    auto = parser.parse_args(["align", "in.tif", "-o", "out.tif", "--regularise", "auto"])
    assert options_from_args(auto).regularise == "auto"
    sub = next(a for a in parser._actions if a.dest == "command").choices["align"]
    helps = {a.dest: a.help or "" for a in sub._actions}
    for f in dataclasses.fields(AlignOptions):
        assert f.name in helps
        words = [w for w in option_docs()[f.name].split() if w.isalpha()]
        assert max(words, key=len) in helps[f.name], (f.name, helps[f.name])


def test_regularise_flag_takes_auto_or_a_number(src: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--regularise", "strong"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--regularise: expected \"auto\" or a number, got 'strong'" in err
    assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "o.tif").exists()


def test_a_relative_masks_path_is_read_beside_the_config(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A config written next to its masks works from any folder (the path was read from the
    current folder, and the error did not name the config)."""
    from deepalign_fast.alignment.options import load_options_file

    project = tmp_path / "project"
    (project / "masks").mkdir(parents=True)
    config = project / "run.json"
    config.write_text(json.dumps({"mode": "expected-affine", "masks": "masks"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_options_file(config)["masks"] == str(project / "masks")
    (elsewhere / "here").mkdir()  # only the current folder has it: taken from there
    config.write_text(json.dumps({"mode": "expected-affine", "masks": "here"}))
    assert load_options_file(config)["masks"] == "here"
    config.write_text(json.dumps({"mode": "expected-affine", "masks": str(elsewhere)}))
    assert load_options_file(config)["masks"] == str(elsewhere)


def test_the_config_file_is_an_input_never_replaced(src: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--config names a file the command reads: no output may replace it, --overwrite or not
    (was: `--transforms cfg.json --overwrite` wrote the transforms over the config file)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"offsets": [1, 2]}))
    before = cfg.read_bytes()
    for extra in (["--transforms", str(cfg)], ["--report", str(cfg)]):
        assert main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--config", str(cfg),
                     *extra, "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is the input {cfg}" in err, err
        assert cfg.read_bytes() == before and not (tmp_path / "o.tif").exists()
    # An earlier run's transforms file re-runs the options into new outputs, but is not
    # replaced by the re-run's own transforms (the default name beside the same output).
    out = tmp_path / "a.tif"
    assert main(["align", str(src), "-o", str(out), "--quiet"]) == 0
    first = (tmp_path / "a.transforms.json").read_bytes()
    assert main(["align", str(src), "-o", str(out), "--config",
                 str(tmp_path / "a.transforms.json"), "--overwrite", "--quiet"]) == 2
    assert "(--transforms) is the input" in capsys.readouterr().err
    assert (tmp_path / "a.transforms.json").read_bytes() == first
