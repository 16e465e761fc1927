"""From raw k-space to what reconstruction needs: coil maps, targets and normalisation.

- Coil sensitivities: ESPIRiT from the central ``calib_width`` lines of each slice's fully
  sampled k-space, computed once and cached next to the data (`load_maps`; several files
  at a time: `precompute_maps`). This is the usual "maps from a calibration region"
  convention of SENSE-based learned reconstruction (e.g. MoDL and the Stanford knee sets);
  every method gets the same maps. The default backend is `cvxmri.data.espirit` (torch,
  batched over slices, CPU or CUDA), which agrees with sigpy's ``EspiritCalib`` (the
  other backend) to well under 1% (tests/test_espirit.py) at about a tenth of its time
  on CPU; the backend is part of the cache folder's name (`EspiritConfig.tag`).
- Targets: the SENSE-combined complex image ``x* = sum_c conj(S_c) F^H y_c`` and fastMRI's
  root-sum-of-squares image, both centre-cropped in image space to the recon matrix.
- Normalisation: each slice (with its mask) is divided by the 99th percentile of the
  zero-filled magnitude ``|x0|`` over the recon matrix. It uses measured data only, so it is
  available at test time, and it puts every input on one scale, which matters for the
  regulariser of the convex stages. PSNR and SSIM are invariant to a common scale.
- Where the data are (`find_files`): a dataset root with ``multicoil_<split>/`` and
  ``singlecoil_<split>/`` folders, a flat folder of ``.h5`` files (what fastMRI's
  ``SliceDataset`` takes, e.g. ``knee/multicoil_val``) or one ``.h5`` file. A volume is
  identified by its path relative to the data root (`volume_id`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from itertools import repeat
from pathlib import Path

import h5py
import numpy as np
import torch

from cvxmri.data.espirit import espirit
from cvxmri.data.fastmri_h5 import Volume, read_encoding, read_volume
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec, seed_from_name
from cvxmri.physics import Sense, center_crop, ifft2c

log = logging.getLogger(__name__)

NORM_PERCENTILE = 99.0
SPLIT_KINDS = ("multicoil", "singlecoil")
STORED_RSS = "stored reconstruction_rss"
COMPUTED_RSS = "computed rss"
DATA_FORMS = "a dataset root, a flat folder of .h5 files or one .h5 file"
ESPIRIT_BACKENDS = ("torch", "sigpy")
SLICES_PER_CALL = 8


@dataclass(frozen=True)
class EspiritConfig:
    """ESPIRiT parameters (sigpy `EspiritCalib`'s) and the implementation that computes
    the maps: ``"torch"`` (`cvxmri.data.espirit`, batched, CPU or CUDA; the default) or
    ``"sigpy"`` (``EspiritCalib``, one slice at a time on CPU)."""

    calib_width: int = 24
    thresh: float = 0.02
    kernel_width: int = 6
    crop: float = 0.95
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.backend not in ESPIRIT_BACKENDS:
            raise CvxmriError(
                f"unknown ESPIRiT backend {self.backend!r} (expected one of "
                f"{', '.join(ESPIRIT_BACKENDS)})"
            )

    def tag(self) -> str:
        """A folder name that changes whenever a parameter or the backend does, so that
        caches of the two backends never mix."""
        return (
            f"espirit-{self.backend}-cw{self.calib_width}-t{self.thresh:g}"
            f"-k{self.kernel_width}-c{self.crop:g}"
        )


def espirit_maps(
    kspace: np.ndarray,
    config: EspiritConfig,
    device: str | torch.device = "cpu",
    slices_per_call: int = SLICES_PER_CALL,
) -> np.ndarray:
    """ESPIRiT sensitivities, complex64, of multi-coil k-space: one slice (C, H, W) or a
    stack (S, C, H, W), same shape out.

    The torch backend computes ``slices_per_call`` slices at a time on ``device`` (the
    memory it needs grows with it); the sigpy backend ignores both and runs on CPU."""
    stack = kspace if kspace.ndim == 4 else kspace[None]
    if config.backend == "sigpy":
        maps = np.stack([_sigpy_maps(k, config) for k in stack])
    else:
        parts = []
        for first in range(0, len(stack), slices_per_call):
            part = torch.from_numpy(np.ascontiguousarray(stack[first : first + slices_per_call]))
            computed = espirit(
                part.to(device=device, dtype=torch.complex64),
                calib_width=config.calib_width,
                thresh=config.thresh,
                kernel_width=config.kernel_width,
                crop=config.crop,
            )
            parts.append(computed.cpu().numpy())
        maps = np.concatenate(parts)
    return maps if kspace.ndim == 4 else maps[0]


def _sigpy_maps(kspace: np.ndarray, config: EspiritConfig) -> np.ndarray:
    """sigpy's ``EspiritCalib`` maps (C, H, W) of one slice (C, H, W)."""
    import sigpy.mri

    app = sigpy.mri.app.EspiritCalib(
        kspace,
        calib_width=config.calib_width,
        thresh=config.thresh,
        kernel_width=config.kernel_width,
        crop=config.crop,
        show_pbar=False,
    )
    return np.asarray(app.run(), dtype=np.complex64)


@dataclass
class PreparedVolume:
    """A fastMRI volume with what reconstruction needs, all on the full k-space grid except
    the targets, which are cropped to the recon matrix.

    Attributes:
        name: the file name (seeds its evaluation mask).
        kspace: complex64 (S, C, H, W), fully sampled.
        maps: complex64 (S, C, H, W) coil sensitivities (ones for single-coil data).
        target: complex64 (S, h, w) SENSE-combined image.
        rss: float32 (S, h, w) root-sum-of-squares image computed from the k-space.
        recon_shape: (h, w).
        padding: acquired phase-encoding columns [left, right).
        mask: the file's own bool (H, W) sampling mask (``mask`` dataset), or None.
        stored_rss: float32 (S, h, w) ``reconstruction_rss`` of a multi-coil file (the
            reference fastMRI's numbers are computed against), or None if it has none.
    """

    name: str
    kspace: np.ndarray
    maps: np.ndarray
    target: np.ndarray
    rss: np.ndarray
    recon_shape: tuple[int, int]
    padding: tuple[int, int]
    mask: np.ndarray | None = None
    stored_rss: np.ndarray | None = None

    def rss_target(self) -> tuple[np.ndarray, str]:
        """fastMRI's RSS target and where it comes from: the stored ``reconstruction_rss``
        when the file has one, else the RSS computed from the k-space."""
        if self.stored_rss is not None:
            return self.stored_rss, STORED_RSS
        return self.rss, COMPUTED_RSS


def _cache_path(path: Path, cache_dir: Path, config: EspiritConfig) -> Path:
    return cache_dir / config.tag() / path.parent.name / path.name


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _cache_is_valid(hf: h5py.File, path: Path, shape: tuple[int, ...]) -> bool:
    """Whether an open cache file holds maps of ``shape`` computed from ``path`` as it is."""
    return hf.attrs.get("source") == _fingerprint(path) and hf["maps"].shape == shape


def _read_cache(
    path: Path, cache_dir: Path, config: EspiritConfig, shape: tuple[int, ...], index: slice
) -> np.ndarray | None:
    """Slices ``index`` of the cached maps of ``path``, or None when the cache is missing,
    stale (the file changed since) or of another shape. Only those slices are read."""
    cached = _cache_path(path, cache_dir, config)
    if not cached.is_file():
        return None
    try:
        with h5py.File(cached, "r") as hf:
            if _cache_is_valid(hf, path, shape):
                return np.asarray(hf["maps"][index])
    except OSError:
        log.warning("%s: damaged cache file, recomputing", cached)
    return None


def _needs_maps(path: Path, cache_dir: Path, config: EspiritConfig) -> bool:
    """Whether ``path`` is a multi-coil file without valid cached maps (reads no maps)."""
    _, shape, multicoil = read_encoding(path)
    cached = _cache_path(path, cache_dir, config)
    if not multicoil or not cached.is_file():
        return multicoil
    try:
        with h5py.File(cached, "r") as hf:
            return not _cache_is_valid(hf, path, shape)
    except OSError:
        return True


def _cache_maps(path: Path, cache_dir: Path, config: EspiritConfig) -> None:
    """Compute and cache the maps of one file (a worker's task: nothing is sent back)."""
    load_maps(path, read_volume(path), cache_dir, config)


def _one_thread() -> None:
    """Worker start-up: one torch thread per process, the processes being the parallelism."""
    torch.set_num_threads(1)


def precompute_maps(
    paths: Sequence[str | Path],
    cache_dir: str | Path,
    config: EspiritConfig | None = None,
    workers: int = 1,
    progress: bool = False,
) -> int:
    """Compute and cache the coil maps of the files among ``paths`` that have none cached
    yet (`load_maps`), ``workers`` files at a time in separate processes (spawned, one
    torch thread each; 1: in this process). Every cache file is written to a temporary
    name and renamed, so readers never see a partial one. ``progress``: a progress bar
    on a terminal. Returns how many files were computed."""
    from tqdm import tqdm

    config = config or EspiritConfig()
    cache = Path(cache_dir)
    todo = [Path(p) for p in paths if _needs_maps(Path(p), cache, config)]
    bar = tqdm(total=len(todo), desc="coil maps", unit="file", disable=None if progress else True)
    with bar:
        if workers <= 1 or len(todo) <= 1:
            for path in todo:
                _cache_maps(path, cache, config)
                bar.update()
            return len(todo)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), context, _one_thread) as pool:
            for _ in pool.map(_cache_maps, todo, repeat(cache), repeat(config)):
                bar.update()
    return len(todo)


def load_maps(path: Path, volume: Volume, cache_dir: Path, config: EspiritConfig) -> np.ndarray:
    """The coil maps of a volume, from the cache or computed (then cached atomically)."""
    if not volume.multicoil:
        return np.ones_like(volume.kspace)
    stored = _read_cache(path, cache_dir, config, volume.kspace.shape, slice(None))
    if stored is not None:
        return stored
    cached = _cache_path(path, cache_dir, config)
    fingerprint = _fingerprint(path)
    calib = min(config.calib_width, *volume.kspace.shape[-2:])
    # C order, as the cache returns them: a strided layout would change the summation
    # order downstream, and a first run would differ in the last bit from later ones.
    maps = np.ascontiguousarray(espirit_maps(volume.kspace, replace(config, calib_width=calib)))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as hf:
            hf.create_dataset("maps", data=maps)
            hf.attrs["source"] = fingerprint
            for key, value in asdict(config).items():
                hf.attrs[key] = value
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)
    return maps


def sense_image(
    kspace: torch.Tensor, maps: torch.Tensor, recon_shape: tuple[int, int]
) -> torch.Tensor:
    """The SENSE-combined image ``crop(sum_c conj(S_c) F^H k_c)`` (B, h, w) of fully
    sampled k-space (B, C, H, W)."""
    return center_crop(Sense(maps).H(kspace), recon_shape)


def rss_image(kspace: torch.Tensor, recon_shape: tuple[int, int]) -> torch.Tensor:
    """fastMRI's root-sum-of-squares image ``crop(sqrt(sum_c |F^H k_c|^2))`` (B, h, w)."""
    return center_crop(ifft2c(kspace).abs().pow(2).sum(dim=-3).sqrt(), recon_shape)


def slice_maps(
    path: str | Path, index: int, cache_dir: str | Path, config: EspiritConfig | None = None
) -> np.ndarray:
    """The coil maps (1, C, H, W) of one slice, without loading the volume when they are
    cached: only that slice of the cache is read. On a cache miss the whole volume's maps
    are computed and cached (`load_maps`), then sliced. Single-coil files get ones."""
    path = Path(path)
    config = config or EspiritConfig()
    _, shape, multicoil = read_encoding(path)
    full = shape if multicoil else (shape[0], 1, *shape[1:])
    if not 0 <= index < full[0]:
        raise CvxmriError(f"{path}: slice {index} out of range (the file has {full[0]})")
    if not multicoil:
        return np.ones((1, *full[1:]), dtype=np.complex64)
    part = slice(index, index + 1)
    stored = _read_cache(path, Path(cache_dir), config, full, part)
    if stored is not None:
        return stored
    return load_maps(path, read_volume(path), Path(cache_dir), config)[part]


def prepare_volume(
    path: str | Path, cache_dir: str | Path, config: EspiritConfig | None = None
) -> PreparedVolume:
    """Read a fastMRI file and attach coil maps and targets."""
    path = Path(path)
    config = config or EspiritConfig()
    volume = read_volume(path)
    maps = load_maps(path, volume, Path(cache_dir), config)
    kspace_t = torch.from_numpy(volume.kspace)
    recon_shape = volume.encoding.recon_shape
    target = sense_image(kspace_t, torch.from_numpy(maps), recon_shape)
    rss = rss_image(kspace_t, recon_shape)
    return PreparedVolume(
        name=path.name,
        kspace=volume.kspace,
        maps=maps,
        target=target.numpy(),
        rss=rss.numpy(),
        recon_shape=recon_shape,
        padding=volume.encoding.padding,
        mask=volume.mask,
        stored_rss=volume.target if volume.multicoil else None,
    )


def normalisation_scale(x0: torch.Tensor, recon_shape: tuple[int, ...]) -> torch.Tensor:
    """Per-slice scale: the 99th percentile of the zero-filled magnitude over the recon
    matrix. ``x0`` is (B, H, W) complex (3D: (B, X, Y, Z), one scale per volume); returns
    (B,)."""
    magnitude = center_crop(x0, recon_shape).abs().flatten(1)
    scale = torch.quantile(magnitude.float(), NORM_PERCENTILE / 100, dim=1)
    if not torch.all(scale > 0):
        raise CvxmriError("zero-filled image is zero: the mask samples no signal")
    return scale


def evaluation_mask(
    spec: MaskSpec,
    name: str,
    shape: tuple[int, int],
    padding: tuple[int, int] | None,
    stored: np.ndarray | None = None,
    ndim: int = 2,
) -> np.ndarray:
    """The fixed evaluation mask of one file: seeded from its name, or for the ``file`` kind
    the file's own ``stored`` mask. With ``ndim=3`` (``padding`` None), the (ky, kz) mask
    of a 3D volume whose (ky, kz) grid is ``shape``.

    ``name`` is the file NAME (``path.name``), not its volume id (the path relative to the
    data root): seeding by name is fastMRI's convention, and it keeps every number reported
    on the default dataset unchanged. So files of the same name in ``multicoil_test/`` and
    ``singlecoil_test/`` share a mask (on grids of the same shape); their results are still
    told apart by their volume ids.
    """
    if spec.kind == "file":
        if stored is None:
            raise CvxmriError(f"{name}: mask 'file' asked for, but the file has no 'mask' dataset")
        return stored
    return spec.sample(shape, np.random.default_rng(seed_from_name(name)), padding, ndim)


def coil_support(maps: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Where any coil is sensitive: (B, H, W) 0/1 of maps (B, C, H, W), or (B, X, Y, Z) of
    3D maps with ``ndim=3``. Outside it the SENSE model has no data and the SENSE target is
    zero, so every method's image is restricted to it."""
    return (maps.abs().sum(dim=-(ndim + 1)) > 0).to(maps.real.dtype)


def _is_split_folder(folder: Path) -> bool:
    return any(folder.name.startswith(f"{kind}_") for kind in SPLIT_KINDS)


def find_files(root: str | Path, split: str = "test") -> list[Path]:
    """The HDF5 files to read, sorted. ``root`` is one of:

    - a dataset root: it has a ``multicoil_<split>/`` or ``singlecoil_<split>/`` folder,
      and the files of both are returned;
    - a flat folder of ``.h5`` files, as fastMRI's ``SliceDataset`` takes (e.g.
      ``knee/multicoil_val``): any folder that is not a dataset root for ``split``; its own
      files are returned and ``split`` is ignored;
    - one ``.h5`` file; ``split`` is ignored.

    Anything else is a one-line `CvxmriError` saying what is expected: a missing ``.h5``
    file, a missing folder, a NIfTI volume (simulate k-space from it first) or a file of
    another kind.
    """
    root = Path(root)
    if root.is_file():
        check_data_file(root)
        return [root]
    if root.suffix.lower() == ".h5":
        raise CvxmriError(f"{root}: no such file")
    if not root.is_dir():
        raise CvxmriError(f"{root}: data folder does not exist (expected {DATA_FORMS})")
    folders = [root / f"{kind}_{split}" for kind in SPLIT_KINDS]
    if not is_dataset_root(root, split):
        folders = [root]
    files = sorted(p for folder in folders if folder.is_dir() for p in folder.glob("*.h5"))
    if not files:
        raise CvxmriError(
            f"{root}: no .h5 files in multicoil_{split}/ or singlecoil_{split}/, nor in the "
            "folder itself (run 'cvxmri data simulate' to build the default dataset)"
        )
    return files


def check_data_file(path: Path) -> None:
    """Refuse, in one line, a data file that cannot be fastMRI k-space by its name: a
    NIfTI volume (image data: ``cvxmri data simulate`` makes k-space from it) or a file
    without an HDF5 suffix. HDF5 files are checked by the reader."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        raise CvxmriError(
            f"{path}: a NIfTI image volume, not fastMRI k-space (simulate k-space from it "
            f"with 'cvxmri data simulate --nifti {path} --out DIR', then use DIR)"
        )
    if path.suffix.lower() != ".h5":
        raise CvxmriError(f"{path}: not an .h5 file (expected {DATA_FORMS})")


def is_dataset_root(data: str | Path, split: str) -> bool:
    """Whether ``data`` is a dataset root holding ``split`` (a ``multicoil_<split>/`` or
    ``singlecoil_<split>/`` folder), as opposed to a flat folder of files or one file."""
    data = Path(data)
    return any((data / f"{kind}_{split}").is_dir() for kind in SPLIT_KINDS)


def data_root(data: str | Path) -> Path:
    """The folder that volume ids are relative to: ``data`` itself, or the folder of a
    single file."""
    data = Path(data)
    return data.parent if data.is_file() else data


def volume_id(path: str | Path, data: str | Path) -> str:
    """A volume's id: its path relative to the data root, e.g. ``multicoil_test/f.h5``
    for a dataset root and ``f.h5`` for a flat folder. Files of the same name in
    ``multicoil_test/`` and ``singlecoil_test/`` get distinct ids."""
    return Path(path).relative_to(data_root(data)).as_posix()


def default_cache_dir(data: str | Path) -> Path:
    """Where coil maps are cached by default: ``<root>/cache``, with root the data root,
    or its parent when the data root is a fastMRI split folder (``multicoil_val/``), so
    that the split folder read alone shares the dataset root's cache."""
    root = data_root(data)
    return (root.parent if _is_split_folder(root) else root) / "cache"
