"""FFT convention and adjointness of every linear operator, in 2D and 3D."""

from __future__ import annotations

import doctest
from copy import deepcopy

import numpy as np
import pytest
import torch
from conftest import devices, fft2c_np

from cvxmri.physics import (
    FFT,
    FFT2,
    CenterCrop,
    LinearOperator,
    Mask,
    Sense,
    center_crop,
    fft2c,
    fftnc,
    ifft2c,
    ifftnc,
)
from cvxmri.physics import fft as fft_module
from cvxmri.physics import operators as operators_module


def crandn(*shape: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    real = torch.randn(*shape, generator=generator, dtype=dtype)
    imag = torch.randn(*shape, generator=generator, dtype=dtype)
    return torch.complex(real, imag)


# The formulas of the 2D physics before it took a number of axes (commit 1cabc60), kept
# verbatim so that the new code is checked bit for bit against them.
def old_fft2c(image: torch.Tensor) -> torch.Tensor:
    shifted = torch.fft.ifftshift(image, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=(-2, -1), norm="ortho"), dim=(-2, -1))


def old_ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    shifted = torch.fft.ifftshift(kspace, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(shifted, dim=(-2, -1), norm="ortho"), dim=(-2, -1))


def old_sense_forward(maps, mask, x):
    kspace = old_fft2c(maps * x.unsqueeze(-3))
    return kspace if mask is None else kspace * mask


def old_sense_adjoint(maps, mask, y):
    if mask is not None:
        y = y * mask
    return (maps.conj() * old_ifft2c(y)).sum(dim=-3)


def operators(device: str, ndim: int) -> list[tuple[str, LinearOperator, tuple[int, ...]]]:
    """Every operator with the shape of its input (one list, as in deepinv's tests)."""
    gen = torch.Generator().manual_seed(ndim)
    grid = (12, 10) if ndim == 2 else (6, 5, 4)
    crop = (6, 4) if ndim == 2 else (3, 4, 2)
    odd_grid, odd_crop = ((11, 9), (6, 5)) if ndim == 2 else ((5, 7, 3), (2, 4, 3))
    maps = crandn(2, 5, *grid, generator=gen).to(device)
    shared_maps = crandn(5, *grid, generator=gen).to(device)
    mask = (torch.rand(*grid, generator=gen) < 0.4).to(torch.float64).to(device)
    # One pattern per batch element, constant along the first spatial axis (the readout).
    pattern = (2, 1, 1, *grid[1:])
    batch_mask = (torch.rand(*pattern, generator=gen) < 0.5).to(torch.float64).to(device)
    sense = Sense(maps, mask, ndim=ndim)
    return [
        ("fft", FFT(ndim), (2, *grid)),
        ("fft-adjoint", FFT(ndim).H, (2, *grid)),
        ("mask", Mask(mask), (2, 5, *grid)),
        ("sense", sense, (2, *grid)),
        ("sense-adjoint", sense.H, (2, 5, *grid)),
        ("sense-normal", sense.N, (2, *grid)),
        ("sense-batch-mask", Sense(maps, batch_mask, ndim=ndim), (2, *grid)),
        ("sense-full", Sense(maps, ndim=ndim), (2, *grid)),
        ("sense-shared-maps", Sense(shared_maps, mask, ndim=ndim), (3, *grid)),
        ("crop-even", CenterCrop(grid, crop), (2, *grid)),
        ("crop-odd", CenterCrop(odd_grid, odd_crop), (3, *odd_grid)),
        ("sense-then-crop-adjoint", sense @ CenterCrop(grid, crop).H, (2, *crop)),
        ("mask-fft-sense", Mask(mask) @ FFT(ndim) @ Sense(maps, ndim=ndim), (2, *grid)),
    ]


OPERATOR_CASES = [
    pytest.param(device, ndim, index, id=f"{device}-{ndim}d-{name}")
    for device in devices()
    for ndim in (2, 3)
    for index, (name, _, _) in enumerate(operators("cpu", ndim))
]


@pytest.mark.parametrize(("device", "ndim", "index"), OPERATOR_CASES)
def test_adjointness(device: str, ndim: int, index: int) -> None:
    name, op, shape = operators(device, ndim)[index]
    gen = torch.Generator().manual_seed(index + 1)
    x = crandn(*shape, generator=gen).to(device)
    ax = op(x)
    y = crandn(*ax.shape, generator=gen).to(device)
    lhs = torch.vdot(ax.flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.H(y).flatten())
    assert abs(lhs) > 1e-3, name  # a zero inner product would make the check vacuous
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), name
    # The normal operator is A^H A, self-adjoint and positive semi-definite.
    nx = op.N(x)
    assert torch.allclose(nx, op.H(op(x)), rtol=1e-12, atol=1e-12), name
    assert torch.vdot(x.flatten(), nx.flatten()).real >= -1e-10
    assert op.H.H(x).equal(ax), name


def test_adjointness_catches_a_wrong_adjoint() -> None:
    gen = torch.Generator().manual_seed(9)
    x, y = crandn(6, 5, 4, generator=gen), crandn(6, 5, 4, generator=gen)
    # ifftnc over two axes is not the adjoint of the 3D FFT.
    wrong = LinearOperator(lambda v: fftnc(v, 3), lambda v: ifftnc(v, 2), "wrong")
    lhs = torch.vdot(wrong(x).flatten(), y.flatten())
    assert not torch.allclose(lhs, torch.vdot(x.flatten(), wrong.H(y).flatten()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_2d_is_bit_identical_to_the_old_formulas(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    x = crandn(3, 14, 10, generator=gen, dtype=dtype)
    maps = crandn(3, 4, 14, 10, generator=gen, dtype=dtype)
    y = crandn(3, 4, 14, 10, generator=gen, dtype=dtype)
    masks = {
        "none": None,
        "grid": (torch.rand(14, 10, generator=gen) < 0.3).to(dtype),
        "columns": (torch.rand(3, 1, 1, 10, generator=gen) < 0.3).to(dtype),
        # Columns stored on the whole grid: the normal operator skips the readout FFT.
        "column grid": (torch.rand(3, 1, 1, 10, generator=gen) < 0.3)
        .to(dtype)
        .expand(3, 1, 14, 10),
        "all": torch.ones(14, 10, dtype=dtype),
    }
    assert torch.equal(fft2c(x), old_fft2c(x))
    assert torch.equal(ifft2c(y), old_ifft2c(y))
    assert torch.equal(fftnc(x), old_fft2c(x))
    assert torch.equal(FFT2()(x), old_fft2c(x))
    assert torch.equal(FFT2().H(y), old_ifft2c(y))
    for name, mask in masks.items():
        op = Sense(maps, mask)
        assert torch.equal(op(x), old_sense_forward(maps, mask, x)), name
        assert torch.equal(op.H(y), old_sense_adjoint(maps, mask, y)), name
        normal = old_sense_adjoint(maps, mask, old_sense_forward(maps, mask, x))
        # The normal operator skips the inner centring shifts (SenseNormal): the same
        # products, but vectorised loops may round the last bit differently.
        tol = torch.finfo(dtype).eps * 8 * float(normal.abs().max())
        assert torch.allclose(op.N(x), normal, rtol=0, atol=tol), name
        assert torch.equal(Sense(maps[0], mask).H(y), old_sense_adjoint(maps[0], mask, y)), name


def test_sense_normal_is_kept_until_the_operator_moves() -> None:
    """`Sense.N` is prepared once (shifted maps and mask) and reused; casting the operator
    drops it, so the next one is prepared from the cast buffers."""
    gen = torch.Generator().manual_seed(5)
    maps = crandn(1, 3, 12, 10, generator=gen).to(torch.complex64)
    mask = (torch.rand(12, 10, generator=gen) < 0.4).float()
    op = Sense(maps, mask)
    normal = op.N
    assert op.N is normal
    op.double()  # complex buffers become complex128
    assert op.N is not normal
    x = crandn(1, 12, 10, generator=gen)
    expected = op.H(op(x))
    assert op.N(x).dtype == torch.complex128
    assert torch.allclose(op.N(x), expected, rtol=0, atol=1e-12)


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


def test_3d_fft_of_a_delta() -> None:
    # A delta at the centre (D // 2, H // 2, W // 2) has a flat spectrum of 1 / sqrt(D H W);
    # moved by one voxel along D, the phase turns by -2 pi k / D along that axis only.
    shape = (6, 5, 4)
    delta = torch.zeros(2, *shape, dtype=torch.complex128)
    delta[:, 3, 2, 2] = 1
    k = fftnc(delta, ndim=3)
    expected = torch.full((2, *shape), 120**-0.5, dtype=torch.complex128)
    assert torch.allclose(k, expected, atol=1e-15)
    shifted = torch.roll(delta, 1, dims=1)
    phase = torch.exp(-2j * torch.pi * (torch.arange(6) - 3) / 6).to(torch.complex128)
    assert torch.allclose(fftnc(shifted, ndim=3), expected * phase[:, None, None], atol=1e-14)
    assert torch.equal(ifftnc(k, ndim=3).real.round(decimals=12) + 0, delta.real)


def test_3d_fft_matches_torch_fftn() -> None:
    gen = torch.Generator().manual_seed(6)
    x = crandn(2, 6, 5, 4, generator=gen)
    dims = (-3, -2, -1)
    reference = torch.fft.fftshift(
        torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho"), dim=dims
    )
    assert torch.equal(fftnc(x, ndim=3), reference)
    axes = (-3, -2, -1)
    numpy_reference = np.fft.fftshift(
        np.fft.fftn(np.fft.ifftshift(x.numpy(), axes=axes), axes=axes, norm="ortho"), axes=axes
    )
    np.testing.assert_allclose(fftnc(x, ndim=3).numpy(), numpy_reference, atol=1e-12)
    # The leading axis is a batch axis: it is not transformed.
    assert torch.allclose(fftnc(x, ndim=3)[1], fftnc(x[1], ndim=3), atol=0)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_fft_is_unitary(ndim: int) -> None:
    gen = torch.Generator().manual_seed(7)
    x = crandn(2, 6, 5, 4, generator=gen)
    op = FFT(ndim)
    assert torch.allclose(op.H(op(x)), x, atol=1e-12)
    assert torch.allclose(op.N(x), x, atol=1e-12)
    assert torch.allclose(op(op.H(x)), x, atol=1e-12)
    assert torch.linalg.norm(op(x)).item() == pytest.approx(torch.linalg.norm(x).item())


@pytest.mark.parametrize("ndim", [2, 3])
def test_sense_full_sampling_recovers_image_with_normalised_maps(ndim: int) -> None:
    gen = torch.Generator().manual_seed(4)
    grid = (8, 8) if ndim == 2 else (4, 6, 5)
    maps = crandn(4, *grid, generator=gen)
    maps = maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()
    x = crandn(2, *grid, generator=gen)
    op = Sense(maps, ndim=ndim)
    # With sum_c |S_c|^2 = 1, A^H A = I when fully sampled.
    assert torch.allclose(op.N(x), x, atol=1e-12)
    assert op(x).shape == (2, 4, *grid)


def test_sense_3d_coil_axis_and_mask_over_ky_kz() -> None:
    # Coil c of the 3D k-space is the 3D FFT of S_c x; a (ky, kz) mask acts on every kx.
    gen = torch.Generator().manual_seed(8)
    maps = crandn(1, 3, 4, 6, 5, generator=gen)
    x = crandn(1, 4, 6, 5, generator=gen)
    pattern = torch.rand(6, 5, generator=gen) < 0.5
    mask = pattern.expand(4, 6, 5).to(torch.float64)
    y = Sense(maps, mask, ndim=3)(x)
    for coil in range(3):
        expected = fftnc(maps[0, coil] * x[0], ndim=3) * mask
        assert torch.equal(y[0, coil], expected)
    assert torch.count_nonzero(y[:, :, :, ~pattern]) == 0


def test_sense_is_a_module_with_buffers() -> None:
    gen = torch.Generator().manual_seed(10)
    maps = crandn(1, 2, 4, 6, 5, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) < 0.5).to(torch.float64)
    op = Sense(maps, mask, ndim=3)
    assert isinstance(op, torch.nn.Module)
    assert set(op.state_dict()) == {"maps", "mask"}
    assert op.maps is maps  # a buffer, not a copy
    assert dict(op.named_buffers()).keys() == {"maps", "mask"}
    assert list(op.parameters()) == []
    assert set(Sense(maps, ndim=3).state_dict()) == {"maps"}
    # .to() moves the buffers (the meta device stands in for a GPU), and with them the
    # operator's adjoint and normal operator and any network that holds it.
    net = torch.nn.Sequential(op)
    moved = net.to("meta")[0]
    assert moved is op
    assert op.maps.device.type == "meta" and op.mask.device.type == "meta"
    assert op.H(torch.zeros(1, 2, 4, 6, 5, dtype=torch.complex128, device="meta")).shape == (
        1,
        4,
        6,
        5,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sense_moves_to_cuda() -> None:
    gen = torch.Generator().manual_seed(11)
    maps = crandn(1, 2, 8, 6, generator=gen)
    mask = (torch.rand(8, 6, generator=gen) < 0.5).to(torch.float64)
    x = crandn(1, 8, 6, generator=gen)
    op = Sense(maps, mask).to("cuda")
    assert op.maps.is_cuda and op.mask.is_cuda
    assert torch.allclose(op(x.cuda()).cpu(), Sense(maps, mask)(x), atol=1e-12)


def test_sense_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(12)
    maps = crandn(1, 2, 8, 6, generator=gen)
    mask = (torch.rand(8, 6, generator=gen) < 0.5).to(torch.float64)
    op = Sense(torch.zeros_like(maps), torch.zeros_like(mask))
    op.load_state_dict(Sense(maps, mask).state_dict())
    x = crandn(1, 8, 6, generator=gen)
    assert torch.equal(op(x), Sense(maps, mask)(x))


def test_composition_holds_its_operands() -> None:
    gen = torch.Generator().manual_seed(13)
    maps = crandn(1, 2, 8, 6, generator=gen)
    mask = torch.ones(8, 6, dtype=torch.float64)
    op = Sense(maps, mask) @ CenterCrop((8, 6), (4, 4)).H
    assert set(op.state_dict()) == {"outer.maps", "outer.mask"}
    assert repr(op) == "<Sense @ CenterCrop.H>"
    assert repr(op.N) == "<Sense @ CenterCrop.H.N>"
    x = crandn(1, 4, 4, generator=gen)
    assert torch.equal(op(x), Sense(maps, mask)(CenterCrop((8, 6), (4, 4)).H(x)))


def test_mask_idempotent_and_crop_pad() -> None:
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.randn(3, 2, 2, dtype=torch.float64).to(torch.complex128)
    op = Mask(mask)
    assert torch.equal(op(op(y)), op(y))
    assert set(op.state_dict()) == {"mask"}
    crop = CenterCrop((6, 5), (2, 3))
    image = torch.arange(30.0).reshape(6, 5)
    assert torch.equal(crop(image), torch.tensor([[11.0, 12.0, 13.0], [16.0, 17.0, 18.0]]))
    assert torch.equal(crop(crop.H(crop(image))), crop(image))


def test_center_crop_3d_uses_fastmri_start_index() -> None:
    volume = torch.arange(2 * 7 * 6 * 5.0).reshape(2, 7, 6, 5)
    out = center_crop(volume, (3, 4, 2))
    # Starts (7 - 3) // 2 = 2, (6 - 4) // 2 = 1, (5 - 2) // 2 = 1.
    assert torch.equal(out, volume[:, 2:5, 1:5, 1:3])
    # Cropping two axes of a volume leaves the third alone, as a 2D crop of each slice.
    assert torch.equal(center_crop(volume, (4, 2)), volume[:, :, 1:5, 1:3])
    crop = CenterCrop((7, 6, 5), (3, 4, 2))
    padded = crop.H(out)
    assert padded.shape == volume.shape
    assert torch.equal(padded[:, 2:5, 1:5, 1:3], out)
    assert padded.abs().sum() == out.abs().sum()
    # The k-space centre (size // 2 per axis) lands at the crop's centre (target // 2).
    assert torch.equal(out[:, 1, 2, 1], volume[:, 3, 3, 2])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: center_crop(torch.zeros(4, 4), (5, 4)), "cannot crop an image of 4x4 to 5x4"),
        (lambda: center_crop(torch.zeros(4, 4), (2, 2, 2)), "cannot crop the last 3 axes"),
        (lambda: center_crop(torch.zeros(4, 4), (0, 2)), "to 0x2"),
        (lambda: CenterCrop((4, 4), (2, 2, 2)), "different numbers of axes"),
        (lambda: CenterCrop((4, 4, 4), (2, 5, 2)), "4x4x4 to 2x5x2"),
        (lambda: Sense(torch.zeros(2, 4, 4, dtype=torch.complex64), ndim=3), "3 grid axes"),
        (lambda: FFT(0), "ndim must be an integer >= 1"),
        (lambda: fftnc(torch.zeros(4, dtype=torch.complex64), ndim=2.0), "ndim"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_maps_and_maps_pairs() -> None:
    with pytest.raises(TypeError, match="complex"):
        Sense(torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="both forward and adjoint"):
        LinearOperator(lambda x: x)


@pytest.mark.parametrize("module", [fft_module, operators_module])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_sense_copies_and_saves_like_a_module(tmp_path) -> None:
    gen = torch.Generator().manual_seed(14)
    maps = crandn(1, 2, 8, 6, generator=gen)
    mask = (torch.rand(8, 6, generator=gen) < 0.5).to(torch.float64)
    net = torch.nn.Sequential(Sense(maps, mask))
    copy = deepcopy(net)
    assert copy[0].maps is not maps and torch.equal(copy[0].maps, maps)
    torch.save(net.state_dict(), tmp_path / "sense.pt")
    loaded = torch.load(tmp_path / "sense.pt", weights_only=True)
    assert loaded.keys() == {"0.maps", "0.mask"}
    x = crandn(1, 8, 6, generator=gen)
    assert torch.equal(copy(x), net(x))
