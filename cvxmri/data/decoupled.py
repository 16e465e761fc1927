"""The decoupled 2D view of 3D volume files: every readout position a 2D slice.

The readout of 3D Cartesian k-space is fully sampled, so its inverse FFT
(`cvxmri.physics.ifft_readout`) is exact and leaves one 2D problem per readout position x:
the (ky, kz) k-space of the plane x, ``ifft_readout(k)[:, x]``, is the 2D centred FFT of the
coil images of that plane, and the (ky, kz) mask of the volume is that plane's mask. A 3D
file (coils, kx, ky, kz) therefore becomes a 2D fastMRI-layout file of the same name with
``kspace`` (x, coils, ky, kz) and ``reconstruction_rss`` (x, ky, kz) (the 3D file's, which is
the planes' root-sum-of-squares), and the whole 2D pipeline (coil maps per plane, which are
`cvxmri.data.espirit.espirit_decoupled`'s, training, `cvxmri evaluate`) runs on it
unchanged. Its per-volume metrics are then the 3D ones (PSNR over the volume with its
maximum, SSIM over the readout planes), and its evaluation masks are the 3D files' (seeded
from the same file names, the same Poisson-disc or random (ky, kz) pattern).

`decouple_dataset` writes that view of a 3D dataset root next to it (``<root>/decoupled``),
once: it is rewritten only when a 3D file changed since.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cvxmri.data.fastmri_h5 import EncodingInfo, Volume, write_volume
from cvxmri.data.prepare import find_files, is_dataset_root, volume_id
from cvxmri.data.simulate import write_dataset
from cvxmri.data.volume3d import file_dims, read_volume3d, rss_volume
from cvxmri.errors import CvxmriError
from cvxmri.physics import ifft_readout

log = logging.getLogger(__name__)

FOLDER = "decoupled"
SPLITS = ("train", "val", "test")


def decoupled_volume(path: str | Path) -> Volume:
    """The 2D fastMRI-layout volume of a 3D file: one slice per readout position."""
    volume = read_volume3d(path)
    hybrid = ifft_readout(torch.from_numpy(volume.kspace)).movedim(-3, 0).contiguous()
    target = volume.target if volume.target is not None else rss_volume(volume.kspace)
    grid = (hybrid.shape[-2], hybrid.shape[-1])
    attrs = {k: v for k, v in volume.attrs.items() if k not in ("dims", "max", "norm")}
    attrs["decoupled_from"] = Path(path).name
    return Volume(hybrid.numpy(), target, EncodingInfo.full(grid, grid), attrs)


def _fingerprints(data: Path) -> dict[str, str]:
    """``volume id -> size:mtime`` of every 3D file of every split of ``data``."""
    found = {}
    for split in SPLITS:
        if not (data / f"multicoil_{split}").is_dir():
            continue
        for path in find_files(data, split):
            if file_dims(path) != 3:
                raise CvxmriError(f"{path}: not a 3D volume file; --dims 3 takes 3D data")
            stat = path.stat()
            found[volume_id(path, data)] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return found


def decouple_dataset(data: str | Path, out: str | Path | None = None) -> Path:
    """The decoupled 2D view of the 3D dataset root ``data``, in ``out`` (default
    ``data/decoupled``): written when missing or when a 3D file changed since (its
    ``manifest.json`` records the files' sizes and times), kept otherwise. Returns ``out``.
    """
    data = Path(data)
    if not data.is_dir() or not any(is_dataset_root(data, split) for split in SPLITS):
        raise CvxmriError(
            f"{data}: not a 3D dataset root (multicoil_train/, multicoil_val/, ... of 3D "
            "volume files; cvxmri data simulate --dims 3 writes one)"
        )
    out = Path(out) if out is not None else data / FOLDER
    sources = _fingerprints(data)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()).get("sources") == sources:
                return out
        except json.JSONDecodeError:
            pass
        log.warning("%s: out of date, written again", out)

    def build(folder: Path) -> dict[str, object]:
        for name in sources:
            write_volume(folder / name, decoupled_volume(data / name))
        manifest: dict[str, object] = {
            "kind": "decoupled 2D view of 3D volume files: slices are readout positions",
            "data": str(data),
            "sources": sources,
        }
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return manifest

    write_dataset(out, overwrite=True, build=build)
    log.info("%s: decoupled view of %d 3D files", out, len(sources))
    return out
