"""The certified convex CNN against Adam's and end-to-end, in one run (issue 12): training
time, certificates, validation and test metrics; print a table, write JSON and update
docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/bench_certified.py [--masks poisson cartesian]
    [--variants certified certified-pool1 adam adam-preset end-to-end] [--runs DIR]
    [--no-doc]

Every network trains on the default dataset (build it with `cvxmri data simulate`) with the
quick preset, one after the other in this process, a mask at a time in the order of
``--variants``, so that their times are comparable (this machine drifts by 15% over an
hour): ``certified`` is the preset as it is (layer-wise convex, the certified solver,
``carry``, gates selected from four times as many candidates: ``convex.gate_pool`` 4);
``certified-pool1`` the same with the gates as drawn (``gate_pool`` 1); ``adam`` the paper's
convex stages (``--solver adam``, no ``carry``, gates as drawn; the issue's comparison);
``adam-preset`` Adam on the preset's program (``carry``, selected gates); ``end-to-end`` the
end-to-end network of the same depth and width. Training seconds are the trainer's
(`metrics_val.json`: its stages' or epochs' times, validation included). Test metrics are
fastMRI's volume PSNR and SSIM on the SENSE magnitude with the fixed per-file test masks of
`cvxmri evaluate`; differences are paired over the test volumes (mean and standard error).
Run folders are kept under ``--runs`` and a finished run is reused (its time then is the
one it took when it ran).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from bench_data import DOC, add_no_doc, update_section, write_results

from cvxmri.evaluate import EvaluateConfig, evaluate
from cvxmri.masks import MaskSpec
from cvxmri.reproduce import reproduce_preset, train_config
from cvxmri.training.config import TrainConfig
from cvxmri.training.run import train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "certified.json"
MASKS = {"poisson": MaskSpec("poisson", 4.0), "cartesian": MaskSpec("cartesian", 4.0, 0.04)}
VARIANTS = ("certified", "certified-pool1", "adam", "adam-preset", "end-to-end")


def variant_config(variant: str, mask_name: str) -> TrainConfig:
    """One variant on one mask: the main job's configuration of its network
    (`cvxmri.reproduce.train_config`, quick preset), the solver, ``carry`` and the gate
    pool changed."""
    quick = reproduce_preset("quick")
    method = "end-to-end" if variant == "end-to-end" else "layerwise-convex"
    config = train_config(quick, method, MASKS[mask_name], quick.layers)
    drawn = replace(config.convex, gate_pool=1)
    if variant == "certified-pool1":
        return replace(config, convex=drawn)
    if variant == "adam":
        return replace(config, solver="adam", carry=False, convex=drawn)
    if variant == "adam-preset":
        return replace(config, solver="adam")
    return config


def run_one(runs: Path, mask_name: str, variant: str) -> dict[str, object]:
    """Train (or reuse) one network; its time, validation metrics and certificates."""
    out = runs / mask_name / variant
    if not (out / "model.pt").exists():
        began = time.perf_counter()
        train(variant_config(variant, mask_name), out, resume=out.exists())
        print(f"{mask_name} {variant}: trained in {time.perf_counter() - began:.0f} s")
    metrics = json.loads((out / "metrics_val.json").read_text())
    certificates = json.loads((out / "certificates.json").read_text())
    selected = [c for c in certificates if c.get("selected")]
    return {
        "mask": mask_name,
        "variant": variant,
        "train_seconds": metrics["train_seconds"],
        "val_psnr": metrics["final"]["val_psnr"],
        "selected_gaps": [c["relative_gap"] for c in selected],
        "run": str(out),
    }


def test_metrics(runs: Path, mask_name: str, rows: list[dict]) -> None:
    """Add each row's test volume PSNR and SSIM (`cvxmri.evaluate`), per volume too."""
    out = runs / mask_name / "test"
    out.mkdir(parents=True, exist_ok=True)
    evaluate(
        EvaluateConfig(methods=[], masks=[MASKS[mask_name]], models=[r["run"] for r in rows]),
        out,
    )
    with (out / "per_volume.csv").open() as handle:
        volumes = list(csv.DictReader(handle))
    for row in rows:
        mine = [v for v in volumes if v["method"] == Path(row["run"]).name]
        row["test_psnr_volumes"] = [float(v["psnr"]) for v in mine]
        row["test_psnr"] = statistics.mean(row["test_psnr_volumes"])
        row["test_ssim"] = statistics.mean(float(v["ssim"]) for v in mine)


def paired(a: dict, b: dict) -> str:
    """Test PSNR of ``a`` minus ``b``: mean ± standard error over the volumes."""
    diffs = [x - y for x, y in zip(a["test_psnr_volumes"], b["test_psnr_volumes"], strict=True)]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.2f} ± {error:.2f}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per mask and variant, with the ratios and paired differences
    against Adam and end-to-end of the same mask."""
    lines = [
        "| mask | variant | train s | / adam | certified (largest selected gap) | val PSNR "
        "| test PSNR | test SSIM | - adam (dB) | - end-to-end (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mask_name in dict.fromkeys(r["mask"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["mask"] == mask_name}
        adam, e2e = mine.get("adam"), mine.get("end-to-end")
        for variant, row in mine.items():
            gaps = row["selected_gaps"]
            certified = "-"
            if gaps and variant.startswith("certified"):
                certified = f"{sum(g <= 1e-3 for g in gaps)}/{len(gaps)} ({max(gaps):.1e})"
            ratio = f"{row['train_seconds'] / adam['train_seconds']:.2f}" if adam else "-"
            versus_adam = paired(row, adam) if adam and variant != "adam" else "-"
            versus_e2e = paired(row, e2e) if e2e and variant != "end-to-end" else "-"
            lines.append(
                f"| {mask_name} | {variant} | {row['train_seconds']:.0f} | {ratio} | "
                f"{certified} | {row['val_psnr']:.2f} | {row['test_psnr']:.2f} | "
                f"{row['test_ssim']:.4f} | {versus_adam} | {versus_e2e} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--runs", default="runs/bench-certified")
    add_no_doc(parser)
    args = parser.parse_args()
    runs = Path(args.runs)
    rows = []
    for mask_name in args.masks:
        mine = [run_one(runs, mask_name, variant) for variant in args.variants]
        test_metrics(runs, mask_name, mine)
        rows += mine
    markdown = table(rows)
    print(markdown)
    if args.no_doc:
        return
    env = write_results(RESULTS, args=vars(args), rows=rows)
    command = (
        "`.venv/bin/python benchmarks/bench_certified.py --masks "
        + " ".join(args.masks)
        + " --variants "
        + " ".join(args.variants)
        + "`"
    )
    header = (
        "## The certified convex CNN against Adam's and end-to-end, one run (issue 12)\n\n"
        f"{date.today()}, {env['processor']} ({env['torch_threads']} torch threads), "
        f"command: {command}. Quick preset (5 layers, 32 channels, 7x7), default data, "
        "trained one after the other; `certified`: the preset (certified solver, `carry`, "
        "gates selected from 4x as many candidates, `convex.gate_pool: 4`); "
        "`certified-pool1`: the same with the gates as drawn; `adam`: the paper's convex "
        "stages (Adam, no `carry`, gates as drawn); `adam-preset`: Adam on the preset's "
        "program. Test split (fixed per-file masks), volume PSNR/SSIM on the SENSE "
        "magnitude; differences paired over the 3 test volumes (mean ± standard error). "
        "`train s`: the trainer's seconds (validation included). JSON: "
        "`benchmarks/results/certified.json`.\n\n"
    )
    update_section(DOC, "bench_certified", header + markdown)


if __name__ == "__main__":
    main()
