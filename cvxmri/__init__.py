"""cvxmri: undersampled MRI reconstruction with CNNs trained layer-wise by convex programs.

The public API, importable as ``cvxmri.<name>``:

- models: `ReconCNN` (the network, an ordinary ``nn.Module``), `ConvexStage` (the convex
  program of one stage) and `ConvexStageConfig`, the stage interface `Stage`, `StageSpec`
  and its factory `build_stage`, `duality_gap` (the optimality certificate);
- training: `fit_layerwise` and `fit_end_to_end` (any iterable of ``(x0, target)``
  batches in, a `ReconCNN` out), `OptimConfig`; `TrainConfig` and `train` for a run folder
  with checkpoints and logs (what ``cvxmri train`` runs);
- data: `SliceDataset` (lazy, over fastMRI-layout HDF5 files), `Sample`, `make_sample`,
  `collate_samples`, `TrainingPairs`;
- masks: `MaskSpec`, `poisson_disc_mask`, `cartesian_random_mask`, `equispaced_mask`,
  `uniform_random_mask`;
- physics: `Sense`, `FFT`, `Mask`, `CenterCrop`, `fftnc`, `ifftnc`;
- reconstruction: `zero_filled`, `compressed_sensing`, `CSConfig`, `cg_sense`,
  `CGSenseConfig`, `network_reconstructor` (each takes a `Sample` and returns the image
  on the reconstruction matrix);
- metrics: `psnr`, `ssim`, `nmse`, `volume_metrics`, `slice_metrics` (fastMRI's
  conventions).

Names are imported on first use, so ``import cvxmri`` (and the command line) stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ReconCNN": "cvxmri.models.cnn",
    "ConvexStage": "cvxmri.models.convex",
    "ConvexStageConfig": "cvxmri.models.convex",
    "duality_gap": "cvxmri.models.convex",
    "Stage": "cvxmri.models.stages",
    "StageSpec": "cvxmri.models.stages",
    "build_stage": "cvxmri.models.stages",
    "fit_layerwise": "cvxmri.training.fit",
    "fit_end_to_end": "cvxmri.training.fit",
    "OptimConfig": "cvxmri.training.config",
    "TrainConfig": "cvxmri.training.config",
    "train": "cvxmri.training.run",
    "SliceDataset": "cvxmri.data.dataset",
    "TrainingPairs": "cvxmri.data.dataset",
    "Sample": "cvxmri.data.sample",
    "make_sample": "cvxmri.data.sample",
    "collate_samples": "cvxmri.data.sample",
    "MaskSpec": "cvxmri.masks",
    "poisson_disc_mask": "cvxmri.masks",
    "cartesian_random_mask": "cvxmri.masks",
    "equispaced_mask": "cvxmri.masks",
    "uniform_random_mask": "cvxmri.masks",
    "Sense": "cvxmri.physics",
    "FFT": "cvxmri.physics",
    "Mask": "cvxmri.physics",
    "CenterCrop": "cvxmri.physics",
    "fftnc": "cvxmri.physics",
    "ifftnc": "cvxmri.physics",
    "zero_filled": "cvxmri.recon",
    "compressed_sensing": "cvxmri.recon",
    "CSConfig": "cvxmri.recon",
    "cg_sense": "cvxmri.recon",
    "CGSenseConfig": "cvxmri.recon",
    "network_reconstructor": "cvxmri.recon",
    "psnr": "cvxmri.metrics",
    "ssim": "cvxmri.metrics",
    "nmse": "cvxmri.metrics",
    "volume_metrics": "cvxmri.metrics",
    "slice_metrics": "cvxmri.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cvxmri' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names (`__all__`)."""
    return sorted(__all__)
