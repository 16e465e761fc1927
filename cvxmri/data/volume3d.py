"""Read and write 3D Cartesian multi-coil k-space: one volume (or one slab of one) per HDF5
file.

The layout (written by ``cvxmri data simulate --dims 3``, `write_volume3d`):

- ``kspace``: complex64 (coils, kx, ky, kz). kx is the readout, fully sampled; masks select
  (ky, kz) points (`cvxmri.masks.MaskSpec.sample` with ``ndim=3``). The centred
  orthonormal 3D FFT (`cvxmri.physics.fftnc` with ``ndim=3``) maps the coil images
  (coils, x, y, z) to it.
- ``reconstruction_rss``: float32 (kx, ky, kz): the root-sum-of-squares of the coil images
  ``sqrt(sum_c |F^-1 k_c|^2)``, fastMRI's multi-coil target in 3D (optional).
- attributes: ``dims`` = 3 (what tells these files from 2D fastMRI files, whose 4D
  ``kspace`` is (slices, coils, H, W)), ``max`` and ``norm`` of the target, and whatever
  the writer adds (the simulator: ``coils``, ``matrix``, ``voxel_mm``, ``source``,
  ``noise_std``, ``snr``, ``slab_start``, ``acquisition``, ``patient_id``).

`read_volume3d` validates all of it and raises `CvxmriError` with a one-line message naming
the file and the problem; a 2D fastMRI file is refused there, and a 3D file is refused by
the 2D reader (`cvxmri.data.fastmri_h5.read_volume`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from cvxmri.data.espirit import espirit_decoupled
from cvxmri.data.fastmri_h5 import is_volume3d, open_hdf5, plain_attribute
from cvxmri.data.prepare import COMPUTED_RSS, STORED_RSS, EspiritConfig
from cvxmri.errors import CvxmriError
from cvxmri.physics import Sense, ifftnc

TARGET_KEY = "reconstruction_rss"


@dataclass
class Volume3D:
    """One 3D file in memory.

    Attributes:
        kspace: complex64 (coils, kx, ky, kz).
        target: float32 (kx, ky, kz) root-sum-of-squares image, or None if the file has none.
        attrs: the file's attributes (``dims``, ``max``, ``norm``, ``source``...).
    """

    kspace: np.ndarray
    target: np.ndarray | None
    attrs: dict[str, object] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(kx, ky, kz), the k-space grid and the image matrix."""
        _, x, y, z = self.kspace.shape
        return x, y, z


def file_dims(path: str | Path) -> int:
    """3 for a 3D volume file, 2 otherwise (fastMRI's multi-slice layout), cheaply: only the
    attributes are read. One-line error for a missing or non-HDF5 file."""
    path = Path(path)
    with open_hdf5(path) as hf:
        return 3 if is_volume3d(hf) else 2


def read_volume3d(path: str | Path, check_finite: bool = True) -> Volume3D:
    """Read and validate a 3D volume file.

    Args:
        path: the HDF5 file.
        check_finite: reject NaN or Inf k-space and target (costs one pass over the data).
    """
    path = Path(path)
    with open_hdf5(path) as hf:
        if not is_volume3d(hf):
            raise CvxmriError(
                f"{path}: not a 3D volume file (no attribute dims=3): a 2D multi-slice file "
                "belongs with 2D data (cvxmri data simulate --dims 3 writes 3D files)"
            )
        if "kspace" not in hf or not isinstance(hf["kspace"], h5py.Dataset):
            keys = ", ".join(hf.keys()) or "none"
            raise CvxmriError(f"{path}: no 'kspace' dataset (keys: {keys})")
        dataset = hf["kspace"]
        if dataset.ndim != 4:
            raise CvxmriError(
                f"{path}: 3D kspace must be (coils, kx, ky, kz), got shape {dataset.shape}"
            )
        if not np.issubdtype(dataset.dtype, np.complexfloating):
            raise CvxmriError(f"{path}: kspace must be complex, got {dataset.dtype}")
        if min(dataset.shape) == 0:
            raise CvxmriError(f"{path}: kspace is empty, shape {dataset.shape}")
        try:
            kspace = np.asarray(dataset[()], dtype=np.complex64)
            target = np.asarray(hf[TARGET_KEY][()], dtype=np.float32) if TARGET_KEY in hf else None
        except (OSError, TypeError, ValueError) as err:
            raise CvxmriError(f"{path}: cannot read data, the file is damaged ({err})") from None
        attrs = {key: plain_attribute(value) for key, value in hf.attrs.items()}
    if check_finite and not np.isfinite(kspace).all():
        raise CvxmriError(f"{path}: kspace contains NaN or Inf values")
    if not np.any(kspace):
        raise CvxmriError(f"{path}: kspace is all zeros")
    if target is not None:
        if target.shape != kspace.shape[1:]:
            raise CvxmriError(
                f"{path}: {TARGET_KEY} has shape {target.shape}, expected "
                f"{kspace.shape[1:]} (the kspace grid kx, ky, kz)"
            )
        if check_finite and not np.isfinite(target).all():
            raise CvxmriError(f"{path}: {TARGET_KEY} contains NaN or Inf values")
    return Volume3D(kspace, target, attrs)


def write_volume3d(path: str | Path, volume: Volume3D) -> None:
    """Write ``volume`` in the 3D layout, atomically (temporary file, then rename); sets
    ``dims`` = 3 and, when there is a target, its ``max`` and ``norm``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as hf:
            hf.create_dataset("kspace", data=volume.kspace.astype(np.complex64))
            attrs = dict(volume.attrs)
            if volume.target is not None:
                hf.create_dataset(TARGET_KEY, data=volume.target.astype(np.float32))
                attrs["max"] = float(volume.target.max())
                attrs["norm"] = float(np.linalg.norm(volume.target))
            attrs["dims"] = 3
            for key, value in attrs.items():
                hf.attrs[key] = value
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rss_volume(kspace: np.ndarray) -> np.ndarray:
    """The root-sum-of-squares image (X, Y, Z) of 3D k-space (C, X, Y, Z): the
    ``reconstruction_rss`` target."""
    images = ifftnc(torch.from_numpy(kspace), ndim=3)
    return images.abs().pow(2).sum(dim=0).sqrt().numpy()


@dataclass
class PreparedVolume3D:
    """A 3D file with what reconstruction needs (`prepare_volume3d`).

    Attributes:
        name: the file name (it seeds the evaluation mask, as in 2D).
        kspace: complex64 (C, X, Y, Z).
        maps: complex64 (C, X, Y, Z) coil maps (`cvxmri.data.espirit.espirit_decoupled`).
        target: complex64 (X, Y, Z) SENSE image ``sum_c conj(S_c) F^-1 k_c``.
        rss: float32 (X, Y, Z) root-sum-of-squares image: the stored
            ``reconstruction_rss`` when there is one, else computed.
        rss_source: where ``rss`` comes from.
    """

    name: str
    kspace: np.ndarray
    maps: np.ndarray
    target: np.ndarray
    rss: np.ndarray
    rss_source: str


def prepare_volume3d(path: str | Path, config: EspiritConfig | None = None) -> PreparedVolume3D:
    """Read a 3D file and attach decoupled ESPIRiT coil maps (computed, not cached: one 2D
    ESPIRiT per readout position; the calibration square at most the (ky, kz) grid, as in
    2D) and the SENSE and RSS targets."""
    path = Path(path)
    config = config or EspiritConfig()
    if config.backend != "torch":
        raise CvxmriError(f"3D coil maps use the torch ESPIRiT backend, not {config.backend!r}")
    volume = read_volume3d(path)
    kspace = torch.from_numpy(volume.kspace)
    # As in 2D (`cvxmri.data.prepare.load_maps`): the calibration fits in the (ky, kz) grid.
    calib = min(config.calib_width, *volume.kspace.shape[-2:])
    maps = espirit_decoupled(kspace, calib, config.thresh, config.kernel_width, config.crop)
    target = Sense(maps, ndim=3).H(kspace)
    if volume.target is not None:
        rss, source = volume.target, STORED_RSS
    else:
        rss, source = rss_volume(volume.kspace), COMPUTED_RSS
    return PreparedVolume3D(path.name, volume.kspace, maps.numpy(), target.numpy(), rss, source)
