"""The k-space simulator: layout, physics, noise level and leak-free splits."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import phantom_nifti

from cvxmri.data.fastmri_h5 import read_volume
from cvxmri.data.simulate import (
    SimulationConfig,
    birdcage_maps,
    load_nifti,
    simulate_dataset,
    simulate_slice,
)
from cvxmri.errors import CvxmriError
from cvxmri.physics import ifft2c


def test_simulated_dataset_layout_and_splits(tmp_path: Path) -> None:
    source = load_nifti(phantom_nifti(tmp_path / "head.nii.gz", depth=120))
    config = SimulationConfig(matrix=32, coils=4, slab_slices=3, guard_slices=2, slice_step=2)
    manifest = simulate_dataset([source], tmp_path / "data", config)
    files = manifest["files"]
    assert {f["split"] for f in files} == {"train", "val", "test"}
    for entry in files:
        volume = read_volume(tmp_path / "data" / entry["file"])
        assert volume.kspace.shape == (3, 4, 32, 32)
        assert volume.target is not None and volume.target.shape == (3, 32, 32)
        assert volume.attrs["patient_id"] == "head"
    # No slice of one split is within guard distance of a slice of another split.
    by_split = {
        s: [k for f in files if f["split"] == s for k in f["source_slices"]]
        for s in ("train", "val", "test")
    }
    for a in by_split:
        for b in by_split:
            if a < b:
                gap = min(abs(i - j) for i in by_split[a] for j in by_split[b])
                assert gap >= (config.guard_slices + 1) * config.slice_step
    saved = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert saved["counts"] == manifest["counts"]
    assert not list(tmp_path.glob(".*partial"))


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    source = load_nifti(phantom_nifti(tmp_path / "head.nii.gz"))
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CvxmriError, match="already exists"):
        simulate_dataset([source], out, SimulationConfig(matrix=32))
    # A volume too thin for one slab fails cleanly and leaves no partial dataset.
    thin = load_nifti(phantom_nifti(tmp_path / "thin.nii.gz", depth=4))
    with pytest.raises(CvxmriError, match="no slab"):
        simulate_dataset([thin], tmp_path / "other", SimulationConfig(matrix=32))
    assert not (tmp_path / "other").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_oversampled_readout_target_is_cropped(tmp_path: Path) -> None:
    source = load_nifti(phantom_nifti(tmp_path / "head.nii.gz"))
    config = SimulationConfig(matrix=32, coils=3, readout_oversampling=2, slab_slices=4, snr=1e6)
    manifest = simulate_dataset([source], tmp_path / "data", config)
    volume = read_volume(tmp_path / "data" / manifest["files"][0]["file"])
    assert volume.kspace.shape[-2:] == (64, 32)
    assert volume.target is not None and volume.target.shape == (4, 32, 32)
    assert volume.encoding.encoded_size == (64, 32, 1)
    # The oversampled half of the FOV is air: the whole object is inside the crop.
    full = ifft2c(torch.from_numpy(volume.kspace)).abs().pow(2).sum(1).sqrt().numpy()
    outside = np.concatenate([full[:, :16], full[:, 48:]], axis=1)
    assert outside.max() < 1e-3 * full.max()


def test_noise_level_and_rss_of_maps() -> None:
    maps = birdcage_maps(6, (48, 48))
    np.testing.assert_allclose((np.abs(maps) ** 2).sum(0), 1.0, rtol=1e-5)
    # A smooth blob has no signal in the k-space corners: there only noise of std sigma.
    yy, xx = np.mgrid[:48, :48]
    image = np.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / 50).astype(np.float32)
    config = SimulationConfig(matrix=48, snr=20.0, phase_strength=0.0)
    kspace = simulate_slice(image, maps, config, np.random.default_rng(0))
    sigma = image[image > 0.1].mean() / config.snr
    corner = kspace[:, :8, :8]
    measured = np.sqrt(np.mean(np.abs(corner) ** 2))
    assert measured == pytest.approx(sigma, rel=0.1)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(CvxmriError, match="no such file"):
        load_nifti(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    with pytest.raises(CvxmriError, match="cannot read as NIfTI"):
        load_nifti(junk)
    with pytest.raises(CvxmriError, match="invalid simulation setting snr"):
        SimulationConfig(snr=-1).validate()
    nan = tmp_path / "nan.nii.gz"
    data = np.ones((8, 8, 8), np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan)
    with pytest.raises(CvxmriError, match="NaN"):
        simulate_dataset([load_nifti(nan)], tmp_path / "d", SimulationConfig(matrix=16))
