"""ESPIRiT coil sensitivities in torch, batched over slices, on CPU or CUDA.

The algorithm and its conventions are those of sigpy's ``EspiritCalib`` (one set of maps),
so that the maps agree with it; only the arithmetic is arranged differently:

1. Calibration region: the central ``calib_width`` x ``calib_width`` k-space samples (index
   ``n // 2 - calib_width // 2`` onwards on each axis, zero-padded when the grid is smaller).
2. Calibration (Casorati) matrix: every ``kernel_width`` x ``kernel_width`` patch of it, all
   coils side by side, one row per patch; its right singular vectors with singular value
   above ``thresh`` times the largest are the kernels.
3. The kernels, zero-padded to the grid (centred) and inverse FFT'd (centred,
   orthonormal), give at each pixel r the C x C matrix
   ``G(r) = N / kernel_width**2 * sum_k g_k(r) g_k(r)^H``, N the number of pixels. Its
   entries are trigonometric polynomials of degree ``kernel_width - 1``: here they are
   evaluated from their ``(2 kernel_width - 1)**2`` coefficients (the kernels'
   auto-correlations, computed once) by two small DFT matrix products, instead of one
   image-size inverse FFT per kernel and coil.
4. The map at r is the top eigenvector of ``G(r)``, computed by power iteration as in sigpy
   (100 iterations from all-ones there) but started from the exact eigenvectors on a
   coarse grid (`EIGEN_STEP` pixels apart, `torch.linalg.eigh`), interpolated to the full
   grid; `POWER_ITERATIONS` iterations then suffice. Its phase is referred to coil 0
   (``m *= conj(m_0) / |m_0|``) and it is set to zero where the eigenvalue ``|G(r) m|``
   is not above ``crop``.

Measured on simulated slices (birdcage coils, a smooth phantom; one CPU thread, a busy
2-core machine; `benchmarks/bench_data.py`, docs/benchmarks.md): the residual of these
maps outside the span of sigpy's, relative, over all pixels, is 4.9e-4 at 128x128 with 8
coils and 7.9e-5 at 320x320 with 15 coils, with the same support (crop); a coarse step of
8 instead of 4 gives 3e-3 at 128x128 and moves the support at a few pixels, one power
iteration instead of two 1e-3. Time per slice 59 ms and 0.62 s there, sigpy's 0.91 s and
21 s in the same run (15x and 34x). The exact eigen-decomposition at every pixel alone
takes 2-3 times the whole of this (about 2 s at 320x320). Batching slices does not speed
up a CPU thread (0.6 to 0.9 s a slice at 320x320 with 8 slices per call); it is for GPUs.
"""

from __future__ import annotations

import math

import torch

from cvxmri.physics.fft import ifft_readout

EIGEN_STEP = 4
"""Spacing in pixels of the coarse grid where eigenvectors are computed exactly."""
POWER_ITERATIONS = 2
"""Power iterations at every pixel, started from the interpolated coarse eigenvectors."""
CHUNK_PIXELS = 1 << 15
"""Pixels (over all slices of a batch) whose C x C matrices are held at once."""


def centre_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop or zero-pad the last two axes of ``x`` to ``size``, with sigpy's
    ``resize`` offsets (``n // 2 - m // 2``)."""
    out = x.new_zeros((*x.shape[:-2], *size))
    src, dst = [], []
    for n, m in zip(x.shape[-2:], size, strict=True):
        start_in, start_out = max(n // 2 - m // 2, 0), max(m // 2 - n // 2, 0)
        count = min(n - start_in, m - start_out)
        src.append(slice(start_in, start_in + count))
        dst.append(slice(start_out, start_out + count))
    out[..., dst[0], dst[1]] = x[..., src[0], src[1]]
    return out


def espirit_kernels(
    kspace: torch.Tensor, calib_width: int, thresh: float, kernel_width: int
) -> torch.Tensor:
    """The ESPIRiT kernels of a batch of k-space (B, C, H, W): (B, n, C, k, k), the right
    singular vectors of the calibration matrix whose singular value is above ``thresh``
    times the largest; the others are set to zero, so that every slice has n of them.

    The singular vectors come from the eigen-decomposition of the smaller of the two Gram
    matrices of the calibration matrix (singular values squared), several times faster
    than its SVD on CPU; the kept vectors (singular value at least ``thresh`` times the
    largest) are as accurate in single precision."""
    batch, coils = kspace.shape[:2]
    calib = centre_resize(kspace.to(torch.complex64), (calib_width, calib_width))
    patches = calib.unfold(-2, kernel_width, 1).unfold(-2, kernel_width, 1)
    matrix = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, coils * kernel_width**2)
    wide = matrix.shape[-1] > matrix.shape[-2]
    gram = matrix @ matrix.mH if wide else matrix.mH @ matrix
    values, vectors = torch.linalg.eigh(gram)
    keep = values > thresh**2 * values[:, -1:]
    if wide:  # right singular vectors v = A^H u / s from the left ones
        singular = values.clamp_min(torch.finfo(values.dtype).tiny).sqrt()
        vectors = matrix.mH @ vectors / singular[:, None, :]
    vectors = vectors * keep[:, None, :]
    return vectors.mH.reshape(batch, -1, coils, kernel_width, kernel_width)


def kernel_correlations(kernels: torch.Tensor) -> torch.Tensor:
    """``R[b, c, d, s] = sum_k sum_p a[b, k, c, p + s] conj(a[b, k, d, p])`` of kernels
    (B, n, C, k, k), for shifts s in ``[-(k - 1), k - 1]**2``: (B, C, C, 2k - 1, 2k - 1),
    the zero shift at the centre. Computed by FFTs on a ``2k - 1`` grid, where circular
    correlation equals linear correlation."""
    width = kernels.shape[-1]
    size = 2 * width - 1
    spectra = torch.fft.fft2(kernels, s=(size, size))
    products = torch.einsum("bkcuv,bkduv->bcduv", spectra, spectra.conj())
    return torch.fft.fftshift(torch.fft.ifft2(products), dim=(-2, -1))


def _dft_rows(width: int, positions: torch.Tensor, n: int) -> torch.Tensor:
    """``exp(2 pi i s (y - n // 2) / n)`` for shifts s in ``[-(width - 1), width - 1]``
    (rows) and pixel positions y (columns, possibly fractional): the centred inverse DFT
    of the band of frequencies of the kernels' correlations."""
    s = torch.arange(-(width - 1), width, dtype=torch.float64, device=positions.device)
    angle = 2 * math.pi * s[:, None] * (positions.double()[None, :] - n // 2) / n
    return torch.polar(torch.ones_like(angle), angle)


def column_sums(
    correlations: torch.Tensor, cols: torch.Tensor, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """The first half of evaluating ``G``: the correlations (B, C, C, s, s) summed over
    their column shifts at pixel columns ``cols`` (w) of an image ``width`` wide, as
    (B, s, w * C * C), for `gram_rows`."""
    batch, _, _, shifts, _ = correlations.shape
    kernel_width = (shifts + 1) // 2
    ex = _dft_rows(kernel_width, cols, width).to(dtype) / kernel_width**2
    half = correlations.to(dtype) @ ex  # (B, C, C, s, w)
    return half.permute(0, 3, 4, 1, 2).reshape(batch, shifts, -1)


def gram_rows(half: torch.Tensor, rows: torch.Tensor, height: int, coils: int) -> torch.Tensor:
    """The per-pixel matrices ``G`` (B, h, w, C, C) at pixel rows ``rows`` (h) of an image
    ``height`` high, from `column_sums` (B, s, w * C * C)."""
    batch, shifts, _ = half.shape
    ey = _dft_rows((shifts + 1) // 2, rows, height).to(half.dtype)
    out = ey.transpose(0, 1) @ half  # (B, h, w C C)
    return out.reshape(batch, len(rows), -1, coils, coils)


def image_gram(
    correlations: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.complex64,
) -> torch.Tensor:
    """The per-pixel matrices ``G`` (B, h, w, C, C) at pixel positions ``rows`` (h) x
    ``cols`` (w) of an image of ``shape``, from the kernels' correlations (B, C, C, s, s)."""
    half = column_sums(correlations, cols, shape[1], dtype)
    return gram_rows(half, rows, shape[0], correlations.shape[1])


def _coil_norm(x: torch.Tensor) -> torch.Tensor:
    """The 2-norm over the last axis of a complex tensor, keeping it (faster than
    ``x.norm(dim=-1)`` on CPU, which does not vectorise complex magnitudes)."""
    return torch.view_as_real(x).square().sum(dim=(-2, -1), keepdim=True)[..., 0].sqrt()


def _linear_weights(size: int, coarse: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Linear interpolation from ``coarse`` points spanning ``[0, size - 1]`` (corners
    included) to every integer position: left index, right index and right weight (as
    ``F.interpolate(..., align_corners=True)``)."""
    position = torch.arange(size, device=device, dtype=torch.float64)
    position = position * (coarse - 1) / max(size - 1, 1)
    left = position.floor().long().clamp_max(coarse - 1)
    right = (left + 1).clamp_max(coarse - 1)
    return left, right, (position - left).float()


def eigen_maps(
    correlations: torch.Tensor,
    shape: tuple[int, int],
    crop: float,
    step: int = EIGEN_STEP,
    iterations: int = POWER_ITERATIONS,
    chunk_pixels: int = CHUNK_PIXELS,
) -> torch.Tensor:
    """The maps (B, C, H, W) of an image of ``shape`` from the kernels' correlations
    (B, C, C, s, s): at every pixel the top eigenvector of ``G``, phase-referred to coil 0,
    zero where the eigenvalue is not above ``crop``.

    Exact eigenvectors (`torch.linalg.eigh`) on a coarse grid of about ``step`` pixels
    spacing (corners included), phase-referred to coil 0 and linearly interpolated, start
    ``iterations`` power iterations ``v <- G v / |G v|`` at every pixel; the eigenvalue is
    ``|G v|`` of the last one, as in sigpy. Everything at full resolution is done on bands
    of rows of ``chunk_pixels`` pixels (all slices together) at a time, which bounds the
    memory and keeps it in cache. A pixel where ``G v = 0`` gets a zero map."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    batch, coils = correlations.shape[:2]
    device = correlations.device
    height, width = shape
    rows = torch.linspace(0, height - 1, math.ceil((height - 1) / step) + 1, device=device)
    cols = torch.linspace(0, width - 1, math.ceil((width - 1) / step) + 1, device=device)
    top = torch.linalg.eigh(image_gram(correlations, rows, cols, shape))[1][..., -1]
    top = top * torch.sgn(top[..., :1]).conj()  # (B, h, w, C), smooth where coil 0 is
    left, right, weight = _linear_weights(width, len(cols), device)
    top = torch.lerp(top[:, :, left], top[:, :, right], weight[:, None].to(top.dtype))
    above, below, weight = _linear_weights(height, len(rows), device)
    weight = weight.to(top.dtype)[:, None, None]
    maps = top.new_empty(batch, coils, height, width)
    tiny = torch.finfo(weight.real.dtype).tiny
    band = max(1, chunk_pixels // (width * batch))
    half = column_sums(correlations, torch.arange(width, device=device), width, top.dtype)
    for first in range(0, height, band):
        part = slice(first, min(first + band, height))
        band_rows = torch.arange(part.start, part.stop, device=device)
        gram = gram_rows(half, band_rows, height, coils)
        v = torch.lerp(top[:, above[part]], top[:, below[part]], weight[part])
        v = v / _coil_norm(v).clamp_min(tiny)
        for _ in range(iterations):
            y = (gram @ v[..., None])[..., 0]
            norm = _coil_norm(y)
            v = y / norm.clamp_min(tiny)
        v = v * torch.sgn(v[..., :1]).conj() * (norm > crop)
        maps[:, :, part] = v.permute(0, 3, 1, 2)
    return maps


def espirit(
    kspace: torch.Tensor,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    chunk_pixels: int = CHUNK_PIXELS,
) -> torch.Tensor:
    """ESPIRiT maps (B, C, H, W) of fully sampled (at least in the calibration region)
    k-space (B, C, H, W), on the device of ``kspace``, in its dtype; parameters as sigpy's
    ``EspiritCalib``. Slices are independent: batching changes only the speed."""
    kernels = espirit_kernels(kspace, calib_width, thresh, kernel_width)
    correlations = kernel_correlations(kernels)
    shape = (kspace.shape[-2], kspace.shape[-1])
    return eigen_maps(correlations, shape, crop, chunk_pixels=chunk_pixels).to(kspace.dtype)


def espirit_decoupled(
    kspace: torch.Tensor,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    planes_per_call: int = 16,
) -> torch.Tensor:
    """Coil maps (C, X, Y, Z) of fully sampled 3D k-space (C, kx, ky, kz) by the decoupled
    approach (as BART's ``ecaltwo``): inverse FFT along the fully sampled readout, then 2D
    ESPIRiT (`espirit`, same parameters) of every readout position's (ky, kz) plane, the
    planes batched ``planes_per_call`` at a time.

    Why not 3D ESPIRiT: its calibration matrix has ``C kernel_width**3`` columns and its
    kernels must be evaluated over the whole volume, for maps that differ little from the
    per-plane ones when coil sensitivities vary slowly along the readout; the decoupled maps
    cost one 2D ESPIRiT per readout position, and they are the maps the decoupled 2D
    reconstruction of each (ky, kz) plane uses. Phases are referred to coil 0 at every
    voxel, so they agree from plane to plane."""
    hybrid = ifft_readout(kspace.to(torch.complex64)).movedim(-3, 0)  # (X, C, ky, kz)
    maps = [
        espirit(hybrid[first : first + planes_per_call], calib_width, thresh, kernel_width, crop)
        for first in range(0, hybrid.shape[0], planes_per_call)
    ]
    return torch.cat(maps).movedim(0, -3).to(kspace.dtype)
