"""`cvxmri benchmark memory --dims 3`: the largest cubic patch each training method of the
3D CNN trains at within a memory budget.

True 3D training (`cvxmri train --dims 3`) steps on cubic patches of side ``s``; memory
grows with the voxels ``s^3`` of the patch, so the question in 3D is not the batch but the
patch. Every point is one 3D `Workload` (``ndim=3``, batch 1, side ``s``) measured in a
fresh process by `cvxmri.benchmark.measure` (its docstring states what is counted) through
the 2D benchmark's `Runner`: end-to-end (and end-to-end with gradient checkpointing) at
the given depth and width, and the steps of layer-wise stage 1 (2 input channels) and
stage 2 (``channels`` inputs, cached, the frozen prefix not resident). Stages 3 and later
run the same step as stage 2 (same input width, the prefix not resident), so a layer-wise
method's largest patch is the smaller of its stages 1 and 2.

Largest side within the budget:

- measured (``direct``): the sides ``fit_sides`` are measured first; a straight line
  ``peak = fixed + per_voxel * s^3`` through them predicts the side where the budget is
  crossed, and the 2D benchmark's search (`max_batch_size`: exponential steps from the
  prediction, then bisection) finds the largest side that fits, on CUDA up to a real
  out-of-memory error, on the CPU up to a measured peak above the budget;
- extrapolated (``fit``): the line's crossing. ``auto`` searches directly when the step
  at the predicted side would take at most ``direct_seconds`` (time scaled by the voxels
  from the measured points), so on a CPU the quick width is searched and the paper's
  width extrapolated; every row says which.

Every configuration's line also gives the largest side within the budgets of common GPUs,
``extra_budgets_gb`` (12 and 80 GiB; always extrapolated), and the largest batch of
patches of end-to-end's side at the same budget. The training passes that run without
autograd on whole volumes (validation, a stage's inputs and sign patterns) are not
counted: they are the same for every method up to one layer's width, and can be tiled.

Output (``memory.json``, schema ``cvxmri.benchmark.memory-3d/1``): ``device``,
``command``, ``date``, ``environment``, ``measurement``, ``config`` (the resolved
`Memory3DConfig`), ``budget_bytes``; ``configurations``: one per method and stage with
``points`` (``side``, ``voxels``, ``peak_bytes``, ``state_bytes``, ``seconds``, ``oom``,
``fits``), ``fit`` (``bytes_per_voxel``, ``fixed_bytes``), ``max_side``, ``max_side_kind``
and ``extrapolated`` (budget GiB -> side); ``results``: one row per method (layer-wise:
its limiting stage) with ``max_side``, ``max_side_kind``, ``voxels``, ``vs_end_to_end``
(voxels over end-to-end's), ``batch_at_end_to_end_side`` and, per extra budget, the side
and the voxel ratio; ``targets``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cvxmri.benchmark.measure import CUDA_METHOD, MMAP_THRESHOLD_METHOD, result_header
from cvxmri.benchmark.memory import (
    GIB,
    MIB,
    SEARCHES,
    Runner,
    format_targets,
    linear_fit,
    max_batch_size,
)
from cvxmri.benchmark.workload import LAYERWISE, METHODS, Workload
from cvxmri.errors import CvxmriError

SCHEMA = "cvxmri.benchmark.memory-3d/1"
# The target: layer-wise convex trains at patches of at least this many times the
# voxels end-to-end fits, at the same depth, width and budget.
TARGET_VOXEL_RATIO = 8.0
# The largest side an extrapolation reports.
EXTRAPOLATION_LIMIT = 100_000


@dataclass
class Memory3DConfig:
    """Settings of `run_memory3d_benchmark`; saved as ``config.yaml`` in its folder.

    Attributes:
        layers: network depth (the paper: 5).
        channels: hidden width (quick preset 32, the paper 256).
        kernel_size: KxKxK of the hidden layers (3 in 3D).
        budget_gb: the memory budget in GiB within which the largest side is searched.
        extra_budgets_gb: further budgets reported from each configuration's line
            (extrapolated).
        methods: among end-to-end, end-to-end-checkpointing, layerwise-convex,
            layerwise-nonconvex.
        pattern_chunk: gate patterns a convex stage processes at once (0: all).
        search: ``direct``, ``fit`` or ``auto`` (see the module docstring).
        fit_sides: patch sides measured first, for the line (at least two).
        max_side: the search stops here.
        direct_seconds: ``auto`` searches directly when a step at the predicted side would
            take at most this long.
        steps: full-size steps per measurement.
        device: ``cpu``, ``cuda`` or ``auto``.
        trial_timeout: seconds before one measurement is abandoned.
        seed: of the random weights and patches.
    """

    layers: int = 5
    channels: int = 256
    kernel_size: int = 3
    budget_gb: float = 12.0
    extra_budgets_gb: list[float] = field(default_factory=lambda: [12.0, 80.0])
    methods: list[str] = field(
        default_factory=lambda: ["end-to-end", "layerwise-convex", "layerwise-nonconvex"]
    )
    pattern_chunk: int = 32
    search: str = "auto"
    fit_sides: list[int] = field(default_factory=lambda: [16, 32])
    max_side: int = 1024
    direct_seconds: float = 60.0
    steps: int = 1
    device: str = "auto"
    trial_timeout: float = 3600.0
    seed: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first impossible setting."""
        for budget in [self.budget_gb, *self.extra_budgets_gb]:
            if not budget > 0 or not math.isfinite(budget):
                raise CvxmriError(f"budget must be a positive number of GiB, got {budget}")
        if not self.methods:
            raise CvxmriError("no method selected")
        for method in self.methods:
            if method not in METHODS:
                raise CvxmriError(f"unknown method {method!r} (choose from {METHODS})")
        if self.search not in SEARCHES:
            raise CvxmriError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if len(set(self.fit_sides)) < 2 or min(self.fit_sides) < self.kernel_size:
            raise CvxmriError(
                f"fit sides must be at least two different sides >= the kernel size "
                f"{self.kernel_size}, got {self.fit_sides}"
            )
        if self.max_side < max(self.fit_sides):
            raise CvxmriError(f"max side {self.max_side} is below the fit sides {self.fit_sides}")
        if self.steps < 1 or not self.trial_timeout > 0 or not self.direct_seconds >= 0:
            raise CvxmriError("steps must be >= 1, trial and direct seconds positive")
        self.workload("end-to-end", 1).validate()

    @property
    def budget_bytes(self) -> int:
        """The budget in bytes (GiB = 2^30 bytes); what `Runner` checks a trial against."""
        return int(self.budget_gb * GIB)

    def workload(self, method: str, stage: int, side: int = 0) -> Workload:
        """The 3D workload of ``method`` (stage ``stage`` for layer-wise) at side ``side``
        (default: the smallest fit side), batch 1, fp32, cached stage inputs."""
        return Workload(
            method=method,
            stage=stage if method in LAYERWISE else 0,
            layers=self.layers,
            channels=self.channels,
            kernel_size=self.kernel_size,
            size=side or min(self.fit_sides),
            pattern_chunk=self.pattern_chunk,
            device=self.device,
            seed=self.seed,
            ndim=3,
        )


def side_within(fit: tuple[float, float], budget: int, limit: int) -> int:
    """The largest cube side whose voxels the line ``peak = fixed + per_voxel * voxels``
    keeps within ``budget`` bytes (at most ``limit``; 0 if none)."""
    per_voxel, fixed = fit
    if per_voxel <= 0:
        return limit
    voxels = (budget - fixed) / per_voxel
    if voxels < 1:
        return 0
    side = math.floor(voxels ** (1 / 3))
    # Guard the cube root's rounding.
    while (side + 1) ** 3 <= voxels:
        side += 1
    while side > 0 and side**3 > voxels:
        side -= 1
    return min(side, limit)


def _voxel_points(points: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured points as `linear_fit` takes them: the voxels in place of the batch."""
    return [{**p, "batch": side**3} for side, p in points.items()]


def measure_stage(runner: Runner, cfg: Memory3DConfig, w: Workload) -> dict[str, Any]:
    """Points, line, largest side within the budget (measured or extrapolated) and the
    extrapolated sides at the extra budgets, of one method's step (one stage)."""
    budget = cfg.budget_bytes
    points = {s: runner.trial(replace(w, size=s)) for s in sorted(set(cfg.fit_sides))}
    fit = linear_fit(_voxel_points(points))
    predicted = side_within(fit, budget, cfg.max_side) if fit else 0
    direct = cfg.search == "direct"
    if cfg.search == "auto" and predicted:
        # Step time grows with the voxels: from the largest measured point.
        largest = max((s for s in points if "seconds" in points[s]), default=0)
        if largest:
            scale = (predicted / largest) ** 3
            direct = points[largest]["seconds"] * scale <= cfg.direct_seconds
    if direct:

        def fits(side: int) -> bool:
            if side < cfg.kernel_size:  # no such patch
                return False
            points[side] = runner.trial(replace(w, size=side))
            return bool(points[side]["fits"])

        best, _ = max_batch_size(fits, cfg.max_side, guess=max(cfg.kernel_size, predicted))
        kind = "measured"
        fit = linear_fit(_voxel_points(points)) or fit
    else:
        best, kind = predicted, "extrapolated"
    return {
        "method": w.method,
        "stage": w.stage if w.layerwise else None,
        "points": [
            {"side": s, "voxels": s**3, **{k: v for k, v in points[s].items() if k != "batch"}}
            for s in sorted(points)
        ],
        "fit": None if fit is None else {"bytes_per_voxel": fit[0], "fixed_bytes": fit[1]},
        "max_side": best,
        "max_side_kind": kind,
        "extrapolated": {
            str(gb): side_within(fit, int(gb * GIB), EXTRAPOLATION_LIMIT) if fit else 0
            for gb in cfg.extra_budgets_gb
        },
    }


def _stages(cfg: Memory3DConfig, method: str) -> list[int]:
    """The stages measured for ``method``: 0 for end-to-end, 1 and 2 for layer-wise."""
    return list(range(1, min(2, cfg.layers - 1) + 1)) if method in LAYERWISE else [0]


def summarise(configurations: list[dict[str, Any]], cfg: Memory3DConfig) -> list[dict]:
    """One row per method (layer-wise: its limiting stage), with its voxels over
    end-to-end's, at the budget and at each extra budget."""
    rows = []
    for method in cfg.methods:
        mine = [c for c in configurations if c["method"] == method]
        limiting = min(mine, key=lambda c: c["max_side"])
        extra = {gb: min(c["extrapolated"][str(gb)] for c in mine) for gb in cfg.extra_budgets_gb}
        rows.append(
            {
                "method": method,
                "max_side": limiting["max_side"],
                "max_side_kind": limiting["max_side_kind"],
                "voxels": limiting["max_side"] ** 3,
                "limiting_stage": limiting["stage"] if method in LAYERWISE else "-",
                "bytes_per_voxel": max((c["fit"] or {}).get("bytes_per_voxel", 0) for c in mine),
                "extrapolated": {str(gb): side for gb, side in extra.items()},
            }
        )
    reference = next((r for r in rows if r["method"] == "end-to-end"), None)
    for row in rows:
        row["vs_end_to_end"] = _ratio(row["max_side"], reference and reference["max_side"])
        row["extrapolated_vs_end_to_end"] = {
            gb: _ratio(side, reference and reference["extrapolated"][gb])
            for gb, side in row["extrapolated"].items()
        }
        side = reference and reference["max_side"]
        batch = _batch_at(configurations, row["method"], side, cfg)
        # A method whose largest side was found at or above that side trains batch 1 there.
        fits_one = bool(side) and row["max_side"] >= side
        row["batch_at_end_to_end_side"] = max(batch or 0, int(fits_one)) if side else None
    return rows


def _ratio(side: int, reference: int | None) -> float:
    """Voxels of a cube of ``side`` over those of ``reference`` (NaN without one)."""
    return round(side**3 / reference**3, 2) if reference else math.nan


def _batch_at(
    configurations: list[dict[str, Any]], method: str, side: int | None, cfg: Memory3DConfig
) -> int | None:
    """The largest batch of patches of ``side`` the method's lines keep within the budget
    (the smallest over its stages; extrapolated from the lines)."""
    if not side:
        return None
    batches = []
    for c in configurations:
        if c["method"] != method or c["fit"] is None:
            continue
        per_voxel, fixed = c["fit"]["bytes_per_voxel"], c["fit"]["fixed_bytes"]
        room = (cfg.budget_bytes - fixed) / (per_voxel * side**3) if per_voxel > 0 else math.inf
        batches.append(max(0, math.floor(room)) if math.isfinite(room) else cfg.max_side)
    return min(batches) if batches else None


def targets(rows: list[dict[str, Any]], cfg: Memory3DConfig) -> list[dict[str, Any]]:
    """The issue's 3D memory target, at the budget and at each extra budget."""
    convex = next((r for r in rows if r["method"] == "layerwise-convex"), None)
    if convex is None or not math.isfinite(convex["vs_end_to_end"]):
        return []
    where = f"{cfg.layers} layers, {cfg.channels} channels, {cfg.kernel_size}x3D"
    checks = [(cfg.budget_gb, convex["vs_end_to_end"], convex["max_side_kind"])]
    checks += [
        (float(gb), ratio, "extrapolated")
        for gb, ratio in convex["extrapolated_vs_end_to_end"].items()
        if float(gb) != cfg.budget_gb
    ]
    return [
        {
            "name": f"patch voxels, layer-wise convex over end-to-end, 3D, {gb:g} GiB",
            "value": ratio,
            "threshold": TARGET_VOXEL_RATIO,
            "direction": "at least",
            "met": bool(ratio >= TARGET_VOXEL_RATIO),
            "note": f"{where}, {kind}",
        }
        for gb, ratio, kind in checks
    ]


def run_memory3d_benchmark(cfg: Memory3DConfig, out: Path) -> dict[str, Any]:
    """Measure every method's largest 3D patch, write ``memory.json`` and ``tables.md``
    into ``out``, and return the results."""
    from cvxmri.training.trainer import resolve_device

    device = resolve_device(cfg.device)
    cfg = replace(cfg, device=str(device))
    cfg.validate()
    plan = [cfg.workload(m, s) for m in cfg.methods for s in _stages(cfg, m)]
    with tqdm(total=len(plan) * 6, desc="memory trials", unit="trial", disable=None) as bar:
        runner = Runner(cfg, bar)  # type: ignore[arg-type]
        configurations = [measure_stage(runner, cfg, w) for w in plan]
    rows = summarise(configurations, cfg)
    result = {
        **result_header(SCHEMA, device),
        "measurement": CUDA_METHOD if device.type == "cuda" else MMAP_THRESHOLD_METHOD,
        "inputs": "random cubic patches (1, 2, s, s, s), fp32; layer-wise stage 2: the stage "
        "input patch (channels wide) is given and the frozen prefix is not resident, as in "
        "the trainer; convex stages get the patch's sign patterns",
        "config": _plain(cfg),
        "budget_bytes": cfg.budget_bytes,
        "results": rows,
        "configurations": configurations,
        "targets": targets(rows, cfg),
    }
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    (out / "tables.md").write_text(format_tables3d(result) + "\n")
    return result


def _plain(cfg: Memory3DConfig) -> dict[str, Any]:
    from cvxmri.config import to_dict

    return to_dict(cfg)


def format_tables3d(result: dict[str, Any]) -> str:
    """The results as Markdown tables: one row per method, then every measured point."""
    cfg = result["config"]
    extra = [str(gb) for gb in cfg["extra_budgets_gb"]]
    lines = [
        f"3D memory benchmark, {result['device']}, {cfg['layers']} layers, "
        f"{cfg['kernel_size']}x{cfg['kernel_size']}x{cfg['kernel_size']}, {cfg['channels']} "
        f"channels, batch 1, fp32; largest cubic patch within {cfg['budget_gb']:g} GiB, and "
        "within " + " and ".join(f"{float(gb):g}" for gb in extra) + " GiB (extrapolated).",
        "",
        f"| method | side in {cfg['budget_gb']:g} GiB | voxels | vs end-to-end | "
        "batch at end-to-end's side | limiting stage | KiB per voxel | "
        + " | ".join(f"side in {float(gb):g} GiB (extrap.), vs e2e" for gb in extra)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for row in result["results"]:
        kind = "" if row["max_side_kind"] == "measured" else " (extrap.)"
        cells = [
            f"{row['extrapolated'][gb]} ({_times(row['extrapolated_vs_end_to_end'][gb])})"
            for gb in extra
        ]
        lines.append(
            f"| {row['method']} | {row['max_side']}{kind} | {row['voxels']:,} | "
            f"{_times(row['vs_end_to_end'])} | {row['batch_at_end_to_end_side']} | "
            f"{row['limiting_stage']} | {row['bytes_per_voxel'] / 1024:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Measured points: peak MiB (seconds per step) at each side.",
        "",
        "| method | stage | points | max side |",
        "|---|---|---|---|",
    ]
    for c in result["configurations"]:
        points = ", ".join(
            f"{p['side']}: OOM"
            if p.get("oom")
            else f"{p['side']}: {p.get('peak_bytes', math.nan) / MIB:,.0f} "
            f"({p.get('seconds', math.nan):.1f} s)"
            for p in c["points"]
        )
        lines.append(
            f"| {c['method']} | {c['stage'] or '-'} | {points} | {c['max_side']} "
            f"({c['max_side_kind']}) |"
        )
    return "\n".join(lines + format_targets(result["targets"]))


def _times(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"
