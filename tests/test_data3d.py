"""3D volumes: the simulator (`cvxmri.data.simulate3d`), the 3D file reader
(`cvxmri.data.volume3d`), decoupled ESPIRiT, the 3D SENSE operator of a `Sample`, the
classical baselines and evaluation in 3D, and the decoupled 2D view and training
(`cvxmri.data.decoupled`)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import phantom_nifti

from cvxmri.cli import main
from cvxmri.data.decoupled import decouple_dataset, decoupled_volume
from cvxmri.data.espirit import espirit, espirit_decoupled
from cvxmri.data.fastmri_h5 import read_volume
from cvxmri.data.prepare import evaluation_mask, prepare_volume
from cvxmri.data.sample import Sample, make_sample
from cvxmri.data.simulate import birdcage_maps, load_nifti
from cvxmri.data.simulate3d import Simulation3DConfig, simulate_dataset3d
from cvxmri.data.volume3d import (
    Volume3D,
    file_dims,
    prepare_volume3d,
    read_volume3d,
    rss_volume,
    write_volume3d,
)
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec, realised_acceleration
from cvxmri.metrics import psnr
from cvxmri.physics import Sense, fftnc, ifft_readout, ifftnc, recon_sense
from cvxmri.recon import CGSenseConfig, CSConfig, cg_sense, compressed_sensing, zero_filled
from cvxmri.recon.classical import wavelet_soft_threshold

TINY = Simulation3DConfig(matrix=(24, 16, 16), coils=4, slab=4, guard=2)


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 'subjects' (the phantom twice, the second one shifted) simulated in 3D."""
    root = tmp_path_factory.mktemp("data3d")
    first = load_nifti(phantom_nifti(root / "a.nii.gz", depth=64))
    second = load_nifti(phantom_nifti(root / "b.nii.gz", depth=56))
    simulate_dataset3d([first, second], root / "data", TINY)
    return root / "data"


def test_simulated_files_have_the_3d_layout(data3d: Path) -> None:
    manifest = json.loads((data3d / "manifest.json").read_text())
    assert manifest["dims"] == 3
    assert manifest["config"]["matrix"] == [24, 16, 16]
    assert {f["split"] for f in manifest["files"]} == {"train", "val", "test"}
    for entry in manifest["files"]:
        path = data3d / entry["file"]
        assert path.parent.name == f"multicoil_{entry['split']}"
        assert file_dims(path) == 3
        volume = read_volume3d(path)
        start, stop = entry["readout_positions"]
        assert volume.kspace.shape == (4, stop - start, 16, 16)
        assert volume.kspace.dtype == np.complex64
        np.testing.assert_allclose(volume.target, rss_volume(volume.kspace), rtol=1e-5)
        assert volume.attrs["coils"] == 4 and volume.attrs["noise_std"] > 0
        assert volume.attrs["slab_start"] == start
        assert volume.attrs["max"] == pytest.approx(float(volume.target.max()))


def test_split_is_by_position_with_guard_gaps(data3d: Path) -> None:
    """Slab positions have one split in every volume, and slabs are ``guard`` apart."""
    files = json.loads((data3d / "manifest.json").read_text())["files"]
    split_of: dict[tuple[int, int], set[str]] = {}
    for entry in files:
        split_of.setdefault(tuple(entry["readout_positions"]), set()).add(entry["split"])
    assert all(len(splits) == 1 for splits in split_of.values())
    spans = sorted(split_of)
    for (_, stop), (start, _) in itertools.pairwise(spans):
        assert start - stop >= TINY.guard


def test_simulation_is_seeded(data3d: Path, tmp_path: Path) -> None:
    first = load_nifti(phantom_nifti(tmp_path / "a.nii.gz", depth=64))
    second = load_nifti(phantom_nifti(tmp_path / "b.nii.gz", depth=56))
    simulate_dataset3d([first, second], tmp_path / "again", TINY)
    for path in sorted(data3d.glob("multicoil_*/*.h5")):
        again = read_volume3d(tmp_path / "again" / path.relative_to(data3d))
        np.testing.assert_array_equal(read_volume3d(path).kspace, again.kspace)


def _write(path: Path, attrs: dict[str, object] | None = None, **datasets: object) -> Path:
    with h5py.File(path, "w") as hf:
        for key, value in datasets.items():
            hf.create_dataset(key, data=value)
        for key, value in ({"dims": 3} if attrs is None else attrs).items():
            hf.attrs[key] = value
    return path


def _kspace3d() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 4, 8, 8)) + 1j * rng.normal(size=(2, 4, 8, 8))).astype(np.complex64)


@pytest.mark.parametrize(
    ("datasets", "attrs", "message"),
    [
        ({"reconstruction_rss": np.ones((4, 8, 8), np.float32)}, None, "no 'kspace' dataset"),
        ({"kspace": np.ones((4, 8, 8), np.complex64)}, None, "must be (coils, kx, ky, kz)"),
        ({"kspace": np.ones((2, 4, 8, 8))}, None, "kspace must be complex"),
        ({"kspace": np.zeros((2, 4, 8, 8), np.complex64)}, None, "kspace is all zeros"),
        (
            {"kspace": _kspace3d(), "reconstruction_rss": np.ones((4, 8, 7), np.float32)},
            None,
            "reconstruction_rss has shape (4, 8, 7), expected (4, 8, 8)",
        ),
        (
            {"kspace": _kspace3d(), "reconstruction_rss": np.full((4, 8, 8), np.nan, np.float32)},
            None,
            "reconstruction_rss contains NaN",
        ),
        ({"kspace": np.ones((3, 2, 8, 8), np.complex64)}, {}, "not a 3D volume file"),
    ],
)
def test_reader_refuses_malformed_files(
    tmp_path: Path, datasets: dict[str, object], attrs: dict[str, object] | None, message: str
) -> None:
    path = _write(tmp_path / "bad.h5", attrs, **datasets)
    with pytest.raises(CvxmriError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        read_volume3d(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_reader_refuses_nan_kspace(tmp_path: Path) -> None:
    kspace = _kspace3d()
    kspace[0, 1, 2, 3] = np.nan
    with pytest.raises(CvxmriError, match="kspace contains NaN or Inf"):
        read_volume3d(_write(tmp_path / "nan.h5", kspace=kspace))


def test_2d_reader_refuses_3d_files(tmp_path: Path) -> None:
    path = tmp_path / "v.h5"
    write_volume3d(path, Volume3D(_kspace3d(), None))
    with pytest.raises(CvxmriError, match="a 3D volume file"):
        read_volume(path)


def test_roundtrip(tmp_path: Path) -> None:
    kspace = _kspace3d()
    write_volume3d(tmp_path / "v.h5", Volume3D(kspace, rss_volume(kspace), {"source": "x"}))
    volume = read_volume3d(tmp_path / "v.h5")
    np.testing.assert_array_equal(volume.kspace, kspace)
    assert volume.attrs["source"] == "x" and volume.attrs["dims"] == 3
    assert not list(tmp_path.glob(".*"))


def test_readout_ifft_is_the_3d_ifft_in_hybrid_space() -> None:
    kspace = torch.from_numpy(_kspace3d())
    np.testing.assert_allclose(
        ifftnc(ifft_readout(kspace), ndim=2), ifftnc(kspace, ndim=3), atol=1e-5
    )


def _phantom(shape: tuple[int, int, int]) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.75) ** 2 < 1
    inner = ((x - 0.2) / 0.3) ** 2 + (y / 0.25) ** 2 + ((z + 0.1) / 0.3) ** 2 < 1
    return (head * 1.0 + inner * 0.5).astype(np.float32)


def _multicoil(shape: tuple[int, int, int], coils: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-free k-space (C, X, Y, Z) of the phantom, and its birdcage maps."""
    maps = torch.from_numpy(birdcage_maps(coils, shape))
    image = torch.from_numpy(_phantom(shape)).to(torch.complex64)
    return fftnc(maps * image, ndim=3), maps


def test_decoupled_espirit_recovers_the_coil_maps() -> None:
    """Inside the object the maps span the true ones (up to a phase per voxel) and they
    are the 2D ESPIRiT maps of each readout position's (ky, kz) plane."""
    kspace, truth = _multicoil((8, 32, 32), 4)
    maps = espirit_decoupled(kspace, calib_width=16, kernel_width=5, planes_per_call=3)
    assert maps.shape == kspace.shape
    inside = torch.from_numpy(_phantom((8, 32, 32)) > 0)
    overlap = (maps.conj() * truth).sum(dim=0).abs()[inside]
    assert overlap.min() > 0.98
    plane = espirit(ifft_readout(kspace)[:, 5][None], calib_width=16, kernel_width=5)[0]
    torch.testing.assert_close(maps[:, 5], plane)


def test_3d_sense_of_a_sample_is_adjoint() -> None:
    """``<A x, y> = <x, A^H y>`` for the 3D SENSE operator of a `Sample` (mask broadcast
    over the readout) and for the cropped one `recon_sense` builds."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.complex64, generator=gen)

    maps, kspace = randn(2, 3, 6, 8, 10), randn(2, 3, 6, 8, 10)
    mask = torch.from_numpy(
        MaskSpec("poisson", 2.0, calib_size=(2, 2))
        .sample((8, 10), np.random.default_rng(0), ndim=3)
        .astype(np.float32)
    )
    sample = make_sample(kspace, mask, maps, (6, 8, 10))
    assert sample.mask.shape == (2, 1, 1, 8, 10)
    for op, image_shape in (
        (sample.sense(), (2, 6, 8, 10)),
        (recon_sense(maps, sample.mask, (4, 6, 10), ndim=3), (2, 4, 6, 10)),
    ):
        x, y = randn(*image_shape), randn(2, 3, 6, 8, 10)
        forward = torch.vdot(op(x).flatten(), y.flatten())
        backward = torch.vdot(x.flatten(), op.H(y).flatten())
        assert abs(forward - backward) <= 1e-4 * abs(forward)


def _tiny_sample(
    acceleration: float = 3.0, shape: tuple[int, int, int] = (8, 16, 16), calib: int = 4
) -> Sample:
    kspace, maps = _multicoil(shape, 4)
    noise = torch.randn(kspace.shape, generator=torch.Generator().manual_seed(1))
    kspace = kspace + 0.002 * noise.to(kspace.dtype)
    mask = MaskSpec("poisson", acceleration, calib_size=(calib, calib)).sample(
        shape[1:], np.random.default_rng(2), ndim=3
    )
    target = Sense(maps, ndim=3).H(kspace)
    return make_sample(
        kspace[None],
        torch.from_numpy(mask.astype(np.float32)),
        maps[None],
        shape,
        target=target[None],
        reference=target.abs()[None],
    )


def test_cg_sense_3d_equals_a_direct_solve() -> None:
    """CG-SENSE run to convergence solves ``(A^H A + lamda I) x = A^H y`` exactly: compared
    with the solution from the explicit matrix of A on a 2x4x4 volume."""
    sample = _tiny_sample(2.0, shape=(2, 4, 4), calib=2)
    sense = sample.sense()
    n = 2 * 4 * 4
    basis = torch.eye(n, dtype=torch.complex64).reshape(n, 1, 2, 4, 4)
    matrix = torch.stack([sense(e).flatten() for e in basis], dim=1).to(torch.complex128)
    lamda = 0.05
    normal = matrix.mH @ matrix + lamda * torch.eye(n, dtype=torch.complex128)
    rhs = matrix.mH @ sample.y.flatten().to(torch.complex128)
    direct = torch.linalg.solve(normal, rhs).reshape(1, 2, 4, 4)
    image = cg_sense(sample, CGSenseConfig(lamda=lamda, iterations=200))
    torch.testing.assert_close(image, direct.to(torch.complex64), atol=1e-4, rtol=1e-4)


def test_cs_beats_zero_filled_in_3d() -> None:
    sample = _tiny_sample()
    reference = sample.reference[0].numpy()

    def score(image: torch.Tensor) -> float:
        return psnr(reference, (image.abs() * sample.scale[0])[0].numpy())

    cs = compressed_sensing(sample, CSConfig(lamda=1e-3, iterations=40, wavelet="haar"))
    assert score(cs) > score(zero_filled(sample)) + 3


def test_3d_wavelet_threshold_zero_is_identity() -> None:
    image = torch.randn(2, 4, 8, 8, dtype=torch.complex64)
    again = wavelet_soft_threshold(image, torch.zeros(2), "db2", 2, shift=(1, 2, 3))
    torch.testing.assert_close(again, image, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["poisson", "random"])
@pytest.mark.parametrize("acceleration", [4.0, 6.0, 8.0])
def test_3d_evaluation_masks_realise_the_acceleration(kind: str, acceleration: float) -> None:
    """On the default 3D (ky, kz) grid, within 3%, the masks `cvxmri evaluate` draws."""
    spec = MaskSpec(kind, acceleration)
    mask = evaluation_mask(spec, "mni152_slab03.h5", (96, 80), None, ndim=3)
    assert realised_acceleration(mask) == pytest.approx(acceleration, rel=0.03)


def test_cli_simulates_and_evaluates_3d(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    nifti = phantom_nifti(tmp_path / "head.nii.gz", depth=64)
    data = tmp_path / "data"
    args = ["data", "simulate", "--dims", "3", "--nifti", str(nifti), "--out", str(data)]
    assert (
        main(
            [
                *args,
                "--matrix",
                "24x16x16",
                "--coils",
                "4",
                "--slab-slices",
                "4",
                "--guard-slices",
                "2",
            ]
        )
        == 0
    )
    assert "3D files" in capsys.readouterr().out
    main(["data", "info", str(next(data.glob("multicoil_test/*.h5")))])
    assert "3D multi-coil volume, 4 coils" in capsys.readouterr().out
    out = tmp_path / "eval"
    evaluate = ["evaluate", "--data", str(data), "--mask", "poisson", "--calib-size", "6"]
    assert main([*evaluate, "--cs-iterations", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = {entry["method"]: entry for entry in summary["results"]}
    assert set(methods) == {"zero-filled", "cs", "cg-sense"}
    assert all(np.isfinite(m["volume"]["psnr"]["mean"]) for m in methods.values())
    assert main([*evaluate, "--dims", "2", "--out", str(tmp_path / "e2")]) == 2
    assert "a 3D volume file" in capsys.readouterr().err


def test_decoupled_view_has_one_slice_per_readout_position(data3d: Path) -> None:
    path = next(data3d.glob("multicoil_test/*.h5"))
    volume3d = read_volume3d(path)
    plane = decoupled_volume(path)
    assert plane.kspace.shape == (volume3d.kspace.shape[1], 4, 16, 16)
    images = ifftnc(torch.from_numpy(plane.kspace), ndim=2)
    expected = ifftnc(torch.from_numpy(volume3d.kspace), ndim=3).movedim(1, 0)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(plane.target, volume3d.target)


def test_decoupled_planes_get_the_3d_maps_and_masks(data3d: Path, tmp_path: Path) -> None:
    """The 2D pipeline on the decoupled view sees what a 3D evaluation of the same file
    does: the decoupled ESPIRiT maps and the file's (ky, kz) evaluation mask."""
    view = decouple_dataset(data3d, tmp_path / "view")
    path = next(data3d.glob("multicoil_test/*.h5"))
    prepared = prepare_volume(view / path.relative_to(data3d), tmp_path / "cache")
    maps3d = prepare_volume3d(path).maps
    np.testing.assert_allclose(prepared.maps, np.moveaxis(maps3d, 1, 0), atol=1e-5)
    spec = MaskSpec("poisson", 3.0, calib_size=(4, 4))
    np.testing.assert_array_equal(
        evaluation_mask(spec, path.name, (16, 16), prepared.padding),
        evaluation_mask(spec, path.name, (16, 16), None, ndim=3),
    )


def test_decoupled_view_is_written_once(data3d: Path, tmp_path: Path) -> None:
    view = decouple_dataset(data3d, tmp_path / "view")
    manifest = view / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert decouple_dataset(data3d, view) == view
    assert manifest.stat().st_mtime_ns == stamp
    assert sorted(p.relative_to(view) for p in view.glob("multicoil_*/*.h5")) == sorted(
        p.relative_to(data3d) for p in data3d.glob("multicoil_*/*.h5")
    )


def test_cli_trains_decoupled_and_evaluates(
    data3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(data3d, data)
    run = tmp_path / "run"
    train = ["train", "--dims", "3", "--decoupled", "--preset", "tiny", "--data", str(data)]
    assert main([*train, "--out", str(run)]) == 0
    assert "val PSNR" in capsys.readouterr().out
    assert (data / "decoupled" / "manifest.json").is_file()
    out = tmp_path / "eval"
    evaluate = ["evaluate", "--model", str(run), "--mask", "poisson", "--calib-size", "6"]
    assert main([*evaluate, "--data", str(data / "decoupled"), "--out", str(out)]) == 0
    methods = {e["method"] for e in json.loads((out / "summary.json").read_text())["results"]}
    assert "run" in methods
    assert main([*evaluate, "--data", str(data), "--out", str(tmp_path / "e3")]) == 2
    assert "evaluated on the decoupled view" in capsys.readouterr().err
    # Without --decoupled, --dims 3 trains in 3D: the decoupled view (2D files) is refused.
    true3d = [*train[:3], *train[4:-1], str(data / "decoupled"), "--out", str(tmp_path / "r2")]
    assert main(true3d) == 2
    assert "not a 3D volume file" in capsys.readouterr().err
