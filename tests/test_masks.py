"""Tests for cvxmri.masks: fastMRI 1D masks, variable-density Poisson-disc masks, MaskSpec."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import zlib

import numpy as np
import pytest
from scipy.spatial import cKDTree

from cvxmri import masks
from cvxmri.errors import CvxmriError
from cvxmri.masks import (
    MaskSpec,
    apply_padding,
    cartesian_random_mask,
    equispaced_mask,
    poisson_disc_mask,
    realised_acceleration,
    seed_from_name,
)

ONE_D = [cartesian_random_mask, equispaced_mask]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def fastmri_random_columns(width: int, accel: float, cf: float, seed: int) -> np.ndarray:
    """fastMRI ``RandomMaskFunc`` restated, drawing from a Generator."""
    num_low = round(width * cf)
    prob = (width / accel - num_low) / (width - num_low)
    columns = np.random.default_rng(seed).uniform(size=width) < prob
    pad = (width - num_low + 1) // 2
    columns[pad : pad + num_low] = True
    return columns


def fastmri_equispaced_columns(width: int, accel: float, cf: float, seed: int) -> np.ndarray:
    """fastMRI ``EquispacedMaskFunc`` (fraction-adjusted) restated, drawing from a Generator."""
    num_low = round(width * cf)
    columns = np.zeros(width, dtype=bool)
    pad = (width - num_low + 1) // 2
    columns[pad : pad + num_low] = True
    adjusted_accel = (accel * (num_low - width)) / (num_low * accel - width)
    offset = np.random.default_rng(seed).integers(0, round(adjusted_accel))
    columns[np.around(np.arange(offset, width - 1, adjusted_accel)).astype(np.uint)] = True
    return columns


# --- 1D Cartesian masks -------------------------------------------------------------------


@pytest.mark.parametrize("fn", ONE_D)
def test_1d_mask_shape_dtype_and_constant_rows(fn):
    mask = fn((320, 368), 4, 0.04, rng(1))
    assert mask.shape == (320, 368)
    assert mask.dtype == np.bool_
    assert mask.flags.writeable
    assert (mask == mask[0]).all()


@pytest.mark.parametrize(
    ("width", "cf", "first", "count"),
    [(368, 0.04, 177, 15), (65, 0.08, 30, 5), (320, 0.08, 147, 26)],
)
@pytest.mark.parametrize("fn", ONE_D)
def test_1d_centre_block(fn, width, cf, first, count):
    always = np.logical_and.reduce([fn((2, width), 4, cf, rng(seed))[0] for seed in range(60)])
    np.testing.assert_array_equal(np.flatnonzero(always), np.arange(first, first + count))


@pytest.mark.parametrize(
    ("width", "accel", "cf"), [(368, 4, 0.08), (368, 8, 0.04), (640, 4.5, 0.04), (65, 3, 0.1)]
)
def test_cartesian_matches_fastmri_formula(width, accel, cf):
    for seed in range(5):
        mask = cartesian_random_mask((3, width), accel, cf, rng(seed))
        np.testing.assert_array_equal(mask[0], fastmri_random_columns(width, accel, cf, seed))


@pytest.mark.parametrize("accel", [4, 8])
def test_cartesian_expected_acceleration(accel):
    width, seeds = 368, 2000
    masks_ = np.array(
        [cartesian_random_mask((1, width), accel, 0.04, rng(s))[0] for s in range(seeds)]
    )
    counts = masks_.sum(axis=1)
    assert width / counts.mean() == pytest.approx(accel, rel=0.02)
    if accel == 4:
        mean_accel = np.mean([realised_acceleration(m) for m in masks_])
        assert mean_accel == pytest.approx(accel, rel=0.02)


def test_cartesian_column_keep_probability():
    width, accel, cf, seeds = 368, 4, 0.04, 2000
    num_low = 15
    prob = (width / accel - num_low) / (width - num_low)
    masks_ = np.array(
        [cartesian_random_mask((1, width), accel, cf, rng(s))[0] for s in range(seeds)]
    )
    outer = np.ones(width, dtype=bool)
    outer[177:192] = False
    freq = masks_[:, outer].mean(axis=0)
    sigma = math.sqrt(prob * (1 - prob) / seeds)
    assert freq.mean() == pytest.approx(prob, abs=4 * sigma / math.sqrt(outer.sum()))
    assert np.abs(freq - prob).max() < 5 * sigma
    assert (masks_[:, ~outer]).all()


@pytest.mark.parametrize(
    ("width", "accel", "cf"), [(368, 4, 0.08), (368, 8, 0.04), (640, 4, 0.08), (65, 3, 0.1)]
)
def test_equispaced_matches_fastmri_formula(width, accel, cf):
    for seed in range(5):
        mask = equispaced_mask((3, width), accel, cf, rng(seed))
        np.testing.assert_array_equal(mask[0], fastmri_equispaced_columns(width, accel, cf, seed))


def test_equispaced_by_hand():
    # W = 16, R = 4, cf = 0.125: num_low = 2, prob = (4 - 2) / 14, adjusted_accel = 7,
    # centre [7, 9), outer columns offset + 7 k below 15.
    for seed in range(10):
        offset = int(rng(seed).integers(0, 7))
        expected = {offset, offset + 7, 7, 8} | ({offset + 14} if offset + 14 < 15 else set())
        mask = equispaced_mask((1, 16), 4, 0.125, rng(seed))
        assert set(np.flatnonzero(mask[0]).tolist()) == expected


def test_equispaced_acceleration_close():
    for seed in range(5):
        accel = realised_acceleration(equispaced_mask((1, 368), 4, 0.08, rng(seed)))
        assert accel == pytest.approx(4, rel=0.05)


@pytest.mark.parametrize("fn", ONE_D)
def test_1d_seeding(fn):
    a = fn((8, 368), 4, 0.04, rng(7))
    np.testing.assert_array_equal(a, fn((8, 368), 4, 0.04, rng(7)))
    assert not np.array_equal(a, fn((8, 368), 4, 0.04, rng(8)))


@pytest.mark.parametrize(
    "make",
    [
        lambda g: cartesian_random_mask((16, 64), 4, 0.08, g),
        lambda g: equispaced_mask((16, 64), 4, 0.08, g),
        lambda g: poisson_disc_mask((64, 64), 4, g),
        lambda g: MaskSpec("poisson", 4).sample((64, 64), g),
    ],
)
def test_global_rng_untouched(make):
    # The legacy global state is exactly what must stay untouched.
    state = np.random.get_state()  # noqa: NPY002
    make(rng(3))
    after = np.random.get_state()  # noqa: NPY002
    assert state[0] == after[0]
    np.testing.assert_array_equal(state[1], after[1])
    assert state[2:] == after[2:]


@pytest.mark.parametrize("fn", ONE_D)
def test_1d_centre_too_large(fn):
    with pytest.raises(CvxmriError, match="too large"):
        fn((8, 100), 4, 0.3, rng())


def test_equispaced_centre_exactly_w_over_r():
    # 25 central columns of 100 are already W / R = 25 columns: fastMRI divides by zero.
    assert cartesian_random_mask((1, 100), 4, 0.25, rng()).sum() == 25
    with pytest.raises(CvxmriError, match="too large"):
        equispaced_mask((1, 100), 4, 0.25, rng())


# --- Poisson-disc masks -------------------------------------------------------------------

POISSON_SHAPES = [(128, 128), (320, 368), (96, 160), (127, 65)]


def calib_slices(shape, calib):
    top = shape[0] // 2 - calib[0] // 2
    left = shape[1] // 2 - calib[1] // 2
    return slice(top, top + calib[0]), slice(left, left + calib[1])


@pytest.mark.parametrize("shape", POISSON_SHAPES)
@pytest.mark.parametrize("accel", [2, 3, 4, 6, 8])
def test_poisson_acceleration_and_calibration(shape, accel):
    mask = poisson_disc_mask(shape, accel, rng(accel))
    assert mask.shape == shape
    assert mask.dtype == np.bool_
    assert realised_acceleration(mask) == pytest.approx(accel, rel=0.03)
    assert mask[calib_slices(shape, (16, 16))].all()


@pytest.mark.parametrize(
    ("shape", "calib", "rows", "cols"),
    [((127, 65), (16, 15), (55, 71), (25, 40)), ((96, 160), (24, 8), (36, 60), (76, 84))],
)
def test_poisson_calibration_position(shape, calib, rows, cols):
    assert calib_slices(shape, calib) == (slice(*rows), slice(*cols))
    mask = poisson_disc_mask(shape, 4, rng(), calib_size=calib)
    assert mask[rows[0] : rows[1], cols[0] : cols[1]].all()


def normalised_radius(shape):
    rows = (np.arange(shape[0]) - shape[0] // 2) / (shape[0] / 2)
    cols = (np.arange(shape[1]) - shape[1] // 2) / (shape[1] / 2)
    return np.hypot(rows[:, None], cols[None, :])


@pytest.mark.parametrize("accel", [4, 8])
def test_poisson_density_decreases_outward(accel):
    shape = (320, 368)
    mask = poisson_disc_mask(shape, accel, rng(5))
    rho = normalised_radius(shape)
    fractions = [mask[(rho >= a) & (rho < a + 0.2)].mean() for a in (0.2, 0.4, 0.6, 0.8)]
    assert all(inner > outer for inner, outer in itertools.pairwise(fractions))
    assert fractions[0] > 2 * fractions[-1]


def conflicting_pairs(mask, radius2, exclude):
    """Pairs of samples (not both in ``exclude``) closer than max of their radii."""
    points = np.argwhere(mask)
    r2 = radius2[mask]
    pairs = cKDTree(points).query_pairs(math.sqrt(r2.max()), output_type="ndarray")
    d2 = ((points[pairs[:, 0]] - points[pairs[:, 1]]) ** 2).sum(axis=1)
    bad = d2 < np.maximum(r2[pairs[:, 0]], r2[pairs[:, 1]])
    both_excluded = exclude[mask][pairs[:, 0]] & exclude[mask][pairs[:, 1]]
    return int((bad & ~both_excluded).sum()), len(pairs)


class RecordingDartThrow:
    """Wraps masks._dart_throw to record each (radius2, result)."""

    def __init__(self):
        self.calls = []
        self.inner = masks._dart_throw

    def __call__(self, radius2, priority, calib):
        out = self.inner(radius2, priority, calib)
        self.calls.append((radius2, out.copy()))
        return out


@pytest.mark.parametrize(("shape", "accel"), [((128, 128), 4), ((127, 65), 8), ((96, 160), 2)])
def test_poisson_respects_radius_law(monkeypatch, shape, accel):
    recorder = RecordingDartThrow()
    monkeypatch.setattr(masks, "_dart_throw", recorder)
    mask = poisson_disc_mask(shape, accel, rng(11))
    radius2 = next(r2 for r2, out in recorder.calls if np.array_equal(out, mask))
    calib = np.zeros(shape, dtype=bool)
    calib[calib_slices(shape, (16, 16))] = True
    bad, checked = conflicting_pairs(mask, radius2, calib)
    assert checked > 0
    assert bad == 0
    # The radius grows with rho as s (1 + 2 rho) (default variable_density 2).
    rho = normalised_radius(shape)
    np.testing.assert_allclose(
        np.sqrt(radius2) / (1 + 2 * rho), math.sqrt(radius2[0, 0]) / (1 + 2 * rho[0, 0])
    )
    # A uniformly random mask of the same density breaks the rule.
    shuffled = rng(0).permutation(mask.ravel()).reshape(shape)
    assert conflicting_pairs(shuffled, radius2, calib)[0] > 0


def sequential_dart_throw(radius2, priority, calib):
    """Reference: visit points by decreasing priority, accept if no conflict."""
    height, width = radius2.shape
    ys, xs = np.mgrid[:height, :width]
    accepted = calib.copy()
    for k in np.argsort(-priority.ravel()):
        y, x = divmod(int(k), width)
        if accepted[y, x]:
            continue
        d2 = (ys - y) ** 2 + (xs - x) ** 2
        if not (accepted & ((d2 < radius2[y, x]) | (d2 < radius2))).any():
            accepted[y, x] = True
    return accepted


@pytest.mark.parametrize("seed", range(6))
def test_dart_throw_equals_sequential_order(seed):
    g = rng(seed)
    shape = (int(g.integers(8, 30)), int(g.integers(8, 30)))
    radius2 = (g.uniform(0.5, 2.5) * (1 + g.uniform(0, 3) * normalised_radius(shape))) ** 2
    priority = g.permutation(shape[0] * shape[1]).reshape(shape)
    calib = np.zeros(shape, dtype=bool)
    calib[calib_slices(shape, (4, 6))] = True
    got = masks._dart_throw(radius2, priority, calib)
    np.testing.assert_array_equal(got, sequential_dart_throw(radius2, priority, calib))
    assert got[calib].all()
    # Maximal: every point left out conflicts with a sample.
    points = np.argwhere(got)
    for y, x in np.argwhere(~got):
        d2 = ((points - (y, x)) ** 2).sum(axis=1)
        assert (d2 < np.maximum(radius2[y, x], radius2[got])).any()


def test_poisson_deterministic_per_seed():
    a = poisson_disc_mask((96, 160), 4, rng(21))
    np.testing.assert_array_equal(a, poisson_disc_mask((96, 160), 4, rng(21)))
    assert not np.array_equal(a, poisson_disc_mask((96, 160), 4, rng(22)))


def test_poisson_no_calibration_and_uniform_density():
    mask = poisson_disc_mask((64, 96), 5, rng(), calib_size=(0, 0), variable_density=0.0)
    assert realised_acceleration(mask) == pytest.approx(5, rel=0.03)


def test_poisson_removal_fallback(monkeypatch):
    # With a uniform radius the count only changes when r^2 crosses an integer, so a tight
    # tolerance cannot be met by the scale search: samples are removed instead.
    recorder = RecordingDartThrow()
    monkeypatch.setattr(masks, "_dart_throw", recorder)
    shape, accel = (64, 64), 5
    mask = poisson_disc_mask(shape, accel, rng(2), variable_density=0.0, tol=0.001, max_iter=3)
    assert not any(np.array_equal(out, mask) for _, out in recorder.calls)
    assert mask.sum() == round(64 * 64 / accel)
    assert mask[calib_slices(shape, (16, 16))].all()
    assert any((out >= mask).all() for _, out in recorder.calls)


@pytest.mark.parametrize(
    ("shape", "accel", "calib"),
    [((32, 32), 8, (16, 16)), ((64, 64), 20, (16, 16)), ((4, 4), 3, (0, 0))],
)
def test_poisson_unreachable(shape, accel, calib):
    with pytest.raises(CvxmriError, match="unreachable"):
        poisson_disc_mask(shape, accel, rng(), calib_size=calib)


def test_poisson_calibration_exactly_the_target():
    mask = poisson_disc_mask((32, 32), 4, rng(), calib_size=(16, 16))
    assert mask.sum() == 256
    assert mask[8:24, 8:24].all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"acceleration": 1},
        {"acceleration": 0.5},
        {"acceleration": math.nan},
        {"acceleration": math.inf},
        {"calib_size": (-1, 16)},
        {"calib_size": (200, 16)},
        {"calib_size": 16},
        {"variable_density": -1.0},
        {"variable_density": math.nan},
        {"tol": 0.0},
        {"tol": 1.0},
        {"max_iter": 0},
        {"shape": (0, 16)},
        {"shape": (16.0, 16)},
        {"rng": 0},
    ],
)
def test_poisson_invalid(kwargs):
    args = {"shape": (64, 64), "acceleration": 4, "rng": rng()} | kwargs
    with pytest.raises(CvxmriError):
        poisson_disc_mask(**args)


# --- Validation, MaskSpec and helpers --------------------------------------------------------

BAD_ACCELERATIONS = [1, 0.5, math.nan, math.inf, -math.inf, -4, "4", True, None]
BAD_FRACTIONS = [0, 1, -0.1, 1.5, math.nan, "0.04", None]


@pytest.mark.parametrize("fn", ONE_D)
@pytest.mark.parametrize("accel", BAD_ACCELERATIONS)
def test_1d_bad_acceleration(fn, accel):
    with pytest.raises(CvxmriError, match="acceleration"):
        fn((8, 64), accel, 0.08, rng())


@pytest.mark.parametrize("fn", ONE_D)
@pytest.mark.parametrize("cf", BAD_FRACTIONS)
def test_1d_bad_center_fraction(fn, cf):
    with pytest.raises(CvxmriError, match="center_fraction"):
        fn((8, 64), 4, cf, rng())


@pytest.mark.parametrize("fn", ONE_D)
@pytest.mark.parametrize("shape", [(0, 64), (8, -1), (8,), (8, 64.0), None])
def test_1d_bad_shape(fn, shape):
    with pytest.raises(CvxmriError, match="shape"):
        fn(shape, 4, 0.08, rng())


@pytest.mark.parametrize("fn", ONE_D)
def test_1d_bad_rng(fn):
    with pytest.raises(CvxmriError, match="rng"):
        fn((8, 64), 4, 0.08, np.random.RandomState(0))


@pytest.mark.parametrize("accel", BAD_ACCELERATIONS)
def test_spec_bad_acceleration(accel):
    with pytest.raises(CvxmriError, match="acceleration"):
        MaskSpec("cartesian", accel).validate()


@pytest.mark.parametrize("cf", BAD_FRACTIONS)
def test_spec_bad_center_fraction(cf):
    with pytest.raises(CvxmriError, match="center_fraction"):
        MaskSpec("equispaced", 4, center_fraction=cf).validate()


@pytest.mark.parametrize("kind", ["radial", "Poisson", "", None])
def test_spec_unknown_kind(kind):
    spec = MaskSpec(kind, 4)
    with pytest.raises(CvxmriError, match="kind"):
        spec.validate()
    with pytest.raises(CvxmriError, match="kind"):
        spec.sample((64, 64), rng())


@pytest.mark.parametrize("calib", [(-1, 16), (16, -2), (16,), (16.0, 16)])
def test_spec_bad_calib_size(calib):
    with pytest.raises(CvxmriError, match="calib_size"):
        MaskSpec("poisson", 4, calib_size=calib).validate()


@pytest.mark.parametrize(
    ("spec", "fn", "args"),
    [
        (MaskSpec("poisson", 4, calib_size=(8, 12)), poisson_disc_mask, {"calib_size": (8, 12)}),
        (MaskSpec("cartesian", 6, 0.08), cartesian_random_mask, {"center_fraction": 0.08}),
        (MaskSpec("equispaced", 4), equispaced_mask, {"center_fraction": 0.04}),
    ],
)
def test_spec_sample_dispatches(spec, fn, args):
    spec.validate()
    expected = fn(shape=(64, 96), acceleration=spec.acceleration, rng=rng(4), **args)
    np.testing.assert_array_equal(spec.sample((64, 96), rng(4)), expected)
    padded = spec.sample((64, 96), rng(4), padding=(10, 80))
    np.testing.assert_array_equal(padded, apply_padding(expected, (10, 80)))


def test_spec_describe_and_frozen():
    assert MaskSpec("poisson", 4).describe() == "poisson 4x (calib 16x16)"
    assert MaskSpec("cartesian", 4).describe() == "cartesian 4x (centre 0.04)"
    assert MaskSpec("equispaced", 8, 0.08).describe() == "equispaced 8x (centre 0.08)"
    assert MaskSpec("poisson", 2.5, calib_size=(24, 12)).describe() == "poisson 2.5x (calib 24x12)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskSpec("poisson", 4).acceleration = 8  # type: ignore[misc]


def test_apply_padding_zeros_outside_columns():
    mask = np.ones((4, 10), dtype=bool)
    padded = apply_padding(mask, (2, 7))
    expected = np.zeros(10, dtype=bool)
    expected[2:7] = True
    assert (padded == expected).all()
    assert mask.all()  # input untouched
    np.testing.assert_array_equal(apply_padding(mask, None), mask)
    np.testing.assert_array_equal(apply_padding(mask, (0, 10)), mask)
    batched = apply_padding(np.ones((2, 3, 4, 10), dtype=bool), (3, 5))
    assert (batched.sum(axis=-1) == 2).all() and batched[..., 3:5].all()


@pytest.mark.parametrize("padding", [(5, 5), (7, 2), (-1, 5), (0, 11), (1.0, 5), (1,), 3])
def test_apply_padding_invalid(padding):
    with pytest.raises(CvxmriError, match="padding"):
        apply_padding(np.ones((4, 10), dtype=bool), padding)


def test_seed_from_name():
    assert seed_from_name("123456789") == 0xCBF43926  # the standard CRC-32 check value
    name = "file1000001.h5"
    assert seed_from_name(name) == seed_from_name(name) == zlib.crc32(name.encode())
    assert 0 <= seed_from_name("ü.h5") < 2**32
    assert seed_from_name("file1000001.h5") != seed_from_name("file1000002.h5")
    with pytest.raises(CvxmriError):
        seed_from_name(b"file.h5")  # type: ignore[arg-type]


def test_realised_acceleration():
    mask = np.zeros((4, 8), dtype=bool)
    mask[:, ::4] = True
    assert realised_acceleration(mask) == 4.0
    with pytest.raises(CvxmriError, match="nothing"):
        realised_acceleration(np.zeros((4, 8), dtype=bool))


# Draws of the 2D kinds made with the code before 3D masks existed (commit 1cabc60): SHA-256
# (first 16 hex digits) of ``mask.tobytes()`` and the generator's next ``integers(2**62)``,
# which pins how many numbers each draw consumed.
_POISSON = MaskSpec("poisson", 4.0)
_POISSON_8X = MaskSpec("poisson", 8.0, calib_size=(12, 10))
_POISSON_SMALL = MaskSpec("poisson", 4.0, calib_size=(6, 6))
_CARTESIAN = MaskSpec("cartesian", 4.0, 0.04)
_CARTESIAN_8X = MaskSpec("cartesian", 8.0, 0.08)
_EQUISPACED = MaskSpec("equispaced", 4.0, 0.08)
STORED_2D_DRAWS = [
    (_POISSON, (64, 96), None, 0, "0283aad27b21fbd8", 3922192517893714476),
    (_POISSON, (64, 96), None, 1, "f9425da13676a35e", 2306619938289641711),
    (_POISSON_8X, (128, 128), None, 0, "d3899b4724b8bf89", 391161050096076404),
    (_POISSON_8X, (128, 128), None, 1, "19bb66a0d2b3eb9f", 2216330469451613400),
    (_POISSON_SMALL, (32, 30), (2, 28), 0, "4a9b69abb43f989c", 304879755136735771),
    (_POISSON_SMALL, (32, 30), (2, 28), 1, "32cd1292ec564f3d", 1358516972866892504),
    (_CARTESIAN, (64, 368), None, 0, "42516ba5a23b5bba", 4498851797125794534),
    (_CARTESIAN, (64, 368), None, 1, "fe23acf9362aaf84", 2026525454948512988),
    (_CARTESIAN_8X, (20, 96), (3, 90), 0, "3996d6194c89ef4e", 686052915257771543),
    (_CARTESIAN_8X, (20, 96), (3, 90), 1, "2b33cea3f6fe1ca9", 488475486377706491),
    (_EQUISPACED, (16, 368), None, 0, "fc8329e225a38b7b", 1244171615822312904),
    (_EQUISPACED, (16, 368), None, 1, "afca9bce7a4686aa", 4383240139369130521),
]


@pytest.mark.parametrize(("spec", "shape", "padding", "seed", "digest", "after"), STORED_2D_DRAWS)
def test_2d_draws_unchanged(spec, shape, padding, seed, digest, after):
    g = rng(seed)
    mask = spec.sample(shape, g, padding=padding)
    assert mask.shape == shape
    assert hashlib.sha256(mask.tobytes()).hexdigest()[:16] == digest
    assert int(g.integers(2**62)) == after
    # The explicit ndim=2 is the default.
    g = rng(seed)
    np.testing.assert_array_equal(spec.sample(shape, g, padding=padding, ndim=2), mask)
    assert int(g.integers(2**62)) == after
