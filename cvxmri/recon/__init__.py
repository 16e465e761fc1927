"""Reconstruction methods. Each takes a `cvxmri.data.sample.Sample` and returns complex
images (B, h, w) on its reconstruction matrix, restricted to its coil support, in the
sample's normalised units: zero-filled SENSE, compressed sensing, CG-SENSE, or a trained
network."""

from collections.abc import Callable

import torch

from cvxmri.data.sample import Sample
from cvxmri.recon.classical import (
    CLASSICAL_METHODS,
    CGSenseConfig,
    CSConfig,
    cg_sense,
    compressed_sensing,
    cs_l1_wavelet,
    cs_l1_wavelet_shifted,
    zero_filled,
)
from cvxmri.recon.network import network_reconstructor

Reconstructor = Callable[[Sample], torch.Tensor]

__all__ = [
    "CLASSICAL_METHODS",
    "CGSenseConfig",
    "CSConfig",
    "Reconstructor",
    "cg_sense",
    "compressed_sensing",
    "cs_l1_wavelet",
    "cs_l1_wavelet_shifted",
    "network_reconstructor",
    "zero_filled",
]
