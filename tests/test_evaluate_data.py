"""fastMRI conventions of `evaluate`: dataset roots, flat folders and single files; volume
ids relative to the data root; the stored ``reconstruction_rss`` as the RSS target."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import header, write_knee_like

from cvxmri.cli import main
from cvxmri.data.prepare import (
    data_root,
    default_cache_dir,
    evaluation_mask,
    find_files,
    prepare_volume,
    volume_id,
)
from cvxmri.data.sample import make_sample
from cvxmri.masks import MaskSpec
from cvxmri.metrics import volume_metrics
from cvxmri.recon import zero_filled

CARTESIAN = ["--method", "zero-filled", "--mask", "cartesian"]


def _rows(out: Path, name: str = "per_volume.csv") -> list[dict[str, str]]:
    with (out / name).open() as handle:
        return list(csv.DictReader(handle))


def _evaluate(data: Path, out: Path, *extra: str) -> dict[str, object]:
    assert main(["evaluate", "--data", str(data), *CARTESIAN, "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def _singlecoil(path: Path) -> None:
    rng = np.random.default_rng(1)
    kspace = (rng.normal(size=(2, 40, 24)) + 1j * rng.normal(size=(2, 40, 24))).astype(np.complex64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=kspace)
        hf.create_dataset("ismrmrd_header", data=header(40, 24, 20, 20, 23, 12))


def test_find_files_layouts(tmp_path: Path) -> None:
    root = tmp_path / "knee"
    for split in ("multicoil_val", "singlecoil_val"):
        (root / split).mkdir(parents=True)
        (root / split / "a.h5").touch()
    (root / "multicoil_val" / "b.h5").touch()
    val = root / "multicoil_val"
    assert find_files(root, "val") == [val / "a.h5", val / "b.h5", root / "singlecoil_val/a.h5"]
    assert find_files(val, "val") == find_files(val, "train") == [val / "a.h5", val / "b.h5"]
    assert find_files(val / "b.h5") == [val / "b.h5"]
    assert [volume_id(p, root) for p in find_files(root, "val")] == [
        "multicoil_val/a.h5",
        "multicoil_val/b.h5",
        "singlecoil_val/a.h5",
    ]
    assert volume_id(val / "a.h5", val) == volume_id(val / "a.h5", val / "a.h5") == "a.h5"
    assert data_root(val / "a.h5") == val
    # A split folder read alone shares the dataset root's coil-map cache.
    assert default_cache_dir(root) == default_cache_dir(val) == root / "cache"
    assert default_cache_dir(tmp_path / "mine") == tmp_path / "mine" / "cache"


def test_flat_folder_and_single_file_give_the_dataset_root_numbers(
    tiny_data: Path, tmp_path: Path
) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in find_files(tiny_data, "test"):
        shutil.copy(path, flat / path.name)
    names = sorted(p.name for p in flat.iterdir())
    rows = {}
    for label, data in (("root", tiny_data), ("flat", flat), ("file", flat / names[0])):
        _evaluate(data, tmp_path / f"out-{label}", "--split", "test")
        rows[label] = _rows(tmp_path / f"out-{label}")
    assert [r["file"] for r in rows["root"]] == [f"multicoil_test/{n}" for n in names]
    assert [r["file"] for r in rows["flat"]] == names and len(names) > 1
    assert [r["file"] for r in rows["file"]] == names[:1]
    for key in ("psnr", "ssim", "nmse"):
        assert [r[key] for r in rows["flat"]] == [r[key] for r in rows["root"]]
        assert rows["file"][0][key] == rows["root"][0][key]


def test_same_name_in_multicoil_and_singlecoil_gives_distinct_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "multicoil_test").mkdir(parents=True)
    write_knee_like(data / "multicoil_test" / "file1.h5")
    _singlecoil(data / "singlecoil_test" / "file1.h5")
    _evaluate(data, tmp_path / "out")
    files = [r["file"] for r in _rows(tmp_path / "out")]
    assert files == ["multicoil_test/file1.h5", "singlecoil_test/file1.h5"]
    slices = {(r["file"], r["slice"]) for r in _rows(tmp_path / "out", "per_slice.csv")}
    assert len(slices) == 3 + 2


def _zero_filled_volume(path: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Zero-filled magnitudes in the data's units, and the computed RSS, by hand."""
    volume = prepare_volume(path, cache)
    spec = MaskSpec("cartesian", 4.0, 0.04)
    mask = evaluation_mask(spec, path.name, volume.kspace.shape[-2:], volume.padding)
    sample = make_sample(
        torch.from_numpy(volume.kspace),
        torch.from_numpy(mask.astype(np.float32)),
        torch.from_numpy(volume.maps),
        volume.recon_shape,
    )
    return (zero_filled(sample).abs() * sample.scale[:, None, None]).numpy(), volume.rss


def test_rss_target_is_the_stored_reconstruction_rss(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = data / "multicoil_test" / "file1.h5"
    path.parent.mkdir(parents=True)
    write_knee_like(path, slices=2, coils=3, shape=(32, 24), recon=(16, 16), acquired=(2, 22))
    with h5py.File(path, "a") as hf:  # a stored target that differs from the computed RSS
        stored = hf["reconstruction_rss"][()] * 1.5
        stored[:, 4:10, 4:10] = 0
        hf["reconstruction_rss"][...] = stored
    pred, computed = _zero_filled_volume(path, data / "cache")
    summary = _evaluate(data, tmp_path / "stored", "--target", "rss")
    assert summary["target_source"] == "stored reconstruction_rss"
    row = _rows(tmp_path / "stored")[0]
    expected = volume_metrics(stored, pred)
    assert float(row["psnr"]) == pytest.approx(expected["psnr"], rel=1e-6)
    assert float(row["ssim"]) == pytest.approx(expected["ssim"], rel=1e-6)
    assert float(row["psnr"]) != pytest.approx(volume_metrics(computed, pred)["psnr"], rel=1e-3)

    with h5py.File(path, "a") as hf:
        del hf["reconstruction_rss"]
    summary = _evaluate(data, tmp_path / "computed", "--target", "rss")
    assert summary["target_source"] == "computed rss"
    row = _rows(tmp_path / "computed")[0]
    assert float(row["psnr"]) == pytest.approx(volume_metrics(computed, pred)["psnr"], rel=1e-6)
    summary = _evaluate(data, tmp_path / "sense")
    assert summary["target_source"] == "sense magnitude"


def test_bad_data_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "multicoil_val").mkdir(parents=True)
    bad = tmp_path / "bad"
    path = bad / "multicoil_test" / "file1.h5"
    path.parent.mkdir(parents=True)
    write_knee_like(path)
    with h5py.File(path, "a") as hf:
        rss = hf["reconstruction_rss"][()]
        del hf["reconstruction_rss"]
        hf.create_dataset("reconstruction_rss", data=rss[:, :30])
    for data, message in (
        (empty, "no .h5 files in multicoil_test/ or singlecoil_test/, nor in the folder"),
        (bad, "reconstruction_rss has shape (3, 30, 32), expected (3, 32, 32)"),
    ):
        args = ["evaluate", "--data", str(data), *CARTESIAN, "--target", "rss"]
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
