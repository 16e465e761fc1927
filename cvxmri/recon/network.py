"""A trained network as a reconstruction method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cvxmri.data.sample import Sample
from cvxmri.models.cnn import to_complex
from cvxmri.models.unrolled import UnrolledNet


def network_reconstructor(model: nn.Module) -> Callable[[Sample], torch.Tensor]:
    """``sample -> model(x0)`` (an `UnrolledNet`: ``model(x0, y, mask, maps)``) as a complex
    image (B, h, w) on the recon matrix ((B, x, y, z): a 3D network on whole volumes),
    restricted to the coil support, in the sample's normalised units. The network runs on
    its own device (without gradients); the image comes back on the CPU."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(sample: Sample) -> torch.Tensor:
        on = sample.to(device)
        if isinstance(model, UnrolledNet):
            output = model(on.x0, on.y, on.mask, on.maps)
        else:
            output = model(on.x0)
        return to_complex(output.cpu(), sample.ndim) * sample.support[:, 0]

    return run
