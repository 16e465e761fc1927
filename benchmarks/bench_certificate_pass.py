"""The float64 certificate pass of a wide convex stage, two ways, side by side in one
process: seconds per pass and agreement; print a table and write JSON.

Usage: .venv/bin/python benchmarks/bench_certificate_pass.py [--images 54] [--repeats 2]

A stage of the quick preset's width (32 input channels, 16 patterns, 2 outputs, 7x7) on
random 128x128 images, the default training set's count and size. The two ways of the
pass ``A^T e``, ``<r, e>``, ``||e||^2`` (``e = r - A v``) in float64, over batches of 8
images as the trainer passes them:

- ``convolutions``: float64 `ConvexStage.apply_weight` and `apply_adjoint` (torch runs
  float64 convolutions on its slow path, with a whole ``im2col`` buffer per call);
- ``products``: `exact_products`, float64 matrix products on shifted copies of the input
  (what `residual_statistics` uses).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cvxmri.models.convex import ConvexStage, ConvexStageConfig, exact_products
from cvxmri.runs import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "certificate_pass.json"
BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=54)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 32, 128, 128, generator=gen)
    r = torch.randn(args.images, 2, 128, 128, generator=gen)
    stage = ConvexStage(32, 2, ConvexStageConfig(patterns=16, kernel_size=7))
    stage.init_gates(x[:BATCH])
    with torch.no_grad():
        stage.v.copy_(1e-3 * torch.randn(stage.v.shape, generator=gen))
    gates = stage.pattern_gates(x)
    weight = stage.v.detach().double()

    def convolutions() -> tuple[torch.Tensor, float, float]:
        grad, re, ee = torch.zeros_like(weight), 0.0, 0.0
        for i in range(0, args.images, BATCH):
            xb, rb, d = x[i : i + BATCH].double(), r[i : i + BATCH].double(), gates[i : i + BATCH]
            e = rb - stage.apply_weight(xb, weight, d)
            grad += stage.apply_adjoint(xb, e, d)
            re += float((rb * e).sum())
            ee += float((e * e).sum())
        return grad, re, ee

    def products() -> tuple[torch.Tensor, float, float]:
        grad, re, ee = torch.zeros_like(weight), 0.0, 0.0
        for i in range(0, args.images, BATCH):
            part, part_re, part_ee = exact_products(
                stage, x[i : i + BATCH], r[i : i + BATCH], gates[i : i + BATCH]
            )
            grad += part
            re += part_re
            ee += part_ee
        return grad, re, ee

    ways = {"convolutions": convolutions, "products": products}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    results = {}
    for _ in range(args.repeats):
        for name, way in ways.items():  # alternating: the machine's drift hits both
            began = time.perf_counter()
            results[name] = way()
            seconds[name].append(time.perf_counter() - began)
    (g1, re1, ee1), (g2, re2, ee2) = results["convolutions"], results["products"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "images": args.images,
        "seconds": seconds,
        "products_over_convolutions": min(seconds["products"]) / min(seconds["convolutions"]),
        "gradient_difference": float((g1 - g2).abs().max() / g1.abs().max()),
        "re_difference": abs(re1 - re2) / abs(re1),
        "ee_difference": abs(ee1 - ee2) / abs(ee1),
    }
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"| way | seconds per pass (best of {args.repeats}) |")
    print("|---|---|")
    for name in ways:
        print(f"| {name} | {min(seconds[name]):.2f} |")
    print(
        f"{args.images} images, {result['torch_threads']} threads: products / convolutions "
        f"x{result['products_over_convolutions']:.2f}; max difference / max entry: gradient "
        f"{result['gradient_difference']:.1e}, <r, e> {result['re_difference']:.1e}, "
        f"||e||^2 {result['ee_difference']:.1e}"
    )


if __name__ == "__main__":
    main()
