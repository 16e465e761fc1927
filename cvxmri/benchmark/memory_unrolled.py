"""`cvxmri benchmark memory --arch unrolled`: peak training memory of an unrolled network
against its number of iterations T, per training method.

Every point is one `Workload` with ``arch="unrolled"`` (`cvxmri.benchmark.unrolled` says
what each method's step builds and runs), measured in a fresh process by
`cvxmri.benchmark.measure` (its docstring states what is counted) through the memory
benchmark's `Runner`:

- ``end-to-end``, ``end-to-end-checkpointing``: one Adam step through T iterations;
- ``layerwise-nonconvex``: greedy iteration T's step and its once-per-iteration pass;
- ``layerwise-convex``: greedy iteration T's Gram build over the batch, one solve and its
  once-per-iteration pass.

A method's peak at T is the largest of its parts (the trainer runs them all). With
``dims`` 3 every point is measured on whole volumes of shape ``volume`` (true 3D training,
`cvxmri train --dims 3 --arch unrolled`; 3x3x3 regularisers by default).

Output (``memory.json``, schema ``cvxmri.benchmark.memory-unrolled/1``): ``device``,
``command``, ``date``, ``environment``, ``measurement``, ``inputs``, ``config`` (the
resolved `UnrolledMemoryConfig`), ``budget_bytes``; ``rows``, one per method and T:
``method``, ``iterations``, ``peak_bytes`` (None when a part ran out of memory),
``step_bytes``, ``stage_pass_bytes``, ``solve_bytes`` (None where the method has no such
part), ``state_bytes`` (of the step), ``step_seconds``, ``oom``; and ``targets``
(``name``, ``value``, ``threshold``, ``direction``, ``met``, ``note``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cvxmri.benchmark.measure import CUDA_METHOD, MMAP_THRESHOLD_METHOD, result_header
from cvxmri.benchmark.memory import GIB, MIB, Runner, format_targets
from cvxmri.benchmark.unrolled import UnrolledBenchSettings, describe_settings
from cvxmri.benchmark.workload import LAYERWISE
from cvxmri.errors import CvxmriError

SCHEMA = "cvxmri.benchmark.memory-unrolled/1"
# The parts each method's trainer runs, by `Workload.part`.
PARTS = {
    "end-to-end": ("step",),
    "end-to-end-checkpointing": ("step",),
    "layerwise-nonconvex": ("step", "stage_pass"),
    "layerwise-convex": ("step", "solve", "stage_pass"),
}
# The targets compare greedy iterations at these T (when both are measured).
TARGET_ITERATIONS = (5, 20)
TARGET_RATIO = 1.1


@dataclass
class UnrolledMemoryConfig(UnrolledBenchSettings):
    """Settings of `run_unrolled_memory_benchmark`; saved as ``config.yaml``. The workload
    settings are `UnrolledBenchSettings`'s (T from 1 to 20 by default); and:

    Attributes:
        budget_gb: memory limit of a measurement in GiB (`cvxmri.benchmark.measure`).
        steps: measured runs per point (after the warm-up on a small image).
        trial_timeout: seconds before one measurement is abandoned.
    """

    iterations: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    budget_gb: float = 12.0
    steps: int = 1
    trial_timeout: float = 3600.0

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first impossible setting."""
        if not self.budget_gb > 0 or not math.isfinite(self.budget_gb):
            raise CvxmriError(f"budget must be a positive number of GiB, got {self.budget_gb}")
        if self.steps < 1:
            raise CvxmriError(f"steps must be >= 1, got {self.steps}")
        if not self.trial_timeout > 0:
            raise CvxmriError(f"trial timeout must be > 0, got {self.trial_timeout}")
        self.validate_workloads()

    @property
    def budget_bytes(self) -> int:
        """The budget in bytes (GiB = 2^30 bytes)."""
        return int(self.budget_gb * GIB)


def iteration_sweep(runner: Runner, cfg: UnrolledMemoryConfig) -> list[dict[str, Any]]:
    """One row per method and T (see the module docstring)."""
    rows = []
    for method in cfg.methods:
        for iterations in sorted(set(cfg.iterations)):
            points = {
                part: runner.trial(cfg.workload(method, iterations, part)) for part in PARTS[method]
            }
            oom = any(p.get("oom") for p in points.values())
            peaks = [p.get("peak_bytes") for p in points.values()]
            step = points["step"]
            rows.append(
                {
                    "method": method,
                    "iterations": iterations,
                    "peak_bytes": None if oom or None in peaks else max(peaks),
                    **{
                        f"{part}_bytes": points[part].get("peak_bytes") if part in points else None
                        for part in ("step", "stage_pass", "solve")
                    },
                    "state_bytes": step.get("state_bytes"),
                    "step_seconds": step.get("seconds"),
                    "oom": oom,
                }
            )
    return rows


def _peaks(rows: list[dict[str, Any]], method: str) -> dict[int, int]:
    return {
        r["iterations"]: r["peak_bytes"]
        for r in rows
        if r["method"] == method and r["peak_bytes"] is not None
    }


def targets(rows: list[dict[str, Any]], cfg: UnrolledMemoryConfig) -> list[dict[str, Any]]:
    """The issue's targets on this run: a greedy method's peak at T=20 at most 1.1x its
    peak at T=5; end-to-end's peak grows with T (larger at every measured T than at the
    one before)."""
    out = []
    low, high = TARGET_ITERATIONS
    setting = cfg.describe()
    for method in LAYERWISE:
        peaks = _peaks(rows, method)
        if low in peaks and high in peaks:
            ratio = peaks[high] / peaks[low]
            out.append(
                {
                    "name": f"layer-wise peak at T={high} over T={low}, {method}",
                    "value": round(ratio, 3),
                    "threshold": TARGET_RATIO,
                    "direction": "at most",
                    "met": bool(ratio <= TARGET_RATIO),
                    "note": f"{peaks[high] / MIB:.1f} MiB at T={high}, "
                    f"{peaks[low] / MIB:.1f} MiB at T={low}; {setting}",
                }
            )
    peaks = _peaks(rows, "end-to-end")
    if len(peaks) >= 2:
        ts = sorted(peaks)
        grows = all(peaks[b] > peaks[a] for a, b in pairwise(ts))
        ratio = peaks[ts[-1]] / peaks[ts[0]]
        out.append(
            {
                "name": f"end-to-end grows with T: peak at T={ts[-1]} over T={ts[0]}",
                "value": round(ratio, 3),
                "threshold": 1.0,
                "direction": "more than, at every measured T",
                "met": bool(grows),
                "note": ", ".join(f"T={t}: {peaks[t] / MIB:.1f} MiB" for t in ts),
            }
        )
    return out


def run_unrolled_memory_benchmark(cfg: UnrolledMemoryConfig, out: Path) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for, write ``memory.json``, ``memory.csv`` and
    ``tables.md`` into ``out``, and return the results."""

    from cvxmri.config import to_dict
    from cvxmri.training.trainer import resolve_device

    device = resolve_device(cfg.device)
    cfg.device = str(device)
    cfg.validate()
    total = len(set(cfg.iterations)) * sum(len(PARTS[m]) for m in cfg.methods)
    with tqdm(total=total, desc="memory trials", unit="trial", disable=None) as progress:
        # The runner reads only steps, budget_bytes and trial_timeout of its config.
        rows = iteration_sweep(Runner(cfg, progress), cfg)  # type: ignore[arg-type]
    result = {
        **result_header(SCHEMA, device),
        "measurement": CUDA_METHOD if device.type == "cuda" else MMAP_THRESHOLD_METHOD,
        "inputs": "random complex images (3D: volumes), coil maps of unit root-sum-of-squares, "
        "random 0/1 masks (3D: over ky, kz) with a fully sampled centre; greedy iteration T "
        "runs on the previous iterate through T - 1 frozen random ReLU blocks (resident); the "
        "convex step is the Gram build of the batch, the solve one certified solve at the "
        "path's first beta",
        "config": to_dict(cfg),
        "budget_bytes": cfg.budget_bytes,
        "rows": rows,
        "targets": targets(rows, cfg),
    }
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    fields = ["method", "iterations", "peak_bytes", "step_bytes", "stage_pass_bytes"]
    fields += ["solve_bytes", "state_bytes", "step_seconds", "oom"]
    with (out / "memory.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "tables.md").write_text(format_unrolled_tables(result) + "\n")
    return result


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def format_unrolled_tables(result: dict[str, Any]) -> str:
    """The results as Markdown tables: the peak per method and T, then per part."""
    cfg = result["config"]
    rows = result["rows"]
    ts = sorted({r["iterations"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["method"], r["iterations"]): r for r in rows}
    head = "| " + " | ".join(f"T={t}" for t in ts) + " |"
    rule = "---|" * len(ts)
    lines = [
        f"Unrolled training memory, {result['device']}, {describe_settings(cfg)}: peak MiB "
        "per method (the largest of its parts).",
        "",
        "| method " + head,
        "|---|" + rule,
    ]
    for method in methods:
        cells = [
            "OOM" if by_key[(method, t)]["oom"] else _mib(by_key[(method, t)]["peak_bytes"])
            for t in ts
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per part (MiB):", "", "| method | part " + head, "|---|---|" + rule]
    for method in methods:
        for part in PARTS[method]:
            cells = [_mib(by_key[(method, t)][f"{part}_bytes"]) for t in ts]
            label = part.replace("_", " ")
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + format_targets(result["targets"]))
