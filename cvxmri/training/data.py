"""Training and validation data: zero-filled inputs and SENSE targets as 2-channel images.

A split is loaded once (k-space, cached ESPIRiT maps, targets). For given masks, every slice
becomes a pair ``(x0, x*)`` of (2, h, w) real tensors (real and imaginary channels) on the
recon matrix, divided by the slice's normalisation scale (`cvxmri.data.prepare`). For true
3D training (`VolumeData`) every item is a whole 3D volume instead: its pair is
(2, x, y, z), from decoupled ESPIRiT maps and a (ky, kz) mask; the rest (masks per item,
`make_sample`, crops) is the same code.

Masks: evaluation splits use the fixed per-file masks of `cvxmri.evaluate`; training uses
one fixed mask per slice (``fixed_masks``) or a fresh mask per epoch. Every random choice is
derived from ``(seed, epoch, ...)``, not from a running generator, so a resumed run makes the
same choices as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cvxmri.data.fastmri_h5 import open_hdf5, read_encoding
from cvxmri.data.prepare import (
    EspiritConfig,
    default_cache_dir,
    evaluation_mask,
    find_files,
    precompute_maps,
    prepare_volume,
    volume_id,
)
from cvxmri.data.sample import Sample, collate_samples, make_sample
from cvxmri.data.volume3d import prepare_volume3d
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec, seed_from_name


@dataclass
class PairSet:
    """Normalised network inputs and targets of a set of slices.

    Attributes:
        x0: (N, 2, h, w) zero-filled SENSE images ((N, 2, x, y, z) volumes in 3D).
        target: (N, 2, h, w) SENSE-combined fully sampled images.
        support: (N, 1, h, w) coil support (0/1).
        scale: (N,) normalisation scale of each slice.
        files: (N,) volume id of each slice, its path relative to the data root (volume
            metrics group by it).
    """

    x0: Tensor
    target: Tensor
    support: Tensor
    scale: Tensor
    files: list[str]

    def __len__(self) -> int:
        return self.x0.shape[0]


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_split_fits(files: list[Path], max_slices: int) -> None:
    """Refuse up front a split whose k-space and coil maps (complex64, held in memory)
    would not fit in available memory, estimated from the files' shapes."""
    need, slices = 0, 0
    for path in files:
        _, shape, _ = read_encoding(path)
        take = shape[0] if not max_slices else min(shape[0], max_slices - slices)
        need += take * int(np.prod(shape[1:])) * 8 * 2  # k-space and maps
        slices += take
        if max_slices and slices >= max_slices:
            break
    have = available_memory()
    if need > 0.8 * have:
        raise CvxmriError(
            f"{files[0].parent}: the split needs {need / 1024**3:.1f} GiB in memory but only "
            f"{have / 1024**3:.1f} GiB is available: use max_train_slices or a smaller dataset"
        )


def files_holding(paths: list[Path], max_slices: int) -> list[Path]:
    """The first of ``paths`` that hold the first ``max_slices`` slices (0: all of them)."""
    needed, total = [], 0
    for path in paths:
        if max_slices and total >= max_slices:
            break
        needed.append(path)
        total += read_encoding(path)[1][0]
    return needed


class SliceData:
    """All slices of one split in memory, ready to be masked.

    Args:
        root: dataset root, flat folder of ``.h5`` files or one file (`find_files`).
        split: train, val or test.
        mask: the sampling pattern.
        max_slices: keep only the first n slices (0: all).
        espirit: coil-map settings; maps are cached under ``root/cache``
            (`cvxmri.data.prepare.default_cache_dir`).
        map_workers: maps not cached yet are computed this many files at a time, in
            separate processes (`cvxmri.data.prepare.precompute_maps`); 1: one by one.

    Each slice has a volume id (``files``: its file's path relative to the data root) and
    a file name (``names``), which seeds its masks as in `cvxmri.evaluate`.
    """

    # Spatial axes of an item, and items per `make_sample` call in `pairs` and `samples`.
    ndim = 2
    batch = 16

    def __init__(
        self,
        root: str | Path,
        split: str,
        mask: MaskSpec,
        max_slices: int = 0,
        espirit: EspiritConfig | None = None,
        map_workers: int = 1,
    ) -> None:
        kspace, maps, targets, files, names, slices = [], [], [], [], [], []
        self.mask = mask
        paths = find_files(root, split)
        check_split_fits(paths, max_slices)
        config, cache = espirit or EspiritConfig(), default_cache_dir(root)
        if map_workers > 1:
            precompute_maps(files_holding(paths, max_slices), cache, config, map_workers)
        for path in paths:
            volume = prepare_volume(path, cache, config)
            kspace.append(torch.from_numpy(volume.kspace))
            maps.append(torch.from_numpy(volume.maps))
            targets.append(torch.from_numpy(volume.target))
            files += [volume_id(path, root)] * len(volume.kspace)
            names += [volume.name] * len(volume.kspace)
            slices += list(range(len(volume.kspace)))
            self.recon_shape = volume.recon_shape
            self.padding = volume.padding
            if max_slices and len(files) >= max_slices:
                break
        count = max_slices or len(files)
        self.kspace = torch.cat(kspace)[:count]
        self.maps = torch.cat(maps)[:count]
        self.targets = torch.cat(targets)[:count]
        self.files = files[:count]
        self.names = names[:count]
        self.slices = slices[:count]

    def __len__(self) -> int:
        return len(self.files)

    def _mask_grid(self) -> tuple[int, int]:
        """The grid a mask is drawn on: (H, W) of a slice, (ky, kz) of a volume."""
        return tuple(self.kspace.shape[-2:])  # type: ignore[return-value]

    def _batched(self, masks: list[np.ndarray]) -> Tensor:
        """Masks, one per item, as `make_sample` takes them: (N, H, W) for slices,
        (N, 1, 1, ky, kz) for volumes (shared by the readout)."""
        stacked = torch.from_numpy(np.stack(masks).astype(np.float32))
        return stacked if self.ndim == 2 else stacked[:, None, None]

    def evaluation_masks(self) -> Tensor:
        """The fixed per-file evaluation masks (as `cvxmri evaluate` draws them)."""
        shape = self._mask_grid()
        cache: dict[str, np.ndarray] = {}
        for name in self.names:
            if name not in cache:
                cache[name] = evaluation_mask(self.mask, name, shape, self.padding, ndim=self.ndim)
        return self._batched([cache[n] for n in self.names])

    def training_masks(self, seed: int, epoch: int | None) -> Tensor:
        """One mask per item: fixed for the run (``epoch=None``) or fresh for an epoch."""
        shape = self._mask_grid()
        masks = []
        for name, index in zip(self.names, self.slices, strict=True):
            key = [seed, seed_from_name(f"{name}:{index}")] + ([] if epoch is None else [epoch])
            rng = np.random.default_rng(key)
            masks.append(self.mask.sample(shape, rng, self.padding, self.ndim))
        return self._batched(masks)

    def samples(self, masks: Tensor, batch: int = 0) -> Sample:
        """Every slice as one `Sample` for these masks (`make_sample`, ``batch`` slices at
        a time, 0: the class's ``batch``): k-space, masks and maps included, for networks
        that apply the SENSE operator themselves (data consistency)."""
        batch = batch or self.batch
        return collate_samples(
            [
                make_sample(
                    self.kspace[start : start + batch],
                    masks[start : start + batch],
                    self.maps[start : start + batch],
                    self.recon_shape,
                    target=self.targets[start : start + batch],
                    volume=self.files[start : start + batch],
                    slice_index=self.slices[start : start + batch],
                )
                for start in range(0, len(self), batch)
            ]
        )

    def pairs(self, masks: Tensor, batch: int = 0) -> PairSet:
        """Normalised ``(x0, x*)`` pairs for these masks (`make_sample`, ``batch`` slices
        at a time, 0: the class's ``batch``; only the images are kept, not each batch's
        k-space and maps)."""
        batch = batch or self.batch
        x0s, targets, supports, scales = [], [], [], []
        for start in range(0, len(self), batch):
            part = slice(start, start + batch)
            sample = make_sample(
                self.kspace[part],
                masks[part],
                self.maps[part],
                self.recon_shape,
                target=self.targets[part],
                volume=self.files[part],
                slice_index=self.slices[part],
            )
            assert sample.target is not None
            x0s.append(sample.x0)
            targets.append(sample.target)
            supports.append(sample.support)
            scales.append(sample.scale)
        return PairSet(
            x0=torch.cat(x0s),
            target=torch.cat(targets),
            support=torch.cat(supports),
            scale=torch.cat(scales),
            files=list(self.files),
        )


class VolumeData(SliceData):
    """All 3D volumes of one split in memory, for true 3D training: each item is a whole
    volume (`cvxmri.data.volume3d` files), with decoupled ESPIRiT maps
    (`cvxmri.data.volume3d.prepare_volume3d`, computed here, not cached) and (ky, kz) masks
    seeded as `cvxmri evaluate --dims 3` seeds them (evaluation) or from (seed, file name,
    epoch) (training). The masks, pairs and samples are `SliceData`'s, with three spatial
    axes. The volumes of a split must share one grid (they are batched together).

    Args:
        root: dataset root, flat folder of ``.h5`` files or one 3D file (`find_files`).
        split: train, val or test.
        mask: the (ky, kz) sampling pattern (poisson or random).
        max_slices: keep only the first n volumes (0: all).
        espirit: coil-map settings.
    """

    ndim = 3
    batch = 1

    def __init__(
        self,
        root: str | Path,
        split: str,
        mask: MaskSpec,
        max_slices: int = 0,
        espirit: EspiritConfig | None = None,
    ) -> None:
        mask.validate(ndim=3)
        self.mask = mask
        self.padding = None
        paths = find_files(root, split)[: max_slices or None]
        check_volumes_fit(paths)
        kspace, maps, targets, self.files, self.names = [], [], [], [], []
        for path in paths:
            volume = prepare_volume3d(path, espirit)
            if kspace and volume.kspace.shape != kspace[0].shape:
                raise CvxmriError(
                    f"{path}: k-space {volume.kspace.shape} differs from {paths[0].name}'s "
                    f"{tuple(kspace[0].shape)}: true 3D training batches the volumes of a "
                    "split, which must share one grid and coil count"
                )
            kspace.append(torch.from_numpy(volume.kspace))
            maps.append(torch.from_numpy(volume.maps))
            targets.append(torch.from_numpy(volume.target))
            self.files.append(volume_id(path, root))
            self.names.append(volume.name)
        self.kspace = torch.stack(kspace)
        self.maps = torch.stack(maps)
        self.targets = torch.stack(targets)
        self.slices = [0] * len(self.files)
        self.recon_shape = tuple(self.kspace.shape[2:])


def check_volumes_fit(files: list[Path]) -> None:
    """Refuse up front 3D volumes whose k-space, coil maps and targets (complex64) would
    not fit in available memory, from the files' k-space shapes."""
    need = 0
    for path in files:
        with open_hdf5(path) as hf:
            shape = hf["kspace"].shape if "kspace" in hf else ()
        need += int(np.prod(shape)) * 8 * 2 + (int(np.prod(shape[1:])) * 8 if shape else 0)
    have = available_memory()
    if need > 0.8 * have:
        raise CvxmriError(
            f"{files[0].parent}: the 3D volumes need {need / 1024**3:.1f} GiB in memory but "
            f"only {have / 1024**3:.1f} GiB is available: use max_train_slices (volumes) or "
            "fewer files"
        )


def split_data(
    root: str | Path, split: str, mask: MaskSpec, ndim: int = 2, max_slices: int = 0
) -> SliceData:
    """One split for training or validation: `SliceData` (2D slices, ``ndim`` 2) or
    `VolumeData` (whole 3D volumes, ``ndim`` 3)."""
    if ndim == 3:
        return VolumeData(root, split, mask, max_slices=max_slices)
    return SliceData(root, split, mask, max_slices=max_slices)


def derived_seed(*keys: int) -> int:
    """A 31-bit seed from integers, the same in every process (unlike ``hash``)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int) -> list[Tensor]:
    """The shuffled index batches of one epoch (derived from seed, stage and epoch)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, stage, epoch, 0))
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def crops_apply(shape: tuple[int, ...], crop: int) -> bool:
    """Whether training crops of side ``crop`` are cut from items of spatial ``shape``:
    not for 0, nor when the side exceeds an axis (whole items then; 3D training refuses
    such a patch up front, `check_patch`)."""
    return 0 < crop <= min(shape)


def check_patch(shape: tuple[int, ...], crop: int) -> None:
    """Refuse a 3D patch side larger than the volumes (``shape`` (x, y, z))."""
    if crop > min(shape):
        grid = "x".join(str(n) for n in shape)
        raise CvxmriError(
            f"crop {crop}: a {crop}x{crop}x{crop} patch does not fit in the {grid} volumes; "
            f"use a side of at most {min(shape)} (--crop; 0: whole volumes)"
        )


def crop_windows(
    n: int, shape: tuple[int, ...], crop: int, seed: int, stage: int, epoch: int
) -> Tensor:
    """(n, len(shape)) first corners of this epoch's random crops (cubes of side ``crop``
    in 3D; all zero when no crops are cut, `crops_apply`)."""
    if not crops_apply(shape, crop):
        return torch.zeros(n, len(shape), dtype=torch.long)
    generator = torch.Generator().manual_seed(derived_seed(seed, stage, epoch, 1))
    corners = [torch.randint(0, side - crop + 1, (n,), generator=generator) for side in shape]
    return torch.stack(corners, dim=1)


def take_crops(images: Tensor, corners: Tensor, crop: int) -> Tensor:
    """Crop each image (B, C, H, W) (or volume (B, C, X, Y, Z)) at its corner; whole
    images when no crops are cut (`crops_apply`)."""
    spatial = images.shape[2:]
    if not crops_apply(tuple(spatial), crop):
        return images
    if images.shape[0] == 0:
        return images[(..., *[slice(0, crop)] * len(spatial))]
    return torch.stack(
        [
            img[(slice(None), *[slice(c, c + crop) for c in corner])]
            for img, corner in zip(images, corners.tolist(), strict=True)
        ]
    )
