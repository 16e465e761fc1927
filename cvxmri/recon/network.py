"""A trained network as a reconstruction method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cvxmri.data.sample import Sample
from cvxmri.models.cnn import to_complex


def network_reconstructor(model: nn.Module) -> Callable[[Sample], torch.Tensor]:
    """``sample -> model(x0)`` as a complex image (B, h, w) on the recon matrix,
    restricted to the coil support, in the sample's normalised units. The network runs
    on its own device (without gradients); the image comes back on the CPU."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(sample: Sample) -> torch.Tensor:
        image = to_complex(model(sample.x0.to(device)).cpu())
        return image * sample.support[:, 0]

    return run
