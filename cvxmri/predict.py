"""Reconstructions out: one HDF5 file per input volume, in fastMRI's submission layout.

`predict` reconstructs every volume of a split (a dataset root's, default ``test``), a flat
folder of ``.h5`` files or one file (`cvxmri.data.prepare.find_files`) with a trained
network or a classical method, and writes into the output folder, for each input:

- ``<input file name>``: an HDF5 file holding one dataset, ``reconstruction``, float32
  (slices, h, w) magnitude images on the reconstruction matrix, in the data's own units:
  the layout of fastMRI's ``save_reconstructions`` and of its leaderboard submissions, and
  exactly the image `cvxmri evaluate` compares against its target (the same `Sample`,
  `cvxmri.evaluate.volume_sample`, and the same magnitude, `cvxmri.evaluate.magnitude`).
  Its attributes say what made it: ``method``, ``model`` (the network file, or ''),
  ``mask`` (its description), ``mask_source``, ``source`` (the input's volume id) and
  ``cvxmri`` (the version);
- with ``nifti``, ``<input stem>.nii.gz`` as well, for viewers: voxel ``(x, y, z)`` is
  ``reconstruction[z, h - 1 - y, x]`` (columns left to right, rows top to bottom, slices
  along z), voxel sizes from the header's encoded field of view when it has one, else 1 mm;
- ``predict.yaml``, the resolved configuration, and ``log.txt``, the log, as every run
  folder has.

Masks: a file that carries its own ``mask`` dataset (fastMRI's test files do: their
k-space is already undersampled) is reconstructed with that mask unless another mask is
asked for (``file_masks=False``); other files get ``mask``, drawn with the seed of the file
name as `cvxmri evaluate` draws it.

Nothing is left half-written: every file is written to a hidden temporary name in the
output folder and all of them are renamed into place only when every volume has succeeded;
on failure they are removed, and so is the output folder if this run created it
(`cvxmri.runs.staged_files`). Files of the same names already there are refused unless
``overwrite``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import yaml
from tqdm import tqdm

from cvxmri import __version__
from cvxmri.config import from_dict, save_yaml
from cvxmri.data.fastmri_h5 import EncodingInfo, read_encoding
from cvxmri.data.prepare import (
    EspiritConfig,
    default_cache_dir,
    find_files,
    prepare_volume,
    volume_id,
)
from cvxmri.errors import CvxmriError
from cvxmri.evaluate import (
    EvaluateConfig,
    classical_reconstructor,
    magnitude,
    model_file,
    model_label,
    volume_sample,
)
from cvxmri.masks import MaskSpec
from cvxmri.models.unrolled import load_network
from cvxmri.recon import (
    CLASSICAL_METHODS,
    CGSenseConfig,
    CSConfig,
    Reconstructor,
    network_reconstructor,
)
from cvxmri.runs import logging_to, staged_files

log = logging.getLogger(__name__)

CONFIG_NAME = "predict.yaml"
LOG_NAME = "log.txt"
DATASET = "reconstruction"
FILE_MASK_SOURCE = "the file's own 'mask' dataset"
DRAWN_MASK_SOURCE = "drawn, seeded from the file name (as cvxmri evaluate draws it)"


@dataclass
class PredictConfig:
    """What `cvxmri predict` runs.

    Attributes:
        model: a trained network (a model file, or a run folder meaning its ``model.pt``)
            or a classical method (``zero-filled``, ``cs`` or ``cg-sense``; a path of that
            name wins).
        data: a dataset root, a flat folder of ``.h5`` files or one file.
        split: the split of a dataset root.
        mask: the sampling mask of the files without their own (kind ``file``: every
            file's own, which each must have).
        file_masks: a file's own ``mask`` dataset wins over ``mask`` (what fastMRI's test
            files need); off when a mask is asked for explicitly.
        nifti: also write a ``.nii.gz`` per volume.
        cs: compressed-sensing settings (method ``cs``).
        cg_sense: CG-SENSE settings (method ``cg-sense``).
        espirit: coil-map settings.
        cache: where coil maps are cached; ``<data root>/cache`` when empty.
        device: where a network runs: cpu, cuda (``cuda:N``) or auto.
    """

    model: str = "zero-filled"
    data: str = "data/default"
    split: str = "test"
    mask: MaskSpec = field(default_factory=lambda: MaskSpec("poisson", 4.0))
    file_masks: bool = True
    nifti: bool = False
    cs: CSConfig = field(default_factory=CSConfig)
    cg_sense: CGSenseConfig = field(default_factory=CGSenseConfig)
    espirit: EspiritConfig = field(default_factory=EspiritConfig)
    cache: str = ""
    device: str = "cpu"

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings (those of `EvaluateConfig`)."""
        if not self.model:
            raise CvxmriError(
                f"no model: give a model file, a run folder or {' or '.join(CLASSICAL_METHODS)}"
            )
        EvaluateConfig(
            data=self.data,
            split=self.split,
            methods=[],
            masks=[self.mask],
            cs=self.cs,
            cg_sense=self.cg_sense,
            device=self.device,
        ).validate()


def training_mask(model: str) -> MaskSpec | None:
    """The mask a network was trained on, from its run folder's ``config.yaml`` (the
    folder itself, or the folder of the model file); None for a classical method, a model
    file outside a run folder or a config without a valid ``mask``."""
    path = Path(model)
    if not path.exists():
        return None
    config = model_file(path).parent / "config.yaml"
    try:
        saved = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("mask"), dict):
        return None
    try:
        return from_dict(MaskSpec, saved["mask"], str(config))
    except CvxmriError:
        return None


class Method(NamedTuple):
    """A resolved ``--model``: its label (the method's name, or the network's run folder),
    its reconstruction function, and for a network its file and saved metadata."""

    label: str
    reconstruct: Reconstructor
    file: Path | None = None
    metadata: dict[str, object] | None = None


def resolve_model(
    model: str, cs: CSConfig, device: object = "cpu", cg: CGSenseConfig | None = None
) -> Method:
    """The `Method` of ``model``: a classical method name (run with the CS settings ``cs``
    or the CG-SENSE settings ``cg``), or a model file or run folder (a path of a method's
    name wins), loaded onto ``device``."""
    path = Path(model)
    if model in CLASSICAL_METHODS and not path.exists():
        return Method(model, classical_reconstructor(model, cs, cg))
    if not path.exists():
        raise CvxmriError(
            f"{model}: no such model file or run folder (or a classical method: "
            f"{', '.join(CLASSICAL_METHODS)})"
        )
    network = load_network(path, map_location=device).eval()  # type: ignore[arg-type]
    if network.ndim != 2:
        raise CvxmriError(f"{model}: a {network.ndim}D network; predict reconstructs 2D slices")
    file = Path(str(network.metadata["path"]))
    return Method(model_label(file), network_reconstructor(network), file, network.metadata)


def nifti_name(path: Path) -> str:
    """``file.h5`` -> ``file.nii.gz``."""
    return f"{path.stem}.nii.gz"


def write_reconstruction(path: Path, recon: np.ndarray, attrs: dict[str, str]) -> None:
    """One fastMRI submission file: dataset ``reconstruction`` (float32) and ``attrs``."""
    with h5py.File(path, "w") as hf:
        hf.create_dataset(DATASET, data=np.asarray(recon, dtype=np.float32))
        for key, value in attrs.items():
            hf.attrs[key] = value


def nifti_array(recon: np.ndarray) -> np.ndarray:
    """(slices, h, w) -> the NIfTI voxel array: ``[x, y, z] = recon[z, h - 1 - y, x]``."""
    return np.ascontiguousarray(recon[:, ::-1, :].transpose(2, 1, 0), dtype=np.float32)


def from_nifti_array(data: np.ndarray) -> np.ndarray:
    """The inverse of `nifti_array`: the (slices, h, w) reconstruction of a NIfTI array."""
    return np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)[:, ::-1, :])


def write_nifti(path: Path, recon: np.ndarray, encoding: EncodingInfo) -> None:
    """``recon`` as a NIfTI-1 volume (`nifti_array`), voxel sizes from the encoded field
    of view (1 mm where the header has none)."""
    import nibabel as nib

    def size(fov: float, samples: int) -> float:
        return fov / samples if fov > 0 and samples > 0 else 1.0

    rows = size(encoding.fov_mm[0], encoding.encoded_size[0])
    cols = size(encoding.fov_mm[1], encoding.encoded_size[1])
    thickness = encoding.fov_mm[2] if encoding.fov_mm[2] > 0 else 1.0
    image = nib.Nifti1Image(nifti_array(recon), np.diag([cols, rows, thickness, 1.0]))
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def predict(config: PredictConfig, out: Path, overwrite: bool = False) -> dict[str, object]:
    """Reconstruct every volume of ``config.data`` into ``out`` (see the module docstring);
    return what was written: method, model file and one entry per volume."""
    from cvxmri.training.trainer import resolve_device

    config.validate()
    device = resolve_device(config.device)
    files = find_files(config.data, config.split)
    seen: dict[str, Path] = {}
    for path in files:
        if path.name in seen:
            first, second = (volume_id(p, config.data) for p in (seen[path.name], path))
            raise CvxmriError(
                f"{config.data}: two volumes named {path.name} ({first} and {second}); "
                "predict writes one file per name: give one split folder at a time"
            )
        seen[path.name] = path
    label, reconstruct, network, metadata = resolve_model(
        config.model, config.cs, device, config.cg_sense
    )
    if network is not None:  # recorded as what ran: the model file, not its folder
        config = replace(config, model=str(network))
    names = [p.name for p in files]
    if config.nifti:
        names += [nifti_name(p) for p in files]
    cache = Path(config.cache) if config.cache else default_cache_dir(config.data)
    written: list[dict[str, object]] = []
    with staged_files(out, [*names, CONFIG_NAME, LOG_NAME], overwrite) as stage:
        save_yaml(config, stage(CONFIG_NAME))
        with logging_to(stage(LOG_NAME)):
            log.info("predict %s on %d volume(s) into %s", label, len(files), out)
            if network is not None:
                log.info("network %s, saved with %s", network, metadata)
            for path in tqdm(files, desc=f"predict {label}", unit="file", disable=None):
                volume = prepare_volume(path, cache, config.espirit)
                own = config.file_masks and volume.mask is not None
                spec = replace(config.mask, kind="file") if own else config.mask
                name = volume_id(path, config.data)
                sample = volume_sample(volume, spec, name)
                recon = magnitude(reconstruct(sample), sample)
                source = FILE_MASK_SOURCE if spec.kind == "file" else DRAWN_MASK_SOURCE
                attrs = {
                    "method": label,
                    "model": "" if network is None else str(network),
                    "mask": spec.describe(),
                    "mask_source": source,
                    "source": name,
                    "cvxmri": __version__,
                }
                write_reconstruction(stage(path.name), recon, attrs)
                if config.nifti:
                    write_nifti(stage(nifti_name(path)), recon, read_encoding(path)[0])
                log.info("%s: %s, %s (%s), %s", name, label, spec.describe(), source, recon.shape)
                written.append({"file": path.name, "source": name, "mask": spec.describe()})
    return {"method": label, "model": None if network is None else str(network), "files": written}
