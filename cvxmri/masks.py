"""Undersampling masks for 2D k-space and for 3D Cartesian k-space.

2D k-space arrays are (..., H, W) with W (the last axis) the phase-encoding direction, along
which the 1D masks select columns (the fastMRI convention). 3D Cartesian k-space is
(..., kx, ky, kz) with the readout kx fully sampled: its mask is a 2D pattern over the
phase-encoding plane (ky, kz), which broadcasts over kx (``mask[None]`` or plain NumPy/torch
broadcasting against the last two axes). Every mask function returns a NumPy ``bool`` array
of the 2D grid shape it is given ((H, W) or (ky, kz)) and draws its randomness from the
``numpy.random.Generator`` it is given; none touches NumPy's global random state.

* `cartesian_random_mask` and `equispaced_mask` reproduce fastMRI's ``RandomMaskFunc`` and
  ``EquispacedMaskFunc`` (the fraction-adjusted version): a fully sampled block of
  ``round(W * center_fraction)`` central columns plus random or equispaced outer columns chosen
  so that the expected acceleration is the one requested.
* `poisson_disc_mask` is 2D variable-density Poisson-disc sampling of the whole k-space plane
  with a fully sampled calibration rectangle, tuned so that the realised acceleration is within
  a tolerance of the request. It serves 2D slices (over (H, W)) and 3D volumes (over
  (ky, kz)).
* `uniform_random_mask` is uniformly random sampling of a 2D grid with a fully sampled
  calibration rectangle and the whole number of samples closest to ``size / acceleration``;
  for the (ky, kz) plane of 3D acquisitions (and, like Poisson disc, usable over a 2D
  slice's plane).
* `MaskSpec` names one of these and samples it (``ndim=3`` for a (ky, kz) pattern);
  `seed_from_name` gives the fixed per-file seed used for evaluation masks.

Invalid parameters raise :class:`~cvxmri.errors.CvxmriError` with a one-line message.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cvxmri.errors import CvxmriError

__all__ = [
    "GRID_KINDS",
    "MASK_KINDS",
    "MaskSpec",
    "apply_padding",
    "cartesian_random_mask",
    "equispaced_mask",
    "poisson_disc_mask",
    "realised_acceleration",
    "seed_from_name",
    "uniform_random_mask",
]

# "file": the mask stored in each fastMRI file's ``mask`` dataset (evaluation only).
MASK_KINDS = ("poisson", "cartesian", "equispaced", "random", "file")
# The kinds that draw a pattern over a whole 2D grid, hence the (ky, kz) plane of a volume.
GRID_KINDS = ("poisson", "random")

BoolArray = npt.NDArray[np.bool_]

# Samples per pixel of saturated dart throwing with exclusion radius r is about packing / r^2
# (0.547 / (pi r^2 / 4) = 0.70 / r^2 in the continuum; about 0.58 / r^2 measured on the pixel
# grid with the radius law below). Only the first guess of the scale uses it: later guesses
# are corrected by the measured counts.
_PACKING = 0.58


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        height, width = shape
    except (TypeError, ValueError):
        raise CvxmriError(f"mask shape must be (H, W), got {shape!r}") from None
    dims = []
    for dim in (height, width):
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise CvxmriError(f"mask shape must be two positive integers, got {shape!r}")
        dims.append(int(dim))
    return dims[0], dims[1]


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise CvxmriError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_acceleration(acceleration: Any) -> float:
    value = _real("acceleration", acceleration)
    if not math.isfinite(value) or value <= 1:
        raise CvxmriError(f"acceleration must be finite and > 1, got {acceleration!r}")
    return value


def _check_center_fraction(center_fraction: Any) -> float:
    value = _real("center_fraction", center_fraction)
    if not 0 < value < 1:  # also rejects NaN
        raise CvxmriError(f"center_fraction must be in (0, 1), got {center_fraction!r}")
    return value


def _check_calib_size(calib_size: Any) -> tuple[int, int]:
    try:
        rows, cols = calib_size
    except (TypeError, ValueError):
        raise CvxmriError(f"calib_size must be (rows, cols), got {calib_size!r}") from None
    for dim in (rows, cols):
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            raise CvxmriError(f"calib_size must be two integers >= 0, got {calib_size!r}")
    return int(rows), int(cols)


def _check_calib_within(calib_size: Any, shape: tuple[int, int]) -> tuple[int, int]:
    """`_check_calib_size`, and the rectangle must fit in the grid ``shape``."""
    calib_size = _check_calib_size(calib_size)
    if calib_size[0] > shape[0] or calib_size[1] > shape[1]:
        raise CvxmriError(f"calib_size {calib_size} larger than the mask shape {shape}")
    return calib_size


def _check_tol(tol: Any) -> float:
    value = _real("tol", tol)
    if not 0 < value < 1:
        raise CvxmriError(f"tol must be in (0, 1), got {tol!r}")
    return value


def _sample_counts(
    shape: tuple[int, int],
    acceleration: float,
    calib_size: tuple[int, int],
    num_calib: int,
    tol: float,
) -> tuple[int, int, int]:
    """The sample counts allowed on a grid of ``shape`` points: ``(low, high, target)``.

    ``[low, high]`` are the counts ``n >= num_calib`` whose realised acceleration
    ``size / n`` is within ``tol`` of the request, and ``target`` is the one closest to
    ``round(size / acceleration)``.

    Raises:
        CvxmriError: when no count qualifies: the calibration rectangle alone is too large,
            or no whole number of samples gives an acceleration within ``tol``.
    """
    height, width = shape
    total = height * width
    low = max(math.ceil(total / (acceleration * (1 + tol))), num_calib, 1)
    high = min(math.floor(total / (acceleration * (1 - tol))), total)
    if low > high:
        if num_calib > total / (acceleration * (1 - tol)):
            raise CvxmriError(
                f"acceleration {acceleration} unreachable: the {calib_size[0]}x{calib_size[1]} "
                f"calibration region alone has {num_calib} samples, more than the "
                f"{total / acceleration:.0f} it allows on a {height}x{width} grid"
            )
        raise CvxmriError(
            f"acceleration {acceleration} unreachable within tol {tol} on a {height}x{width} grid"
        )
    return low, high, min(max(round(total / acceleration), low), high)


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise CvxmriError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _center_columns(width: int, acceleration: float, center_fraction: float) -> tuple[int, float]:
    """fastMRI's number of central columns and keep probability of the other columns."""
    num_low = round(width * center_fraction)
    if num_low >= width:
        raise CvxmriError(
            f"center_fraction {center_fraction} keeps all {width} columns; nothing to undersample"
        )
    prob = (width / acceleration - num_low) / (width - num_low)
    if not 0 <= prob <= 1:
        raise CvxmriError(
            f"center_fraction {center_fraction} too large for acceleration {acceleration}: "
            f"{num_low} central columns exceed {width}/{acceleration:g} = "
            f"{width / acceleration:.1f}"
        )
    return num_low, prob


def _columns_to_mask(columns: BoolArray, height: int) -> BoolArray:
    return np.broadcast_to(columns, (height, columns.size)).copy()


def cartesian_random_mask(
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float,
    rng: np.random.Generator,
) -> BoolArray:
    """Random 1D Cartesian mask with fastMRI ``RandomMaskFunc`` semantics.

    ``num_low = round(W * center_fraction)`` central columns ``[pad, pad + num_low)``, with
    ``pad = (W - num_low + 1) // 2``, are always sampled; every other column is kept
    independently with probability ``prob = (W / R - num_low) / (W - num_low)``, so the
    expected number of columns is ``W / R``. As in fastMRI, one uniform number is drawn per
    column (``rng.uniform(size=W)``), including the central ones.

    Args:
        shape: (H, W) of the k-space plane; the mask is constant along H.
        acceleration: the expected acceleration R, finite and > 1.
        center_fraction: fraction of columns in the fully sampled centre, in (0, 1).
        rng: the source of randomness.

    Returns:
        bool array of shape (H, W).

    Raises:
        CvxmriError: for an invalid parameter, or a centre too large for the acceleration
            (``prob < 0``).
    """
    height, width = _check_shape(shape)
    acceleration = _check_acceleration(acceleration)
    center_fraction = _check_center_fraction(center_fraction)
    rng = _check_rng(rng)
    num_low, prob = _center_columns(width, acceleration, center_fraction)
    columns = rng.uniform(size=width) < prob
    pad = (width - num_low + 1) // 2
    columns[pad : pad + num_low] = True
    return _columns_to_mask(columns, height)


def equispaced_mask(
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float,
    rng: np.random.Generator,
) -> BoolArray:
    """Equispaced 1D Cartesian mask with fastMRI ``EquispacedMaskFunc`` semantics.

    The central block is that of `cartesian_random_mask`. The outer columns are spaced by
    ``adjusted_accel = R (num_low - W) / (num_low R - W)`` (equal to ``1 / prob``), so that
    with the centre the mask has about ``W / R`` columns: columns
    ``around(arange(offset, W - 1, adjusted_accel))`` with a random
    ``offset = rng.integers(0, round(adjusted_accel))``.

    Args:
        shape: (H, W) of the k-space plane; the mask is constant along H.
        acceleration: the acceleration R, finite and > 1.
        center_fraction: fraction of columns in the fully sampled centre, in (0, 1).
        rng: the source of randomness.

    Returns:
        bool array of shape (H, W).

    Raises:
        CvxmriError: for an invalid parameter, or a centre that alone reaches ``W / R``
            columns (no room for outer columns).
    """
    height, width = _check_shape(shape)
    acceleration = _check_acceleration(acceleration)
    center_fraction = _check_center_fraction(center_fraction)
    rng = _check_rng(rng)
    num_low, prob = _center_columns(width, acceleration, center_fraction)
    if prob == 0:
        # fastMRI divides by zero here: the centre alone already gives W / R columns.
        raise CvxmriError(
            f"center_fraction {center_fraction} too large for acceleration {acceleration}: "
            f"the {num_low} central columns leave no equispaced columns"
        )
    adjusted_accel = (acceleration * (num_low - width)) / (num_low * acceleration - width)
    offset = int(rng.integers(0, round(adjusted_accel)))
    columns = np.zeros(width, dtype=bool)
    columns[np.around(np.arange(offset, width - 1, adjusted_accel)).astype(np.intp)] = True
    pad = (width - num_low + 1) // 2
    columns[pad : pad + num_low] = True
    return _columns_to_mask(columns, height)


def _calibration_region(shape: tuple[int, int], calib_size: tuple[int, int]) -> BoolArray:
    """The ``calib_size`` rectangle centred at (H // 2, W // 2)."""
    calib = np.zeros(shape, dtype=bool)
    top = shape[0] // 2 - calib_size[0] // 2
    left = shape[1] // 2 - calib_size[1] // 2
    calib[top : top + calib_size[0], left : left + calib_size[1]] = True
    return calib


def _radius_profile(shape: tuple[int, int], variable_density: float) -> npt.NDArray[np.float64]:
    """``1 + variable_density * rho``: the exclusion radius per unit scale at each point.

    ``rho`` is the distance from (H // 2, W // 2) with rows measured in units of H / 2 and
    columns in units of W / 2, so ``rho = 1`` at the middle of each edge.
    """
    height, width = shape
    rows = (np.arange(height) - height // 2) / (height / 2)
    cols = (np.arange(width) - width // 2) / (width / 2)
    rho = np.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)
    return 1.0 + variable_density * rho


def _dart_throw(
    radius2: npt.NDArray[np.float64], priority: npt.NDArray[np.integer], calib: BoolArray
) -> BoolArray:
    """The Poisson-disc set that sequential dart throwing gives in priority order.

    Points ``p`` and ``q`` conflict when ``|p - q|^2 < max(radius2[p], radius2[q])``. The
    calibration points are accepted first; then, visiting the others by decreasing
    ``priority`` (distinct values), a point is accepted when it conflicts with no accepted
    point. The same set is computed in parallel rounds (Luby-style): a remaining point with
    the highest priority among the remaining points it conflicts with is accepted, since none
    of those can be accepted before it; the points that conflict with an accepted point are
    then removed. Each round accepts at least the remaining point of highest priority, so
    there are at most H * W rounds; with random priorities there are a handful.

    Args:
        radius2: (H, W) squared exclusion radius of each point, in pixels.
        priority: (H, W) distinct integers >= 0.
        calib: (H, W) points accepted before all others.

    Returns:
        bool (H, W) mask of the accepted points.
    """
    height, width = radius2.shape
    max_r2 = float(radius2.max())
    margin = math.ceil(math.sqrt(max_r2))
    dy, dx = np.mgrid[-margin : margin + 1, -margin : margin + 1]
    dist2 = (dy**2 + dx**2).ravel()
    near = (dist2 > 0) & (dist2 < max_r2)
    # The grid is padded by ``margin`` on every side so that flat index + offset never leaves
    # it; padding points have priority -1 (never remaining) and radius 0.
    padded_width = width + 2 * margin
    offsets = (dy.ravel() * padded_width + dx.ravel())[near]
    dist2 = dist2[near].astype(np.float64)
    padded_shape = (height + 2 * margin, padded_width)
    inner = (slice(margin, margin + height), slice(margin, margin + width))
    # ``remaining`` holds the priority of points still undecided and -1 for all others.
    remaining = np.full(padded_shape, -1, dtype=np.int64)
    remaining[inner] = priority
    remaining = remaining.ravel()
    r2 = np.zeros(padded_shape)
    r2[inner] = radius2
    r2 = r2.ravel()
    accepted = np.zeros(padded_shape, dtype=bool)
    index = np.arange(remaining.size).reshape(padded_shape)[inner]

    def accept(points: npt.NDArray[np.intp]) -> None:
        accepted.flat[points] = True
        remaining[points] = -1
        points_r2 = r2[points]
        for offset, d2 in zip(offsets, dist2, strict=True):
            neighbours = points + offset
            remaining[neighbours[(d2 < points_r2) | (d2 < r2[neighbours])]] = -1

    accept(index[calib])
    alive = index[remaining[index] >= 0]
    while alive.size:
        alive_priority = remaining[alive]
        alive_r2 = r2[alive]
        beaten = np.zeros(alive.size, dtype=bool)
        for offset, d2 in zip(offsets, dist2, strict=True):
            neighbours = alive + offset
            beaten |= (remaining[neighbours] > alive_priority) & (
                (d2 < alive_r2) | (d2 < r2[neighbours])
            )
        accept(alive[~beaten])
        alive = alive[remaining[alive] >= 0]
    return accepted[inner].copy()


class _DensityModel:
    """Model sample count of a Poisson-disc set with radii ``r = scale * profile``.

    Each non-calibration point contributes ``min(1, packing / r^2)``, a function of
    ``u = packing / scale^2`` only: ``count(u) = num_calib + sum(min(1, u / profile^2))``.
    `inverse` solves it for ``u``; the search uses ratios of such ``u``, so the packing
    constant cancels out after the first guess.
    """

    def __init__(self, free_profile2: npt.NDArray[np.float64], num_calib: int) -> None:
        self.profile2 = np.sort(free_profile2.ravel())
        self.num_calib = num_calib
        # tail[k] = sum of 1 / profile2 over the unsaturated points k, k + 1, ...
        self.tail = np.cumsum((1.0 / self.profile2)[::-1])[::-1]

    def inverse(self, count: int) -> float:
        """The ``u`` at which the model gives ``count`` samples (``count`` below the total)."""
        free = count - self.num_calib
        # With the k points of smallest profile saturated, count(u) = k + u * tail[k] for
        # profile2[k - 1] <= u <= profile2[k]: find the consistent k.
        k = np.arange(self.profile2.size)
        u = (free - k) / self.tail
        lower = np.concatenate([[0.0], self.profile2[:-1]])
        consistent = (u >= lower) & (u <= self.profile2)
        return float(u[np.argmax(consistent)])


def poisson_disc_mask(
    shape: tuple[int, int],
    acceleration: float,
    rng: np.random.Generator,
    calib_size: tuple[int, int] = (16, 16),
    variable_density: float = 2.0,
    tol: float = 0.03,
    max_iter: int = 12,
) -> BoolArray:
    """2D variable-density Poisson-disc mask over the whole (H, W) k-space plane.

    Density law: the point at normalised distance ``rho`` from the centre (H // 2, W // 2)
    (rows in units of H / 2, columns in units of W / 2, so ``rho = 1`` at the middle of each
    edge and the density contours are ellipses matching the grid) has exclusion radius
    ``r = s * (1 + variable_density * rho)`` pixels. The sampling density is then about
    ``0.58 / r^2`` per pixel, i.e. proportional to ``(1 + variable_density * rho)^-2``, and 1
    (fully sampled) where ``r <= 1``.

    Conflict rule: two samples ``p``, ``q`` are never closer than ``max(r_p, r_q)``, so no
    sample lies inside another's exclusion disc. The mask is the maximal set that dart
    throwing in a uniformly random order gives (computed in parallel rounds, see
    `_dart_throw`), with the ``calib_size`` rectangle centred at (H // 2, W // 2) fully sampled
    and placed first, so other samples also keep their distance from it.

    The scale ``s`` is searched with the random order fixed: each guess comes from a count
    model (``min(1, 0.58 / r^2)`` per point) rescaled to reproduce the last measured count,
    safeguarded by bisection of a bracket. The search stops once the count is within
    ``tol / 4`` of ``round(H * W / acceleration)``, or after ``max_iter`` evaluations, and
    returns the mask found whose realised acceleration ``H * W / mask.sum()`` is closest to
    the request within ``tol``. If there is none, random non-calibration samples are removed
    from the sparsest mask found with too many samples until it has the target count
    (removing samples keeps the distance rule but leaves holes); this does not happen on the
    grids tested.

    Args:
        shape: (H, W) of the k-space plane.
        acceleration: requested acceleration R, finite and > 1.
        rng: the source of randomness.
        calib_size: (rows, cols) of the fully sampled central rectangle; (0, 0) for none.
        variable_density: ``>= 0``; 0 gives uniform-density Poisson-disc sampling.
        tol: relative tolerance on the realised acceleration, in (0, 1).
        max_iter: most scale evaluations, >= 1.

    Returns:
        bool array of shape (H, W) whose realised acceleration is within ``tol`` of
        ``acceleration``.

    Raises:
        CvxmriError: for an invalid parameter, or an unreachable target: the calibration
            rectangle alone has more samples than ``H * W / (acceleration * (1 - tol))``, or
            no whole number of samples gives an acceleration within ``tol``.
    """
    height, width = _check_shape(shape)
    acceleration = _check_acceleration(acceleration)
    rng = _check_rng(rng)
    calib_size = _check_calib_within(calib_size, shape)
    variable_density = _real("variable_density", variable_density)
    if not (math.isfinite(variable_density) and variable_density >= 0):
        raise CvxmriError(f"variable_density must be finite and >= 0, got {variable_density!r}")
    tol = _check_tol(tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 1:
        raise CvxmriError(f"max_iter must be an integer >= 1, got {max_iter!r}")

    total = height * width
    calib = _calibration_region((height, width), calib_size)
    num_calib = int(calib.sum())
    low, high, target = _sample_counts((height, width), acceleration, calib_size, num_calib, tol)
    if target == num_calib:
        return calib
    good_enough = max(tol / 4 * target, 0.5)

    profile = _radius_profile((height, width), variable_density)
    density_model = _DensityModel(profile[~calib] ** 2, num_calib)
    target_u = density_model.inverse(target)
    priority = rng.permutation(total).reshape(height, width)

    scale = math.sqrt(_PACKING / target_u)
    # Bracket: scale_low gives too many samples, scale_high too few. At scale 1 / max(profile)
    # every radius is <= 1, so nothing conflicts and every point is sampled.
    scale_low, scale_high = 1.0 / float(profile.max()), math.inf
    dense_mask, dense_count = np.ones((height, width), dtype=bool), total
    best_mask: BoolArray | None = None
    best_error = math.inf
    for _ in range(max_iter):
        if not scale_low < scale < scale_high:
            scale = 2 * scale_low if math.isinf(scale_high) else math.sqrt(scale_low * scale_high)
        mask = _dart_throw((scale * profile) ** 2, priority, calib)
        count = int(mask.sum())
        if low <= count <= high and abs(count - target) < best_error:
            best_mask, best_error = mask, abs(count - target)
        if best_error <= good_enough:
            break
        if count > target:
            scale_low = scale
            if high < count < dense_count:
                dense_mask, dense_count = mask, count
        else:
            scale_high = scale
        # Correct the model by the measured count: ``u = packing / scale^2`` with the packing
        # constant that makes the model reproduce ``count``.
        measured_u = density_model.inverse(count) if num_calib < count < total else 0.0
        scale = scale * math.sqrt(measured_u / target_u)
    if best_mask is not None:
        return best_mask
    # Remove random non-calibration samples from the sparsest mask found above tolerance.
    candidates = np.flatnonzero(dense_mask & ~calib)
    drop = rng.choice(candidates, size=dense_count - target, replace=False)
    dense_mask.flat[drop] = False
    return dense_mask


def uniform_random_mask(
    shape: tuple[int, int],
    acceleration: float,
    rng: np.random.Generator,
    calib_size: tuple[int, int] = (16, 16),
    tol: float = 0.03,
) -> BoolArray:
    """Uniformly random mask over a 2D grid with a fully sampled calibration rectangle.

    Made for the (ky, kz) phase-encoding plane of 3D Cartesian acquisitions (the readout kx
    is fully sampled; the mask broadcasts over it). The ``calib_size`` rectangle centred at
    (H // 2, W // 2) is sampled, and ``n - num_calib`` of the other points, drawn uniformly
    without replacement (``rng.choice``), where ``n`` is the whole number of samples closest
    to ``H * W / acceleration`` whose realised acceleration ``H * W / n`` is within ``tol``
    of the request. Every non-calibration point is thus sampled with the same probability
    ``(n - num_calib) / (H * W - num_calib)``.

    Args:
        shape: (H, W) of the grid, e.g. (ky, kz).
        acceleration: requested acceleration R, finite and > 1.
        rng: the source of randomness.
        calib_size: (rows, cols) of the fully sampled central rectangle; (0, 0) for none.
        tol: relative tolerance on the realised acceleration, in (0, 1).

    Returns:
        bool array of shape (H, W) with exactly ``n`` samples.

    Raises:
        CvxmriError: for an invalid parameter, a calibration rectangle larger than the grid,
            or an unreachable target (as in `poisson_disc_mask`).
    """
    height, width = _check_shape(shape)
    acceleration = _check_acceleration(acceleration)
    rng = _check_rng(rng)
    calib_size = _check_calib_within(calib_size, (height, width))
    tol = _check_tol(tol)
    mask = _calibration_region((height, width), calib_size)
    num_calib = int(mask.sum())
    _, _, target = _sample_counts((height, width), acceleration, calib_size, num_calib, tol)
    chosen = rng.choice(np.flatnonzero(~mask), size=target - num_calib, replace=False)
    mask.flat[chosen] = True
    return mask


def apply_padding(mask: BoolArray, padding: tuple[int, int] | None) -> BoolArray:
    """Zero the mask outside the acquired phase-encoding columns ``[left, right)``.

    fastMRI zero-pads k-space along W where the ISMRMRD header's phase-encoding limits do not
    cover the encoded matrix; those columns were never acquired, so they cannot be sampled.

    Args:
        mask: bool array (..., W).
        padding: ``(left, right)`` with ``0 <= left < right <= W``, or None for no padding.

    Returns:
        a new bool array (the input is not modified).
    """
    mask = np.array(mask, dtype=bool)
    if padding is None:
        return mask
    try:
        left, right = padding
    except (TypeError, ValueError):
        raise CvxmriError(f"padding must be (left, right) or None, got {padding!r}") from None
    width = mask.shape[-1] if mask.ndim else 0
    if not (
        all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (left, right))
        and 0 <= left < right <= width
    ):
        raise CvxmriError(
            f"padding must be integers with 0 <= left < right <= {width}, got {padding!r}"
        )
    mask[..., :left] = False
    mask[..., right:] = False
    return mask


def seed_from_name(name: str) -> int:
    """A deterministic 32-bit seed from a file name: CRC-32 of its UTF-8 bytes.

    Used to fix the evaluation mask of each file, independently of process and platform
    (unlike ``hash``, which is salted per process).
    """
    if not isinstance(name, str):
        raise CvxmriError(f"name must be a string, got {type(name).__name__}")
    return zlib.crc32(name.encode("utf-8"))


def realised_acceleration(mask: npt.ArrayLike) -> float:
    """``mask.size / mask.sum()``: grid points per sample.

    Raises:
        CvxmriError: if the mask samples nothing.
    """
    mask = np.asarray(mask)
    samples = int(np.count_nonzero(mask))
    if samples == 0:
        raise CvxmriError(f"mask of shape {mask.shape} samples nothing")
    return mask.size / samples


@dataclass(frozen=True)
class MaskSpec:
    """A mask family and its parameters.

    The same spec serves 2D slices and 3D Cartesian volumes: `sample` with ``ndim=2`` draws
    a (H, W) mask for (..., H, W) k-space; with ``ndim=3`` it draws the (ky, kz) pattern of a
    (..., kx, ky, kz) volume, whose readout kx is fully sampled (only the kinds that sample a
    whole 2D grid, "poisson" and "random", make sense there).

    Attributes:
        kind: "poisson" (`poisson_disc_mask`), "cartesian" (`cartesian_random_mask`),
            "equispaced" (`equispaced_mask`) or "random" (`uniform_random_mask`).
        acceleration: requested acceleration, finite and > 1.
        center_fraction: fraction of fully sampled central columns, in (0, 1); used by the
            1D kinds.
        calib_size: (rows, cols) of the fully sampled central rectangle, >= 0; used by
            "poisson" and "random".
    """

    kind: str
    acceleration: float
    center_fraction: float = 0.04
    calib_size: tuple[int, int] = (16, 16)

    def validate(self, ndim: int = 2) -> None:
        """Raise CvxmriError for an unknown kind, an invalid parameter, or a kind that cannot
        sample ``ndim``-dimensional k-space (2: slices, 3: volumes)."""
        if self.kind not in MASK_KINDS:
            raise CvxmriError(
                f"mask kind must be one of {', '.join(MASK_KINDS)}, got {self.kind!r}"
            )
        _check_acceleration(self.acceleration)
        _check_center_fraction(self.center_fraction)
        _check_calib_size(self.calib_size)
        if isinstance(ndim, bool) or ndim not in (2, 3):
            raise CvxmriError(f"mask ndim must be 2 or 3, got {ndim!r}")
        if ndim == 3 and self.kind not in (*GRID_KINDS, "file"):
            raise CvxmriError(
                f"a {self.kind} mask selects lines of 2D k-space; 3D masks are drawn over "
                f"(ky, kz) by the kinds {', '.join(GRID_KINDS)}"
            )

    def sample(
        self,
        shape: tuple[int, int],
        rng: np.random.Generator,
        padding: tuple[int, int] | None = None,
        ndim: int = 2,
    ) -> BoolArray:
        """Draw a bool mask of this kind over the 2D grid ``shape``.

        Args:
            shape: (H, W) of a 2D k-space plane for ``ndim=2``; the phase-encoding plane
                (ky, kz) of 3D k-space (..., kx, ky, kz) for ``ndim=3``.
            rng: the source of randomness.
            padding: ``(left, right)``: zero the columns outside ``[left, right)`` after
                sampling, as fastMRI does (so a padded mask has fewer samples than the
                acceleration asks for); 2D only.
            ndim: number of spatial axes of the k-space the mask is for, 2 or 3.

        Returns:
            bool array of shape ``shape``; for ``ndim=3`` it broadcasts over kx against
            (..., kx, ky, kz) k-space (the readout is fully sampled).
        """
        self.validate(ndim)
        if self.kind == "file":
            raise CvxmriError("the 'file' mask is read from each file, not drawn")
        if ndim == 3 and padding is not None:
            raise CvxmriError("padding applies to the columns of 2D masks, not to 3D masks")
        if self.kind == "poisson":
            mask = poisson_disc_mask(shape, self.acceleration, rng, calib_size=self.calib_size)
        elif self.kind == "random":
            mask = uniform_random_mask(shape, self.acceleration, rng, calib_size=self.calib_size)
        elif self.kind == "cartesian":
            mask = cartesian_random_mask(shape, self.acceleration, self.center_fraction, rng)
        else:
            mask = equispaced_mask(shape, self.acceleration, self.center_fraction, rng)
        return apply_padding(mask, padding)

    def describe(self) -> str:
        """A short label, e.g. "poisson 4x (calib 16x16)" or "cartesian 4x (centre 0.04)"."""
        if self.kind == "file":
            return "file mask"
        if self.kind in GRID_KINDS:
            rows, cols = self.calib_size
            return f"{self.kind} {self.acceleration:g}x (calib {rows}x{cols})"
        return f"{self.kind} {self.acceleration:g}x (centre {self.center_fraction:g})"
