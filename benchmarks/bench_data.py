"""Time mask generation and data preparation; print a table, write JSON and update
docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/bench_data.py [--repeats N] [--quick]

Each number is the median wall time of ``repeats`` runs in this process (after one warm-up
run), so ratios between rows of one run are comparable; absolute numbers depend on the
machine, which is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

from cvxmri.data.fastmri_h5 import EncodingInfo, Volume, write_volume
from cvxmri.data.prepare import EspiritConfig, espirit_maps, prepare_volume
from cvxmri.data.simulate import SimulationConfig, birdcage_maps, simulate_slice
from cvxmri.masks import MaskSpec
from cvxmri.physics import Sense
from cvxmri.recon import CSConfig, cs_l1_wavelet
from cvxmri.runs import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data.json"
DOC = ROOT / "docs" / "benchmarks.md"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def smooth_image(shape: tuple[int, int]) -> np.ndarray:
    """A head-sized ellipse with some structure, values in [0, 1]."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    radius = ((yy - shape[0] / 2) / (0.4 * shape[0])) ** 2 + (
        (xx - shape[1] / 2) / (0.35 * shape[1])
    ) ** 2
    return ((radius < 1) * (0.6 + 0.4 * np.cos(xx / 5.0) ** 2)).astype(np.float32)


def run(repeats: int, quick: bool) -> list[dict[str, object]]:
    """All timings as rows of a table."""
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng(0)
    mask_shapes = [(128, 128)] if quick else [(128, 128), (320, 368)]
    specs = [
        MaskSpec("cartesian", 4.0, 0.04),
        MaskSpec("equispaced", 4.0, 0.04),
        MaskSpec("poisson", 4.0, calib_size=(16, 16)),
        MaskSpec("poisson", 8.0, calib_size=(16, 16)),
    ]
    for shape in mask_shapes:
        for spec in specs:
            seconds = median_seconds(lambda s=spec, sh=shape: s.sample(sh, rng), repeats)
            rows.append(
                {
                    "step": f"mask {spec.describe()}",
                    "size": f"{shape[0]}x{shape[1]}",
                    "seconds": seconds,
                }
            )
    for matrix, coils in [(128, 8)] if quick else [(128, 8), (320, 15)]:
        rows += preparation_rows(matrix, coils, repeats, rng)
    return rows


def preparation_rows(
    matrix: int, coils: int, repeats: int, rng: np.random.Generator
) -> list[dict[str, object]]:
    """Simulation, coil maps, preparation and the classical baselines at one size."""
    shape = (matrix, matrix)
    maps = birdcage_maps(coils, shape)
    image = smooth_image(shape)
    config = SimulationConfig(matrix=matrix, coils=coils)
    kspace = simulate_slice(image, maps, config, rng)
    mask = torch.from_numpy(MaskSpec("poisson", 4.0).sample(shape, rng).astype(np.float32))
    masked = torch.from_numpy(kspace)[None] * mask
    batch_maps = torch.from_numpy(maps)[None]
    steps: list[tuple[str, Callable[[], object], int]] = [
        ("simulate one slice", lambda: simulate_slice(image, maps, config, rng), repeats),
        (
            "ESPIRiT maps, one slice (sigpy)",
            lambda: espirit_maps(kspace, EspiritConfig()),
            max(1, repeats // 2),
        ),
        ("zero-filled SENSE, one slice", lambda: Sense(batch_maps, mask).H(masked), repeats),
        (
            "CS l1-wavelet (100 it), one slice",
            lambda: cs_l1_wavelet(masked, batch_maps, mask, CSConfig()),
            max(1, repeats // 3),
        ),
    ]
    size = f"{matrix}x{matrix}, {coils} coils"
    rows: list[dict[str, object]] = [
        {"step": step, "size": size, "seconds": median_seconds(fn, n)} for step, fn, n in steps
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "multicoil_test" / "bench.h5"
        write_volume(
            path, Volume(kspace[None].repeat(4, axis=0), None, EncodingInfo.full(shape, shape))
        )
        cache = Path(tmp) / "cache"
        seconds = median_seconds(lambda: prepare_volume(path, cache), repeats)
    rows.append({"step": "prepare 4-slice file, maps cached", "size": size, "seconds": seconds})
    return rows


def table(rows: list[dict[str, object]]) -> str:
    """A Markdown table of the rows."""
    lines = ["| step | size | median time |", "|---|---|---|"]
    for row in rows:
        seconds = float(row["seconds"])  # type: ignore[arg-type]
        if seconds < 1e-3:
            shown = f"{seconds * 1e6:.0f} µs"
        elif seconds < 1:
            shown = f"{seconds * 1e3:.1f} ms"
        else:
            shown = f"{seconds:.2f} s"
        lines.append(f"| {row['step']} | {row['size']} | {shown} |")
    return "\n".join(lines)


def update_section(path: Path, name: str, text: str) -> None:
    """Replace the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` of a
    Markdown file (or append it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + section + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + section + "\n"
    path.write_text(doc)


def main() -> None:
    """Run, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="128x128 only")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    rows = run(args.repeats, args.quick)
    env = environment()
    env["torch_threads"] = str(torch.get_num_threads())
    markdown = table(rows)
    print(markdown)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"date": str(date.today()), "environment": env, "rows": rows}, indent=2)
    )
    if not args.no_doc:
        header = (
            f"## Mask generation and data preparation\n\n"
            f"{date.today()}, {env['processor']} ({env['torch_threads']} torch threads), "
            f"torch {env['torch']}, command: `.venv/bin/python benchmarks/bench_data.py"
            f"{' --quick' if args.quick else ''} --repeats {args.repeats}`. "
            f"Median of {args.repeats} runs after a warm-up. JSON: `benchmarks/results/data.json`."
            f"\n\n"
        )
        update_section(DOC, "bench_data", header + markdown)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
