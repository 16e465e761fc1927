"""Simulate 3D Cartesian multi-coil k-space from magnitude volumes (NIfTI).

Every source is resampled (linear interpolation after a Gaussian anti-aliasing filter of the
target voxel's width) onto ONE world grid: isotropic voxels, the union of the sources' fields
of view, ``matrix`` = (readout, ky, kz) voxels with the readout running foot to head and
(ky, kz) anterior-to-posterior and left-to-right. The volume gets a smooth random 3D phase
and 3D birdcage coil sensitivities (two rings along the readout); it is cut into slabs of
``slab`` readout positions with ``guard`` positions dropped between neighbours
(`slab_positions`), and each slab's coil images go through the centred orthonormal 3D FFT,
with complex Gaussian noise, into one file of the layout of `cvxmri.data.volume3d`
(k-space (coils, kx, ky, kz)).

Split without leakage: the split of a slab is decided by its POSITION on the common grid
(cyclically by `cvxmri.data.simulate.split_pattern`, from one seeded offset), the same for
every source. Two images of the same head, Colin27's ``ch2`` and ``ch2better``, therefore
never put the same anatomy into two splits, and neighbouring slabs of different splits are
``guard`` positions apart. A slab whose foreground (voxels above 0.1 of the volume scale)
covers less than ``min_foreground`` of it is not written.

As in 2D (`cvxmri.data.simulate`): simulated from magnitude images, without real phase,
coil geometry or noise correlation, so absolute PSNR/SSIM are optimistic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from cvxmri.data.simulate import (
    SPLIT_RATIO_RULE,
    SPLITS,
    Source,
    birdcage_maps,
    check_out_dir,
    ensure_every_split,
    foreground_fraction,
    normalised_volume,
    slabs,
    smooth_phase,
    split_pattern,
    valid_split_ratio,
    write_dataset,
)
from cvxmri.data.volume3d import Volume3D, rss_volume, write_volume3d
from cvxmri.errors import CvxmriError, check_settings
from cvxmri.physics import fftnc

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class Simulation3DConfig:
    """Parameters of the 3D k-space simulation.

    Attributes:
        matrix: (readout, ky, kz) voxels of the common grid (foot-head, anterior-posterior,
            left-right); isotropic voxels that hold the union of the sources' fields of view.
        coils: number of birdcage coils (two rings along the readout).
        snr: mean foreground magnitude of a slab over the noise standard deviation (coil
            maps have unit root-sum-of-squares).
        slab: readout positions per file.
        guard: readout positions dropped between neighbouring slabs.
        split_ratio: slab positions of train, val and test, assigned cyclically in this
            ratio (`cvxmri.data.simulate.split_pattern`); a split of ratio 0 gets none.
        min_foreground: a slab with less foreground than this fraction is not written.
        phase_strength: peak-to-peak radians of the smooth random phase.
        seed: seed of the phase, the noise and the split offset.
    """

    matrix: tuple[int, int, int] = (80, 96, 80)
    coils: int = 8
    snr: float = 30.0
    slab: int = 12
    guard: int = 4
    split_ratio: tuple[int, int, int] = (3, 1, 1)
    min_foreground: float = 0.05
    phase_strength: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible values."""
        check_settings(
            "simulation",
            self,
            {
                "matrix": (
                    len(self.matrix) == 3 and all(int(n) >= 8 for n in self.matrix),
                    "three sizes, each >= 8",
                ),
                "coils": (self.coils >= 1, ">= 1"),
                "snr": (bool(np.isfinite(self.snr)) and self.snr > 0, "> 0 and finite"),
                "slab": (
                    1 <= self.slab <= self.matrix[0],
                    f"in [1, {self.matrix[0]}] (the readout size)",
                ),
                "guard": (self.guard >= 0, ">= 0"),
                "split_ratio": (valid_split_ratio(self.split_ratio), SPLIT_RATIO_RULE),
                "min_foreground": (0 <= self.min_foreground < 1, "in [0, 1)"),
                "phase_strength": (self.phase_strength >= 0, ">= 0"),
            },
        )


@dataclass(frozen=True)
class WorldGrid:
    """The common grid: ``shape`` voxels in RAS axis order (left-right, posterior-anterior,
    inferior-superior) of ``voxel_mm`` mm, voxel (0, 0, 0) at world ``origin_mm``."""

    shape: tuple[int, int, int]
    voxel_mm: float
    origin_mm: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """The voxel-to-world (RAS mm) affine."""
        affine = np.diag([self.voxel_mm] * 3 + [1.0])
        affine[:3, 3] = self.origin_mm
        return affine


def world_grid(images: list[nib.Nifti1Image], matrix: tuple[int, int, int]) -> WorldGrid:
    """The isotropic grid of ``matrix`` = (readout, ky, kz) voxels, centred on and holding
    the union of the images' fields of view (their voxel centres' bounding boxes)."""
    corners = []
    for image in images:
        shape = np.asarray(image.shape[:3]) - 1
        grid = np.stack(np.meshgrid(*[[0, n] for n in shape], indexing="ij"), -1).reshape(-1, 3)
        corners.append(nib.affines.apply_affine(image.affine, grid))
    points = np.concatenate(corners)
    low, high = points.min(axis=0), points.max(axis=0)
    ras_shape = (matrix[2], matrix[1], matrix[0])
    voxel = float(max((high - low) / (np.asarray(ras_shape) - 1)))
    origin = (low + high) / 2 - voxel * (np.asarray(ras_shape) - 1) / 2
    return WorldGrid(ras_shape, voxel, (float(origin[0]), float(origin[1]), float(origin[2])))


def resample_volume(image: nib.Nifti1Image, grid: WorldGrid) -> np.ndarray:
    """``image`` scaled as `cvxmri.data.simulate.normalised_volume` and resampled onto
    ``grid``: (readout foot to head, ky anterior to posterior, kz left to right), float32.

    A Gaussian filter first brings the source's resolution down to the grid's (FWHM
    ``sqrt(voxel^2 - zoom^2)`` mm per axis), so that fine sources (Colin27 ``ch2better`` at
    0.5 mm) do not alias; then trilinear interpolation; zero outside the source."""
    data, canonical = normalised_volume(image)
    zooms = np.asarray(canonical.header.get_zooms()[:3], dtype=np.float64)
    fwhm = np.sqrt(np.clip(grid.voxel_mm**2 - zooms**2, 0, None))
    data = ndimage.gaussian_filter(data, fwhm / FWHM_PER_SIGMA / zooms)
    to_source = np.linalg.inv(canonical.affine) @ grid.affine
    ras = ndimage.affine_transform(
        data, to_source[:3, :3], offset=to_source[:3, 3], output_shape=grid.shape, order=1
    )
    # RAS (x: left->right, y: posterior->anterior, z: inferior->superior) to
    # (readout z, ky anterior->posterior, kz x).
    return np.ascontiguousarray(np.clip(ras, 0, None).transpose(2, 1, 0)[:, ::-1]).astype(
        np.float32
    )


def simulate_slab(
    image: np.ndarray,
    phase: np.ndarray,
    maps: np.ndarray,
    snr: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """Multi-coil 3D k-space (C, X, Y, Z) of a magnitude slab (X, Y, Z) with ``phase``
    (radians) and coil ``maps`` (C, X, Y, Z), and the standard deviation of its complex
    noise (mean foreground magnitude over ``snr``; the FFT is unitary, so image noise has
    the same)."""
    obj = torch.from_numpy((image * np.exp(1j * phase)).astype(np.complex64))
    kspace = fftnc(torch.from_numpy(maps) * obj, ndim=3).numpy()
    foreground = image > 0.1
    sigma = float(image[foreground].mean()) / snr if foreground.any() else 0.0
    noise = rng.normal(size=(2, *kspace.shape)) * (sigma / np.sqrt(2))
    return (kspace + noise[0] + 1j * noise[1]).astype(np.complex64), sigma


def simulate_dataset3d(
    sources: list[Source],
    out_dir: str | Path,
    config: Simulation3DConfig,
    overwrite: bool = False,
) -> dict[str, object]:
    """Simulate every source into ``out_dir/multicoil_{train,val,test}/`` (one file per
    slab) with a ``manifest.json``, and return the manifest. Every split of non-zero
    ``split_ratio`` gets at least one slab position, or a `CvxmriError` says why it cannot.
    Built in a sibling folder and moved into place at the end; an existing ``out_dir`` is
    replaced only with ``overwrite``."""
    config.validate()
    check_out_dir(out_dir, overwrite)
    grid = world_grid([s.image for s in sources], config.matrix)
    volumes = []
    for source in sources:
        try:
            volumes.append(resample_volume(source.image, grid))
        except CvxmriError as err:
            raise CvxmriError(f"{source.name}: {err}") from None
    return write_dataset(
        out_dir, overwrite, lambda folder: _simulate_into(sources, volumes, grid, folder, config)
    )


def slab_positions(volumes: list[np.ndarray], config: Simulation3DConfig) -> list[range]:
    """The slabs on the common grid: as many as fit, with ``guard`` positions between
    them, centred on the span of readout positions where some volume has at least
    ``min_foreground`` foreground."""
    profile = [max(foreground_fraction(v[i]) for v in volumes) for i in range(config.matrix[0])]
    inside = [i for i, value in enumerate(profile) if value >= config.min_foreground]
    if not inside:
        return []
    first, length = inside[0], inside[-1] - inside[0] + 1
    found = list(slabs(length, config.slab, config.guard))
    used = len(found) * (config.slab + config.guard) - config.guard if found else 0
    start = first + (length - used) // 2
    return [range(start + r.start, start + r.stop) for r in found]


def _slab_splits(
    volumes: list[np.ndarray], config: Simulation3DConfig, rng: np.random.Generator
) -> tuple[list[range], list[str], list[list[bool]]]:
    """The slab positions with any foreground in any volume, their splits and, per volume,
    which of them are written."""
    positions = slab_positions(volumes, config)
    written = [
        [foreground_fraction(v[s]) >= config.min_foreground for s in positions] for v in volumes
    ]
    used = [i for i in range(len(positions)) if any(w[i] for w in written)]
    wanted = [s for s, w in zip(SPLITS, config.split_ratio, strict=True) if w]
    if len(used) < len(wanted):
        raise CvxmriError(
            f"{len(used)} slab position(s) of {config.slab} readout positions with "
            f"{config.guard} dropped between them and {config.min_foreground:.0%} foreground "
            f"in a {config.matrix[0]}-position readout, but the splits {'/'.join(wanted)} need "
            "one each: use thinner slabs (--slab-slices), fewer dropped positions (--guard-slices) "
            "or a --split-ratio with fewer splits"
        )
    pattern = split_pattern(config.split_ratio)
    offset = int(rng.integers(len(pattern)))
    splits = ensure_every_split([pattern[(offset + i) % len(pattern)] for i in used], wanted)
    return (
        [positions[i] for i in used],
        splits,
        [[w[i] for i in used] for w in written],
    )


def _simulate_into(
    sources: list[Source],
    volumes: list[np.ndarray],
    grid: WorldGrid,
    out_dir: Path,
    config: Simulation3DConfig,
) -> dict[str, object]:
    rng = np.random.default_rng(config.seed)
    positions, splits, written = _slab_splits(volumes, config, rng)
    maps = birdcage_maps(config.coils, config.matrix)
    files: list[dict[str, Any]] = []
    for source, volume, keep in zip(sources, volumes, written, strict=True):
        phase = smooth_phase(config.matrix, config.phase_strength, rng)
        for number, (part, split, kept) in enumerate(zip(positions, splits, keep, strict=True)):
            if not kept:
                continue
            cut = slice(part.start, part.stop)
            kspace, sigma = simulate_slab(volume[cut], phase[cut], maps[:, cut], config.snr, rng)
            name = f"multicoil_{split}/{source.name}_slab{number:02d}.h5"
            attrs = {
                "acquisition": "SIM_T1_3D",
                "patient_id": source.name,
                "source": source.origin,
                "coils": config.coils,
                "matrix": list(kspace.shape[1:]),
                "voxel_mm": grid.voxel_mm,
                "slab_start": part.start,
                "noise_std": sigma,
                "snr": config.snr,
            }
            write_volume3d(out_dir / name, Volume3D(kspace, rss_volume(kspace), attrs))
            files.append(
                {
                    "file": name,
                    "split": split,
                    "source": source.name,
                    "readout_positions": [part.start, part.stop],
                    "noise_std": sigma,
                }
            )
            log.info("%s: %s", split, name)
    ratio = ":".join(str(w) for w in config.split_ratio)
    manifest = {
        "kind": "simulated 3D multi-coil k-space from magnitude volumes",
        "dims": 3,
        "layout": "kspace (coils, kx, ky, kz), reconstruction_rss (kx, ky, kz), attrs dims=3",
        "sources": [{"name": s.name, "origin": s.origin, "frame": s.frame} for s in sources],
        "config": asdict(config),
        "grid": {
            "matrix": list(config.matrix),
            "axes": "readout foot->head, ky anterior->posterior, kz left->right",
            "voxel_mm": grid.voxel_mm,
            "affine_ras": grid.affine.tolist(),
        },
        "split_rule": (
            f"slabs of {config.slab} readout positions, {config.guard} dropped between "
            f"slabs; a slab position's split is the same in every volume, assigned "
            f"cyclically by {list(split_pattern(config.split_ratio))} (train:val:test {ratio})"
        ),
        "files": files,
        "counts": {split: sum(f["split"] == split for f in files) for split in SPLITS},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
