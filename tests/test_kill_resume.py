"""Training killed with SIGKILL (mid-stage, at a stage boundary, during a checkpoint
write) and resumed ends with the weights and metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvxmri.models.cnn import ReconCNN
from cvxmri.training.checkpoint import FAULT_VARIABLE, load_checkpoint


@pytest.fixture
def data(tiny_data: Path) -> Path:
    return tiny_data


def train(data: Path, out: Path, *extra: str, kill: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != FAULT_VARIABLE}
    if kill:
        env[FAULT_VARIABLE] = kill
    args = [
        sys.executable,
        "-m",
        "cvxmri.cli",
        "train",
        "--method",
        "layerwise-convex",
        "--preset",
        "tiny",
        "--epochs",
        "2",
        "--calib-size",
        "6",
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(args, env=env, capture_output=True, check=False).returncode


# Checkpoints of a 2-stage, 2-epoch run as (stages done, epochs done in the next stage):
# 1 = stage 1 epoch 1, 2 = end of stage 1 (the stage boundary), 3 = stage 2 epoch 1,
# 4 = end of stage 2.
CHECKPOINTS = {1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (2, 0)}


@pytest.mark.parametrize("kill", ["before:1", "during:1", "during:2", "before:3", "during:4"])
def test_killed_and_resumed_run_matches_uninterrupted(
    data: Path, tmp_path: Path, kill: str
) -> None:
    reference = tmp_path / "reference"
    assert train(data, reference) == 0
    run = tmp_path / "killed"
    assert train(data, run, kill=kill) == -signal.SIGKILL
    assert not (run / "model.pt").exists()
    # What survives is the previous checkpoint: at most the epoch in progress is lost.
    previous = int(kill.split(":")[1]) - 1
    last = run / "checkpoints" / "last.pt"
    if previous == 0:
        assert not last.exists()
    else:
        state = load_checkpoint(last)
        assert (int(state["stage"]), int(state["epoch"])) == CHECKPOINTS[previous]
    assert train(data, run, "--resume") == 0
    expected, got = ReconCNN.load(reference / "model.pt"), ReconCNN.load(run / "model.pt")
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    metrics = [json.loads((r / "metrics_val.json").read_text())["final"] for r in (reference, run)]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-6)
