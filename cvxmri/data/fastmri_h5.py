"""Read and write k-space in the fastMRI HDF5 layout.

A fastMRI file holds one volume:

- ``kspace``: complex, (slices, coils, H, W) multi-coil or (slices, H, W) single-coil, with
  H the readout (frequency-encoding) axis, often 2x oversampled, and W the phase-encoding
  axis along which 1D masks select columns;
- ``reconstruction_rss`` (multi-coil) or ``reconstruction_esc`` (single-coil): the
  (slices, h, w) magnitude target, cropped in image space to the recon matrix;
- ``ismrmrd_header``: ISMRMRD XML with the encoded and recon matrix sizes and the phase-
  encoding limits, from which fastMRI derives the zero-padded k-space columns;
- ``mask`` (optional, as in fastMRI's test files): the sampling mask, (W,) over the
  k-space columns or (H, W);
- attributes ``max`` and ``norm`` of the target volume, ``acquisition``, ``patient_id``.

`read_volume` validates all of it and raises `CvxmriError` with a one-line message naming the
file and the problem; `write_volume` writes the same layout atomically.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cvxmri.errors import CvxmriError

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
TARGET_KEYS = {True: "reconstruction_rss", False: "reconstruction_esc"}


@dataclass(frozen=True)
class EncodingInfo:
    """What fastMRI reads from the ISMRMRD header.

    Attributes:
        encoded_size: encoded matrix (x, y, z): x readout, y phase encoding.
        recon_size: reconstructed matrix (x, y, z); targets are (x, y) crops.
        pe_limits: phase-encoding (kspace_encoding_step_1) limits (minimum, maximum, centre).
        fov_mm: encoded field of view (x, y, z) in millimetres.
    """

    encoded_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    pe_limits: tuple[int, int, int]
    fov_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def padding(self) -> tuple[int, int]:
        """Acquired phase-encoding columns ``[left, right)``, as fastMRI computes them."""
        left = self.encoded_size[1] // 2 - self.pe_limits[2]
        return left, left + self.pe_limits[1] + 1

    @property
    def recon_shape(self) -> tuple[int, int]:
        """The (H, W) shape of the target images."""
        return self.recon_size[0], self.recon_size[1]

    @classmethod
    def full(cls, kspace_shape: tuple[int, int], recon_shape: tuple[int, int]) -> EncodingInfo:
        """A header for fully encoded k-space of shape (H, W), no phase-encoding padding."""
        height, width = kspace_shape
        return cls(
            encoded_size=(height, width, 1),
            recon_size=(recon_shape[0], recon_shape[1], 1),
            pe_limits=(0, width - 1, width // 2),
        )


@dataclass
class Volume:
    """One fastMRI file in memory. Single-coil k-space is held with a coil axis of size 1.

    Attributes:
        kspace: complex64 (slices, coils, H, W).
        target: float32 (slices, h, w) magnitude target, or None if the file has none.
        encoding: the header's encoding information.
        attrs: the file's attributes (``max``, ``norm``, ``acquisition``, ``patient_id``...).
        multicoil: False for single-coil files (``kspace`` of ndim 3 on disk).
        mask: bool (H, W) sampling mask from the file's ``mask`` dataset, or None.
    """

    kspace: np.ndarray
    target: np.ndarray | None
    encoding: EncodingInfo
    attrs: dict[str, object] = field(default_factory=dict)
    multicoil: bool = True
    mask: np.ndarray | None = None


def _find_int(root: ET.Element, path: list[str], source: str) -> int:
    query = "." + "".join(f"//{{{ISMRMRD_NS}}}{name}" for name in path)
    node = root.find(query)
    if node is None or node.text is None:
        raise CvxmriError(f"{source}: ismrmrd_header has no {'/'.join(path)}")
    try:
        return int(float(node.text))
    except ValueError:
        raise CvxmriError(
            f"{source}: ismrmrd_header field {'/'.join(path)} is not a number: {node.text!r}"
        ) from None


def parse_ismrmrd_header(xml: bytes | str, source: str = "header") -> EncodingInfo:
    """Read the encoding fields fastMRI uses from an ISMRMRD XML header."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise CvxmriError(f"{source}: ismrmrd_header is not valid XML ({err})") from None
    enc = ["encoding", "encodedSpace", "matrixSize"]
    rec = ["encoding", "reconSpace", "matrixSize"]
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    fov = ["encoding", "encodedSpace", "fieldOfView_mm"]
    fov_mm = []
    for axis in "xyz":
        node = root.find("." + "".join(f"//{{{ISMRMRD_NS}}}{n}" for n in [*fov, axis]))
        fov_mm.append(float(node.text) if node is not None and node.text else 0.0)
    encoded = [_find_int(root, [*enc, axis], source) for axis in "xyz"]
    recon = [_find_int(root, [*rec, axis], source) for axis in "xyz"]
    limits = [_find_int(root, [*lims, key], source) for key in ("minimum", "maximum", "center")]
    return EncodingInfo(
        encoded_size=(encoded[0], encoded[1], encoded[2]),
        recon_size=(recon[0], recon[1], recon[2]),
        pe_limits=(limits[0], limits[1], limits[2]),
        fov_mm=(fov_mm[0], fov_mm[1], fov_mm[2]),
    )


def make_ismrmrd_header(encoding: EncodingInfo) -> bytes:
    """An ISMRMRD XML header carrying `encoding`, in the structure fastMRI files have."""
    ET.register_namespace("", ISMRMRD_NS)

    def sub(parent: ET.Element, name: str, text: object | None = None) -> ET.Element:
        node = ET.SubElement(parent, f"{{{ISMRMRD_NS}}}{name}")
        if text is not None:
            node.text = str(text)
        return node

    root = ET.Element(f"{{{ISMRMRD_NS}}}ismrmrdHeader")
    enc = sub(root, "encoding")
    for space, size in (
        ("encodedSpace", encoding.encoded_size),
        ("reconSpace", encoding.recon_size),
    ):
        node = sub(enc, space)
        matrix = sub(node, "matrixSize")
        for axis, value in zip("xyz", size, strict=True):
            sub(matrix, axis, value)
        fov = sub(node, "fieldOfView_mm")
        for axis, value in zip("xyz", encoding.fov_mm, strict=True):
            sub(fov, axis, value)
    limits = sub(enc, "encodingLimits")
    step1 = sub(limits, "kspace_encoding_step_1")
    for key, value in zip(("minimum", "maximum", "center"), encoding.pe_limits, strict=True):
        sub(step1, key, value)
    return ET.tostring(root, xml_declaration=True, encoding="utf-8")


def open_hdf5(path: Path) -> h5py.File:
    """``path`` opened read-only, or a one-line `CvxmriError` if it is missing, a folder or
    not HDF5."""
    if not path.exists():
        raise CvxmriError(f"{path}: no such file")
    if not path.is_file():
        raise CvxmriError(f"{path}: not a file")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise CvxmriError(
            f"{path}: not a readable HDF5 file (truncated or another format)"
        ) from None


def read_encoding(path: str | Path) -> tuple[EncodingInfo, tuple[int, ...], bool]:
    """The encoding, the on-disk k-space shape and whether the file is multi-coil, cheaply."""
    path = Path(path)
    with open_hdf5(path) as hf:
        kspace = _kspace_dataset(hf, path)
        return _encoding(hf, path, kspace.shape), kspace.shape, kspace.ndim == 4


def is_volume3d(hf: h5py.File) -> bool:
    """Whether an open HDF5 file is a 3D volume file (`cvxmri.data.volume3d`: attribute
    ``dims`` = 3) rather than a fastMRI multi-slice file."""
    return plain_attribute(hf.attrs.get("dims")) == 3


def _kspace_dataset(hf: h5py.File, path: Path) -> h5py.Dataset:
    if is_volume3d(hf):
        raise CvxmriError(
            f"{path}: a 3D volume file (attribute dims=3, kspace (coils, kx, ky, kz)), where "
            "2D multi-slice data are expected"
        )
    if "kspace" not in hf:
        raise CvxmriError(f"{path}: no 'kspace' dataset (keys: {', '.join(hf.keys()) or 'none'})")
    kspace = hf["kspace"]
    if not isinstance(kspace, h5py.Dataset):
        raise CvxmriError(f"{path}: 'kspace' is not a dataset")
    if kspace.ndim not in (3, 4):
        raise CvxmriError(
            f"{path}: kspace must be (slices, coils, H, W) or (slices, H, W), "
            f"got shape {kspace.shape}"
        )
    if not np.issubdtype(kspace.dtype, np.complexfloating):
        raise CvxmriError(f"{path}: kspace must be complex, got {kspace.dtype}")
    if min(kspace.shape) == 0:
        raise CvxmriError(f"{path}: kspace is empty, shape {kspace.shape}")
    return kspace


def _encoding(hf: h5py.File, path: Path, shape: tuple[int, ...]) -> EncodingInfo:
    height, width = shape[-2:]
    if "ismrmrd_header" in hf:
        encoding = parse_ismrmrd_header(hf["ismrmrd_header"][()], str(path))
    else:
        # Files without a header (some test sets): the whole grid is encoded and the target
        # shape, if any, is the recon matrix.
        key = TARGET_KEYS[len(shape) == 4]
        recon = tuple(hf[key].shape[-2:]) if key in hf else (height, width)
        encoding = EncodingInfo.full((height, width), (int(recon[0]), int(recon[1])))
    if encoding.encoded_size[:2] != (height, width):
        raise CvxmriError(
            f"{path}: header encoded matrix {encoding.encoded_size[:2]} does not match "
            f"kspace {height}x{width}"
        )
    left, right = encoding.padding
    if not (0 <= left < right <= width):
        raise CvxmriError(
            f"{path}: header phase-encoding limits give columns [{left}, {right}) "
            f"outside the {width} k-space columns"
        )
    rh, rw = encoding.recon_shape
    if not (0 < rh <= height and 0 < rw <= width):
        raise CvxmriError(f"{path}: recon matrix {rh}x{rw} larger than kspace {height}x{width}")
    return encoding


def read_volume(path: str | Path, slices: slice | None = None, check_finite: bool = True) -> Volume:
    """Read a fastMRI file (or a range of its slices) and validate it.

    Args:
        path: the HDF5 file.
        slices: which slices to read; all by default.
        check_finite: reject NaN or Inf k-space (costs one pass over the data).
    """
    path = Path(path)
    with open_hdf5(path) as hf:
        dataset = _kspace_dataset(hf, path)
        multicoil = dataset.ndim == 4
        encoding = _encoding(hf, path, dataset.shape)
        index = slices if slices is not None else slice(None)
        try:
            kspace = np.asarray(dataset[index], dtype=np.complex64)
            key = TARGET_KEYS[multicoil]
            target = np.asarray(hf[key][index], dtype=np.float32) if key in hf else None
            mask = _read_mask(hf, path, dataset.shape[-2:]) if "mask" in hf else None
        except OSError as err:
            raise CvxmriError(f"{path}: cannot read data, the file is damaged ({err})") from None
        attrs = {key: plain_attribute(value) for key, value in hf.attrs.items()}
    if not multicoil:
        kspace = kspace[:, None]
    if check_finite and not np.isfinite(kspace).all():
        raise CvxmriError(f"{path}: kspace contains NaN or Inf values")
    if not np.any(kspace):
        raise CvxmriError(f"{path}: kspace is all zeros")
    if target is not None:
        expected = (kspace.shape[0], *encoding.recon_shape)
        if target.shape != expected:
            raise CvxmriError(
                f"{path}: {TARGET_KEYS[multicoil]} has shape {target.shape}, "
                f"expected {expected} (slices, recon matrix)"
            )
    return Volume(kspace, target, encoding, attrs, multicoil, mask)


def _read_mask(hf: h5py.File, path: Path, grid: tuple[int, int]) -> np.ndarray:
    """The ``mask`` dataset as a bool (H, W) mask: fastMRI stores (W,) over the columns."""
    height, width = grid
    dataset = hf["mask"]
    if not isinstance(dataset, h5py.Dataset) or dataset.shape not in ((width,), (height, width)):
        shape = getattr(dataset, "shape", "a group")
        raise CvxmriError(
            f"{path}: mask has shape {shape} but kspace is {height}x{width} "
            f"(expected ({width},) or ({height}, {width}))"
        )
    values = np.asarray(dataset[()])
    if not np.isin(values, (0, 1)).all():
        raise CvxmriError(f"{path}: mask values must be 0 or 1")
    if not values.any():
        raise CvxmriError(f"{path}: mask samples nothing")
    return np.broadcast_to(values.astype(bool), (height, width)).copy()


def plain_attribute(value: object) -> object:
    """HDF5 attribute values as plain Python objects (for JSON manifests)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_volume(path: str | Path, volume: Volume) -> None:
    """Write `volume` in the fastMRI layout, atomically (temporary file, then rename).

    ``max`` and ``norm`` are set from the target when it is present.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    kspace = volume.kspace if volume.multicoil else volume.kspace[:, 0]
    try:
        with h5py.File(tmp, "w") as hf:
            hf.create_dataset("kspace", data=kspace.astype(np.complex64))
            hf.create_dataset("ismrmrd_header", data=make_ismrmrd_header(volume.encoding))
            attrs = dict(volume.attrs)
            if volume.target is not None:
                hf.create_dataset(
                    TARGET_KEYS[volume.multicoil], data=volume.target.astype(np.float32)
                )
                attrs["max"] = float(volume.target.max())
                attrs["norm"] = float(np.linalg.norm(volume.target))
            if volume.mask is not None:
                rows_equal = (volume.mask == volume.mask[:1]).all()
                hf.create_dataset("mask", data=volume.mask[0] if rows_equal else volume.mask)
            for key, value in attrs.items():
                hf.attrs[key] = value
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
