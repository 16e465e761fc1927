"""One training run in its folder: config, log, checkpoints, exported network, metrics."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cvxmri import distributed
from cvxmri.config import save_yaml, to_dict
from cvxmri.errors import CvxmriError
from cvxmri.runs import environment, first_missing
from cvxmri.training.config import TrainConfig
from cvxmri.training.trainer import Trainer, check_resumable, resolve_device, write_outputs
from cvxmri.training.unrolled import UnrolledTrainer

log = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    out: Path,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train into ``out`` and return the validation metrics.

    A new run needs a new (or, with ``force``, replaced) folder; ``resume`` continues the
    run in ``out`` from its last checkpoint and requires the same configuration, except
    that an end-to-end run may be given more ``optim.epochs`` than it was started with:
    it then continues (a finished run too) to the new count, with the weights a run
    started with that count would have (the schedule depends on the epoch only).

    A failed run leaves nothing behind: the settings and the device are checked before the
    folder is created, and a folder this call created is removed again if the run fails
    before its first checkpoint (after that, the run is resumable and kept).

    ``progress`` is called with every history row (`Trainer`).

    Under torchrun every process runs this with the same arguments; the checks are made by
    all of them before the folder changes, and only rank 0 writes (`cvxmri.distributed`)
    and returns the metrics (the others an empty dict).
    """
    config.validate()
    resolve_device(config.device)
    if out.exists() and not resume and not force:
        raise CvxmriError(f"{out}: run folder already exists (use --resume or --force)")
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise CvxmriError(f"{out}: nothing to resume (no config.yaml)")
        check_resumable(yaml.safe_load(saved.read_text()), to_dict(config), out)
    distributed.barrier()
    main = distributed.is_main()
    if main and out.exists() and not resume:
        shutil.rmtree(out)
    created = first_missing(out)
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CvxmriError(f"{out}: cannot create the run folder ({err.strerror})") from None
    handler = None
    try:
        if main:
            save_yaml(config, out / "config.yaml")
            handler = logging.FileHandler(out / "log.txt")
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            logging.getLogger().addHandler(handler)
            log.info("environment: %s", environment())
        distributed.barrier()
        trainer = (
            UnrolledTrainer(config, out, progress)
            if config.arch == "unrolled"
            else Trainer(config, out, progress)
        )
        model = trainer.fit()
        metrics = write_outputs(trainer, model) if main else {}
        distributed.barrier()
        return metrics
    except BaseException:
        if main and created is not None and not (out / "checkpoints" / "last.pt").exists():
            _close(handler)
            handler = None
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        _close(handler)


def _close(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
