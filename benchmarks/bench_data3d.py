"""3D data: time the simulator and the decoupled ESPIRiT maps, compare the maps with BART's,
measure the 3D masks' acceleration and the classical baselines on the 3D test split; print
tables, write JSON and update docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/bench_data3d.py [--no-doc]

Steps, all on the default 3D dataset (``cvxmri data simulate --dims 3``, simulated into a
temporary folder):

1. Simulation time of the whole default dataset.
2. Decoupled ESPIRiT (`cvxmri.data.espirit.espirit_decoupled`) of one test slab, timed, and
   compared, when the ``bart`` command is installed, with ``bart ecalib -m1`` (same
   parameters) run (a) on every readout position's (ky, kz) plane after the readout inverse
   FFT, the same algorithm in BART, and (b) on the 3D k-space at once, BART's 3D ESPIRiT.
   Agreement, on the voxels of the object (root-sum-of-squares above a tenth of its
   maximum; the slab's planes beyond the head hold noise only, and both fit maps to it):
   `bench_data.projection_difference` of BART's maps against ours (the part of BART's maps
   outside the span of ours, voxel by voxel, relative; blind to a per-voxel phase) and the
   fraction of those voxels where exactly one of the two is zero (the crop). BART's 3D
   ESPIRiT with the crop of 0.95 returns zero maps on this 12-position slab (its
   eigenvalues stay below the crop), so it also runs with ``-c 0``.
3. The realised acceleration of the evaluation masks of every test file.
4. Zero-filled, CG-SENSE and CS (3D wavelet) on the test split (`cvxmri.evaluate.evaluate`)
   with their 2D default settings, and with settings chosen on the validation split by a
   small grid (best mean volume PSNR): CS ``lamda`` and CG-SENSE iterations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from bench_data import projection_difference, read_cfl, write_cfl

from cvxmri.data.espirit import espirit, espirit_decoupled
from cvxmri.data.prepare import EspiritConfig, evaluation_mask, find_files
from cvxmri.data.simulate import default_sources
from cvxmri.data.simulate3d import Simulation3DConfig, simulate_dataset3d
from cvxmri.data.volume3d import read_volume3d, rss_volume
from cvxmri.evaluate import EvaluateConfig, evaluate
from cvxmri.masks import MaskSpec, realised_acceleration
from cvxmri.physics import ifft_readout
from cvxmri.recon import CGSenseConfig, CSConfig
from cvxmri.runs import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data3d.json"
DOC = ROOT / "docs" / "benchmarks.md"
ESPIRIT = EspiritConfig()
MASKS = [MaskSpec("poisson", 4.0), MaskSpec("random", 4.0), MaskSpec("poisson", 8.0)]
CS_LAMBDAS = (1e-3, 2e-3, 3.65e-3, 7e-3, 1.5e-2)
CG_ITERATIONS = (4, 6, 10, 15)


def bart_ecalib(kspace: np.ndarray, folder: Path, crop: float = ESPIRIT.crop) -> np.ndarray:
    """``bart ecalib -m1`` maps of k-space given as (x, y, z, coils) (BART's order), with
    `ESPIRIT`'s parameters but ``crop``; returned in the same order."""
    write_cfl(folder / "kspace", kspace)
    command = ["bart", "ecalib", "-m1", "-r", str(ESPIRIT.calib_width)]
    command += ["-k", str(ESPIRIT.kernel_width), "-t", f"{ESPIRIT.thresh:g}"]
    command += ["-c", f"{crop:g}", str(folder / "kspace"), str(folder / "maps")]
    subprocess.run(command, check=True, capture_output=True)
    return read_cfl(folder / "maps").reshape(kspace.shape)


def agreement_row(name: str, maps: np.ndarray, ours: np.ndarray, inside: np.ndarray) -> dict:
    """How BART's ``maps`` (C, X, Y, Z) agree with ``ours`` on the object's voxels
    ``inside``: the projection difference and the fraction where exactly one is zero."""
    support = (np.abs(maps).sum(axis=0) > 0) != (np.abs(ours).sum(axis=0) > 0)
    zero = not np.any(maps * inside)
    return {
        "maps": name,
        "reference": "decoupled (torch)",
        "projection_difference": None
        if zero
        else projection_difference(maps * inside, ours * inside),
        "support_mismatch": float(support[inside].mean()),
        "nonzero": float((np.abs(maps).sum(axis=0) > 0).mean()),
    }


def maps_rows(path: Path) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Time the decoupled maps of one file and compare them with BART's on the voxels of
    the object (root-sum-of-squares above a tenth of its maximum: planes of noise alone,
    beyond the head, give noise-fitted maps in both)."""
    volume = read_volume3d(path)
    kspace = volume.kspace
    coils, *grid = kspace.shape
    size = f"{'x'.join(map(str, grid))}, {coils} coils"
    tensor = torch.from_numpy(kspace)
    start = time.perf_counter()
    ours = espirit_decoupled(tensor).numpy()
    rows: list[dict[str, object]] = [
        {"step": "decoupled ESPIRiT (torch)", "size": size, "seconds": time.perf_counter() - start}
    ]
    if not shutil.which("bart"):
        return rows, []
    rss = volume.target if volume.target is not None else rss_volume(kspace)
    inside = rss > 0.1 * rss.max()
    hybrid = ifft_readout(tensor).numpy()  # (C, x, ky, kz)
    three_d = kspace.transpose(1, 2, 3, 0)
    agreement = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            (
                "bart ecalib -m1 per readout plane",
                lambda: np.stack(
                    [
                        bart_ecalib(hybrid[:, x].transpose(1, 2, 0)[:, :, None], Path(tmp))[
                            :, :, 0
                        ].transpose(2, 0, 1)
                        for x in range(grid[0])
                    ],
                    axis=1,
                ),
            ),
            (
                "bart ecalib -m1 3D",
                lambda: bart_ecalib(three_d, Path(tmp)).transpose(3, 0, 1, 2),
            ),
            (
                "bart ecalib -m1 -c 0 3D (no crop)",
                lambda: bart_ecalib(three_d, Path(tmp), crop=0.0).transpose(3, 0, 1, 2),
            ),
        ]
        for name, run in runs:
            start = time.perf_counter()
            maps = run()
            rows.append({"step": name, "size": size, "seconds": time.perf_counter() - start})
            agreement.append({**agreement_row(name, maps, ours, inside), "size": size})
    # The per-plane torch maps are `espirit` on the hybrid planes: checked, not assumed.
    check = espirit(torch.from_numpy(hybrid).movedim(1, 0)).movedim(0, 1).numpy()
    assert np.allclose(check, ours, atol=1e-5)
    return rows, agreement


def mask_rows(files: list[Path]) -> list[dict[str, object]]:
    """Realised acceleration of the evaluation masks of ``files``, per mask: min and max."""
    rows = []
    for spec in MASKS:
        accelerations = [
            realised_acceleration(
                evaluation_mask(spec, path.name, read_volume3d(path).grid[1:], None, ndim=3)
            )
            for path in files
        ]
        rows.append(
            {
                "mask": spec.describe(),
                "requested": spec.acceleration,
                "min": min(accelerations),
                "max": max(accelerations),
            }
        )
    return rows


def mean_psnr(summary: dict[str, object], method: str, mask: str) -> float:
    """The mean volume PSNR of one method and mask of an evaluation summary."""
    for entry in summary["results"]:  # type: ignore[attr-defined]
        if entry["method"] == method and entry["mask"] == mask:
            return float(entry["volume"]["psnr"]["mean"])
    raise KeyError((method, mask))


def validation_psnr(config: EvaluateConfig, method: str, folder: Path) -> float:
    """The mean validation volume PSNR of ``method`` over `MASKS` with ``config``."""
    folder.mkdir()
    summary = evaluate(replace(config, split="val", methods=[method]), folder)
    return float(np.mean([mean_psnr(summary, method, m.describe()) for m in MASKS]))


def tune(data: Path, work: Path) -> tuple[CSConfig, CGSenseConfig, dict[str, object]]:
    """CS ``lamda`` and CG-SENSE iterations with the best mean validation PSNR over
    `MASKS`."""
    base = EvaluateConfig(data=str(data), masks=MASKS)
    cs = {
        lamda: validation_psnr(replace(base, cs=CSConfig(lamda=lamda)), "cs", work / f"cs{lamda:g}")
        for lamda in CS_LAMBDAS
    }
    cg = {
        n: validation_psnr(
            replace(base, cg_sense=CGSenseConfig(iterations=n)), "cg-sense", work / f"cg{n}"
        )
        for n in CG_ITERATIONS
    }
    scores: dict[str, object] = {
        "cs_lamda": {f"{k:g}": v for k, v in cs.items()},
        "cg_iterations": {str(k): v for k, v in cg.items()},
    }
    return (
        CSConfig(lamda=max(cs, key=cs.__getitem__)),
        CGSenseConfig(iterations=max(cg, key=cg.__getitem__)),
        scores,
    )


def baseline_rows(
    data: Path, work: Path, cs: CSConfig, cg: CGSenseConfig
) -> list[dict[str, object]]:
    """The three methods on the test split, with the default and with the tuned settings."""
    rows = []
    for label, config in (
        ("2D defaults", EvaluateConfig(data=str(data), masks=MASKS)),
        ("tuned on val", EvaluateConfig(data=str(data), masks=MASKS, cs=cs, cg_sense=cg)),
    ):
        folder = work / f"test-{label.replace(' ', '-')}"
        folder.mkdir()
        summary = evaluate(config, folder)
        for entry in summary["results"]:  # type: ignore[attr-defined]
            rows.append(
                {
                    "settings": label,
                    "method": entry["method"],
                    "mask": entry["mask"],
                    "psnr": entry["volume"]["psnr"]["mean"],
                    "psnr_std": entry["volume"]["psnr"]["std"],
                    "ssim": entry["volume"]["ssim"]["mean"],
                    "volumes": entry["volume"]["psnr"]["n"],
                    "seconds": entry["seconds"],
                }
            )
    return rows


def markdown(results: dict[str, object]) -> str:
    """The results as Markdown tables."""
    lines = ["| step | size | time |", "|---|---|---|"]
    lines += [
        f"| {r['step']} | {r['size']} | {float(r['seconds']):.2f} s |"  # type: ignore[arg-type]
        for r in results["timings"]  # type: ignore[attr-defined]
    ]
    lines += [
        "",
        "| maps | reference | size | projection difference (object) | support mismatch "
        "(object) | non-zero voxels |",
        "|---|---|---|---|---|---|",
    ]
    lines += (
        [
            f"| {r['maps']} | {r['reference']} | {r['size']} | "
            + (
                "(all zero)"
                if r["projection_difference"] is None
                else f"{float(r['projection_difference']):.2e}"  # type: ignore[arg-type]
            )
            + f" | {100 * float(r['support_mismatch']):.2f}% | "  # type: ignore[arg-type]
            f"{100 * float(r['nonzero']):.1f}% |"  # type: ignore[arg-type]
            for r in results["agreement"]  # type: ignore[attr-defined]
        ]
        or ["| (bart not installed) | | | | | |"]
    )
    lines += ["", "| mask | realised acceleration, test files (min to max) |", "|---|---|"]
    lines += [
        f"| {r['mask']} | {float(r['min']):.3f} to {float(r['max']):.3f} |"  # type: ignore[arg-type]
        for r in results["masks"]  # type: ignore[attr-defined]
    ]
    tuned = results["tuned"]
    lines += [
        "",
        f"Tuned on the validation split: CS lambda {tuned['cs_lamda']:g}, "  # type: ignore[index]
        f"CG-SENSE {tuned['cg_iterations']} iterations "  # type: ignore[index]
        "(defaults: 3.65e-3 and 6).",
        "",
        "| settings | method | mask | PSNR (volume) | SSIM (volume) | volumes | time s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['settings']} | {r['method']} | {r['mask']} | {float(r['psnr']):.2f} ± "  # type: ignore[arg-type]
        f"{float(r['psnr_std']):.2f} | {float(r['ssim']):.4f} | {r['volumes']} | "  # type: ignore[arg-type]
        f"{float(r['seconds']):.1f} |"  # type: ignore[arg-type]
        for r in results["baselines"]  # type: ignore[attr-defined]
    ]
    return "\n".join(lines)


def main() -> None:
    """Run, print, save."""
    from bench_data import update_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        simulate_dataset3d(default_sources(dims=3), work / "data", Simulation3DConfig())
        timings: list[dict[str, object]] = [
            {
                "step": "data simulate --dims 3 (defaults: 3 volumes, 12 files)",
                "size": "80x96x80, 8 coils",
                "seconds": time.perf_counter() - start,
            }
        ]
        tests = find_files(work / "data", "test")
        rows, agreement = maps_rows(tests[-1])
        cs, cg, scores = tune(work / "data", work)
        results: dict[str, object] = {
            "date": str(date.today()),
            "environment": {**environment(), "torch_threads": str(torch.get_num_threads())},
            "timings": timings + rows,
            "agreement": agreement,
            "masks": mask_rows(tests),
            "tuned": {"cs_lamda": cs.lamda, "cg_iterations": cg.iterations, "scores": scores},
            "baselines": baseline_rows(work / "data", work, cs, cg),
        }
    text = markdown(results)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    if not args.no_doc:
        env = results["environment"]
        header = (
            "## 3D data: simulation, coil maps, masks and classical baselines\n\n"
            f"{date.today()}, {env['processor']} ({env['torch_threads']} torch threads), "  # type: ignore[index]
            "command: `OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python "
            "benchmarks/bench_data3d.py`; one run, wall time. JSON: "
            "`benchmarks/results/data3d.json`. Test split: 3 slabs (12 readout positions "
            "each, one per volume), PSNR with the volume's maximum, SSIM averaged over the "
            "readout planes, target the SENSE magnitude.\n\n"
        )
        update_section(DOC, "bench_data3d", header + text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
