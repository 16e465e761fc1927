"""MRI physics: the centred FFT and the linear operators of the forward model."""

from cvxmri.physics.fft import fft2c, ifft2c
from cvxmri.physics.operators import (
    FFT2,
    CenterCrop,
    LinearOperator,
    Mask,
    Sense,
    center_crop,
)

__all__ = [
    "FFT2",
    "CenterCrop",
    "LinearOperator",
    "Mask",
    "Sense",
    "center_crop",
    "fft2c",
    "ifft2c",
]
