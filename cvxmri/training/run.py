"""One training run in its folder: config, log, checkpoints, exported network, metrics."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from cvxmri.config import save_yaml, to_dict
from cvxmri.errors import CvxmriError
from cvxmri.runs import environment
from cvxmri.training.config import TrainConfig
from cvxmri.training.trainer import Trainer, write_outputs

log = logging.getLogger(__name__)


def train(
    config: TrainConfig, out: Path, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train into ``out`` and return the validation metrics.

    A new run needs a new (or, with ``force``, replaced) folder; ``resume`` continues the
    run in ``out`` from its last checkpoint and requires the same configuration.
    """
    config.validate()
    if out.exists() and not resume:
        if not force:
            raise CvxmriError(f"{out}: run folder already exists (use --resume or --force)")
        shutil.rmtree(out)
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise CvxmriError(f"{out}: nothing to resume (no config.yaml)")
        if yaml.safe_load(saved.read_text()) != to_dict(config):
            raise CvxmriError(f"{out}: the run was started with another configuration")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CvxmriError(f"{out}: cannot create the run folder ({err.strerror})") from None
    save_yaml(config, out / "config.yaml")
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        log.info("environment: %s", environment())
        trainer = Trainer(config, out)
        model = trainer.fit()
        return write_outputs(trainer, model)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
