"""Training-speed options on the quick preset: stage-input caching (memory, disk, none) and
bf16 autocast; print a table, write JSON and update docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/bench_training.py [--epochs 3] [--layers 4]

Every configuration trains from scratch in this process, one after the other, on the default
dataset (build it with `cvxmri data simulate`). Seconds are the sum of the per-epoch times
the trainer logs (training, validation and certificate); compare rows of one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from bench_data import DOC, update_section, write_results

from cvxmri.training.config import TrainConfig, preset
from cvxmri.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "training.json"


def measure(name: str, config: TrainConfig) -> dict[str, object]:
    """Train ``config`` and return its timings and final validation metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = Trainer(config, Path(tmp))
        trainer.fit()
        wall = time.perf_counter() - start
    epochs = len(trainer.history)
    seconds = sum(float(row["seconds"]) for row in trainer.history)
    final = trainer.depth_metrics[-1]
    return {
        "configuration": name,
        "method": config.method,
        "epochs": epochs,
        "seconds_per_epoch": seconds / epochs,
        "wall_seconds": wall,
        "val_psnr": final["val_psnr"],
        "val_ssim": final["val_ssim"],
    }


def main() -> None:
    """Run, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs (per stage)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    base = preset("quick")
    base = replace(
        base, layers=args.layers, certificate_every=0, optim=replace(base.optim, epochs=args.epochs)
    )
    runs = [
        ("layerwise-convex, stage inputs in memory", replace(base, stage_cache="memory")),
        ("layerwise-convex, stage inputs on disk", replace(base, stage_cache="disk")),
        ("layerwise-convex, prefix recomputed", replace(base, stage_cache="none")),
        ("layerwise-convex, bf16 autocast", replace(base, amp=True)),
        ("end-to-end, fp32", replace(base, method="end-to-end")),
        ("end-to-end, bf16 autocast", replace(base, method="end-to-end", amp=True)),
    ]
    rows = [measure(name, config) for name, config in runs]
    lines = [
        "| configuration | epochs | s / epoch | wall s | val PSNR | val SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['configuration']} | {row['epochs']} | {row['seconds_per_epoch']:.2f} | "
            f"{row['wall_seconds']:.0f} | {row['val_psnr']:.2f} | {row['val_ssim']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    env = write_results(RESULTS, args=vars(args), rows=rows)
    if not args.no_doc:
        header = (
            "## Training options: stage-input caching and bf16\n\n"
            f"{date.today()}, {env['processor']} ({env['torch_threads']} torch threads), "
            f"command: `.venv/bin/python benchmarks/bench_training.py --epochs {args.epochs} "
            f"--layers {args.layers}`: quick preset, Poisson 4x, {args.layers} layers, "
            f"{args.epochs} epochs (per stage), no certificate. JSON: "
            "`benchmarks/results/training.json`.\n\n"
        )
        update_section(DOC, "bench_training", header + table)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
