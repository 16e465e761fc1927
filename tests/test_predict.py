"""`cvxmri predict`: fastMRI's submission layout, the same images `evaluate` scores, the
file's own mask by default, NIfTI, all-or-nothing output; `ReconCNN.load` of a run folder."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from cvxmri.cli import main
from cvxmri.data.prepare import default_cache_dir, evaluation_mask, prepare_volume
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.metrics import volume_metrics
from cvxmri.models.cnn import ReconCNN
from cvxmri.predict import from_nifti_array

CARTESIAN = MaskSpec("cartesian", 4.0, 0.04)


def _test_files(data: Path) -> list[Path]:
    return sorted((data / "multicoil_test").glob("*.h5"))


def _volume_rows(out: Path, method: str) -> dict[str, dict[str, str]]:
    with (out / "per_volume.csv").open() as handle:
        return {r["file"]: r for r in csv.DictReader(handle) if r["method"] == method}


def _ifft2c(kspace: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    shifted = np.fft.ifftshift(kspace, axes=axes)
    return np.fft.fftshift(np.fft.ifft2(shifted, norm="ortho"), axes=axes)


def _reconstruction(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as hf:
        assert list(hf) == ["reconstruction"]  # fastMRI's submission layout
        return hf["reconstruction"][()]


def _network_run(folder: Path, mask: dict[str, object]) -> ReconCNN:
    """A run folder with a 2-layer network whose output layer is not zero (so it is not
    the zero-filled image), and the training mask in its config.yaml."""
    torch.manual_seed(0)
    model = ReconCNN.relu(2, 4, 3)
    torch.nn.init.normal_(model.final.weight, std=0.3)
    folder.mkdir(parents=True)
    model.save(folder / "model.pt", {"method": "end-to-end", "layers": 2, "mask": "cartesian"})
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": "end-to-end", "mask": mask}))
    return model


def test_zero_filled_is_what_evaluate_scores_in_fastmri_layout(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, scored = tmp_path / "recon", tmp_path / "scored"
    common = ["--data", str(tiny_data), "--mask", "cartesian"]
    caplog.set_level(logging.INFO)  # what the command line sets (pytest holds the root logger)
    assert main(["predict", "--model", "zero-filled", *common, "--out", str(out)]) == 0
    assert main(["evaluate", "--method", "zero-filled", *common, "--out", str(scored)]) == 0
    files = _test_files(tiny_data)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in files] + ["log.txt", "predict.yaml"]
    )
    rows = _volume_rows(scored, "zero-filled")
    for path in files:
        recon = _reconstruction(out / path.name)
        volume = prepare_volume(path, default_cache_dir(tiny_data))
        assert recon.dtype == np.float32
        assert recon.shape == (volume.kspace.shape[0], *volume.recon_shape)
        # The metrics of the written images are evaluate's, to the last digit.
        metrics = volume_metrics(np.abs(volume.target), recon)
        row = rows[f"multicoil_test/{path.name}"]
        for name in ("psnr", "ssim", "nmse"):
            assert metrics[name] == pytest.approx(float(row[name]), rel=1e-12), name
        # Known answer: |sum_c conj(S_c) F^-1(M k_c)| on the recon matrix, in NumPy.
        mask = evaluation_mask(CARTESIAN, path.name, volume.kspace.shape[-2:], volume.padding)
        combined = (np.conj(volume.maps) * _ifft2c(volume.kspace * mask)).sum(axis=1)
        np.testing.assert_allclose(recon, np.abs(combined), rtol=1e-4, atol=1e-4 * recon.max())
        with h5py.File(out / path.name, "r") as hf:
            assert hf.attrs["method"] == "zero-filled" and hf.attrs["model"] == ""
            assert hf.attrs["mask"] == CARTESIAN.describe()
            assert hf.attrs["source"] == f"multicoil_test/{path.name}"
    saved = yaml.safe_load((out / "predict.yaml").read_text())
    assert saved["model"] == "zero-filled" and saved["mask"]["kind"] == "cartesian"
    logged = (out / "log.txt").read_text()
    assert "environment" in logged and "multicoil_test/" in logged


def test_cg_sense_predictions_are_what_evaluate_scores(tiny_data: Path, tmp_path: Path) -> None:
    """``predict --model cg-sense`` with its options writes the images `evaluate` scores."""
    out, scored = tmp_path / "recon", tmp_path / "scored"
    common = ["--data", str(tiny_data), "--mask", "poisson", "--calib-size", "6"]
    settings = ["--cg-lambda", "0.02", "--cg-iterations", "6"]
    assert main(["predict", "--model", "cg-sense", *common, *settings, "--out", str(out)]) == 0
    evaluate = ["evaluate", "--method", "cg-sense", *common, *settings, "--out", str(scored)]
    assert main(evaluate) == 0
    rows = _volume_rows(scored, "cg-sense")
    for path in _test_files(tiny_data):
        volume = prepare_volume(path, default_cache_dir(tiny_data))
        metrics = volume_metrics(np.abs(volume.target), _reconstruction(out / path.name))
        row = rows[f"multicoil_test/{path.name}"]
        assert metrics["psnr"] == pytest.approx(float(row["psnr"]), rel=1e-12)
    saved = yaml.safe_load((out / "predict.yaml").read_text())
    assert saved["cg_sense"] == {"lamda": 0.02, "iterations": 6}


def test_the_files_own_mask_by_default(tiny_data: Path, tmp_path: Path) -> None:
    """A file with a ``mask`` dataset (fastMRI's test files) is reconstructed with it; a
    fully sampled mask gives the SENSE magnitude. A file without one gets the drawn mask;
    --mask overrides the file's."""
    data = tmp_path / "flat"
    data.mkdir()
    with_mask, without = (shutil.copy(p, data) for p in _test_files(tiny_data))
    with h5py.File(with_mask, "a") as hf:
        hf.create_dataset("mask", data=np.ones(hf["kspace"].shape[-1], np.float32))
    out = tmp_path / "recon"
    args = ["predict", "--model", "zero-filled", "--data", str(data), "--calib-size", "6"]
    assert main([*args, "--out", str(out)]) == 0
    full = prepare_volume(with_mask, default_cache_dir(data))
    recon = _reconstruction(out / Path(with_mask).name)
    np.testing.assert_allclose(recon, np.abs(full.target), rtol=1e-5, atol=1e-6)
    with h5py.File(out / Path(with_mask).name, "r") as hf:
        assert hf.attrs["mask"] == "file mask"
        assert hf.attrs["mask_source"] == "the file's own 'mask' dataset"
    with h5py.File(out / Path(without).name, "r") as hf:
        assert hf.attrs["mask"] == "poisson 4x (calib 6x6)"
        assert hf.attrs["mask_source"].startswith("drawn")
    # An explicit --mask wins over the file's own.
    assert main([*args, "--mask", "cartesian", "--out", str(tmp_path / "drawn")]) == 0
    drawn = _reconstruction(tmp_path / "drawn" / Path(with_mask).name)
    assert np.abs(drawn - np.abs(full.target)).max() > 0.05 * recon.max()


def test_network_predict_matches_evaluate_and_nifti_holds_the_same_values(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A run folder as --model; the training mask (its config.yaml) is the default mask;
    the written images score what evaluate scores for that network; NIfTI round trip."""
    run = tmp_path / "run"
    _network_run(run, {"kind": "cartesian", "acceleration": 4.0, "center_fraction": 0.08})
    out, scored = tmp_path / "recon", tmp_path / "scored"
    assert (
        main(
            ["predict", "--model", str(run), "--data", str(tiny_data), "--nifti", "--out", str(out)]
        )
        == 0
    )
    mask = ["--mask", "cartesian", "--center-fraction", "0.08", "--method", "zero-filled"]
    evaluate = ["evaluate", "--model", str(run), "--data", str(tiny_data), *mask]
    assert main([*evaluate, "--out", str(scored)]) == 0
    rows = _volume_rows(scored, "run")
    saved = yaml.safe_load((out / "predict.yaml").read_text())
    assert saved["model"] == str(run / "model.pt")  # what ran: the file, not the folder
    assert saved["mask"]["center_fraction"] == 0.08 and saved["file_masks"] is True
    for path in _test_files(tiny_data):
        recon = _reconstruction(out / path.name)
        volume = prepare_volume(path, default_cache_dir(tiny_data))
        metrics = volume_metrics(np.abs(volume.target), recon)
        assert metrics["psnr"] == pytest.approx(
            float(rows[f"multicoil_test/{path.name}"]["psnr"]), rel=1e-12
        )
        with h5py.File(out / path.name, "r") as hf:
            assert hf.attrs["method"] == "run"
            assert hf.attrs["model"] == str(run / "model.pt")
            assert hf.attrs["mask"] == "cartesian 4x (centre 0.08)"
        image = nib.load(out / f"{path.stem}.nii.gz")
        assert image.shape == (recon.shape[2], recon.shape[1], recon.shape[0])
        assert image.header.get_zooms() == (1.0, 1.0, 1.0)  # simulated: no field of view
        np.testing.assert_array_equal(from_nifti_array(np.asarray(image.dataobj)), recon)
        # Viewer orientation: the top row of a slice is at the largest y.
        np.testing.assert_array_equal(np.asarray(image.dataobj)[:, -1, 0], recon[0, 0, :])


def test_load_a_run_folder_keeps_the_metadata(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = _network_run(run, {"kind": "poisson", "acceleration": 4.0})
    loaded = ReconCNN.load(run)
    x0 = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(loaded(x0), model(x0), rtol=0, atol=0)
    assert loaded.metadata == {
        "method": "end-to-end",
        "layers": 2,
        "mask": "cartesian",
        "path": str(run / "model.pt"),
    }
    assert ReconCNN.load(run / "model.pt").metadata == loaded.metadata
    # Saved again without metadata, the network keeps its own (not the path it came from).
    loaded.save(tmp_path / "again.pt")
    again = ReconCNN.load(tmp_path / "again.pt")
    assert again.metadata == {**loaded.metadata, "path": str(tmp_path / "again.pt")}
    assert ReconCNN.relu(2, 4, 3).metadata == {}
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(CvxmriError, match=r"a folder without model\.pt"):
        ReconCNN.load(tmp_path / "unfinished")


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of a command that must fail with status 2."""
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's errors
        code = done.code  # type: ignore[assignment]
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, argv
    assert len(lines) == 1 and lines[0].startswith("cvxmri: error:"), lines
    return lines[0]


def test_a_failed_predict_leaves_nothing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A volume that fails after another was written leaves no file and no new folder; an
    existing folder keeps only what it had; outputs of the same names need --force."""
    data = tmp_path / "data"
    data.mkdir()
    good = Path(shutil.copy(_test_files(tiny_data)[0], data))
    bad = data / "zz_bad.h5"
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as hf:
        kspace = hf["kspace"][()]
        kspace[0, 0, 0, 0] = np.nan
        hf["kspace"][...] = kspace
    args = ["predict", "--model", "zero-filled", "--data", str(data), "--mask", "cartesian"]
    deep = tmp_path / "new" / "out"
    assert "NaN or Inf" in _refused([*args, "--nifti", "--out", str(deep)], capsys)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    assert "NaN or Inf" in _refused([*args, "--out", str(kept)], capsys)
    assert [p.name for p in kept.iterdir()] == ["mine.txt"]
    # Only the good file: written next to mine.txt; again, refused; with --force, replaced.
    bad.unlink()
    assert main([*args, "--out", str(kept)]) == 0
    assert sorted(p.name for p in kept.iterdir()) == sorted(
        ["mine.txt", good.name, "predict.yaml", "log.txt"]
    )
    message = _refused([*args, "--out", str(kept)], capsys)
    assert f"already holds {good.name}" in message and "--force" in message
    assert main([*args, "--out", str(kept), "--force"]) == 0
    assert not [p for p in kept.iterdir() if p.name.startswith(".")]


def test_predict_refuses_in_one_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    for kind in ("multicoil_test", "singlecoil_test"):
        (root / kind).mkdir(parents=True)
        shutil.copy(_test_files(tiny_data)[0], root / kind / "same.h5")
    (tmp_path / "unfinished").mkdir()
    out = str(tmp_path / "out")
    for args, message in (
        (["--model", str(tmp_path / "none"), "--data", str(tiny_data)], "no such model file"),
        (["--model", str(tmp_path / "unfinished"), "--data", str(tiny_data)], "without model.pt"),
        (["--model", "cs", "--data", str(root)], "two volumes named same.h5"),
        (
            ["--model", "cs", "--data", str(tiny_data), "--mask", "poisson", "--mask", "file"],
            "one --mask",
        ),
        (["--model", "cs", "--data", str(tmp_path / "f.h5")], "f.h5: no such file"),
        (["--model", "cs"], "required: --data, --out"),
    ):
        argv = ["predict", *args, *(["--out", out] if "--data" in args else [])]
        assert message in _refused(argv, capsys)
        assert not Path(out).exists()
