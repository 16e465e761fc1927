"""``--data some/file.h5`` wherever data is read: every command either works on one file or
says in one line exactly what it expects."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import phantom_nifti

from cvxmri.cli import main


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvxmri: error:"), lines
    return lines[0]


def test_one_file_works_or_says_what_is_expected(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test_file = sorted((tiny_data / "multicoil_test").glob("*.h5"))[0]
    val_file = sorted((tiny_data / "multicoil_val").glob("*.h5"))[0]
    one = ["--data", str(test_file)]
    zf = ["--mask", "cartesian"]
    evaluate = ["evaluate", *one, "--method", "zero-filled", *zf]
    assert main([*evaluate, "--out", str(tmp_path / "ev")]) == 0
    assert main(["predict", "--model", "zero-filled", *one, *zf, "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / test_file.name).is_file()
    assert main(["data", "prepare", *one]) == 0
    assert main(["data", "info", str(test_file)]) == 0
    capsys.readouterr()
    # train: one file is the training data; its validation data must then be given.
    train = ["train", "--preset", "tiny", "--epochs", "1", *one]
    message = _error([*train, "--out", str(tmp_path / "t")], capsys)
    assert "is not a dataset root with a val split (multicoil_val/)" in message
    assert "--val-data" in message
    assert main([*train, "--val-data", str(val_file), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model.pt").is_file()
    capsys.readouterr()
    # reproduce needs the three splits of a dataset root.
    message = _error(["reproduce", "--preset", "tiny", *one, "--out", str(tmp_path / "r")], capsys)
    assert "one file, not a dataset root (reproduce --data takes a dataset root" in message
    assert not (tmp_path / "r").exists()
    # data info takes one file, not a folder.
    assert "a folder; 'data info' takes one .h5 file" in _error(
        ["data", "info", str(tiny_data)], capsys
    )


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--method", "zero-filled", "--mask", "cartesian"],
        ["predict", "--model", "zero-filled"],
        ["train", "--preset", "tiny"],
        ["data", "prepare"],
    ],
    ids=["evaluate", "predict", "train", "prepare"],
)
def test_missing_file_and_nifti_say_what_is_expected(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = [] if command[0] == "data" else ["--out", str(tmp_path / "out")]
    missing = tmp_path / "some" / "file.h5"
    assert f"{missing}: no such file" in _error([*command, "--data", str(missing), *out], capsys)
    nifti = phantom_nifti(tmp_path / "anatomical.nii.gz", depth=8)
    message = _error([*command, "--data", str(nifti), *out], capsys)
    assert "a NIfTI image volume, not fastMRI k-space" in message
    assert f"cvxmri data simulate --nifti {nifti} --out DIR" in message
    other = tmp_path / "notes.txt"
    other.write_text("x")
    message = _error([*command, "--data", str(other), *out], capsys)
    assert "not an .h5 file (expected a dataset root, a flat folder of .h5 files or one" in message
    assert not (tmp_path / "out").exists()
