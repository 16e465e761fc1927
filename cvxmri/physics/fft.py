"""Centred, orthonormal FFT over the last ``ndim`` axes, with fastMRI's conventions.

fastMRI stores k-space with the DC sample at the centre index (``size // 2`` on each
spatial axis): the transform is ``fftshift(fftn(ifftshift(x), norm="ortho"))`` over the
spatial axes, which are the last ``ndim`` axes of the tensor (``ndim = 2`` for slices
(..., H, W), ``ndim = 3`` for volumes (..., D, H, W)). With ``norm="ortho"`` the transform
is unitary, so image-domain and k-space noise have the same standard deviation and the
adjoint of ``fftnc`` is ``ifftnc``.
"""

import torch


def spatial_dims(ndim: int) -> tuple[int, ...]:
    """The last ``ndim`` axes, ``(-ndim, ..., -1)``: the spatial axes of an image or k-space.

    Raises:
        ValueError: if ``ndim`` is not an integer >= 1.
    """
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim must be an integer >= 1, got {ndim!r}")
    return tuple(range(-ndim, 0))


def fftnc(image: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Centred orthonormal FFT over the last ``ndim`` axes of a complex tensor.

    ``fftnc(x) = fftshift(fftn(ifftshift(x), norm="ortho"))`` on the axes ``(-ndim, ..., -1)``;
    for ``ndim = 2`` it is `fft2c`, bit for bit.

    >>> import torch
    >>> x = torch.zeros(4, 4, 2, dtype=torch.complex64); x[2, 2, 1] = 1
    >>> torch.allclose(fftnc(x, ndim=3).abs(), torch.full((4, 4, 2), 32**-0.5))
    True
    """
    dims = spatial_dims(ndim)
    shifted = torch.fft.ifftshift(image, dim=dims)
    return torch.fft.fftshift(torch.fft.fftn(shifted, dim=dims, norm="ortho"), dim=dims)


def ifftnc(kspace: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Centred orthonormal inverse FFT over the last ``ndim`` axes; the inverse of `fftnc`.

    ``ifftnc(y) = fftshift(ifftn(ifftshift(y), norm="ortho"))`` on the axes
    ``(-ndim, ..., -1)``; for ``ndim = 2`` it is `ifft2c`, bit for bit.
    """
    dims = spatial_dims(ndim)
    shifted = torch.fft.ifftshift(kspace, dim=dims)
    return torch.fft.fftshift(torch.fft.ifftn(shifted, dim=dims, norm="ortho"), dim=dims)


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes: ``fftnc(image, ndim=2)``.

    >>> import torch
    >>> x = torch.zeros(4, 4, dtype=torch.complex64); x[2, 2] = 1
    >>> torch.allclose(fft2c(x).abs(), torch.full((4, 4), 0.25))
    True
    """
    return fftnc(image, ndim=2)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2D FFT over the last two axes: ``ifftnc(kspace, ndim=2)``."""
    return ifftnc(kspace, ndim=2)


def ifft_readout(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse FFT along the readout of 3D k-space (..., kx, ky, kz),
    axis -3, only: the hybrid space (..., x, ky, kz) in which every readout position is a
    2D (ky, kz) problem (the readout is fully sampled, so this is exact)."""
    return ifftnc(kspace.movedim(-3, -1), ndim=1).movedim(-1, -3)
