"""The k-space simulator: layout, physics, noise level and leak-free splits."""

from __future__ import annotations

import json
from dataclasses import replace
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


# ------------------------------------------------------------ own volumes (issue: small, 4D)


def test_split_pattern_and_every_split() -> None:
    from cvxmri.data.simulate import SPLIT_PATTERN, ensure_every_split, split_pattern

    assert split_pattern((3, 1, 1)) == SPLIT_PATTERN  # the default dataset's, unchanged
    assert split_pattern((0, 0, 1)) == ("test",)
    assert split_pattern((1, 1, 1)) == ("val", "train", "test")
    assert split_pattern((8, 1, 1)).count("train") == 8
    assert ensure_every_split(["train", "val", "train"], ["train", "val", "test"]) == [
        "train",
        "val",
        "test",
    ]
    assert ensure_every_split(["test"] * 3, ["train", "val", "test"]) == ["test", "val", "train"]
    assert ensure_every_split(["train"] * 4, ["train", "test"]) == ["train"] * 3 + ["test"]


def test_a_small_volume_still_gets_every_split(tmp_path: Path) -> None:
    """One volume with room for one default slab: thinner slabs give every split one (and
    the manifest says so); with the slab size given, a one-line error says why not."""
    source = load_nifti(phantom_nifti(tmp_path / "small.nii.gz", depth=24))
    config = SimulationConfig(matrix=24, coils=3)
    with pytest.raises(CvxmriError, match="need one slab each; use a smaller --slab-slices"):
        simulate_dataset([source], tmp_path / "strict", config)
    assert not (tmp_path / "strict").exists()
    manifest = simulate_dataset([source], tmp_path / "data", config, fit_slabs=True)
    assert all(manifest["counts"][split] >= 1 for split in ("train", "val", "test"))
    used = manifest["config"]["slab_slices"]
    assert used < config.slab_slices
    assert f"slabs of {used} slices instead of 6" in manifest["adjustments"]
    assert {f["split"] for f in manifest["files"]} == {"train", "val", "test"}
    for entry in manifest["files"]:
        assert read_volume(tmp_path / "data" / entry["file"]).kspace.shape[0] == used
    # Too small for any slab size: the error says how many usable slices there are.
    thin = load_nifti(phantom_nifti(tmp_path / "thin.nii.gz", depth=6))
    with pytest.raises(CvxmriError, match=r"thin: 2 usable slices .* need one slab each"):
        simulate_dataset([thin], tmp_path / "thin", config, fit_slabs=True)
    # A test set only: one split asked for, one slab enough.
    only = simulate_dataset(
        [thin], tmp_path / "test-only", replace(config, slab_slices=2, split_ratio=(0, 0, 1))
    )
    assert [f["split"] for f in only["files"]] == ["test"]
    saved = json.loads((tmp_path / "test-only" / "manifest.json").read_text())
    assert saved["config"]["split_ratio"] == [0, 0, 1]


def test_frame_of_a_4d_volume(tmp_path: Path) -> None:
    """--frame N simulates frame N, exactly as the same frame saved as a 3D file."""
    base = nib.load(phantom_nifti(tmp_path / "head.nii.gz", depth=40)).get_fdata()
    other = base.copy()
    other[10:20, 10:30, :] = 150.0
    frames = np.stack([base, other], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(frames, np.eye(4)), tmp_path / "fmri.nii.gz")
    nib.save(nib.Nifti1Image(frames[..., 1], np.eye(4)), tmp_path / "fmri_1.nii.gz")
    with pytest.raises(CvxmriError, match=r"a 4D volume of 2 frames.*--frame \(0 to 1\)"):
        load_nifti(tmp_path / "fmri.nii.gz")
    with pytest.raises(CvxmriError, match=r"frame 2 out of range \(the volume has 2 frames"):
        load_nifti(tmp_path / "fmri.nii.gz", frame=2)
    with pytest.raises(CvxmriError, match="a 3D volume; --frame applies to 4D volumes only"):
        load_nifti(tmp_path / "head.nii.gz", frame=0)
    config = SimulationConfig(matrix=24, coils=3, slab_slices=2)
    manifest = simulate_dataset([load_nifti(tmp_path / "fmri.nii.gz", 1)], tmp_path / "a", config)
    assert manifest["sources"][0]["frame"] == 1
    assert "frame 1 of 2" in manifest["sources"][0]["origin"]
    simulate_dataset([load_nifti(tmp_path / "fmri_1.nii.gz")], tmp_path / "b", config)
    simulate_dataset([load_nifti(tmp_path / "fmri.nii.gz", 0)], tmp_path / "c", config)
    for entry in manifest["files"]:
        name = entry["file"].replace("fmri_", "fmri_1_")
        same = read_volume(tmp_path / "b" / name).kspace
        np.testing.assert_array_equal(read_volume(tmp_path / "a" / entry["file"]).kspace, same)
    first = manifest["files"][0]["file"]
    assert not np.array_equal(
        read_volume(tmp_path / "a" / first).kspace, read_volume(tmp_path / "c" / first).kspace
    )


def test_simulate_command_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cvxmri.cli import main

    nifti = str(phantom_nifti(tmp_path / "small.nii.gz", depth=24))
    assert main(["data", "simulate", "--nifti", nifti]) == 2
    assert "--nifti needs --out DIR" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    out = tmp_path / "own"
    args = ["data", "simulate", "--nifti", nifti, "--matrix", "24", "--coils", "3"]
    assert main([*args, "--out", str(out), "--guard-slices", "0", "--split-ratio", "2:1:1"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["config"]["guard_slices"] == 0 and saved["config"]["split_ratio"] == [2, 1, 1]
    assert f"slabs of {saved['config']['slab_slices']})" in printed
    assert all(saved["counts"][s] >= 1 for s in ("train", "val", "test"))
    assert main([*args, "--out", str(tmp_path / "x"), "--slab-slices", "6"]) == 2
    assert "need one slab each" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--frame", "1"]) == 2
    assert "--frame applies to 4D volumes only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_reproduce_folder_from_before_the_split_ratio_goes_on(tmp_path: Path) -> None:
    """A reproduce folder whose config.yaml predates ``simulation.split_ratio`` is the same
    configuration (the new setting at its default), not "another configuration"."""
    import yaml

    from cvxmri.config import to_dict
    from cvxmri.reproduce import _open_folder, reproduce_preset

    config = reproduce_preset("tiny")
    saved = to_dict(config)
    del saved["simulation"]["split_ratio"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    _open_folder(config, tmp_path, force=False)
    saved["simulation"]["slab_slices"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(CvxmriError, match="another configuration"):
        _open_folder(config, tmp_path, force=False)
