"""Shared fixtures: small files in the real fastMRI layout, written with h5py directly (not
with cvxmri's writer) so the reader is tested against the layout itself; and the 3D
validation-equals-evaluate check that the CNN and unrolled tests share."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from cvxmri.masks import MaskSpec

# A trimmed copy of the structure of a real fastMRI knee header (namespace, nesting and
# field names as in the files); sizes are filled in per fixture.
HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <studyInformation><studyTime>00:00:00</studyTime></studyInformation>
  <encoding>
    <trajectory>cartesian</trajectory>
    <encodedSpace>
      <matrixSize><x>{ex}</x><y>{ey}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>280</x><y>140</y><z>4.5</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{rx}</x><y>{ry}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{pe_max}</maximum><center>{pe_center}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
    </encodingLimits>
  </encoding>
</ismrmrdHeader>"""


def header(ex: int, ey: int, rx: int, ry: int, pe_max: int, pe_center: int) -> bytes:
    """A fastMRI-style ISMRMRD header."""
    return HEADER.format(ex=ex, ey=ey, rx=rx, ry=ry, pe_max=pe_max, pe_center=pe_center).encode()


def fft2c_np(x: np.ndarray) -> np.ndarray:
    """Reference centred orthonormal FFT in NumPy (fastMRI's shift order)."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)


def write_knee_like(
    path: Path,
    slices: int = 3,
    coils: int = 4,
    shape: tuple[int, int] = (64, 46),
    recon: tuple[int, int] = (32, 32),
    acquired: tuple[int, int] = (3, 43),
    seed: int = 0,
) -> dict[str, object]:
    """A multi-coil file like a fastMRI knee: 2x readout oversampling (H = 2 * recon),
    zero-padded phase-encoding columns outside ``acquired``, RSS target, attributes."""
    rng = np.random.default_rng(seed)
    height, width = shape
    yy, xx = np.mgrid[:height, :width]
    obj = np.exp(-(((yy - height / 2) / (height / 6)) ** 2) - ((xx - width / 2) / (width / 4)) ** 2)
    coil_phase = np.exp(1j * np.linspace(0, np.pi, coils))[:, None, None]
    images = obj[None, None] * coil_phase[None] * (1 + 0.1 * rng.normal(size=(slices, 1, 1, 1)))
    kspace = fft2c_np(images) + 1e-3 * (rng.normal(size=(slices, coils, *shape)))
    left, right = acquired
    kspace[..., :left] = 0
    kspace[..., right:] = 0
    coil_images = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    rss = np.sqrt((np.abs(coil_images) ** 2).sum(axis=1))
    top, lft = (height - recon[0]) // 2, (width - recon[1]) // 2
    rss = rss[:, top : top + recon[0], lft : lft + recon[1]].astype(np.float32)
    # fastMRI: padding_left = ey // 2 - center, padding_right = padding_left + maximum + 1.
    pe_center = width // 2 - left
    pe_max = right - left - 1
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=kspace.astype(np.complex64))
        hf.create_dataset("reconstruction_rss", data=rss)
        hf.create_dataset(
            "ismrmrd_header", data=header(height, width, recon[0], recon[1], pe_max, pe_center)
        )
        hf.attrs["max"] = rss.max()
        hf.attrs["norm"] = np.linalg.norm(rss)
        hf.attrs["acquisition"] = "CORPD_FBK"
        hf.attrs["patient_id"] = "abc123"
    return {"kspace": kspace.astype(np.complex64), "rss": rss, "padding": acquired}


@pytest.fixture
def knee_file(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A small multi-coil knee-like fastMRI file and what it holds."""
    path = tmp_path / "file1000001.h5"
    return path, write_knee_like(path)


@pytest.fixture
def singlecoil_file(tmp_path: Path) -> Path:
    """A small single-coil fastMRI file (kspace (slices, H, W), reconstruction_esc)."""
    path = tmp_path / "file1000002.h5"
    rng = np.random.default_rng(1)
    kspace = (rng.normal(size=(2, 40, 24)) + 1j * rng.normal(size=(2, 40, 24))).astype(np.complex64)
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=kspace)
        hf.create_dataset("reconstruction_esc", data=np.ones((2, 20, 20), np.float32))
        hf.create_dataset("ismrmrd_header", data=header(40, 24, 20, 20, 23, 12))
    return path


def devices() -> list[str]:
    """CPU always, CUDA when present (tests never require a GPU)."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def phantom_nifti(path: Path, depth: int = 60) -> Path:
    """An ellipsoid 'head' with an inner structure, 1 x 1 x 1 mm voxels."""
    x, y, z = np.mgrid[:48, :56, :depth]
    head = ((x - 24) / 20) ** 2 + ((y - 28) / 24) ** 2 + ((z - depth / 2) / (depth / 2.2)) ** 2
    data = (head < 1) * 100.0 + (((x - 24) / 8) ** 2 + ((y - 28) / 10) ** 2 < 1) * 50.0
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24x24, 3-coil simulated dataset for training tests (all three splits)."""
    from cvxmri.data.simulate import SimulationConfig, load_nifti, simulate_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    source = load_nifti(phantom_nifti(root / "head.nii.gz", depth=120))
    simulate_dataset([source], root / "data", SimulationConfig(matrix=24, coils=3, slab_slices=2))
    return root / "data"


@pytest.fixture(scope="session")
def tiny_data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 'subjects' (the phantom at two depths) simulated as 3D volumes: slabs of
    4x16x16 voxels, 4 coils, 2 files per split."""
    from cvxmri.data.simulate import load_nifti
    from cvxmri.data.simulate3d import Simulation3DConfig, simulate_dataset3d

    root = tmp_path_factory.mktemp("tiny_data3d")
    sources = [
        load_nifti(phantom_nifti(root / f"{name}.nii.gz", depth=depth))
        for name, depth in (("a", 64), ("b", 56))
    ]
    config = Simulation3DConfig(matrix=(24, 16, 16), coils=4, slab=4, guard=2)
    simulate_dataset3d(sources, root / "data", config)
    return root / "data"


def assert_validation_equals_evaluate(data: Path, run: Path, metrics: dict, mask: MaskSpec) -> None:
    """A 3D run's final validation metrics are what `evaluate --dims 3` gives for its
    exported network on the same val volumes and masks (and differ from zero-filled)."""
    from cvxmri.evaluate import EvaluateConfig, evaluate

    out = run.parent / "eval"
    out.mkdir()
    config = EvaluateConfig(
        data=str(data),
        split="val",
        methods=["zero-filled"],
        masks=[mask],
        models=[str(run)],
        dims=3,
    )
    results = {entry["method"]: entry for entry in evaluate(config, out)["results"]}
    network = results[run.name]["volume"]
    assert network["psnr"]["mean"] == pytest.approx(metrics["final"]["val_psnr"], abs=1e-4)
    assert network["ssim"]["mean"] == pytest.approx(metrics["final"]["val_ssim"], abs=1e-5)
    assert network["psnr"]["mean"] != results["zero-filled"]["volume"]["psnr"]["mean"]
