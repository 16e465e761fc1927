"""FFT convention and adjointness of every linear operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import devices, fft2c_np

from cvxmri.physics import FFT2, CenterCrop, LinearOperator, Mask, Sense, fft2c, ifft2c


def crandn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    real = torch.randn(*shape, generator=generator, dtype=torch.float64)
    imag = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return torch.complex(real, imag)


def operators(device: str) -> list[tuple[str, LinearOperator, tuple[int, ...]]]:
    """Every operator with the shape of its input (one list, as in deepinv's tests)."""
    gen = torch.Generator().manual_seed(0)
    maps = crandn(2, 5, 12, 10, generator=gen).to(device)
    mask = (torch.rand(12, 10, generator=gen) < 0.4).to(torch.float64).to(device)
    batch_mask = (torch.rand(2, 1, 1, 10, generator=gen) < 0.5).to(torch.float64).to(device)
    return [
        ("fft", FFT2(), (2, 12, 10)),
        ("mask", Mask(mask), (2, 5, 12, 10)),
        ("sense", Sense(maps, mask), (2, 12, 10)),
        ("sense-batch-mask", Sense(maps, batch_mask), (2, 12, 10)),
        ("sense-full", Sense(maps), (2, 12, 10)),
        ("crop-even", CenterCrop((12, 10), (6, 4)), (2, 12, 10)),
        ("crop-odd", CenterCrop((11, 9), (6, 5)), (3, 11, 9)),
        ("sense-then-crop-adjoint", Sense(maps, mask) @ CenterCrop((12, 10), (6, 4)).H, (2, 6, 4)),
    ]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("index", range(8))
def test_adjointness(device: str, index: int) -> None:
    name, op, shape = operators(device)[index]
    gen = torch.Generator().manual_seed(index + 1)
    x = crandn(*shape, generator=gen).to(device)
    ax = op(x)
    y = crandn(*ax.shape, generator=gen).to(device)
    lhs = torch.vdot(ax.flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.H(y).flatten())
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), name
    # The normal operator is self-adjoint and positive semi-definite.
    nx = op.N(x)
    assert torch.vdot(x.flatten(), nx.flatten()).real >= -1e-10


def test_fft_matches_fastmri_convention() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 9, 8)) + 1j * rng.normal(size=(3, 9, 8))
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), fft2c_np(x), atol=1e-12)
    np.testing.assert_allclose(ifft2c(fft2c(torch.from_numpy(x))).numpy(), x, atol=1e-12)


def test_fft_dc_at_centre_and_unitary() -> None:
    x = torch.ones(8, 6, dtype=torch.complex128)
    k = fft2c(x)
    assert k[4, 3].real == pytest.approx(np.sqrt(48))
    assert torch.count_nonzero(k.abs() > 1e-9) == 1
    gen = torch.Generator().manual_seed(3)
    z = crandn(5, 7, generator=gen)
    assert torch.linalg.norm(fft2c(z)) == pytest.approx(torch.linalg.norm(z).item())


def test_sense_full_sampling_recovers_image_with_normalised_maps() -> None:
    gen = torch.Generator().manual_seed(4)
    maps = crandn(4, 8, 8, generator=gen)
    maps = maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()
    x = crandn(2, 8, 8, generator=gen)
    op = Sense(maps)
    # With sum_c |S_c|^2 = 1, A^H A = I when fully sampled.
    assert torch.allclose(op.N(x), x, atol=1e-12)


def test_mask_idempotent_and_crop_pad() -> None:
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.randn(3, 2, 2, dtype=torch.float64).to(torch.complex128)
    op = Mask(mask)
    assert torch.equal(op(op(y)), op(y))
    crop = CenterCrop((6, 5), (2, 3))
    image = torch.arange(30.0).reshape(6, 5)
    assert torch.equal(crop(image), torch.tensor([[11.0, 12.0, 13.0], [16.0, 17.0, 18.0]]))
    assert torch.equal(crop(crop.H(crop(image))), crop(image))
