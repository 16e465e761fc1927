"""Simulate multi-coil k-space in the fastMRI layout from magnitude volumes (NIfTI).

Per axial slice: resample to the recon matrix, add a smooth random phase, multiply by
birdcage coil sensitivities (sigpy), take the centred orthonormal FFT and add complex
Gaussian noise. Slices are grouped into slabs; each slab is one fastMRI file, and slabs go to
train, val or test with guard slices dropped between neighbouring slabs so that no split sees
the neighbour of another split's slice. Slabs are assigned cyclically in the ratio
``split_ratio`` (default 3:1:1); when a volume is small, every split of non-zero ratio still
gets a slab (`ensure_every_split`), or the simulation says why it cannot.

This is simulated k-space from magnitude images: it lacks real phase, real coil geometry and
real noise correlations, so absolute PSNR/SSIM are optimistic ("implicit data crimes",
Shimron et al., PNAS 2022). Comparisons between methods on the same data stay fair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from skimage.transform import resize

from cvxmri.data.fastmri_h5 import EncodingInfo, Volume, write_volume
from cvxmri.errors import CvxmriError, check_settings
from cvxmri.physics import center_crop, fft2c, ifft2c

log = logging.getLogger(__name__)

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BETTER_PATH = Path("/usr/share/mricron/templates/ch2better.nii.gz")
SPLITS = ("train", "val", "test")
SPLIT_RATIO_RULE = "three non-negative integers (train, val, test), not all 0"


def valid_split_ratio(ratio: tuple[int, ...]) -> bool:
    """Whether ``ratio`` is a usable ``split_ratio`` (`SPLIT_RATIO_RULE`)."""
    return len(ratio) == 3 and all(isinstance(w, int) and w >= 0 for w in ratio) and sum(ratio) > 0


# Slabs cycle through this pattern (60% train, 20% val, 20% test), so every split sees
# anatomy from the whole head; the cycle starts at a per-volume offset. It is
# `split_pattern` of the default ratio 3:1:1.
SPLIT_PATTERN = ("train", "val", "train", "test", "train")


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the k-space simulation.

    Attributes:
        matrix: recon matrix (square), pixels.
        coils: number of birdcage coils.
        snr: SNR of the coil-combined fully sampled image: mean foreground magnitude over the
            noise standard deviation (coil maps are normalised to unit root-sum-of-squares).
        readout_oversampling: k-space has ``matrix * readout_oversampling`` readout samples
            (fastMRI knee: 2); targets are cropped back in image space.
        slice_step: use every n-th axial slice of the volume.
        slab_slices: slices per file (slab).
        guard_slices: slices dropped between neighbouring slabs.
        split_ratio: slabs of train, val and test, assigned cyclically in this ratio
            (`split_pattern`); a split of ratio 0 gets none (0:0:1: a test set only).
        min_foreground: drop slices whose foreground covers less of the matrix than this.
        phase_strength: peak-to-peak radians of the smooth random phase.
        seed: seed of the phase, the noise and the split offsets.
    """

    matrix: int = 128
    coils: int = 8
    snr: float = 30.0
    readout_oversampling: int = 1
    slice_step: int = 2
    slab_slices: int = 6
    guard_slices: int = 2
    min_foreground: float = 0.2
    phase_strength: float = 2.0
    seed: int = 0
    split_ratio: tuple[int, int, int] = (3, 1, 1)

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible values."""
        check_settings(
            "simulation",
            self,
            {
                "matrix": (self.matrix >= 16, ">= 16"),
                "coils": (self.coils >= 1, ">= 1"),
                "snr": (bool(np.isfinite(self.snr)) and self.snr > 0, "> 0 and finite"),
                "readout_oversampling": (self.readout_oversampling >= 1, ">= 1"),
                "slice_step": (self.slice_step >= 1, ">= 1"),
                "slab_slices": (self.slab_slices >= 1, ">= 1"),
                "guard_slices": (self.guard_slices >= 0, ">= 0"),
                "min_foreground": (0 <= self.min_foreground < 1, "in [0, 1)"),
                "phase_strength": (self.phase_strength >= 0, ">= 0"),
                "split_ratio": (valid_split_ratio(self.split_ratio), SPLIT_RATIO_RULE),
            },
        )

    @property
    def wanted_splits(self) -> list[str]:
        """The splits of non-zero ratio: each gets at least one slab."""
        return [split for split, weight in zip(SPLITS, self.split_ratio, strict=True) if weight]


def split_pattern(ratio: tuple[int, int, int]) -> tuple[str, ...]:
    """The cycle of splits slabs are assigned by: ``sum(ratio)`` entries, the val and test
    entries (alternating, val first) spread evenly among the train ones. 3:1:1 gives
    `SPLIT_PATTERN`, ``train, val, train, test, train``."""
    _, val, test = ratio
    others = []
    while val or test:
        if val:
            others.append("val")
            val -= 1
        if test:
            others.append("test")
            test -= 1
    length = sum(ratio)
    pattern = ["train"] * length
    for index, split in enumerate(others):
        pattern[int((index + 0.5) * length / len(others))] = split
    return tuple(pattern)


def ensure_every_split(assigned: list[str], wanted: list[str]) -> list[str]:
    """``assigned`` (the split of every slab, in order) changed so that every split of
    ``wanted`` has a slab: a missing split takes the last slab of the split that has the
    most. Needs at least ``len(wanted)`` slabs, all in ``wanted`` splits."""
    assigned = list(assigned)
    for split in wanted:
        if split not in assigned:
            donor = max(wanted, key=assigned.count)
            assigned[max(i for i, s in enumerate(assigned) if s == donor)] = split
    return assigned


@dataclass(frozen=True)
class Source:
    """A magnitude volume to simulate from (``frame``: the frame taken of a 4D file)."""

    name: str
    image: nib.Nifti1Image
    origin: str
    frame: int | None = None


def load_nifti(path: str | Path, frame: int | None = None) -> Source:
    """Load a NIfTI file as a simulation source, with a one-line error if it cannot be.

    A 4D file (x, y, z, t) needs ``frame``, the index of the 3D volume to take; a 3D file
    (or a 4D one of one frame) takes none."""
    path = Path(path)
    if not path.is_file():
        raise CvxmriError(f"{path}: no such file")
    try:
        image = nib.load(path)
        shape = image.shape
    except Exception as err:  # nibabel raises many types for damaged files
        raise CvxmriError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from None
    frames = shape[3] if len(shape) == 4 else 1
    if len(shape) not in (3, 4):
        raise CvxmriError(f"{path}: expected a 3D or 4D volume, got shape {shape}")
    if frames > 1 and frame is None:
        raise CvxmriError(
            f"{path}: a 4D volume of {frames} frames, shape {shape}: choose one with "
            f"--frame (0 to {frames - 1})"
        )
    if frame is not None:
        if len(shape) == 3:
            raise CvxmriError(f"{path}: a 3D volume; --frame applies to 4D volumes only")
        if not 0 <= frame < frames:
            raise CvxmriError(
                f"{path}: frame {frame} out of range (the volume has {frames} frames: "
                f"0 to {frames - 1})"
            )
    try:
        if frame is not None:
            image = image.slicer[..., frame]
        image.get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises many types for damaged files
        raise CvxmriError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from None
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    origin = f"{path} (sha256 {_sha256(path)[:16]})"
    if frame is not None:
        origin += f", frame {frame} of {frames}"
    return Source(name=name, image=image, origin=origin, frame=frame)


def default_sources(dims: int = 2) -> list[Source]:
    """The real anatomy that installs offline: Colin27 (Debian mricron-data) and MNI152
    2009 (shipped inside nilearn); for 3D data (``dims=3``) also Colin27's 0.5 mm
    ``ch2better``. Whichever is installed is used."""
    sources = []
    colin = [("colin27", COLIN27_PATH, "Colin27 T1")]
    if dims == 3:
        colin.append(("colin27better", COLIN27_BETTER_PATH, "Colin27 T1, 0.5 mm"))
    for name, path, label in colin:
        if path.is_file():
            source = load_nifti(path)
            sources.append(Source(name, source.image, f"{label}, {source.origin}"))
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        log.warning("nilearn is not installed: the MNI152 template is skipped")
    else:
        sources.append(
            Source("mni152", load_mni152_template(resolution=1), "MNI152 2009 T1 (nilearn)")
        )
    if not sources:
        raise CvxmriError(
            "no default volume found: install Debian's mricron-data (Colin27) or the nilearn "
            "package (MNI152), or pass --nifti FILE"
        )
    return sources


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalised_volume(image: nib.Nifti1Image) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The 3D data of ``image`` in its closest canonical (RAS) orientation, negative values
    clipped and scaled so that the 99.9th percentile is 1, and that canonical image (whose
    affine the data follow). One-line `CvxmriError` for a 4D, non-finite or empty volume."""
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CvxmriError(f"expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise CvxmriError("the volume contains NaN or Inf values")
    data = np.clip(data, 0, None)
    scale = float(np.percentile(data, 99.9))
    if scale <= 0:
        raise CvxmriError("the volume is empty (all values <= 0)")
    data /= scale
    return data, canonical


def axial_slices(image: nib.Nifti1Image, matrix: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices resampled to a square ``matrix`` grid that holds the whole in-plane FOV.

    Returns the slices (n, matrix, matrix), anterior up, scaled so the volume's 99.9th
    percentile is 1, and the indices of the slices in the canonical (RAS) volume.
    """
    data, canonical = normalised_volume(image)
    dx, dy = (float(z) for z in canonical.header.get_zooms()[:2])
    fov = max(data.shape[0] * dx, data.shape[1] * dy)
    pixel = fov / matrix
    size = (round(data.shape[1] * dy / pixel), round(data.shape[0] * dx / pixel))
    out = np.zeros((data.shape[2], matrix, matrix), dtype=np.float32)
    top, left = (matrix - size[0]) // 2, (matrix - size[1]) // 2
    for k in range(data.shape[2]):
        # RAS (x: left->right, y: posterior->anterior): rows run anterior to posterior.
        plane = np.flipud(data[:, :, k].T)
        out[k, top : top + size[0], left : left + size[1]] = resize(
            plane, size, order=1, anti_aliasing=True, preserve_range=True
        )
    return np.clip(out, 0, None), np.arange(data.shape[2])


def foreground_fraction(image: np.ndarray, level: float = 0.1) -> float:
    """Fraction of pixels above ``level`` (relative to the volume scale of 1)."""
    return float((image > level).mean())


def smooth_phase(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random phase map over a 2D or 3D grid: a random low-frequency field (5
    frequencies per axis), scaled to ``strength`` radians peak to peak."""
    coeffs = np.zeros(shape, dtype=np.complex128)
    band = tuple(slice(n // 2 - 2, n // 2 + 3) for n in shape)
    size = (5,) * len(shape)
    coeffs[band] = rng.normal(size=size) + 1j * rng.normal(size=size)
    field = np.real(np.fft.ifftn(np.fft.ifftshift(coeffs)))
    span = field.max() - field.min()
    return (field - field.min()) / span * strength if span > 0 else np.zeros(shape)


def birdcage_maps(coils: int, shape: tuple[int, ...]) -> np.ndarray:
    """Birdcage coil sensitivities (sigpy) over a 2D or 3D grid, normalised to unit
    root-sum-of-squares. In 3D the coils sit on two rings along the first axis (the readout
    of `cvxmri.data.simulate3d`, head to foot), ``ceil(coils / 2)`` per ring."""
    import sigpy.mri

    rings = {"nzz": coils} if len(shape) == 2 else {"nzz": max(1, -(-coils // 2))}
    maps = sigpy.mri.birdcage_maps((coils, *shape), r=1.5, **rings)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))).astype(np.complex64)


def simulate_slice(
    image: np.ndarray, maps: np.ndarray, config: SimulationConfig, rng: np.random.Generator
) -> np.ndarray:
    """Multi-coil k-space (C, H * oversampling, W) of one magnitude slice (H, W)."""
    height, width = image.shape
    full = (height * config.readout_oversampling, width)
    padded = np.zeros(full, dtype=np.float32)
    top = (full[0] - height) // 2
    padded[top : top + height] = image
    phase = smooth_phase(full, config.phase_strength, rng)
    obj = torch.from_numpy((padded * np.exp(1j * phase)).astype(np.complex64))
    kspace = fft2c(torch.from_numpy(maps) * obj).numpy()
    foreground = padded > 0.1
    sigma = float(padded[foreground].mean()) / config.snr if foreground.any() else 0.0
    # Complex noise with E|n|^2 = sigma^2; the FFT is unitary, so image noise has the same std.
    noise = rng.normal(size=(2, *kspace.shape)) * (sigma / np.sqrt(2))
    return (kspace + noise[0] + 1j * noise[1]).astype(np.complex64)


def rss_target(kspace: np.ndarray, recon_shape: tuple[int, int]) -> np.ndarray:
    """fastMRI's multi-coil target: root-sum-of-squares of the coil images, centre-cropped."""
    images = ifft2c(torch.from_numpy(kspace))
    return center_crop(images.abs().pow(2).sum(dim=-3).sqrt(), recon_shape).numpy()


def slabs(n_slices: int, slab: int, guard: int) -> Iterator[range]:
    """Consecutive slabs of ``slab`` positions separated by ``guard`` dropped positions."""
    start = 0
    while start + slab <= n_slices:
        yield range(start, start + slab)
        start += slab + guard


def simulate_dataset(
    sources: list[Source],
    out_dir: str | Path,
    config: SimulationConfig,
    overwrite: bool = False,
    fit_slabs: bool = False,
) -> dict[str, object]:
    """Simulate every source into ``out_dir/multicoil_{train,val,test}/`` with a
    ``manifest.json``, and return the manifest.

    Every split of non-zero ``split_ratio`` gets at least one slab, or a `CvxmriError` says
    why it cannot. With ``fit_slabs``, slabs are made thinner than ``slab_slices`` (down to
    one slice) when volumes are too small for that (and the manifest records the size used).

    The dataset is built in a sibling folder and moved into place at the end, so an
    interrupted run leaves no half-written dataset. An existing ``out_dir`` is replaced only
    with ``overwrite``.
    """
    config.validate()
    check_out_dir(out_dir, overwrite)
    volumes = [_load_slices(source, config) for source in sources]
    config, note = _fit_slabs(volumes, config, fit_slabs)
    return write_dataset(
        out_dir, overwrite, lambda folder: _simulate_into(volumes, folder, config, note)
    )


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that exists and is not empty, unless ``overwrite``."""
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise CvxmriError(f"{final}: already exists and is not empty (use --force to replace it)")


def write_dataset(
    out_dir: str | Path, overwrite: bool, build: Callable[[Path], dict[str, object]]
) -> dict[str, object]:
    """Run ``build(folder)`` on an empty sibling folder of ``out_dir`` and move it into place
    when it returns (its manifest), so that an interrupted run leaves no half-written
    dataset. An existing ``out_dir`` is replaced only with ``overwrite``."""
    check_out_dir(out_dir, overwrite)
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = final.with_name(f".{final.name}.partial")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        manifest = build(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    folder.rename(final)
    return manifest


@dataclass
class _Volume:
    """A source's axial slices, their indices in the volume and the slices kept (every
    ``slice_step``-th with enough foreground)."""

    source: Source
    images: np.ndarray
    indices: np.ndarray
    keep: list[int]


def _load_slices(source: Source, config: SimulationConfig) -> _Volume:
    try:
        images, indices = axial_slices(source.image, config.matrix)
    except CvxmriError as err:
        raise CvxmriError(f"{source.name}: {err}") from None
    keep = [
        k
        for k in range(0, len(images), config.slice_step)
        if foreground_fraction(images[k]) >= config.min_foreground
    ]
    return _Volume(source, images, indices, keep)


def volume_slabs(keep: list[int], config: SimulationConfig) -> list[list[int]]:
    """The slabs of a volume: slice indices of ``slab_slices`` kept slices separated by
    ``guard_slices``; only runs of slices that are contiguous in the volume form a slab."""
    found = []
    for slab in slabs(len(keep), config.slab_slices, config.guard_slices):
        positions = [keep[i] for i in slab]
        if positions[-1] - positions[0] == config.slice_step * (len(positions) - 1):
            found.append(positions)
    return found


def _slab_problem(volumes: list[_Volume], config: SimulationConfig) -> str:
    """Why these slabs cannot make the dataset ('' when they can)."""
    counts = [len(volume_slabs(v.keep, config)) for v in volumes]
    usable = (
        f"usable slices (one axial slice in {config.slice_step}, with "
        f"{config.min_foreground:.0%} foreground or more)"
    )
    slab = f"slab(s) of {config.slab_slices} slices, {config.guard_slices} dropped between slabs"
    for volume, count in zip(volumes, counts, strict=True):
        if count == 0:
            return (
                f"{volume.source.name}: no slab of {config.slab_slices} slices: "
                f"{len(volume.keep)} {usable} of {len(volume.images)}"
            )
    wanted = config.wanted_splits
    if sum(counts) < len(wanted):
        names = ", ".join(v.source.name for v in volumes)
        kept = sum(len(v.keep) for v in volumes)
        return (
            f"{names}: {kept} {usable} make {sum(counts)} {slab}, but the splits "
            f"{'/'.join(wanted)} need one slab each"
        )
    return ""


def _fit_slabs(
    volumes: list[_Volume], config: SimulationConfig, fit: bool
) -> tuple[SimulationConfig, str]:
    """``config``, with thinner slabs when ``fit`` and the volumes need them, and a note of
    the change; a `CvxmriError` saying why when no slab size works."""
    problem = _slab_problem(volumes, config)
    if not problem:
        return config, ""
    if fit:
        for size in range(config.slab_slices - 1, 0, -1):
            thinner = replace(config, slab_slices=size)
            if not _slab_problem(volumes, thinner):
                note = (
                    f"slabs of {size} slices instead of {config.slab_slices}: the volumes are "
                    "too small for every split to get a slab of the default size"
                )
                log.warning("%s", note)
                return thinner, note
        problem = _slab_problem(volumes, replace(config, slab_slices=1))
    hint = (
        "use a smaller --slab-slices, --guard-slices or --slice-step, a --split-ratio with "
        "fewer splits (0:0:1: a test set only), or more volumes"
    )
    raise CvxmriError(f"{problem}; {hint}")


def _simulate_into(
    volumes: list[_Volume], out_dir: Path, config: SimulationConfig, note: str = ""
) -> dict[str, object]:
    rng = np.random.default_rng(config.seed)
    full = (config.matrix * config.readout_oversampling, config.matrix)
    maps = birdcage_maps(config.coils, full)
    encoding = EncodingInfo.full(full, (config.matrix, config.matrix))
    pattern = split_pattern(config.split_ratio)
    files: list[dict[str, Any]] = []
    staging = out_dir / "slabs"
    for source_index, volume in enumerate(volumes):
        source = volume.source
        offset = int(rng.integers(len(pattern))) + source_index
        for n_slab, positions in enumerate(volume_slabs(volume.keep, config)):
            kspace = np.stack(
                [simulate_slice(volume.images[k], maps, config, rng) for k in positions]
            )
            target = rss_target(kspace, encoding.recon_shape)
            name = f"{source.name}_{n_slab:03d}.h5"
            attrs = {"acquisition": "SIM_T1", "patient_id": source.name}
            write_volume(staging / name, Volume(kspace, target, encoding, attrs))
            files.append(
                {
                    "file": name,
                    "split": pattern[(offset + n_slab) % len(pattern)],
                    "source": source.name,
                    "source_slices": [int(volume.indices[k]) for k in positions],
                }
            )
    # Every split asked for gets a slab (small volumes), then the files go to their split.
    splits = ensure_every_split([f["split"] for f in files], config.wanted_splits)
    moved = [
        i for i, (f, split) in enumerate(zip(files, splits, strict=True)) if f["split"] != split
    ]
    if moved:
        message = ", ".join(f"{files[i]['file']} to {splits[i]}" for i in moved)
        note = "; ".join(filter(None, [note, f"too few slabs for the ratio: moved {message}"]))
        log.warning("too few slabs for the split ratio: moved %s", message)
    for entry, split in zip(files, splits, strict=True):
        target_path = out_dir / f"multicoil_{split}" / entry["file"]
        target_path.parent.mkdir(exist_ok=True)
        (staging / entry["file"]).rename(target_path)
        entry["file"] = f"multicoil_{split}/{entry['file']}"
        entry["split"] = split
        log.info("%s: %s (%d slices)", split, entry["file"], len(entry["source_slices"]))
    staging.rmdir()
    ratio = ":".join(str(w) for w in config.split_ratio)
    manifest = {
        "kind": "simulated multi-coil k-space from magnitude volumes",
        "sources": [
            {"name": v.source.name, "origin": v.source.origin, "frame": v.source.frame}
            for v in volumes
        ],
        "config": asdict(config),
        "split_rule": (
            f"slabs of {config.slab_slices} slices (every {config.slice_step}th axial slice), "
            f"{config.guard_slices} slices dropped between slabs, slabs assigned cyclically "
            f"by {list(pattern)} (train:val:test {ratio})"
        ),
        "adjustments": note,
        "files": files,
        "counts": {
            split: sum(len(f["source_slices"]) for f in files if f["split"] == split)
            for split in SPLITS
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
