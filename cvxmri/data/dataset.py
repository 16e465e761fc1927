"""A lazy ``torch.utils.data.Dataset`` of slices over fastMRI-layout files.

Construction reads only the files' headers (`read_encoding`); item ``i`` reads one slice of
k-space from its HDF5 file, that slice's coil maps from the cache (`slice_maps`: computed and
cached for the whole volume on first touch) and turns them into a `Sample` of one slice
(`make_sample`). Memory therefore does not grow with the number of files, and nothing open
is held between items, so the dataset pickles into ``DataLoader`` workers:

    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)

Masks: with ``training=False`` each file gets its fixed evaluation mask (`evaluation_mask`,
seeded from the file name, as `cvxmri evaluate` draws it); with ``training=True`` each slice
gets a mask seeded from ``(seed, file name, slice, epoch)`` (as
`cvxmri.training.data.SliceData.training_masks`), fresh for every `set_epoch`; the epoch
is set in the main process, so use it with ``persistent_workers=False`` (the default).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cvxmri.data.fastmri_h5 import read_encoding, read_volume
from cvxmri.data.prepare import (
    EspiritConfig,
    default_cache_dir,
    evaluation_mask,
    find_files,
    precompute_maps,
    rss_image,
    sense_image,
    slice_maps,
    volume_id,
)
from cvxmri.data.sample import Sample, make_sample
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec, seed_from_name

# Evaluation masks of the files last used are kept (a file's slices are usually read together).
MASKS_KEPT = 4


@dataclass(frozen=True)
class VolumeInfo:
    """What the dataset knows of a file without reading its data.

    Attributes:
        path: the HDF5 file.
        id: its path relative to the data root (`volume_id`).
        slices: number of slices.
        grid: k-space (H, W).
        recon_shape: (h, w).
        padding: acquired phase-encoding columns [left, right).
    """

    path: Path
    id: str
    slices: int
    grid: tuple[int, int]
    recon_shape: tuple[int, int]
    padding: tuple[int, int]


class SliceDataset(Dataset[Sample]):
    """Slices of fastMRI-layout files, read one at a time, as one-slice `Sample` batches.

    Args:
        data: a dataset root, a flat folder of ``.h5`` files or one file (`find_files`).
        mask: the sampling pattern (kind ``file``: each file's stored mask, evaluation only).
        split: the split of a dataset root (ignored otherwise).
        training: fresh per-slice masks each epoch (`set_epoch`) instead of the fixed
            per-file evaluation masks.
        seed: seed of the training masks.
        target: ``sense`` or ``rss``: the ``reference`` magnitude of each sample, the
            SENSE magnitude or fastMRI's RSS (the stored ``reconstruction_rss`` when the
            file has one). The 2-channel SENSE ``target`` is always there.
        cache: coil-map cache folder (default `default_cache_dir`).
        espirit: coil-map settings.
        max_slices: keep only the first n slices (0: all).
        map_workers: when above 1, the maps of its files not cached yet are computed at
            construction, this many files at a time in separate processes
            (`cvxmri.data.prepare.precompute_maps`); else each volume's on first use.
    """

    def __init__(
        self,
        data: str | Path,
        mask: MaskSpec,
        split: str = "test",
        training: bool = False,
        seed: int = 0,
        target: str = "sense",
        cache: str | Path | None = None,
        espirit: EspiritConfig | None = None,
        max_slices: int = 0,
        map_workers: int = 1,
    ) -> None:
        if target not in ("sense", "rss"):
            raise CvxmriError(f"unknown target {target!r} (choose sense or rss)")
        if training and mask.kind == "file":
            raise CvxmriError("mask 'file' is for evaluation; training draws its masks")
        self.mask = mask
        self.training = training
        self.seed = seed
        self.target = target
        self.cache = Path(cache) if cache is not None else default_cache_dir(data)
        self.espirit = espirit or EspiritConfig()
        self.epoch: int | None = None
        self.volumes: list[VolumeInfo] = []
        for path in find_files(data, split):
            encoding, shape, _ = read_encoding(path)
            self.volumes.append(
                VolumeInfo(
                    path=path,
                    id=volume_id(path, data),
                    slices=shape[0],
                    grid=(shape[-2], shape[-1]),
                    recon_shape=encoding.recon_shape,
                    padding=encoding.padding,
                )
            )
        counts = np.array([v.slices for v in self.volumes])
        self._volume_of = np.repeat(np.arange(len(self.volumes)), counts)
        self._slice_of = np.concatenate([np.arange(n) for n in counts])
        if max_slices:
            self._volume_of = self._volume_of[:max_slices]
            self._slice_of = self._slice_of[:max_slices]
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()
        if map_workers > 1:
            used = [self.volumes[i].path for i in np.unique(self._volume_of)]
            precompute_maps(used, self.cache, self.espirit, map_workers)

    def __len__(self) -> int:
        return len(self._volume_of)

    def set_epoch(self, epoch: int | None) -> None:
        """Training masks of this epoch from now on (``None``: one fixed mask per slice)."""
        self.epoch = epoch

    def locate(self, index: int) -> tuple[VolumeInfo, int]:
        """The file and slice of item ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"slice {index} out of range ({len(self)} slices)")
        return self.volumes[self._volume_of[index]], int(self._slice_of[index])

    def sampling_mask(self, index: int, stored: np.ndarray | None = None) -> np.ndarray:
        """The (H, W) sampling mask of item ``index``; ``stored`` is the file's own mask
        (for the ``file`` kind)."""
        info, slice_index = self.locate(index)
        if self.training:
            name = info.path.name
            key = [self.seed, seed_from_name(f"{name}:{slice_index}")]
            key += [] if self.epoch is None else [self.epoch]
            return self.mask.sample(info.grid, np.random.default_rng(key), info.padding)
        number = int(self._volume_of[index])
        if number not in self._masks:
            self._masks[number] = evaluation_mask(
                self.mask, info.path.name, info.grid, info.padding, stored
            )
            if len(self._masks) > MASKS_KEPT:
                self._masks.popitem(last=False)
        self._masks.move_to_end(number)
        return self._masks[number]

    def __getitem__(self, index: int) -> Sample:
        info, slice_index = self.locate(index)
        part = slice(slice_index, slice_index + 1)
        volume = read_volume(info.path, slices=part)
        kspace = torch.from_numpy(volume.kspace)
        maps = torch.from_numpy(slice_maps(info.path, slice_index, self.cache, self.espirit))
        mask = self.sampling_mask(index, volume.mask)
        target = sense_image(kspace, maps, info.recon_shape)
        if self.target == "sense":
            reference = target.abs()
        elif volume.multicoil and volume.target is not None:
            reference = torch.from_numpy(volume.target)
        else:
            reference = rss_image(kspace, info.recon_shape)
        return make_sample(
            kspace,
            torch.from_numpy(mask.astype(np.float32)),
            maps,
            info.recon_shape,
            target=target,
            reference=reference,
            volume=info.id,
            slice_index=[slice_index],
        )


class TrainingPairs:
    """``(x0, target)`` batches of an iterable of `Sample` batches (e.g. a ``DataLoader``
    over a `SliceDataset`), re-iterable, for training functions that take pairs."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.samples = samples

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for sample in self.samples:
            if sample.target is None:
                raise CvxmriError(f"{sample.volume[0]}: sample has no target to train on")
            yield sample.x0, sample.target
