"""Evaluate reconstruction methods on a split: per-slice and per-volume PSNR, SSIM, NMSE.

Each file gets one deterministic mask, seeded from its name (fastMRI's convention for
evaluation), shared by all its slices and by every method, so methods see identical inputs.
Metrics follow fastMRI: per volume, PSNR and SSIM with ``data_range`` = the volume's
maximum (SSIM averaged over slices), plus the slice-based variants (``data_range`` = the
slice's maximum) that the paper reports.
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
    coil_support,
    evaluation_mask,
    find_files,
    normalisation_scale,
    prepare_volume,
)
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.metrics import slice_metrics, volume_metrics
from cvxmri.models.cnn import ReconCNN, to_channels, to_complex
from cvxmri.physics import CenterCrop, Sense, center_crop
from cvxmri.recon import CLASSICAL_METHODS, CSConfig, cs_l1_wavelet, zero_filled_sense

log = logging.getLogger(__name__)

# (masked k-space (B, C, H, W), maps (B, C, H, W), mask (H, W)) -> images (B, H, W)
Reconstructor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METRICS = ("psnr", "ssim", "nmse")


@dataclass
class EvaluateConfig:
    """What `cvxmri evaluate` runs.

    Attributes:
        data: dataset root with ``multicoil_<split>/`` folders.
        split: which split.
        methods: reconstruction methods.
        masks: sampling masks, each evaluated separately.
        target: ``sense`` (magnitude of the SENSE-combined image) or ``rss`` (fastMRI's).
        models: trained networks (``model.pt`` files, or run folders meaning their
            ``model.pt``) evaluated beside the methods.
        cs: compressed-sensing settings.
        espirit: coil-map settings.
        cache: where coil maps are cached; ``<data>/cache`` when empty.
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
    espirit: EspiritConfig = field(default_factory=EspiritConfig)
    cache: str = ""

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings."""
        for method in self.methods:
            if method not in CLASSICAL_METHODS:
                raise CvxmriError(
                    f"unknown method {method!r} (choose from {', '.join(CLASSICAL_METHODS)})"
                )
        for mask in self.masks:
            mask.validate()
        if self.target not in ("sense", "rss"):
            raise CvxmriError(f"unknown target {self.target!r} (choose sense or rss)")
        if not (self.cs.lamda > 0 and math.isfinite(self.cs.lamda)):
            raise CvxmriError(f"CS lambda must be a positive number, got {self.cs.lamda}")
        if self.cs.iterations < 1:
            raise CvxmriError(f"CS iterations must be >= 1, got {self.cs.iterations}")


def classical_reconstructor(method: str, cs: CSConfig) -> Reconstructor:
    """The reconstruction function of a classical method."""
    if method == "zero-filled":
        return zero_filled_sense
    return lambda kspace, maps, mask: cs_l1_wavelet(kspace, maps, mask, cs)


def network_reconstructor(model: ReconCNN, recon_shape: tuple[int, int]) -> Reconstructor:
    """A trained network as a reconstruction method: zero-filled SENSE image, cropped to
    the recon matrix, through the network, zero-padded back to the k-space grid."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x0 = zero_filled_sense(kspace, maps, mask)
        crop = CenterCrop((x0.shape[-2], x0.shape[-1]), recon_shape)
        image = model(to_channels(crop(x0)).to(device)).cpu()
        return crop.H(to_complex(image))

    return run


def model_file(path: Path) -> Path:
    """A network file: ``path`` itself, or ``path/model.pt`` when ``path`` is a run folder."""
    return path / "model.pt" if path.is_dir() else path


def model_label(path: Path) -> str:
    """A method name for a saved network: its run folder, and its depth if not the final."""
    return path.parent.name if path.stem == "model" else f"{path.parent.name}/{path.stem}"


def evaluate(config: EvaluateConfig, out: Path) -> dict[str, object]:
    """Run every method on every mask over the split; write CSV/JSON into ``out``; return the
    summary."""
    config.validate()
    files = find_files(config.data, config.split)
    cache = Path(config.cache) if config.cache else Path(config.data) / "cache"
    reconstructors = {m: classical_reconstructor(m, config.cs) for m in config.methods}
    paths = [model_file(Path(p)) for p in config.models]
    networks = {model_label(p): ReconCNN.load(p).eval() for p in paths}
    slice_rows: list[dict[str, object]] = []
    volume_rows: list[dict[str, object]] = []
    labels = [*config.methods, *networks]
    seconds = {(m, s.describe()): 0.0 for m in labels for s in config.masks}
    for path in tqdm(files, desc=f"evaluate {config.split}", unit="file", disable=None):
        volume = prepare_volume(path, cache, config.espirit)
        target = np.abs(volume.target) if config.target == "sense" else volume.rss
        kspace = torch.from_numpy(volume.kspace)
        maps = torch.from_numpy(volume.maps)
        support = coil_support(maps)
        for label, network in networks.items():
            reconstructors[label] = network_reconstructor(network, volume.recon_shape)
        for spec in config.masks:
            mask_np = evaluation_mask(
                spec, volume.name, kspace.shape[-2:], volume.padding, volume.mask
            )
            mask = torch.from_numpy(mask_np.astype(np.float32))
            masked = kspace * mask
            scale = normalisation_scale(Sense(maps, mask).H(masked), volume.recon_shape)
            masked = masked / scale[:, None, None, None]
            for method, reconstruct in reconstructors.items():
                start = time.perf_counter()
                image = reconstruct(masked, maps, mask) * support
                seconds[(method, spec.describe())] += time.perf_counter() - start
                pred = (center_crop(image, volume.recon_shape).abs() * scale[:, None, None]).numpy()
                key = {"method": method, "mask": spec.describe(), "file": volume.name}
                per_volume = volume_metrics(target, pred)
                volume_rows.append({**key, **per_volume})
                per_slice = slice_metrics(target, pred)
                for index in range(len(pred)):
                    row = {name: per_slice[name][index] for name in METRICS}
                    slice_rows.append({**key, "slice": index, **row})
                log.info("%s %s %s: %s", method, spec.describe(), volume.name, per_volume)
    summary = summarise(slice_rows, volume_rows, seconds, config)
    write_results(out, slice_rows, volume_rows, summary)
    return summary


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
    """The summary as a fixed-width table: volume metrics (fastMRI) and slice-based ones."""
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
    return "\n".join(lines)
