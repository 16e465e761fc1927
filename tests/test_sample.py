"""The one sample pipeline (`make_sample`) and the reconstructors that take a `Sample`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cvxmri.data.prepare import normalisation_scale
from cvxmri.data.sample import Sample, collate_samples, make_sample
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.models.cnn import to_channels
from cvxmri.physics import Sense, center_crop
from cvxmri.recon import (
    CSConfig,
    compressed_sensing,
    cs_l1_wavelet_shifted,
    network_reconstructor,
    zero_filled,
)
from cvxmri.training.data import SliceData

RECON = (6, 4)


def ifft2c_np(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


def crop_np(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    top, left = (x.shape[-2] - shape[0]) // 2, (x.shape[-1] - shape[1]) // 2
    return x[..., top : top + shape[0], left : left + shape[1]]


@pytest.fixture
def case() -> dict[str, np.ndarray]:
    """Two slices, three coils on an 8x6 grid, a random 0/1 mask with the centre sampled."""
    rng = np.random.default_rng(3)
    shape = (2, 3, 8, 6)
    kspace = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    maps = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    maps[:, :, 2] = 0  # a row no coil sees: outside the support
    mask = (rng.random((8, 6)) < 0.5).astype(np.float32)
    mask[3:5, 2:4] = 1
    target = rng.normal(size=(2, *RECON)) + 1j * rng.normal(size=(2, *RECON))
    return {
        "kspace": kspace.astype(np.complex64),
        "maps": maps.astype(np.complex64),
        "mask": mask,
        "target": target.astype(np.complex64),
    }


def _sample(case: dict[str, np.ndarray], mask: torch.Tensor | None = None) -> Sample:
    return make_sample(
        torch.from_numpy(case["kspace"]),
        torch.from_numpy(case["mask"]) if mask is None else mask,
        torch.from_numpy(case["maps"]),
        RECON,
        target=torch.from_numpy(case["target"]),
        volume="multicoil_test/a.h5",
        slice_index=[4, 5],
    )


def test_make_sample_matches_the_explicit_formulas(case: dict[str, np.ndarray]) -> None:
    sample = _sample(case)
    kspace, maps, mask = (case[k].astype(np.complex128) for k in ("kspace", "maps", "mask"))
    adjoint = (np.conj(maps) * ifft2c_np(mask * kspace)).sum(axis=1)  # A^H (M k)
    cropped = crop_np(adjoint, RECON)
    scale = np.quantile(np.abs(cropped).reshape(2, -1), 0.99, axis=1)
    np.testing.assert_allclose(sample.scale.numpy(), scale, rtol=1e-5)
    x0 = sample.x0.numpy()
    assert x0.shape == (2, 2, *RECON)
    np.testing.assert_allclose(
        x0[:, 0] + 1j * x0[:, 1], cropped / scale[:, None, None], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        sample.y.numpy(), mask * kspace / scale[:, None, None, None], rtol=1e-5, atol=1e-7
    )
    target = sample.target.numpy()
    np.testing.assert_allclose(
        target[:, 0] + 1j * target[:, 1], case["target"] / scale[:, None, None], rtol=1e-5
    )
    support = (np.abs(maps).sum(axis=1) > 0).astype(np.float32)
    np.testing.assert_array_equal(sample.support.numpy()[:, 0], crop_np(support, RECON))
    assert sample.volume == ["multicoil_test/a.h5"] * 2 and sample.slice_index == [4, 5]
    assert sample.mask.shape == (2, 1, 8, 6) and sample.recon_shape == RECON


def test_x0_is_the_adjoint_of_the_normalised_measurement(case: dict[str, np.ndarray]) -> None:
    """``crop(A^H y) == x0``: the sample's operator applied to its own ``y``."""
    sample = _sample(case)
    again = to_channels(center_crop(sample.sense().H(sample.y), RECON))
    torch.testing.assert_close(again, sample.x0, rtol=1e-5, atol=1e-6)
    # ...and y is consistent with the operator: masking it again changes nothing.
    assert torch.equal(sample.y * sample.mask, sample.y)


def test_every_mask_layout_gives_the_same_sample(case: dict[str, np.ndarray]) -> None:
    mask = torch.from_numpy(case["mask"])
    first = _sample(case, mask)
    for layout in (mask.expand(2, 8, 6), mask.expand(2, 8, 6)[:, None]):
        other = _sample(case, layout)
        assert torch.equal(other.x0, first.x0) and torch.equal(other.y, first.y)
    with pytest.raises(CvxmriError, match="mask must be"):
        _sample(case, mask[None, None, None])


def test_unsampled_signal_is_a_one_line_error(case: dict[str, np.ndarray]) -> None:
    with pytest.raises(CvxmriError, match="samples no signal"):
        _sample(case, torch.zeros(8, 6))


def test_collate_concatenates_and_refuses_other_shapes(case: dict[str, np.ndarray]) -> None:
    sample = _sample(case)
    joined = collate_samples([sample, sample])
    assert joined.x0.shape == (4, 2, *RECON) and joined.slice_index == [4, 5, 4, 5]
    assert torch.equal(joined.y[2:], sample.y) and joined.reference is None
    wider = make_sample(
        torch.ones(1, 1, 8, 8, dtype=torch.complex64),
        torch.ones(8, 8),
        torch.ones(1, 1, 8, 8, dtype=torch.complex64),
        RECON,
    )
    with pytest.raises(CvxmriError, match="cannot batch slices of different shapes"):
        collate_samples([sample, wider])


def test_zero_filled_and_network_reconstructors(case: dict[str, np.ndarray]) -> None:
    sample = _sample(case)
    image = zero_filled(sample)
    support = sample.support[:, 0]
    assert image.shape == (2, *RECON) and image.is_complex()
    assert torch.equal(image, torch.complex(sample.x0[:, 0], sample.x0[:, 1]) * support)
    assert (support == 0).any() and (image[support == 0] == 0).all()

    identity = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(2)[:, :, None, None])
    assert torch.equal(network_reconstructor(identity)(sample), image)

    doubling = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        doubling.weight.copy_(2 * torch.eye(2)[:, :, None, None])
    torch.testing.assert_close(network_reconstructor(doubling)(sample), 2 * image)


def test_compressed_sensing_runs_on_the_full_grid_and_crops(
    case: dict[str, np.ndarray],
) -> None:
    maps = torch.from_numpy(case["maps"])
    image = torch.randn(2, 8, 6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    case = {**case, "kspace": Sense(maps)(image).numpy()}  # k-space of an image: A x = y solvable
    sample = _sample(case)
    config = CSConfig(lamda=1e-6, iterations=200)
    image = compressed_sensing(sample, config)
    full = cs_l1_wavelet_shifted(sample.y, sample.maps, sample.mask, config)
    assert image.shape == (2, *RECON) and full.shape == (2, 8, 6)
    # The wavelet shifts are seeded: the same numbers, to the bit.
    assert torch.equal(image, center_crop(full, RECON) * sample.support[:, 0])
    assert (image[sample.support[:, 0] == 0] == 0).all()
    # Almost no regularisation: the full-grid solution fits the measured k-space.
    residual = (sample.sense()(full) - sample.y).norm() / sample.y.norm()
    assert residual < 0.01


def old_pairs(data: SliceData, masks: torch.Tensor, batch: int = 16) -> dict[str, torch.Tensor]:
    """SliceData.pairs as it was written before `make_sample` (commit 1cabc60)."""
    from cvxmri.data.prepare import coil_support

    x0s, scales, supports = [], [], []
    for start in range(0, len(data), batch):
        part = slice(start, start + batch)
        mask = masks[part][:, None]
        maps = data.maps[part]
        x0 = Sense(maps, mask).H(data.kspace[part] * mask)
        scale = normalisation_scale(x0, data.recon_shape)
        x0s.append(center_crop(x0, data.recon_shape) / scale[:, None, None])
        scales.append(scale)
        supports.append(center_crop(coil_support(maps), data.recon_shape))
    scale = torch.cat(scales)
    return {
        "x0": to_channels(torch.cat(x0s)),
        "target": to_channels(data.targets / scale[:, None, None]),
        "support": torch.cat(supports)[:, None],
        "scale": scale,
    }


def test_training_pairs_are_bit_identical_to_the_old_pipeline(tiny_data: Path) -> None:
    data = SliceData(tiny_data, "train", MaskSpec("poisson", 4.0, calib_size=(6, 6)))
    for masks in (data.training_masks(0, 3), data.evaluation_masks()):
        for batch in (16, 5):
            new = data.pairs(masks, batch)
            old = old_pairs(data, masks, batch)
            for name, value in old.items():
                assert torch.equal(getattr(new, name), value), name


def test_compressed_sensing_is_repeatable_and_keeps_the_global_random_state(
    case: dict[str, np.ndarray],
) -> None:
    sample = _sample(case)
    config = CSConfig(lamda=1e-3, iterations=20)
    np.random.seed(1)  # noqa: NPY002 (sigpy draws from the legacy global generator)
    first = compressed_sensing(sample, config)
    after_first = np.random.random()  # noqa: NPY002 (sigpy draws from the legacy global generator)
    np.random.seed(2)  # noqa: NPY002 (sigpy draws from the legacy global generator)
    second = compressed_sensing(sample, config)
    assert torch.equal(first, second)
    np.random.seed(1)  # noqa: NPY002 (sigpy draws from the legacy global generator)
    assert np.random.random() == after_first  # noqa: NPY002 (the caller's stream is intact)
