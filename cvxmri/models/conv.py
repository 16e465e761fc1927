"""The one table of convolution functions by number of spatial dimensions.

Every model in `cvxmri.models` takes ``ndim`` (2: images ``(B, C, H, W)``, 3: volumes
``(B, C, D, H, W)``) and gets its convolutions from `conv_ops`, so 2D and 3D share one code
path and no other module names a dimension-specific convolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvxmri.errors import CvxmriError

NDIMS = (2, 3)


@dataclass(frozen=True)
class ConvOps:
    """The convolution functions of one number of spatial dimensions.

    Attributes:
        ndim: spatial dimensions (2 or 3).
        conv: the functional convolution (``F.conv2d`` / ``F.conv3d``).
        conv_weight: the gradient of a convolution in its weight
            (``torch.nn.grad.conv2d_weight`` / ``conv3d_weight``).
        module: the convolution layer (``nn.Conv2d`` / ``nn.Conv3d``).
        channels_last: the channels-last memory format of a batch
            (``torch.channels_last`` / ``torch.channels_last_3d``).
    """

    ndim: int
    conv: Callable[..., torch.Tensor]
    conv_weight: Callable[..., torch.Tensor]
    module: type[nn.Conv2d] | type[nn.Conv3d]
    channels_last: torch.memory_format


_OPS = {
    2: ConvOps(2, F.conv2d, torch.nn.grad.conv2d_weight, nn.Conv2d, torch.channels_last),
    3: ConvOps(3, F.conv3d, torch.nn.grad.conv3d_weight, nn.Conv3d, torch.channels_last_3d),
}


def conv_ops(ndim: int) -> ConvOps:
    """The convolution functions for ``ndim`` spatial dimensions (2 or 3)."""
    if isinstance(ndim, bool) or ndim not in _OPS:
        raise CvxmriError(f"ndim must be one of {NDIMS}, got {ndim!r}")
    return _OPS[ndim]


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a batch) in the memory layout that its convolutions run fastest in on its
    device: channels-last on the CPU, whose oneDNN kernels for a convolution of a
    2-channel image run several times slower on the contiguous layout
    (`benchmarks/bench_layout.py`; docs/benchmarks.md, "Line searches in the convex
    iterations, channels-last convolutions"); unchanged on other devices."""
    if x.device.type != "cpu":
        return x
    return x.contiguous(memory_format=conv_ops(x.dim() - 2).channels_last)
