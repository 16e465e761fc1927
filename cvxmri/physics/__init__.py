"""MRI physics: the centred FFT and the linear operators of the forward model, in 2D or 3D."""

from cvxmri.physics.cg import chebyshev, conjugate_gradient
from cvxmri.physics.fft import fft2c, fftnc, ifft2c, ifft_readout, ifftnc, spatial_dims
from cvxmri.physics.operators import (
    FFT,
    FFT2,
    CenterCrop,
    LinearOperator,
    Mask,
    Sense,
    apply_lines,
    center_crop,
    line_inverse,
    line_normals,
    recon_sense,
)

__all__ = [
    "FFT",
    "FFT2",
    "CenterCrop",
    "LinearOperator",
    "Mask",
    "Sense",
    "apply_lines",
    "center_crop",
    "chebyshev",
    "conjugate_gradient",
    "fft2c",
    "fftnc",
    "ifft2c",
    "ifft_readout",
    "ifftnc",
    "line_inverse",
    "line_normals",
    "recon_sense",
    "spatial_dims",
]
