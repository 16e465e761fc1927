"""Run folders: every command that produces results writes its resolved config, a log and
its metrics into one folder, and the folder appears only when the run succeeded."""

from __future__ import annotations

import logging
import platform
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from cvxmri import __version__
from cvxmri.config import save_yaml
from cvxmri.errors import CvxmriError


def default_run_dir(kind: str) -> Path:
    """``runs/<kind>-<date>-<time>``."""
    return Path("runs") / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}"


def environment() -> dict[str, str]:
    """Software and machine, for the record."""
    return {
        "cvxmri": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "command": " ".join(sys.argv),
    }


@contextmanager
def run_folder(out: Path, config: Any, overwrite: bool = False) -> Iterator[Path]:
    """Create ``out`` through a ``.partial`` sibling: config and log are written at once,
    results by the caller; on success the folder is renamed into place, on failure it is
    removed, so no half-written run is left behind."""
    if out.exists() and not overwrite:
        raise CvxmriError(f"{out}: output folder already exists (use --force to replace it)")
    partial = out.with_name(f".{out.name}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    except OSError as err:
        raise CvxmriError(f"{out}: cannot create the output folder ({err.strerror})") from None
    save_yaml(config, partial / "config.yaml")
    handler = logging.FileHandler(partial / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    logging.getLogger(__name__).info("environment: %s", environment())
    try:
        yield partial
    except BaseException:
        root.removeHandler(handler)
        handler.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    root.removeHandler(handler)
    handler.close()
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
