"""Coil maps (ESPIRiT, cached), targets and normalisation."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import phantom_nifti

from cvxmri.data import prepare
from cvxmri.data.prepare import (
    EspiritConfig,
    find_files,
    normalisation_scale,
    precompute_maps,
    prepare_volume,
)
from cvxmri.data.simulate import SimulationConfig, load_nifti, simulate_dataset
from cvxmri.errors import CvxmriError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    source = load_nifti(phantom_nifti(root / "head.nii.gz", depth=120))
    config = SimulationConfig(matrix=32, coils=4, slab_slices=2, snr=200.0)
    simulate_dataset([source], root / "data", config)
    return root / "data"


def test_sense_target_matches_rss_inside_the_object(dataset: Path) -> None:
    path = find_files(dataset, "test")[0]
    volume = prepare_volume(path, dataset / "cache", EspiritConfig(calib_width=16))
    assert volume.maps.shape == volume.kspace.shape
    assert volume.target.shape == volume.rss.shape == (2, 32, 32)
    inside = volume.rss > 0.3 * volume.rss.max()
    # ESPIRiT maps have unit root-sum-of-squares where there is signal, so |SENSE| == RSS.
    ratio = np.abs(volume.target)[inside] / volume.rss[inside]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    assert np.percentile(np.abs(ratio - 1), 90) < 0.05


def test_maps_are_cached(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = find_files(dataset, "val")[0]
    config = EspiritConfig(calib_width=16)
    first = prepare_volume(path, dataset / "cache", config)
    cached = list((dataset / "cache").rglob(path.name))
    assert len(cached) == 1

    def fail(*args: object) -> None:
        raise AssertionError("ESPIRiT recomputed despite the cache")

    monkeypatch.setattr(prepare, "espirit_maps", fail)
    again = prepare_volume(path, dataset / "cache", config)
    np.testing.assert_array_equal(again.maps, first.maps)
    # Another ESPIRiT setting is another cache entry.
    with pytest.raises(AssertionError, match="recomputed"):
        prepare_volume(path, dataset / "cache", EspiritConfig(calib_width=12))


def test_parallel_maps_equal_serial(dataset: Path, tmp_path: Path) -> None:
    files = find_files(dataset, "train")[:2]
    assert len(files) == 2
    config = EspiritConfig(calib_width=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker, so that the rounding is the same
    try:
        assert precompute_maps(files, tmp_path / "serial", config) == 2
    finally:
        torch.set_num_threads(threads)
    assert precompute_maps(files, tmp_path / "parallel", config, workers=2) == 2
    for path in files:
        caches = [
            tmp_path / run / config.tag() / path.parent.name / path.name
            for run in ("serial", "parallel")
        ]
        with h5py.File(caches[0]) as serial, h5py.File(caches[1]) as parallel:
            assert dict(serial.attrs) == dict(parallel.attrs)
            maps = np.asarray(serial["maps"])
            assert maps.shape[0] == 2 and np.abs(maps).max() > 0.5
            np.testing.assert_array_equal(parallel["maps"], maps)
    assert not list(tmp_path.rglob("*.tmp"))
    # Cached: nothing is computed again, nor in a pool.
    assert precompute_maps(files, tmp_path / "parallel", config, workers=2) == 0


def test_normalisation_scale() -> None:
    x0 = torch.zeros(2, 8, 8, dtype=torch.complex64)
    x0[0, 2:6, 2:6] = 3.0
    x0[1] = 1.0
    x0[1, 0, 0] = 100.0  # outside the 4x4 recon crop
    scale = normalisation_scale(x0, (4, 4))
    assert scale.tolist() == pytest.approx([3.0, 1.0])
    with pytest.raises(CvxmriError, match="zero-filled image is zero"):
        normalisation_scale(torch.zeros(1, 8, 8, dtype=torch.complex64), (4, 4))


def test_find_files_errors(tmp_path: Path) -> None:
    with pytest.raises(CvxmriError, match="does not exist"):
        find_files(tmp_path / "nope", "test")
    (tmp_path / "multicoil_test").mkdir()
    with pytest.raises(CvxmriError, match=r"no \.h5 files"):
        find_files(tmp_path, "test")


def test_coil_support_restricts_to_sensitive_pixels(dataset: Path) -> None:
    from cvxmri.data.prepare import coil_support

    volume = prepare_volume(find_files(dataset, "train")[0], dataset / "cache")
    support = coil_support(torch.from_numpy(volume.maps))
    assert support.shape == (volume.maps.shape[0], *volume.maps.shape[-2:])
    # ESPIRiT's crop zeroes the maps in air far from the object, and only there.
    inside = (np.abs(volume.maps).sum(axis=1) > 0).astype(np.float32)
    np.testing.assert_array_equal(support.numpy(), inside)
    assert 0 < support.mean() < 1
