"""The lazy slice Dataset: one slice read per item, the same masks and samples as the
in-memory pipeline, usable with DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cvxmri.data import dataset as dataset_module
from cvxmri.data import prepare
from cvxmri.data.dataset import SliceDataset, TrainingPairs
from cvxmri.data.prepare import (
    EspiritConfig,
    default_cache_dir,
    evaluation_mask,
    find_files,
    prepare_volume,
)
from cvxmri.data.sample import collate_samples, make_sample
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.training.data import SliceData

MASK = MaskSpec("poisson", 4.0, calib_size=(6, 6))


@pytest.fixture(scope="module")
def prepared(tiny_data: Path) -> Path:
    """The tiny dataset with every coil map cached."""
    for split in ("train", "val", "test"):
        for path in find_files(tiny_data, split):
            prepare_volume(path, default_cache_dir(tiny_data))
    return tiny_data


def test_index_from_headers_and_one_slice_per_item(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, object]] = []
    read_volume = dataset_module.read_volume

    def spy(path: Path, slices: slice | None = None, **kwargs: object) -> object:
        calls.append((Path(path).name, slices))
        return read_volume(path, slices=slices, **kwargs)

    monkeypatch.setattr(dataset_module, "read_volume", spy)
    monkeypatch.setattr(prepare, "read_volume", spy)  # a cache miss would read the volume
    dataset = SliceDataset(prepared, MASK, split="val")
    assert calls == []  # construction reads headers only
    files = find_files(prepared, "val")
    assert len(dataset) == sum(prepare_volume(p, prepared / "cache").kspace.shape[0] for p in files)
    calls.clear()
    sample = dataset[len(dataset) - 1]
    assert len(calls) == 1
    name, part = calls[0]
    assert name == files[-1].name and isinstance(part, slice) and part.stop - part.start == 1
    assert sample.volume == [f"multicoil_val/{files[-1].name}"] and len(sample) == 1


def test_items_equal_the_evaluation_pipeline(prepared: Path) -> None:
    """Item (file, slice) is the `make_sample` of the whole-volume pipeline of `evaluate`:
    the same mask, and the same images."""
    dataset = SliceDataset(prepared, MASK, split="test", target="rss")
    path = find_files(prepared, "test")[0]
    volume = prepare_volume(path, prepared / "cache")
    mask = evaluation_mask(MASK, path.name, volume.kspace.shape[-2:], volume.padding)
    whole = make_sample(
        torch.from_numpy(volume.kspace),
        torch.from_numpy(mask.astype(np.float32)),
        torch.from_numpy(volume.maps),
        volume.recon_shape,
        target=torch.from_numpy(volume.target),
    )
    for index in range(volume.kspace.shape[0]):
        info, slice_index = dataset.locate(index)
        assert info.path == path and slice_index == index
        np.testing.assert_array_equal(dataset.sampling_mask(index), mask)
        item = dataset[index]
        assert torch.equal(item.mask[0, 0], torch.from_numpy(mask.astype(np.float32)))
        assert torch.equal(item.maps[0], torch.from_numpy(volume.maps[index]))
        torch.testing.assert_close(item.x0[0], whole.x0[index], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(item.target[0], whole.target[index], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(item.scale[0], whole.scale[index])
        # target rss: the stored reconstruction_rss of the simulated file
        assert volume.stored_rss is not None
        assert torch.equal(item.reference[0], torch.from_numpy(volume.stored_rss[index]))


def test_training_masks_follow_the_epoch_as_slice_data_draws_them(prepared: Path) -> None:
    dataset = SliceDataset(prepared, MASK, split="train", training=True, seed=7)
    reference = SliceData(prepared, "train", MASK)
    for epoch in (None, 0, 1):
        dataset.set_epoch(epoch)
        expected = reference.training_masks(7, epoch)
        for index in (0, len(dataset) - 1):
            np.testing.assert_array_equal(dataset.sampling_mask(index), expected[index].numpy())
    dataset.set_epoch(0)
    first = dataset.sampling_mask(0)
    dataset.set_epoch(1)
    assert not np.array_equal(first, dataset.sampling_mask(0))
    dataset.set_epoch(0)
    np.testing.assert_array_equal(first, dataset.sampling_mask(0))


def test_dataloader_with_workers_batches_samples(prepared: Path) -> None:
    dataset = SliceDataset(prepared, MASK, split="train")
    pickle.dumps(dataset)  # nothing open travels to the workers
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)
    seen = []
    for batch in loader:
        assert batch.x0.shape[1:] == (2, 24, 24) and batch.y.shape[1:] == (3, 24, 24)
        assert batch.scale.shape == (len(batch),)
        seen += list(zip(batch.volume, batch.slice_index, strict=True))
        single = dataset[len(seen) - 1]
        assert torch.equal(batch.x0[-1], single.x0[0])
    assert len(seen) == len(dataset) and len(set(seen)) == len(dataset)
    pairs = list(TrainingPairs(DataLoader(dataset, batch_size=5, collate_fn=collate_samples)))
    assert [x.shape[0] for x, _ in pairs] == [5] * (len(dataset) // 5) + (
        [len(dataset) % 5] if len(dataset) % 5 else []
    )


def test_maps_are_computed_and_cached_on_first_touch(tiny_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dataset = SliceDataset(tiny_data, MASK, split="val", cache=cache, max_slices=2)
    assert len(dataset) == 2 and not cache.exists()
    first = dataset[1]
    assert list(cache.rglob("*.h5"))
    volume = prepare_volume(dataset.volumes[0].path, cache, EspiritConfig())
    assert torch.equal(first.maps[0], torch.from_numpy(volume.maps[1]))


def test_bad_arguments_are_one_line_errors(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(CvxmriError, match="unknown target"):
        SliceDataset(tiny_data, MASK, target="esc")
    with pytest.raises(CvxmriError, match="mask 'file' is for evaluation"):
        SliceDataset(tiny_data, MaskSpec("file", 4.0), training=True)
    with pytest.raises(CvxmriError, match=r"no \.h5 files"):
        SliceDataset(tmp_path, MASK)
    with pytest.raises(IndexError):
        SliceDataset(tiny_data, MASK, split="val")[1000]


def test_map_workers_precompute_the_files_in_use(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvxmri.training import data as training_data

    calls: list[tuple[list[str], int]] = []

    def record(paths: list[Path], cache: Path, config: EspiritConfig, workers: int) -> int:
        calls.append(([p.name for p in paths], workers))
        return 0

    monkeypatch.setattr(dataset_module, "precompute_maps", record)
    monkeypatch.setattr(training_data, "precompute_maps", record)
    files = find_files(tiny_data, "train")
    first = prepare_volume(files[0], default_cache_dir(tiny_data)).kspace.shape[0]
    assert len(files) > 1
    SliceDataset(tiny_data, MASK, split="train", max_slices=first, map_workers=3)
    SliceData(tiny_data, "train", MASK, max_slices=first, map_workers=3)
    assert calls == [([files[0].name], 3)] * 2  # only the file holding those slices
    SliceDataset(tiny_data, MASK, split="train", map_workers=2)
    assert calls[-1] == ([p.name for p in files], 2)
    SliceDataset(tiny_data, MASK, split="train")
    SliceData(tiny_data, "train", MASK, max_slices=first)
    assert len(calls) == 3  # one worker: maps computed as the volumes are read
