"""Centred, orthonormal 2D FFT with fastMRI's conventions.

fastMRI stores k-space with the DC sample at index (H // 2, W // 2): the transform is
``fftshift(fft2(ifftshift(x), norm="ortho"))`` over the last two axes. With ``norm="ortho"``
the transform is unitary, so image-domain and k-space noise have the same standard deviation
and the adjoint of ``fft2c`` is ``ifft2c``.
"""

import torch

_DIMS = (-2, -1)


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes of a complex tensor.

    >>> import torch
    >>> x = torch.zeros(4, 4, dtype=torch.complex64); x[2, 2] = 1
    >>> torch.allclose(fft2c(x).abs(), torch.full((4, 4), 0.25))
    True
    """
    shifted = torch.fft.ifftshift(image, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2D FFT over the last two axes; the inverse of `fft2c`."""
    shifted = torch.fft.ifftshift(kspace, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_DIMS, norm="ortho"), dim=_DIMS)
