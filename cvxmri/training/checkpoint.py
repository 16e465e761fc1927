"""Training checkpoints: written atomically (temporary file, flush, fsync, rename) and read
with ``torch.load(weights_only=True)``, so a damaged or hostile file cannot run code."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch

from cvxmri.errors import CvxmriError, describe_load_error

FORMAT = "cvxmri.checkpoint/1"
# Fault injection for the kill-and-resume test: "before:N" kills the process (SIGKILL) when
# the N-th checkpoint of the run is about to be written, "during:N" after its temporary
# file is written and before the rename. Unset in normal use.
FAULT_VARIABLE = "CVXMRI_TEST_KILL_AT"
_saves = [0]


def _maybe_kill(phase: str) -> None:
    spec = os.environ.get(FAULT_VARIABLE, "")
    if spec and spec == f"{phase}:{_saves[0]}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _saves[0] += 1
    _maybe_kill("before")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _maybe_kill("during")
        tmp.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; one-line error if it is not one."""
    if not path.is_file():
        raise CvxmriError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        reason = describe_load_error(err)
        raise CvxmriError(f"{path}: not a readable cvxmri checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CvxmriError(f"{path}: not a cvxmri checkpoint (format {FORMAT} expected)")
    return state
