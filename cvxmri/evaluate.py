"""Evaluate reconstruction methods on a split: per-slice and per-volume PSNR, SSIM, NMSE.

Each file gets one deterministic mask, seeded from its name (fastMRI's convention for
evaluation), shared by all its slices and by every method, so methods see identical inputs:
one `Sample` per volume and mask (`cvxmri.data.sample.make_sample`), which every method
reconstructs on the recon matrix. Metrics follow fastMRI: per volume, PSNR and SSIM with
``data_range`` = the volume's maximum (SSIM averaged over slices), plus the slice-based
variants (``data_range`` = the slice's maximum) that the paper reports. Rows name each
volume by its path relative to the data root (`cvxmri.data.prepare.volume_id`).

3D volume files (`cvxmri.data.volume3d`; a folder holds either kind, not both) are
evaluated the same way, one `Sample` per volume and (ky, kz) mask, by the classical
methods in 3D and by 3D networks (``cvxmri train --dims 3``) on the whole volume: PSNR
with the volume's maximum over the whole volume, SSIM averaged over the readout planes
(axis 0: (ky, kz) planes), and the slice rows are those planes.

Targets: ``sense``, the magnitude of the SENSE-combined fully sampled image; ``rss``,
fastMRI's root-sum-of-squares image: the file's stored ``reconstruction_rss`` when it has
one (the reference of every fastMRI number), computed from the k-space otherwise. The
summary's ``target_source`` says which.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cvxmri.data.prepare import (
    EspiritConfig,
    PreparedVolume,
    default_cache_dir,
    evaluation_mask,
    find_files,
    prepare_volume,
    volume_id,
)
from cvxmri.data.sample import Sample, make_sample
from cvxmri.data.volume3d import PreparedVolume3D, file_dims, prepare_volume3d
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.metrics import slice_metrics, volume_metrics
from cvxmri.models.unrolled import load_network
from cvxmri.recon import (
    CLASSICAL_METHODS,
    CGSenseConfig,
    CSConfig,
    Reconstructor,
    cg_sense,
    compressed_sensing,
    network_reconstructor,
    zero_filled,
)

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "nmse")
SENSE_TARGET = "sense magnitude"


@dataclass
class EvaluateConfig:
    """What `cvxmri evaluate` runs.

    Attributes:
        data: a dataset root with ``multicoil_<split>/`` folders, a flat folder of ``.h5``
            files (then ``split`` is ignored) or one file (`cvxmri.data.prepare.find_files`).
        split: which split of a dataset root.
        methods: reconstruction methods.
        masks: sampling masks, each evaluated separately.
        target: ``sense`` (magnitude of the SENSE-combined image) or ``rss`` (fastMRI's:
            the stored ``reconstruction_rss`` when the file has one).
        models: trained networks (``model.pt`` files, or run folders meaning their
            ``model.pt``) evaluated beside the methods.
        cs: compressed-sensing settings (method ``cs``).
        cg_sense: CG-SENSE settings (method ``cg-sense``).
        espirit: coil-map settings.
        cache: where coil maps are cached; ``<data root>/cache`` when empty
            (`cvxmri.data.prepare.default_cache_dir`).
        device: where the networks run: cpu, cuda (``cuda:N``) or auto (cuda when
            available); the classical methods run on the CPU.
        dims: 2 (fastMRI multi-slice files) or 3 (3D volume files) expected, or 0: what
            the files are.
    """

    data: str = "data/default"
    split: str = "test"
    methods: list[str] = field(default_factory=lambda: list(CLASSICAL_METHODS))
    masks: list[MaskSpec] = field(
        default_factory=lambda: [MaskSpec("poisson", 4.0), MaskSpec("cartesian", 4.0, 0.04)]
    )
    target: str = "sense"
    models: list[str] = field(default_factory=list)
    cs: CSConfig = field(default_factory=CSConfig)
    cg_sense: CGSenseConfig = field(default_factory=CGSenseConfig)
    espirit: EspiritConfig = field(default_factory=EspiritConfig)
    cache: str = ""
    device: str = "cpu"
    dims: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings."""
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise CvxmriError(f"unknown device {self.device!r} (choose cpu, cuda or auto)")
        for method in self.methods:
            if method not in CLASSICAL_METHODS:
                raise CvxmriError(
                    f"unknown method {method!r} (choose from {', '.join(CLASSICAL_METHODS)})"
                )
        for mask in self.masks:
            mask.validate()
        if self.dims not in (0, 2, 3):
            raise CvxmriError(f"dims must be 2, 3 or 0 (detect), got {self.dims}")
        if self.target not in ("sense", "rss"):
            raise CvxmriError(f"unknown target {self.target!r} (choose sense or rss)")
        if not (self.cs.lamda > 0 and math.isfinite(self.cs.lamda)):
            raise CvxmriError(f"CS lambda must be a positive number, got {self.cs.lamda}")
        if self.cs.iterations < 1:
            raise CvxmriError(f"CS iterations must be >= 1, got {self.cs.iterations}")
        check_wavelet(self.cs.wavelet)
        if not (self.cg_sense.lamda >= 0 and math.isfinite(self.cg_sense.lamda)):
            raise CvxmriError(
                f"CG-SENSE lambda must be a non-negative number, got {self.cg_sense.lamda}"
            )
        if self.cg_sense.iterations < 1:
            raise CvxmriError(f"CG-SENSE iterations must be >= 1, got {self.cg_sense.iterations}")


def check_wavelet(name: str) -> None:
    """Raise `CvxmriError` unless ``name`` is an orthogonal wavelet pywt knows (``db4``,
    ``haar``, ``sym8``, ...), as the CS solvers need."""
    import pywt

    if name not in pywt.wavelist(kind="discrete") or not pywt.Wavelet(name).orthogonal:
        raise CvxmriError(
            f"unknown CS wavelet {name!r} (an orthogonal discrete pywt wavelet, e.g. db4, db2, "
            "haar, sym8)"
        )


def classical_reconstructor(
    method: str, cs: CSConfig, cg: CGSenseConfig | None = None
) -> Reconstructor:
    """The reconstruction function (``Sample -> image``) of a classical method (one of
    `CLASSICAL_METHODS`), with the CS settings ``cs`` and the CG-SENSE settings ``cg``
    (the defaults when None)."""
    if method == "zero-filled":
        return zero_filled
    if method == "cs":
        return lambda sample: compressed_sensing(sample, cs)
    if method == "cg-sense":
        settings = CGSenseConfig() if cg is None else cg
        return lambda sample: cg_sense(sample, settings)
    raise CvxmriError(f"unknown method {method!r} (choose from {', '.join(CLASSICAL_METHODS)})")


def reference_image(volume: PreparedVolume, target: str) -> tuple[np.ndarray, str]:
    """The (S, h, w) magnitude images the metrics compare against, in the data's units,
    and where they come from (`PreparedVolume.rss_target` for ``rss``)."""
    if target == "sense":
        return np.abs(volume.target), SENSE_TARGET
    return volume.rss_target()


def volume_sample(
    volume: PreparedVolume, spec: MaskSpec, name: str, reference: np.ndarray | None = None
) -> Sample:
    """The `Sample` of all slices of a volume under its evaluation mask (`evaluation_mask`:
    seeded from the file name, or the file's own ``mask`` for the ``file`` kind), with its
    SENSE target; ``name`` is the volume id it carries and ``reference`` (S, h, w) the
    magnitude the metrics compare against, if any. `evaluate` and `cvxmri.predict`
    reconstruct exactly this."""
    kspace = torch.from_numpy(volume.kspace)
    mask = evaluation_mask(spec, volume.name, kspace.shape[-2:], volume.padding, volume.mask)
    return make_sample(
        kspace,
        torch.from_numpy(mask.astype(np.float32)),
        torch.from_numpy(volume.maps),
        volume.recon_shape,
        target=torch.from_numpy(volume.target),
        reference=None if reference is None else torch.from_numpy(reference),
        volume=name,
    )


def magnitude(image: torch.Tensor, sample: Sample) -> np.ndarray:
    """A reconstruction (complex (B, h, w), or (B, x, y, z) for volumes, in the sample's
    normalised units) as float32 magnitude images in the data's own units: what the
    metrics compare against the reference, and what `cvxmri.predict` writes."""
    return (image.abs() * sample.scale.view(-1, *[1] * sample.ndim)).numpy()


def volume3d_sample(
    volume: PreparedVolume3D, spec: MaskSpec, name: str, reference: np.ndarray
) -> Sample:
    """The `Sample` (batch of one volume) of a 3D file under its evaluation mask: the
    (ky, kz) pattern seeded from the file name (`evaluation_mask` with ``ndim=3``), with
    the SENSE target; ``name`` is the volume id it carries and ``reference`` (X, Y, Z) the
    magnitude the metrics compare against."""
    grid = volume.kspace.shape[-2:]
    mask = evaluation_mask(spec, volume.name, grid, None, ndim=3)
    return make_sample(
        torch.from_numpy(volume.kspace)[None],
        torch.from_numpy(mask.astype(np.float32)),
        torch.from_numpy(volume.maps)[None],
        tuple(volume.kspace.shape[1:]),
        target=torch.from_numpy(volume.target)[None],
        reference=torch.from_numpy(reference)[None],
        volume=name,
    )


def prepare_file(
    path: Path, name: str, dims: int, config: EvaluateConfig, cache: Path
) -> tuple[np.ndarray, str, Callable[[MaskSpec], Sample]]:
    """The reference magnitude of a file ((S, h, w) slices, or a (X, Y, Z) volume when
    ``dims`` is 3), where it comes from, and the function giving its `Sample` under a mask
    (`volume_sample` or `volume3d_sample`); ``name`` is its volume id."""
    if dims == 3:
        volume3d = prepare_volume3d(path, config.espirit)
        target, source = (
            (np.abs(volume3d.target), SENSE_TARGET)
            if config.target == "sense"
            else (volume3d.rss, volume3d.rss_source)
        )
        return target, source, lambda spec: volume3d_sample(volume3d, spec, name, target)
    volume = prepare_volume(path, cache, config.espirit)
    target, source = reference_image(volume, config.target)
    return target, source, lambda spec: volume_sample(volume, spec, name, reference=target)


def check_dims(
    files: list[Path], config: EvaluateConfig, networks: dict[Path, int] | None = None
) -> int:
    """The number of spatial axes of the data: ``config.dims``, or when 0 what the files
    are (2: fastMRI multi-slice files, 3: 3D volume files; a mix is refused). For 3D, masks
    that cannot sample (ky, kz) are refused. ``networks`` (model file -> its convolutions'
    spatial axes) must match the data: a 2D network on 3D volumes (one trained with
    ``--dims 3 --decoupled`` belongs on the decoupled view) and a 3D one on slices are
    refused. A file of the other kind is refused by its reader."""
    found = {file_dims(path) for path in files}
    if not config.dims and len(found) > 1:
        raise CvxmriError(f"{config.data}: mixes 2D multi-slice and 3D volume files")
    dims = config.dims or found.pop()
    for path, ndim in (networks or {}).items():
        if ndim == dims:
            continue
        if dims == 3:
            raise CvxmriError(
                f"{path}: a 2D network on 3D volumes; a network trained with --dims 3 "
                f"--decoupled is evaluated on the decoupled view (--data "
                f"{Path(config.data) / 'decoupled'})"
            )
        raise CvxmriError(
            f"{path}: a 3D network (trained with --dims 3) on 2D slices; evaluate it on 3D "
            "volume files"
        )
    if dims == 2:
        return 2
    for spec in config.masks:
        if spec.kind == "file":
            raise CvxmriError("mask 'file': 3D volume files store no mask; use poisson or random")
        spec.validate(ndim=3)
    return 3


def model_file(path: Path) -> Path:
    """A network file: ``path`` itself, or ``path/model.pt`` when ``path`` is a run folder."""
    return path / "model.pt" if path.is_dir() else path


def model_label(path: Path) -> str:
    """A method name for a saved network: its run folder, and its depth if not the final."""
    return path.parent.name if path.stem == "model" else f"{path.parent.name}/{path.stem}"


def evaluate(config: EvaluateConfig, out: Path) -> dict[str, object]:
    """Run every method on every mask over the split; write CSV/JSON into ``out``; return the
    summary."""
    from cvxmri.training.trainer import resolve_device

    config.validate()
    device = resolve_device(config.device)
    files = find_files(config.data, config.split)
    paths = [model_file(Path(p)) for p in config.models]
    networks = {path: load_network(path, map_location=device).eval() for path in paths}
    dims = check_dims(files, config, {path: model.ndim for path, model in networks.items()})
    cache = Path(config.cache) if config.cache else default_cache_dir(config.data)
    reconstructors = {
        m: classical_reconstructor(m, config.cs, config.cg_sense) for m in config.methods
    }
    for path, model in networks.items():
        reconstructors[model_label(path)] = network_reconstructor(model)
    slice_rows: list[dict[str, object]] = []
    volume_rows: list[dict[str, object]] = []
    seconds = {(m, s.describe()): 0.0 for m in reconstructors for s in config.masks}
    sources: list[str] = []
    for path in tqdm(files, desc=f"evaluate {config.split}", unit="file", disable=None):
        name = volume_id(path, config.data)
        target, source, sample_of = prepare_file(path, name, dims, config, cache)
        sources.append(source)
        for spec in config.masks:
            sample = sample_of(spec)
            for method, reconstruct in reconstructors.items():
                start = time.perf_counter()
                image = reconstruct(sample)
                seconds[(method, spec.describe())] += time.perf_counter() - start
                # A 3D volume is a batch of one: its metrics cut it along the readout.
                pred = magnitude(image, sample).reshape(target.shape)
                key = {"method": method, "mask": spec.describe(), "file": name}
                per_volume = volume_metrics(target, pred)
                volume_rows.append({**key, **per_volume})
                per_slice = slice_metrics(target, pred)
                for index in range(len(pred)):
                    row = {metric: per_slice[metric][index] for metric in METRICS}
                    slice_rows.append({**key, "slice": index, **row})
                log.info("%s %s %s: %s", method, spec.describe(), name, per_volume)
    summary = summarise(slice_rows, volume_rows, seconds, config)
    note_training_masks(summary, paths)
    summary["target_source"] = (
        sources[0]
        if len(set(sources)) == 1
        else "mixed: "
        + ", ".join(
            f"{source} in {sources.count(source)} of {len(sources)} files"
            for source in sorted(set(sources))
        )
    )
    write_results(out, slice_rows, volume_rows, summary)
    return summary


def note_training_masks(summary: dict[str, object], paths: list[Path]) -> None:
    """Give every network's result its training mask (``trained_mask``, from its run
    folder's ``config.yaml``, where known) and, where it was evaluated on another mask, a
    ``note`` saying so (`format_table` prints it under the table)."""
    from cvxmri.predict import training_mask

    trained = {model_label(path): training_mask(str(path)) for path in paths}
    for entry in summary["results"]:  # type: ignore[attr-defined]
        spec = trained.get(entry["method"])
        if spec is None:
            continue
        entry["trained_mask"] = spec.describe()
        if spec.describe() != entry["mask"]:
            entry["note"] = f"trained on {spec.describe()}, evaluated on {entry['mask']}"


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def summarise(
    slice_rows: list[dict[str, object]],
    volume_rows: list[dict[str, object]],
    seconds: dict[tuple[str, str], float],
    config: EvaluateConfig,
) -> dict[str, object]:
    """Mean and spread per method and mask, for both metric conventions."""
    results = []
    for method, mask in seconds:
        entry: dict[str, object] = {"method": method, "mask": mask}
        for scope, rows in (("volume", volume_rows), ("slice", slice_rows)):
            chosen = [r for r in rows if r["method"] == method and r["mask"] == mask]
            entry[scope] = {m: _stats([float(r[m]) for r in chosen]) for m in METRICS}  # type: ignore[arg-type]
        entry["seconds"] = seconds[(method, mask)]
        results.append(entry)
    return {"split": config.split, "target": config.target, "results": results}


def write_results(
    out: Path,
    slice_rows: list[dict[str, object]],
    volume_rows: list[dict[str, object]],
    summary: dict[str, object],
) -> None:
    """per_slice.csv, per_volume.csv and summary.json."""
    for name, rows in (("per_slice.csv", slice_rows), ("per_volume.csv", volume_rows)):
        with (out / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def format_table(summary: dict[str, object]) -> str:
    """The summary as a fixed-width table: volume metrics (fastMRI) and slice-based ones,
    then a note line for each network evaluated on a mask it was not trained on."""
    results = summary["results"]  # type: ignore[index]
    width = max([len("method"), *(len(str(e["method"])) for e in results)])  # type: ignore[union-attr]
    header = (
        f"{'method':<{width}} {'mask':<28} {'PSNR vol':>14} {'SSIM vol':>15} "
        f"{'PSNR slice':>14} {'SSIM slice':>15} {'NMSE vol':>9} {'time s':>7}"
    )
    lines = [header, "-" * len(header)]
    for entry in results:  # type: ignore[union-attr]
        vol, sl = entry["volume"], entry["slice"]
        lines.append(
            f"{entry['method']:<{width}} {entry['mask']:<28} "
            f"{vol['psnr']['mean']:>7.2f} ± {vol['psnr']['std']:<4.2f} "
            f"{vol['ssim']['mean']:>7.4f} ± {vol['ssim']['std']:<5.4f} "
            f"{sl['psnr']['mean']:>7.2f} ± {sl['psnr']['std']:<4.2f} "
            f"{sl['ssim']['mean']:>7.4f} ± {sl['ssim']['std']:<5.4f} "
            f"{vol['nmse']['mean']:>9.5f} {entry['seconds']:>7.1f}"
        )
    for entry in results:  # type: ignore[union-attr]
        if entry.get("note"):
            lines.append(f"note: {entry['method']} was {entry['note']}")
    return "\n".join(lines)
