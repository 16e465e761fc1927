"""Training killed with SIGKILL (mid-stage, at a stage boundary, during a checkpoint
write) and resumed ends with the weights and metrics of an uninterrupted run; two runs with
the same seed in fresh processes are bitwise identical."""

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


def train(
    data: Path,
    out: Path,
    *extra: str,
    kill: str | None = None,
    method: str = "layerwise-convex",
) -> int:
    env = {k: v for k, v in os.environ.items() if k != FAULT_VARIABLE}
    if kill:
        env[FAULT_VARIABLE] = kill
    args = [
        sys.executable,
        "-m",
        "cvxmri.cli",
        "train",
        "--method",
        method,
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


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every killed run is compared with (trained once)."""
    out = tmp_path_factory.mktemp("kill") / "reference"
    assert train(tiny_data, out) == 0
    return out


@pytest.mark.parametrize("kill", ["before:1", "during:1", "during:2", "before:3", "during:4"])
def test_killed_and_resumed_run_matches_uninterrupted(
    data: Path, reference: Path, tmp_path: Path, kill: str
) -> None:
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
        assert torch.equal(a, b), name
    metrics = [json.loads((r / "metrics_val.json").read_text())["final"] for r in (reference, run)]
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("method", ["layerwise-convex", "layerwise-nonconvex", "end-to-end"])
def test_same_seed_gives_bitwise_identical_runs(data: Path, tmp_path: Path, method: str) -> None:
    """Each run in its own process, as a user runs them: identical weights and metrics, to
    the bit (within one process, oneDNN's first calls may round differently)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert train(data, run, method=method) == 0
    weights = [ReconCNN.load(run / "model.pt").state_dict() for run in runs]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    metrics = [json.loads((run / "metrics_val.json").read_text()) for run in runs]
    assert metrics[0]["by_depth"] == metrics[1]["by_depth"]
    history = [(run / "history.csv").read_text().splitlines() for run in runs]
    # Identical but for the wall-clock seconds column.
    drop = history[0][0].split(",").index("seconds")
    rows = [[line.split(",")[:drop] for line in h] for h in history]
    assert rows[0] == rows[1]
