"""Reading and writing the fastMRI HDF5 layout, and rejecting bad files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import header

from cvxmri.data.fastmri_h5 import (
    EncodingInfo,
    Volume,
    make_ismrmrd_header,
    parse_ismrmrd_header,
    read_encoding,
    read_volume,
    write_volume,
)
from cvxmri.errors import CvxmriError


def test_reads_knee_layout(knee_file: tuple[Path, dict]) -> None:
    path, expected = knee_file
    volume = read_volume(path)
    assert volume.multicoil
    assert volume.kspace.shape == (3, 4, 64, 46)
    assert volume.kspace.dtype == np.complex64
    np.testing.assert_array_equal(volume.kspace, expected["kspace"])
    assert volume.target is not None and volume.target.shape == (3, 32, 32)
    assert volume.encoding.encoded_size == (64, 46, 1)
    assert volume.encoding.recon_shape == (32, 32)
    # fastMRI's padding formula gives back the acquired columns the fixture zero-padded.
    assert volume.encoding.padding == expected["padding"]
    assert volume.attrs["acquisition"] == "CORPD_FBK"
    assert volume.attrs["patient_id"] == "abc123"
    assert volume.attrs["max"] == pytest.approx(float(expected["rss"].max()))


def test_reads_slice_range_and_encoding_only(knee_file: tuple[Path, dict]) -> None:
    path, expected = knee_file
    volume = read_volume(path, slices=slice(1, 3))
    np.testing.assert_array_equal(volume.kspace, expected["kspace"][1:3])
    encoding, shape, multicoil = read_encoding(path)
    assert shape == (3, 4, 64, 46) and multicoil and encoding.padding == (3, 43)


def test_singlecoil(singlecoil_file: Path) -> None:
    volume = read_volume(singlecoil_file)
    assert not volume.multicoil
    assert volume.kspace.shape == (2, 1, 40, 24)
    assert volume.target is not None and volume.target.shape == (2, 20, 20)


def test_write_read_roundtrip(tmp_path: Path, knee_file: tuple[Path, dict]) -> None:
    original = read_volume(knee_file[0])
    out = tmp_path / "copy.h5"
    write_volume(out, original)
    again = read_volume(out)
    np.testing.assert_array_equal(again.kspace, original.kspace)
    np.testing.assert_array_equal(again.target, original.target)
    assert again.encoding == original.encoding
    assert again.attrs["patient_id"] == "abc123"
    assert again.attrs["norm"] == pytest.approx(float(np.linalg.norm(original.target)))
    assert not list(tmp_path.glob(".*tmp"))
    with h5py.File(out) as hf:
        assert set(hf) == {"kspace", "reconstruction_rss", "ismrmrd_header"}


def test_header_roundtrip() -> None:
    # Typical fastMRI knee numbers: 640x368 encoded, 320x320 recon, 332 acquired columns.
    info = EncodingInfo((640, 368, 1), (320, 320, 1), (0, 331, 166), (280.0, 161.0, 4.5))
    assert parse_ismrmrd_header(make_ismrmrd_header(info)) == info
    assert info.padding == (18, 350)


def _write(path: Path, **datasets: object) -> Path:
    with h5py.File(path, "w") as hf:
        for key, value in datasets.items():
            hf.create_dataset(key, data=value)
    return path


GOOD_K = np.ones((2, 3, 16, 12), np.complex64)
GOOD_HEADER = header(16, 12, 8, 8, 11, 6)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("not-hdf5", "not a readable HDF5 file"),
        ("truncated", "not a readable HDF5 file"),
        ("no-kspace", "no 'kspace' dataset"),
        ("wrong-ndim", "kspace must be"),
        ("real-kspace", "kspace must be complex"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("zeros", "all zeros"),
        ("header-missing-field", "ismrmrd_header has no encoding/reconSpace/matrixSize/x"),
        ("header-not-xml", "not valid XML"),
        ("header-size-mismatch", "does not match kspace"),
        ("target-shape", "expected (2, 8, 8)"),
    ],
)
def test_bad_files(tmp_path: Path, knee_file: tuple[Path, dict], case: str, message: str) -> None:
    path = tmp_path / f"{case}.h5"
    if case == "not-hdf5":
        path.write_text("this is not hdf5")
    elif case == "truncated":
        data = knee_file[0].read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "no-kspace":
        _write(path, reconstruction_rss=np.ones((2, 8, 8), np.float32))
    elif case == "wrong-ndim":
        _write(path, kspace=np.ones((16, 12), np.complex64))
    elif case == "real-kspace":
        _write(path, kspace=np.ones((2, 3, 16, 12), np.float32))
    elif case in ("nan", "inf"):
        bad = GOOD_K.copy()
        bad[1, 2, 3, 4] = np.nan if case == "nan" else np.inf
        _write(path, kspace=bad, ismrmrd_header=GOOD_HEADER)
    elif case == "zeros":
        _write(path, kspace=np.zeros_like(GOOD_K), ismrmrd_header=GOOD_HEADER)
    elif case == "header-missing-field":
        broken = GOOD_HEADER.replace(
            b"<reconSpace>\n      <matrixSize><x>8</x>", b"<reconSpace>\n      <matrixSize>"
        )
        _write(path, kspace=GOOD_K, ismrmrd_header=broken)
    elif case == "header-not-xml":
        _write(path, kspace=GOOD_K, ismrmrd_header=b"<ismrmrdHeader><encoding>")
    elif case == "header-size-mismatch":
        _write(path, kspace=GOOD_K, ismrmrd_header=header(20, 12, 8, 8, 11, 6))
    elif case == "target-shape":
        _write(
            path,
            kspace=GOOD_K,
            ismrmrd_header=GOOD_HEADER,
            reconstruction_rss=np.ones((2, 9, 8), np.float32),
        )
    with pytest.raises(CvxmriError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        read_volume(path)
    assert "\n" not in str(err.value)


def test_file_without_header_uses_shapes(tmp_path: Path) -> None:
    path = _write(tmp_path / "nohdr.h5", kspace=GOOD_K, reconstruction_rss=np.ones((2, 8, 8)))
    volume = read_volume(path)
    assert volume.encoding.recon_shape == (8, 8)
    assert volume.encoding.padding == (0, 12)


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    volume = Volume(GOOD_K, None, EncodingInfo.full((16, 12), (8, 8)), {"bad": object()})
    out = tmp_path / "never.h5"
    with pytest.raises(TypeError):
        write_volume(out, volume)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rows_equal", [True, False])
def test_mask_roundtrip(tmp_path: Path, knee_file: tuple[Path, dict], rows_equal: bool) -> None:
    """A column mask is stored as fastMRI's (W,) vector, a 2D one as (H, W); both read back
    as the same bool (H, W) mask."""
    original = read_volume(knee_file[0])
    height, width = original.kspace.shape[-2:]
    rng = np.random.default_rng(0)
    shape = (1, width) if rows_equal else (height, width)
    mask = np.broadcast_to(rng.random(shape) < 0.3, (height, width)).copy()
    out = tmp_path / "masked.h5"
    write_volume(out, dataclasses.replace(original, mask=mask))
    with h5py.File(out) as hf:
        assert hf["mask"].shape == ((width,) if rows_equal else (height, width))
    np.testing.assert_array_equal(read_volume(out).mask, mask)
    assert read_volume(knee_file[0]).mask is None
