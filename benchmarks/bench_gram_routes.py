"""The two Gram routes of a greedy convex unrolled iteration, side by side in one process:
seconds per image and agreement of the matrices; print a table and write JSON.

Usage: .venv/bin/python benchmarks/bench_gram_routes.py [--volume 12x96x80] [--repeats 2]

One random volume of the quick 3D shape (8 coils, (ky, kz) mask, 16 channels: 8 patterns,
3x3x3, gradient-step DC) through `dc_gram_system`: the fast route (the whole mapped design
held; `MAPPED_BYTES` raised above it) and the lean route (through ``L^2``; the bound set
to 0). Peak memory of each route is `cvxmri benchmark memory --dims 3 --arch unrolled`'s
job (fresh processes); this script times them against each other and checks that they
build the same matrix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cvxmri.benchmark.unrolled import _Unrolled
from cvxmri.benchmark.workload import Workload
from cvxmri.runs import environment
from cvxmri.training import unrolled as training

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gram_routes.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default="12x96x80")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    volume = tuple(int(n) for n in args.volume.split("x"))
    w = Workload(
        method="layerwise-convex",
        arch="unrolled",
        channels=16,
        kernel_size=3,
        ndim=3,
        volume=volume,
        device="cpu",
    )
    unrolled = _Unrolled(w, torch.device("cpu"))
    inputs = unrolled.inputs(volume, 1)
    assert unrolled.stage is not None
    data = unrolled._iteration_data(inputs)
    seconds: dict[str, list[float]] = {"fast": [], "lean": []}
    systems = {}
    bounds = {"fast": 2**62, "lean": 0}
    for _ in range(args.repeats):
        for route, bound in bounds.items():  # alternating: the machine's drift hits both
            training.MAPPED_BYTES = bound
            began = time.perf_counter()
            systems[route] = training.dc_gram_system(unrolled.stage, data, unrolled.dc)
            seconds[route].append(time.perf_counter() - began)
    fast, lean = systems["fast"], systems["lean"]
    scale = float(fast.gram.abs().max())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "volume": volume,
        "unknowns": fast.gram.shape[0],
        "seconds": seconds,
        "lean_over_fast": min(seconds["lean"]) / min(seconds["fast"]),
        "gram_difference": float((fast.gram - lean.gram).abs().max()) / scale,
        "rhs_difference": float((fast.rhs - lean.rhs).abs().max()) / float(fast.rhs.abs().max()),
    }
    RESULTS.write_text(json.dumps(result, indent=2))
    print(
        f"volume {args.volume}, {result['unknowns']} unknowns, {result['torch_threads']} "
        f"threads: fast {min(seconds['fast']):.1f} s, lean {min(seconds['lean']):.1f} s "
        f"(x{result['lean_over_fast']:.2f}); max difference / max entry: Gram "
        f"{result['gram_difference']:.1e}, rhs {result['rhs_difference']:.1e}"
    )


if __name__ == "__main__":
    main()
