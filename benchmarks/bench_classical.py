"""The classical baselines side by side, and against BART's ``pics`` when it is installed:
volume PSNR/SSIM and wall time per method and mask; a table printed (Markdown) and written
to ``benchmarks/results/classical.json``.

Usage: .venv/bin/python benchmarks/bench_classical.py [--split test] [--bart-lamda L ...]

Every method reconstructs the same `Sample` per volume and mask that `cvxmri evaluate`
builds (`cvxmri.evaluate.volume_sample`: the per-file masks seeded from the file name), and
is scored as `evaluate` scores it (`volume_metrics` against the SENSE magnitude, mean over
volumes). Methods: zero-filled; CS without shifts (sigpy's `L1WaveletRecon`, the solver
before cycle spinning, at its old default lamda 3e-3); CS with random shifts at the default
lamda and at the per-mask lamdas of `cvxmri reproduce` (`classical_settings`); CG-SENSE
likewise; and, when the ``bart`` command is on the PATH (Debian: ``apt-get install bart``;
never needed otherwise), ``bart pics -l1 -r L -i N -w 1`` with and without ``-n`` (no
random shifts) on the same normalised k-space, maps and sampling pattern, written as
.cfl/.hdr files. ``-w 1`` keeps BART from rescaling the data, so its ``L`` is in the units
of ``CSConfig.lamda``; BART's lamda is chosen per mask on the validation split from
``--bart-lamda`` (by default the CS grid of docs/benchmarks.md from 1e-3 to 7.5e-3),
then run on ``--split`` (``-n`` at the same lamda). BART runs
on one OpenMP thread, torch on its default threads. Timings share the machine with
whatever else runs on it: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

from cvxmri.data.prepare import (
    EspiritConfig,
    default_cache_dir,
    find_files,
    prepare_volume,
    volume_id,
)
from cvxmri.data.sample import Sample
from cvxmri.evaluate import magnitude, volume_sample
from cvxmri.masks import MaskSpec
from cvxmri.metrics import volume_metrics
from cvxmri.physics import center_crop
from cvxmri.recon import CSConfig, cg_sense, compressed_sensing, zero_filled
from cvxmri.reproduce import ReproduceConfig, classical_settings
from cvxmri.runs import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "classical.json"
MASKS = (MaskSpec("poisson", 4.0), MaskSpec("cartesian", 4.0, 0.04))
OLD_CS = CSConfig(lamda=3e-3, shifts=False)
BART_LAMDAS = (1e-3, 1.33e-3, 1.78e-3, 2.37e-3, 3.16e-3, 4.22e-3, 5.62e-3, 7.5e-3)
# One OpenMP thread: on 2 cores shared with other jobs, BART's spinning OpenMP threads make
# one pics call 60x slower (0.7 s against 43 s, measured).
BART_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

Reconstruct = Callable[[Sample], np.ndarray]


def write_cfl(base: Path, array: np.ndarray) -> None:
    """BART's format: ``base.hdr`` (the dimensions) and ``base.cfl`` (complex64 samples,
    first axis fastest)."""
    base.with_suffix(".hdr").write_text(
        "# Dimensions\n" + " ".join(str(n) for n in array.shape) + "\n"
    )
    np.asarray(array, dtype=np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


def read_cfl(base: Path) -> np.ndarray:
    """An array written by BART (`write_cfl`'s format)."""
    dims = [int(n) for n in base.with_suffix(".hdr").read_text().splitlines()[1].split()]
    data = np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")


def bart_pics(
    sample: Sample, lamda: float, iterations: int, shifts: bool, folder: Path
) -> np.ndarray:
    """``bart pics -l1`` of every slice of ``sample`` (its normalised k-space, maps and
    mask, BART's axes: x, y, z, coil), cropped to the recon matrix and restricted to the
    coil support like cvxmri's methods: complex (B, h, w)."""
    images = []
    for index in range(len(sample)):
        write_cfl(folder / "ksp", sample.y[index].numpy().transpose(1, 2, 0)[:, :, None, :])
        write_cfl(folder / "sens", sample.maps[index].numpy().transpose(1, 2, 0)[:, :, None, :])
        pattern = np.broadcast_to(sample.mask[index, 0].numpy(), sample.y.shape[-2:])
        write_cfl(folder / "pat", pattern[:, :, None, None].astype(np.complex64))
        command = ["bart", "pics", "-l1", "-r", str(lamda), "-i", str(iterations), "-w", "1"]
        command += ["-p", str(folder / "pat")] + ([] if shifts else ["-n"])
        command += [str(folder / "ksp"), str(folder / "sens"), str(folder / "out")]
        subprocess.run(command, check=True, capture_output=True, env=BART_ENV)
        images.append(read_cfl(folder / "out").reshape(sample.y.shape[-2:]))
    full = np.stack(images)
    cropped = center_crop(torch.from_numpy(full), sample.recon_shape)
    return cropped * sample.support[:, 0]


@dataclass
class Volume:
    """One volume's samples (one per mask) and its reference magnitude."""

    name: str
    samples: dict[str, Sample]
    target: np.ndarray


def load_split(data: str, split: str) -> list[Volume]:
    """Every volume of the split with its per-file evaluation masks (as `evaluate`)."""
    volumes = []
    for path in find_files(data, split):
        prepared = prepare_volume(path, default_cache_dir(data), EspiritConfig())
        target = np.abs(prepared.target)
        name = volume_id(path, data)
        samples = {
            spec.describe(): volume_sample(prepared, spec, name, reference=target) for spec in MASKS
        }
        volumes.append(Volume(name, samples, target))
    return volumes


def score(volumes: list[Volume], reconstruct: dict[str, Reconstruct]) -> dict[str, object]:
    """Per mask (``reconstruct`` maps a mask's description to its method): volume
    PSNR/SSIM means over the volumes and the total wall time."""
    result: dict[str, object] = {}
    for spec in MASKS:
        mask = spec.describe()
        rows, seconds = [], 0.0
        for volume in volumes:
            sample = volume.samples[mask]
            start = time.perf_counter()
            image = reconstruct[mask](sample)
            seconds += time.perf_counter() - start
            rows.append(volume_metrics(volume.target, magnitude(image, sample)))
        result[mask] = {
            "psnr": float(np.mean([r["psnr"] for r in rows])),
            "psnr_std": float(np.std([r["psnr"] for r in rows])),
            "ssim": float(np.mean([r["ssim"] for r in rows])),
            "seconds": seconds,
        }
    return result


def per_mask(make: Callable[[MaskSpec], Reconstruct]) -> dict[str, Reconstruct]:
    """``make(mask)`` for every mask, keyed by its description."""
    return {spec.describe(): make(spec) for spec in MASKS}


def cvxmri_methods(iterations: int) -> dict[str, tuple[str, dict[str, Reconstruct]]]:
    """cvxmri's classical methods: (settings, reconstruction per mask) by name."""
    default = ReproduceConfig(cs=CSConfig(iterations=iterations))
    old = CSConfig(lamda=OLD_CS.lamda, iterations=iterations, shifts=False)
    tuned = {spec.describe(): classical_settings(default, spec) for spec in MASKS}
    tuned_text = "; ".join(f"{spec.kind} {tuned[spec.describe()][0].lamda:g}" for spec in MASKS)
    cg_text = "; ".join(
        f"{spec.kind} {tuned[spec.describe()][1].lamda:g}, "
        f"{tuned[spec.describe()][1].iterations} it"
        for spec in MASKS
    )
    return {
        "zero-filled": ("", per_mask(lambda _: zero_filled)),
        "cs, no shifts (before)": (
            f"lamda {old.lamda:g}",
            per_mask(lambda _: lambda s: compressed_sensing(s, old)),
        ),
        "cs, shifts, one lamda": (
            f"lamda {default.cs.lamda:g}",
            per_mask(lambda _: lambda s: compressed_sensing(s, default.cs)),
        ),
        "cs, shifts, lamda per mask": (
            f"lamda {tuned_text}",
            {m: lambda s, cs=cs: compressed_sensing(s, cs) for m, (cs, _) in tuned.items()},
        ),
        "cg-sense, one setting": (
            f"lamda {default.cg_sense.lamda:g}, {default.cg_sense.iterations} it",
            per_mask(lambda _: lambda s: cg_sense(s, default.cg_sense)),
        ),
        "cg-sense, per mask": (
            f"lamda, it: {cg_text}",
            {m: lambda s, cg=cg: cg_sense(s, cg) for m, (_, cg) in tuned.items()},
        ),
    }


def main() -> None:
    """Run every method on the split (BART's lamda chosen on val first) and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/default")
    parser.add_argument("--split", default="test")
    parser.add_argument("--iterations", type=int, default=CSConfig().iterations)
    parser.add_argument("--bart-lamda", type=float, nargs="+", default=list(BART_LAMDAS))
    args = parser.parse_args()
    test = load_split(args.data, args.split)
    methods = cvxmri_methods(args.iterations)
    record: dict[str, object] = {
        "date": date.today().isoformat(),
        "split": args.split,
        "iterations": args.iterations,
        "environment": environment(),
    }
    bart = shutil.which("bart")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if bart is None:
            record["bart"] = "not installed: BART rows skipped"
        else:
            version = subprocess.run(["bart", "version"], capture_output=True, text=True)
            record["bart"] = version.stdout.strip()
            val = load_split(args.data, "val")
            grid = {}
            for lamda in args.bart_lamda:
                run = per_mask(
                    lambda _, lam=lamda: lambda s: bart_pics(s, lam, args.iterations, True, folder)
                )
                grid[lamda] = score(val, run)
                print(f"BART val lamda {lamda:g}: {json.dumps(grid[lamda])}", flush=True)
            best = {
                spec.describe(): max(grid, key=lambda lam: grid[lam][spec.describe()]["psnr"])
                for spec in MASKS
            }
            record["bart_val_grid"] = {f"{lam:g}": rows for lam, rows in grid.items()}
            record["bart_lamda"] = best
            text = "; ".join(f"{spec.kind} {best[spec.describe()]:g}" for spec in MASKS)
            for name, shifts in (("bart pics -l1", True), ("bart pics -l1 -n", False)):
                methods[name] = (
                    f"lamda {text} (best on val)",
                    {
                        m: lambda s, lam=lam, sh=shifts: bart_pics(
                            s, lam, args.iterations, sh, folder
                        )
                        for m, lam in best.items()
                    },
                )
        results = {}
        for method, (settings, reconstruct) in methods.items():
            results[method] = {"settings": settings, **score(test, reconstruct)}
            print(f"{method}: {json.dumps(results[method])}", flush=True)
    record["results"] = results
    RESULTS.write_text(json.dumps(record, indent=2))
    print(markdown(record))


def markdown(record: dict[str, object]) -> str:
    """The results as a Markdown table: one row per method, PSNR/SSIM and time per mask."""
    masks = [spec.describe() for spec in MASKS]
    lines = [
        "| method | settings | " + " | ".join(f"{m}: PSNR / SSIM, time" for m in masks) + " |",
        "|---" * (2 + len(masks)) + "|",
    ]
    for method, entry in record["results"].items():  # type: ignore[attr-defined]
        cells = [
            f"{entry[m]['psnr']:.2f} ± {entry[m]['psnr_std']:.2f} / {entry[m]['ssim']:.4f}, "
            f"{entry[m]['seconds']:.1f} s"
            for m in masks
        ]
        lines.append(f"| {method} | {entry['settings']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
