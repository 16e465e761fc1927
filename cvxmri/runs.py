"""Run folders: every command that produces results writes its resolved config, a log and
its metrics into one folder, and the folder appears only when the run succeeded."""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from cvxmri import __version__
from cvxmri.config import save_yaml
from cvxmri.errors import CvxmriError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
def logging_to(path: Path) -> Iterator[None]:
    """Log INFO and above into ``path`` (a run's ``log.txt``) while inside, starting with
    the `environment`; the file is closed on the way out."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logging.getLogger(__name__).info("environment: %s", environment())
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


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
    try:
        save_yaml(config, partial / "config.yaml")
        with logging_to(partial / "log.txt"):
            yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what
    creating ``path`` adds, and what a failure removes again."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


@contextmanager
def staged_files(
    out: Path, names: Sequence[str], overwrite: bool = False
) -> Iterator[Callable[[str], Path]]:
    """Write the files ``names`` into the folder ``out``, all or none of them.

    Yields ``stage(name)``: the hidden temporary path in ``out`` to write file ``name``
    to. When the block ends without error every staged file is renamed to its name; on
    any failure the staged files are removed, and so is ``out`` (with the parents this
    call created) when it did not exist before. Other files in ``out`` are left alone.
    A file of one of these names already in ``out`` is refused up front unless
    ``overwrite`` (then replaced at the end); a folder of one of these names always is.
    """
    names = list(names)
    if out.exists() and not out.is_dir():
        raise CvxmriError(f"{out}: exists and is not a folder")
    folders = [name for name in names if (out / name).is_dir()]
    if folders:
        raise CvxmriError(f"{out / folders[0]}: a folder where an output file goes")
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more of the outputs" if len(existing) > 1 else ""
        them = "them" if more else "it"
        raise CvxmriError(
            f"{out}: already holds {existing[0]}{more} (use --force to replace {them})"
        )
    created = first_missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CvxmriError(f"{out}: cannot create the output folder ({err.strerror})") from None
    staged: dict[str, Path] = {}

    def stage(name: str) -> Path:
        if name not in names:
            raise ValueError(f"{name} is not one of the outputs announced")
        staged[name] = out / f".partial-{os.getpid()}-{name}"
        return staged[name]

    try:
        yield stage
        for name, path in staged.items():
            os.replace(path, out / name)
    except BaseException:
        for path in staged.values():
            path.unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def certificate_traces(folder: Path) -> list[dict[str, Any]]:
    """The relative duality gap of every convex stage (or greedy unrolled iteration) of a
    training run against the seconds spent on it, from the run's files: per stage
    ``{"stage", "seconds": [...], "relative_gap": [...]}``, ascending in time.

    A certified stage's beta path (``certificates.json`` entries with a ``trace``) is laid
    end to end: each beta's trace starts where the previous betas' solves ended (the
    solver's set-up, such as building a Gram matrix, is not counted). An Adam stage's points
    are its epochs with a certificate (``history.csv``), at the stage's summed epoch times
    (training, validation and certificates). A run without convex stages has none."""
    certificates = folder / "certificates.json"
    entries = json.loads(certificates.read_text()) if certificates.is_file() else []
    traces: dict[int, dict[str, Any]] = {}
    spent: dict[int, float] = {}
    for entry in entries:
        if "trace" not in entry:
            continue
        stage = int(entry["stage"])
        trace = traces.setdefault(stage, {"stage": stage, "seconds": [], "relative_gap": []})
        offset = spent.get(stage, 0.0)
        for seconds, gap in entry["trace"]:
            trace["seconds"].append(offset + float(seconds))
            trace["relative_gap"].append(float(gap))
        spent[stage] = offset + float(entry["seconds"])
    history = folder / "history.csv"
    if not traces and history.is_file():
        with history.open(newline="") as handle:
            for row in csv.DictReader(handle):
                stage = int(row["stage"])
                spent[stage] = spent.get(stage, 0.0) + float(row["seconds"])
                if row.get("cert_relative_gap"):
                    trace = traces.setdefault(
                        stage, {"stage": stage, "seconds": [], "relative_gap": []}
                    )
                    trace["seconds"].append(spent[stage])
                    trace["relative_gap"].append(float(row["cert_relative_gap"]))
    return [traces[stage] for stage in sorted(traces)]
