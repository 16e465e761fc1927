"""The README's Python blocks run as written (the second on the tiny dataset), and the public
API names what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import cvxmri

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def run_block(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter (warnings are errors); its standard output."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_first_block_trains_on_tensors_and_reconstructs(tmp_path: Path) -> None:
    code = python_blocks()[0]
    assert len(code.strip().splitlines()) < 30
    assert "DataLoader" in code and "layerwise-convex" in code
    out = run_block(code, tmp_path)
    match = re.search(r"(\d+) layers; error ([\d.]+) \(input\) -> ([\d.]+) \(network\)", out)
    assert match, out
    layers, before, after = int(match[1]), float(match[2]), float(match[3])
    assert layers == 3
    # The trained network removes a good part of the corruption.
    assert after < 0.85 * before


def test_second_block_runs_on_fastmri_files(tiny_data: Path, tmp_path: Path) -> None:
    # The tiny dataset's 24x24 grid needs a smaller calibration square than the default 16x16.
    code = python_blocks()[1].replace('"data/default"', repr(str(tiny_data)))
    code = code.replace('MaskSpec("poisson", 4.0)', 'MaskSpec("poisson", 4.0, calib_size=(6, 6))')
    assert "calib_size=(6, 6)" in code
    out = run_block(code, tmp_path)
    match = re.search(r"PSNR ([\d.]+) dB", out)
    assert match, out
    assert 10 < float(match[1]) < 80


@pytest.mark.parametrize("name", cvxmri.__all__[1:])
def test_public_names_are_documented(name: str) -> None:
    assert getattr(cvxmri, name).__doc__


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = cvxmri.no_such_thing
