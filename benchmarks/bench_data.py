"""Time mask generation and data preparation; print a table, write JSON and update
docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/bench_data.py [--repeats N] [--quick] [--threads N]

Each number is the median wall time of ``repeats`` runs in this process (after one warm-up
run), so ratios between rows of one run are comparable; absolute numbers depend on the
machine, which is recorded with them.

ESPIRiT maps are timed with sigpy's ``EspiritCalib``, the torch implementation (one slice
per call, and a batch of ``BATCH`` slices per call, per slice) and, when the ``bart``
command is installed, BART's ``ecalib -m1`` with the same parameters (k-space written in
BART's .cfl/.hdr format; its time includes reading and writing them). Their agreement is
`projection_difference` (the part of one's maps outside the span of the other's, pixel by
pixel, relative, over all pixels; blind to a per-pixel phase) and the fraction of pixels
where one's maps are zero and the other's are not (the crop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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
BATCH = 8
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ESPIRIT = EspiritConfig()
SIGPY = EspiritConfig(backend="sigpy")


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


def run(repeats: int, quick: bool) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """All timings as rows of a table, and the agreement of the ESPIRiT maps."""
    rows: list[dict[str, object]] = []
    agreement: list[dict[str, object]] = []
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
        timed, agreed = espirit_rows(matrix, coils, repeats, rng)
        rows += timed
        agreement += agreed
    return rows, agreement


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


def projection_difference(maps: np.ndarray, reference: np.ndarray) -> float:
    """``||(I - P) m||_F / ||m||_F`` of maps ``m`` (C, H, W), with ``P`` at each pixel the
    orthogonal projection onto the reference map there (zero where it is zero)."""
    norm = np.linalg.norm(reference, axis=0, keepdims=True)
    unit = np.divide(reference, norm, out=np.zeros_like(reference), where=norm > 0)
    projected = unit * (unit.conj() * maps).sum(axis=0, keepdims=True)
    return float(np.linalg.norm(maps - projected) / np.linalg.norm(maps))


def support_mismatch(maps: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of pixels where exactly one of two maps (C, H, W) is zero."""
    return float(np.mean((np.abs(maps).sum(axis=0) > 0) != (np.abs(reference).sum(axis=0) > 0)))


def write_cfl(base: Path, array: np.ndarray) -> None:
    """Write ``array`` (dims in BART's order) as BART's ``base.hdr`` and ``base.cfl``."""
    dims = list(array.shape) + [1] * (16 - array.ndim)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asfortranarray(array, dtype=np.complex64).T.tofile(base.with_suffix(".cfl"))


def read_cfl(base: Path) -> np.ndarray:
    """Read BART's ``base.hdr`` and ``base.cfl`` (trailing singleton dims dropped)."""
    dims = [int(d) for d in base.with_suffix(".hdr").read_text().splitlines()[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims[::-1]).T


def bart_maps(kspace: np.ndarray, folder: Path) -> np.ndarray:
    """``bart ecalib -m1`` maps (C, H, W) of one slice (C, H, W), with sigpy's defaults."""
    write_cfl(folder / "kspace", kspace.transpose(1, 2, 0)[:, :, None])
    command = ["bart", "ecalib", "-m1", "-r", str(ESPIRIT.calib_width)]
    command += ["-k", str(ESPIRIT.kernel_width), "-t", f"{ESPIRIT.thresh:g}"]
    command += ["-c", f"{ESPIRIT.crop:g}", str(folder / "kspace"), str(folder / "maps")]
    subprocess.run(command, check=True, capture_output=True)
    return (
        read_cfl(folder / "maps").reshape(kspace.shape[1], kspace.shape[2], -1).transpose(2, 0, 1)
    )


def espirit_rows(
    matrix: int, coils: int, repeats: int, rng: np.random.Generator
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """ESPIRiT maps of simulated slices by sigpy, torch and BART: times and agreement."""
    shape = (matrix, matrix)
    maps = birdcage_maps(coils, shape)
    config = SimulationConfig(matrix=matrix, coils=coils)
    stack = np.stack([simulate_slice(smooth_image(shape), maps, config, rng) for _ in range(BATCH)])
    kspace = stack[0]
    size = f"{matrix}x{matrix}, {coils} coils"
    steps: list[tuple[str, Callable[[], object], int, int]] = [
        ("ESPIRiT maps, one slice (sigpy)", lambda: espirit_maps(kspace, SIGPY), 1, 1),
        ("ESPIRiT maps, one slice (torch)", lambda: espirit_maps(kspace, ESPIRIT), 1, repeats),
        (
            f"ESPIRiT maps, {BATCH} slices per call, per slice (torch)",
            lambda: espirit_maps(stack, ESPIRIT),
            BATCH,
            repeats,
        ),
    ]
    references = {"sigpy": espirit_maps(kspace, SIGPY), "torch": espirit_maps(kspace, ESPIRIT)}
    bart = shutil.which("bart")
    with tempfile.TemporaryDirectory() as tmp:
        if bart:
            steps.append(
                (
                    "ESPIRiT maps, one slice (bart ecalib -m1)",
                    lambda: bart_maps(kspace, Path(tmp)),
                    1,
                    repeats,
                )
            )
            references["bart"] = bart_maps(kspace, Path(tmp))
        rows: list[dict[str, object]] = [
            {"step": step, "size": size, "seconds": median_seconds(fn, n) / per}
            for step, fn, per, n in steps
        ]
    agreement = [
        {
            "maps": maps_of,
            "reference": reference_of,
            "size": size,
            "projection_difference": projection_difference(
                references[maps_of], references[reference_of]
            ),
            "support_mismatch": support_mismatch(references[maps_of], references[reference_of]),
        }
        for maps_of, reference_of in [("torch", "sigpy"), ("bart", "torch"), ("bart", "sigpy")]
        if maps_of in references
    ]
    return rows, agreement


def agreement_table(agreement: list[dict[str, object]]) -> str:
    """A Markdown table of the ESPIRiT agreement."""
    lines = ["| maps | reference | size | projection difference | support mismatch |"]
    lines.append("|---|---|---|---|---|")
    for row in agreement:
        lines.append(
            f"| {row['maps']} | {row['reference']} | {row['size']} | "
            f"{float(row['projection_difference']):.2e} | "  # type: ignore[arg-type]
            f"{100 * float(row['support_mismatch']):.2f}% |"  # type: ignore[arg-type]
        )
    return "\n".join(lines)


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


def add_no_doc(parser: argparse.ArgumentParser) -> None:
    """The ``--no-doc`` option of the benchmarks that write docs/benchmarks.md and JSON."""
    parser.add_argument(
        "--no-doc",
        action="store_true",
        help="print the table only: leave docs/benchmarks.md and the results JSON alone",
    )


def write_results(path: Path, **record: object) -> dict[str, str]:
    """Write ``record`` as JSON to ``path`` with the date and the machine (`environment`,
    with torch's thread count); return that environment."""
    env = environment()
    env["torch_threads"] = str(torch.get_num_threads())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": str(date.today()), "environment": env, **record}, indent=2))
    return env


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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, agreement = run(args.repeats, args.quick)
    env = environment()
    env["torch_threads"] = str(torch.get_num_threads())
    blas = {k: os.environ[k] for k in BLAS_THREADS if k in os.environ}
    env.update(blas)
    markdown = table(rows) + "\n\nESPIRiT agreement (see the script's docstring):\n\n"
    markdown += agreement_table(agreement)
    print(markdown)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"date": str(date.today()), "environment": env, "rows": rows, "agreement": agreement},
            indent=2,
        )
    )
    if not args.no_doc:
        header = (
            f"## Mask generation and data preparation\n\n"
            f"{date.today()}, {env['processor']} ({env['torch_threads']} torch threads), "
            f"torch {env['torch']}, command: `"
            + "".join(f"{k}={v} " for k, v in blas.items())
            + f".venv/bin/python benchmarks/bench_data.py{' --quick' if args.quick else ''}"
            f"{f' --threads {args.threads}' if args.threads else ''} --repeats {args.repeats}`. "
            f"Median of {args.repeats} runs after a warm-up. JSON: `benchmarks/results/data.json`."
            f"\n\n"
        )
        update_section(DOC, "bench_data", header + markdown)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
