"""Unrolled networks against compressed sensing: the three ways to train them, test
metrics against iterations, seeds; print a table, write JSON and update docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/bench_unrolled.py [--masks poisson cartesian]
    [--iterations 12] [--seeds 0] [--max-train-slices 0] [--epochs 10] [--channels 16]
    [--kernel 5] [--runs DIR]

Every network trains on the default dataset (build it with `cvxmri data simulate`) with the
main job's configuration of it (`cvxmri.reproduce.unrolled_train_config`, quick preset);
its run folder is kept under ``--runs`` and a finished
run is reused, so an interrupted benchmark continues. Test metrics are fastMRI's volume
PSNR and SSIM on the SENSE magnitude, with the fixed per-file test masks of `cvxmri
evaluate`, after every iteration (the greedy methods' curves come from one network; the
end-to-end network is evaluated at its own T). The classical rows come from
`cvxmri.evaluate` on the same split and masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from bench_data import DOC, add_no_doc, update_section, write_results

from cvxmri.evaluate import EvaluateConfig, evaluate
from cvxmri.masks import MaskSpec
from cvxmri.models.unrolled import UnrolledNet, load_network
from cvxmri.recon import CLASSICAL_METHODS
from cvxmri.reproduce import (
    COMPARISON_ITERATIONS,
    UnrolledComparison,
    reproduce_preset,
    unrolled_train_config,
)
from cvxmri.training.data import SliceData
from cvxmri.training.run import train
from cvxmri.training.trainer import image_metrics

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "unrolled.json"
MASKS = {"poisson": MaskSpec("poisson", 4.0), "cartesian": MaskSpec("cartesian", 4.0, 0.04)}
METHODS = ("layerwise-convex", "layerwise-nonconvex", "end-to-end")


@torch.no_grad()
def test_curve(model: UnrolledNet, data: str, mask: MaskSpec) -> list[dict[str, float]]:
    """Test metrics after every iteration of ``model`` (fixed per-file test masks)."""
    split = SliceData(data, "test", mask)
    samples = split.samples(split.evaluation_masks())
    assert samples.target is not None
    model.eval()
    rows = []
    iterates = model.iterates(samples.x0, samples.y, samples.mask, samples.maps)
    for t, x in enumerate(iterates):
        metrics = image_metrics(x, samples.target, samples.support, samples.scale, samples.volume)
        rows.append({"iterations": t + 1, **{k[4:]: v for k, v in metrics.items()}})
    return rows


def run_one(args: argparse.Namespace, mask_name: str, method: str, seed: int) -> dict:
    """Train (or reuse) one network and measure it."""
    mask = MASKS[mask_name]
    quick = reproduce_preset("quick")
    network = replace(quick.unrolled.network, channels=args.channels, kernel_size=args.kernel)
    comparison = replace(
        quick.unrolled,
        network=network,
        max_train_slices=args.max_train_slices,
        epochs=args.epochs,
    )
    reproduced = replace(quick, seed=seed, unrolled=comparison)
    # The main job's configuration of this network (`cvxmri reproduce`).
    config = unrolled_train_config(reproduced, method, mask, args.iterations)
    out = Path(args.runs) / mask_name / f"{method}-seed{seed}"
    if not (out / "model.pt").exists():
        began = time.perf_counter()
        train(config, out, resume=out.exists())
        print(f"{mask_name} {method} seed {seed}: trained in {time.perf_counter() - began:.0f} s")
    model = load_network(out)
    assert isinstance(model, UnrolledNet)
    metrics = json.loads((out / "metrics_val.json").read_text())
    certificates = json.loads((out / "certificates.json").read_text())
    selected = [c for c in certificates if c.get("selected")]
    return {
        "mask": mask_name,
        "method": method,
        "seed": seed,
        "train_seconds": metrics["train_seconds"],
        "val": metrics["by_depth"],
        "test": test_curve(model, config.data, mask),
        "max_selected_gap": max((c["relative_gap"] for c in selected), default=None),
        "certified": all(c["certified"] for c in selected) if selected else None,
        "run": str(out),
    }


def classical(args: argparse.Namespace, mask_name: str) -> dict[str, dict[str, float]]:
    """Test metrics of the classical methods (`cvxmri.evaluate`) on one mask."""
    out = Path(args.runs) / mask_name / "classical"
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluate(
        EvaluateConfig(methods=list(CLASSICAL_METHODS), masks=[MASKS[mask_name]]), out
    )
    return {
        entry["method"]: {
            "psnr": entry["volume"]["psnr"]["mean"],
            "ssim": entry["volume"]["ssim"]["mean"],
        }
        for entry in summary["results"]  # type: ignore[attr-defined]
    }


def spread(values: list[float], digits: int = 2) -> str:
    """Mean ± standard deviation (the mean alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict], classics: dict[str, dict[str, dict[str, float]]], t: int) -> str:
    """Markdown: test PSNR by iteration count per method (mean over seeds), then the
    classical rows."""
    shown = sorted({1, 2, 4, t} & set(range(1, t + 1)))
    lines = [
        "| mask | method | seeds | "
        + " | ".join(f"PSNR T={s}" for s in shown)
        + f" | SSIM T={t} | train s | max gap |",
        "|---|---|---|" + "---|" * (len(shown) + 3),
    ]
    for mask_name in dict.fromkeys(r["mask"] for r in rows):
        for method in METHODS:
            mine = [r for r in rows if r["mask"] == mask_name and r["method"] == method]
            if not mine:
                continue
            cells = []
            for s in shown:
                values = [r["test"][s - 1]["psnr"] for r in mine if len(r["test"]) >= s]
                cells.append(spread(values) if method != "end-to-end" or s == t else "-")
            gaps = [r["max_selected_gap"] for r in mine if r["max_selected_gap"] is not None]
            ssim = spread([r["test"][t - 1]["ssim"] for r in mine], 4)
            seconds = spread([r["train_seconds"] for r in mine], 0)
            gap = f"{max(gaps):.1e}" if gaps else "-"
            lines.append(
                f"| {mask_name} | {method} | {len(mine)} | {' | '.join(cells)} | {ssim} "
                f"| {seconds} | {gap} |"
            )
        for name, value in classics.get(mask_name, {}).items():
            cells = ["-"] * (len(shown) - 1) + [f"{value['psnr']:.2f}"]
            lines.append(
                f"| {mask_name} | {name} | - | {' | '.join(cells)} | {value['ssim']:.4f} | - | - |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--iterations", type=int, default=COMPARISON_ITERATIONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    main_job = UnrolledComparison()
    parser.add_argument("--max-train-slices", type=int, default=main_job.max_train_slices)
    parser.add_argument("--epochs", type=int, default=main_job.epochs)
    parser.add_argument(
        "--channels",
        type=int,
        default=main_job.network.channels,
        help="hidden width of every regulariser (gated: twice its patterns)",
    )
    parser.add_argument("--kernel", type=int, default=main_job.network.kernel_size)
    parser.add_argument("--runs", default="runs/bench-unrolled")
    add_no_doc(parser)
    args = parser.parse_args()
    rows = [
        run_one(args, mask_name, method, seed)
        for mask_name in args.masks
        for method in args.methods
        for seed in args.seeds
    ]
    classics = {mask_name: classical(args, mask_name) for mask_name in args.masks}
    markdown = table(rows, classics, args.iterations)
    print(markdown)
    if not args.no_doc:
        env = write_results(RESULTS, args=vars(args), rows=rows, classical=classics)
        command = (
            "`.venv/bin/python benchmarks/bench_unrolled.py --masks "
            + " ".join(args.masks)
            + f" --iterations {args.iterations} --seeds "
            + " ".join(map(str, args.seeds))
            + f" --max-train-slices {args.max_train_slices} --epochs {args.epochs}"
            + f" --channels {args.channels} --kernel {args.kernel}`"
        )
        quick = reproduce_preset("quick")
        dcs = [
            (m, unrolled_train_config(quick, "end-to-end", MASKS[m], args.iterations).unrolled.dc)
            for m in args.masks
        ]
        weights = {
            m: f"eta {dc.eta:g}" if dc.kind == "gradient" else f"lambda {dc.lamda:g}"
            for m, dc in dcs
        }
        dc_text = ", ".join(f"{m} {dc.kind} ({weights[m]})" for m, dc in dcs)
        header = (
            "## Unrolled networks against compressed sensing (issue 13)\n\n"
            f"{date.today()}, {env['processor']} ({env['torch_threads']} torch threads), "
            f"command: {command}. Quick preset, `arch: unrolled` ({args.channels // 2}-pattern / "
            f"{args.channels}-channel regularisers, {args.kernel}x{args.kernel}, the main "
            f"job's data consistency per mask: {dc_text}), the first "
            f"{args.max_train_slices or 'all'} training slices, test split (fixed per-file "
            "masks), volume PSNR/SSIM on the SENSE magnitude. Greedy methods: the metric "
            "after t iterations of one network; end-to-end: its own T only. `max gap`: the "
            "largest relative duality gap of the selected betas. JSON: "
            "`benchmarks/results/unrolled.json`.\n\n"
        )
        update_section(DOC, "bench_unrolled", header + markdown)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
