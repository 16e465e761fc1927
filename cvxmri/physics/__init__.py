"""MRI physics: the centred FFT and the linear operators of the forward model, in 2D or 3D."""

from cvxmri.physics.fft import fft2c, fftnc, ifft2c, ifftnc, spatial_dims
from cvxmri.physics.operators import (
    FFT,
    FFT2,
    CenterCrop,
    LinearOperator,
    Mask,
    Sense,
    center_crop,
)

__all__ = [
    "FFT",
    "FFT2",
    "CenterCrop",
    "LinearOperator",
    "Mask",
    "Sense",
    "center_crop",
    "fft2c",
    "fftnc",
    "ifft2c",
    "ifftnc",
    "spatial_dims",
]
