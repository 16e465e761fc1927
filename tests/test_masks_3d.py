"""Masks for 3D Cartesian k-space: (ky, kz) patterns, uniform random with calibration box."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvxmri.errors import CvxmriError
from cvxmri.masks import (
    GRID_KINDS,
    MaskSpec,
    poisson_disc_mask,
    realised_acceleration,
    uniform_random_mask,
)
from cvxmri.physics import Sense, fftnc


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def calib_box(shape: tuple[int, int], calib: tuple[int, int]) -> tuple[slice, slice]:
    top = shape[0] // 2 - calib[0] // 2
    left = shape[1] // 2 - calib[1] // 2
    return slice(top, top + calib[0]), slice(left, left + calib[1])


SHAPES = [(64, 48), (128, 96), (48, 64), (37, 29)]
ACCELERATIONS = [2, 3.5, 4, 8]


@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("accel", ACCELERATIONS)
def test_3d_spec_realises_acceleration(kind: str, shape: tuple[int, int], accel: float) -> None:
    calib = (8, 6)
    spec = MaskSpec(kind, accel, calib_size=calib)
    mask = spec.sample(shape, rng(int(accel * 10)), ndim=3)
    assert mask.shape == shape
    assert mask.dtype == np.bool_
    assert realised_acceleration(mask) == pytest.approx(accel, rel=0.03)
    assert mask[calib_box(shape, calib)].all()


@pytest.mark.parametrize("kind", GRID_KINDS)
def test_3d_spec_is_deterministic_per_seed(kind: str) -> None:
    spec = MaskSpec(kind, 6.0, calib_size=(12, 12))
    a = spec.sample((80, 60), rng(3), ndim=3)
    np.testing.assert_array_equal(a, spec.sample((80, 60), rng(3), ndim=3))
    assert not np.array_equal(a, spec.sample((80, 60), rng(4), ndim=3))


def test_3d_spec_dispatches_to_the_grid_functions() -> None:
    calib = (10, 8)
    poisson = MaskSpec("poisson", 5.0, calib_size=calib).sample((64, 48), rng(1), ndim=3)
    np.testing.assert_array_equal(poisson, poisson_disc_mask((64, 48), 5.0, rng(1), calib))
    random = MaskSpec("random", 5.0, calib_size=calib).sample((64, 48), rng(1), ndim=3)
    np.testing.assert_array_equal(random, uniform_random_mask((64, 48), 5.0, rng(1), calib))
    # The grid kinds draw the same pattern for a 2D plane and for a (ky, kz) plane.
    np.testing.assert_array_equal(
        MaskSpec("random", 5.0, calib_size=calib).sample((64, 48), rng(1)), random
    )


def test_uniform_random_mask_count_and_position_by_hand() -> None:
    # 10 x 8 = 80 points at 4x: 20 samples, the 2 x 2 box at rows 4-5, columns 3-4, plus 16
    # of the 76 others drawn by rng.choice.
    mask = uniform_random_mask((10, 8), 4, rng(2), calib_size=(2, 2))
    assert mask.sum() == 20
    assert mask[4:6, 3:5].all()
    calib = np.zeros((10, 8), dtype=bool)
    calib[4:6, 3:5] = True
    expected = calib.copy()
    expected.flat[rng(2).choice(np.flatnonzero(~calib), size=16, replace=False)] = True
    np.testing.assert_array_equal(mask, expected)


def test_uniform_random_mask_is_uniform_outside_the_box() -> None:
    # Each non-calibration point is kept with probability (n - n_calib) / (N - n_calib).
    shape, calib, draws = (24, 20), (4, 4), 3000
    masks = np.stack([uniform_random_mask(shape, 4, rng(s), calib) for s in range(draws)])
    box = np.zeros(shape, dtype=bool)
    box[calib_box(shape, calib)] = True
    prob = (120 - 16) / (480 - 16)
    freq = masks[:, ~box].mean(axis=0)
    sigma = math.sqrt(prob * (1 - prob) / draws)
    assert abs(freq.mean() - prob) < 4 * sigma / math.sqrt(freq.size)
    assert np.abs(freq - prob).max() < 5 * sigma
    assert masks[:, box].all()
    assert (masks.sum(axis=(1, 2)) == 120).all()


def test_poisson_is_denser_at_the_centre_than_random() -> None:
    shape = (128, 96)
    rows = (np.arange(shape[0]) - shape[0] // 2) / (shape[0] / 2)
    cols = (np.arange(shape[1]) - shape[1] // 2) / (shape[1] / 2)
    rho = np.hypot(rows[:, None], cols[None, :])
    ring = (rho > 0.3) & (rho < 0.5)
    edge = rho > 0.8
    poisson = MaskSpec("poisson", 6.0, calib_size=(8, 8)).sample(shape, rng(), ndim=3)
    random = MaskSpec("random", 6.0, calib_size=(8, 8)).sample(shape, rng(), ndim=3)
    assert poisson[ring].mean() > 2 * poisson[edge].mean()
    assert random[ring].mean() == pytest.approx(random[edge].mean(), rel=0.25)


def test_3d_mask_broadcasts_over_the_readout() -> None:
    # A (ky, kz) pattern zeroes the same k-space columns for every kx and every coil.
    pattern = MaskSpec("random", 3.0, calib_size=(2, 2)).sample((12, 10), rng(5), ndim=3)
    mask = torch.from_numpy(pattern).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(1, 2, 8, 12, 10, dtype=torch.complex128, generator=gen)
    x = torch.randn(1, 8, 12, 10, dtype=torch.complex128, generator=gen)
    y = Sense(maps, mask, ndim=3)(x)
    full = fftnc(maps * x.unsqueeze(1), ndim=3)
    keep = torch.from_numpy(pattern)
    assert torch.equal(y[:, :, :, keep], full[:, :, :, keep])
    assert torch.count_nonzero(y[:, :, :, ~keep]) == 0


@pytest.mark.parametrize(
    ("spec", "shape", "kwargs", "message"),
    [
        (MaskSpec("cartesian", 4.0), (64, 48), {}, "cartesian mask selects lines"),
        (MaskSpec("equispaced", 4.0), (64, 48), {}, "equispaced mask selects lines"),
        (MaskSpec("random", 1.0), (64, 48), {}, "acceleration must be finite and > 1"),
        (MaskSpec("poisson", 0.5), (64, 48), {}, "acceleration must be finite and > 1"),
        (MaskSpec("random", 4.0, calib_size=(70, 8)), (64, 48), {}, "larger than the mask"),
        (MaskSpec("poisson", 4.0, calib_size=(8, 49)), (64, 48), {}, "larger than the mask"),
        (MaskSpec("random", 8.0, calib_size=(32, 32)), (64, 48), {}, "calibration region alone"),
        (MaskSpec("random", 4.0), (64, 48), {"padding": (2, 40)}, "padding applies"),
        (MaskSpec("file", 4.0), (64, 48), {}, "read from each file"),
        (MaskSpec("random", 4.0), (64, 48, 8), {}, "mask shape must be"),
        (MaskSpec("random", 4.0), (64, 48), {"ndim": 4}, "ndim must be 2 or 3"),
        (MaskSpec("random", 4.0), (64, 48), {"ndim": True}, "ndim must be 2 or 3"),
    ],
)
def test_3d_bad_parameters(spec: MaskSpec, shape, kwargs, message: str) -> None:
    with pytest.raises(CvxmriError, match=message) as info:
        spec.sample(shape, rng(), **({"ndim": 3} | kwargs))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"acceleration": 1},
        {"acceleration": math.inf},
        {"calib_size": (-1, 4)},
        {"calib_size": (4, 49)},
        {"tol": 0.0},
        {"shape": (0, 16)},
        {"rng": 0},
        {"acceleration": 4000},
    ],
)
def test_uniform_random_mask_invalid(kwargs) -> None:
    args = {"shape": (64, 48), "acceleration": 4, "rng": rng(), "calib_size": (4, 4)} | kwargs
    with pytest.raises(CvxmriError):
        uniform_random_mask(**args)


def test_validate_takes_ndim_and_describe() -> None:
    MaskSpec("poisson", 4.0).validate(ndim=3)
    MaskSpec("cartesian", 4.0).validate(ndim=2)
    with pytest.raises(CvxmriError, match="lines of 2D k-space"):
        MaskSpec("cartesian", 4.0).validate(ndim=3)
    assert MaskSpec("random", 8, calib_size=(24, 24)).describe() == "random 8x (calib 24x24)"
