"""`cvxmri benchmark memory`: peak training memory against batch size and depth, and the
largest batch that fits a memory budget, for end-to-end and layer-wise training.

Every configuration (method, stage, stage inputs, precision, batch size) is measured in a
fresh process by `cvxmri.benchmark.measure` (its docstring states what is counted): the
real training step of `cvxmri.training.steps` on random images.

Largest batch that fits the budget (``search``):

- ``direct``: measured. The batch sizes ``fit_batches`` are measured first; a straight line
  through them predicts the crossing, and an exponential search from the prediction (up by
  1, 2, 4, ... while it fits, down by 1, 2, 4, ... while it does not) followed by bisection
  finds the exact largest batch that fits (`max_batch_size`): on CUDA up to a real
  out-of-memory error at the budget, on the CPU up to a measured peak above the budget.
- ``fit``: extrapolated. Only ``fit_batches`` are measured; peak memory is linear in the
  batch size for these models, and the line's crossing of the budget is reported, labelled
  ``extrapolated``. For a CPU, where one step of the paper's network takes seconds to
  minutes per image.
- ``auto``: ``direct`` on CUDA, ``fit`` on the CPU.

A layer-wise method trains one stage at a time with one batch size, so its largest batch is
the smallest over its stages, and its peak is the largest over its stages. Stage ``j``'s
step does not depend on the final depth, so the depth sweep measures stages
``1 .. max(depths) - 1`` once and the peak of a depth-``L`` network is the largest over
stages ``1 .. L - 1``; end-to-end is measured at every depth.

The certified solver of the convex stages (`certified_sweep`): it holds what it needs of
the stage's whole training set (gates, residuals, the patch store's coordinates; the inputs
are streamed from the cache) besides a Gram matrix of at most 1 GiB, so it is measured
against the training-set size (``certified_images``, default 2 and 4 images), and its
line's crossing of the budget, the largest training set, is set against end-to-end's
largest batch.

Unrolled networks (``--arch unrolled``), against their iterations T:
`cvxmri.benchmark.memory_unrolled`.

Output (``memory.json``, schema ``cvxmri.benchmark.memory/1``):

- ``device``, ``command``, ``date``, ``environment``, ``measurement`` (how memory was
  measured), ``config`` (the resolved `MemoryBenchConfig`), ``budget_bytes``;
- ``results``: one row per (method, stage inputs, precision): ``method``, ``stage_inputs``
  (``cached``, ``recomputed`` or ``-`` for end-to-end), ``precision`` (``fp32``/``bf16``),
  ``max_batch``, ``max_batch_kind`` (``measured``/``extrapolated``), ``vs_end_to_end``
  (its max batch over end-to-end's at the same precision), ``mib_per_image`` (slope of the
  fitted line; layer-wise: of its largest stage), ``peak_mib_batch1`` (peak at batch 1,
  layer-wise: largest stage) and ``limiting_stage``;
- ``configurations``: one per method, stage, stage inputs and precision, with ``points``
  (each measured batch size: ``batch``, ``peak_bytes``, ``state_bytes``, ``seconds``,
  ``oom``, ``fits``), ``fit`` (``bytes_per_image``, ``fixed_bytes``, ``max_batch``),
  ``max_batch`` and ``max_batch_kind``;
- ``depth``: ``batch``, and ``rows`` with ``method``, ``stage_inputs``, ``precision``,
  ``layers``, ``peak_bytes`` (the largest of ``step_bytes``, the largest stage's step, and
  ``stage_pass_bytes``, the largest once-per-stage pass: the trainer runs both);
- ``pattern_chunk``: the convex stage 2 at batch ``batch`` for each chunk size:
  ``pattern_chunk``, ``precision``, ``peak_bytes``, ``seconds``; and ``recommended``;
- ``certified``: ``rows`` per measured stage and precision (``stage``, ``stands_for``:
  the stages it represents, ``precision``, ``points``: each training-set size's
  ``batch`` (images), ``peak_bytes``, ``state_bytes``, ``seconds``, ``details`` (the
  solve's certificate and counts), ``fit``, ``max_images``) and ``totals`` per
  precision (``max_images``, the smallest over the stages, ``end_to_end_max_batch``,
  ``vs_end_to_end``);
- ``targets``: ``name``, ``value``, ``threshold``, ``direction`` (``at least`` or
  ``at most``), ``met``, ``note``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cvxmri.benchmark.measure import (
    CPU_METHOD,
    CUDA_METHOD,
    MMAP_THRESHOLD_METHOD,
    result_header,
    run_trial,
)
from cvxmri.benchmark.workload import (
    IMAGE_CHANNELS,
    LAYERWISE,
    METHODS,
    STAGE_INPUTS,
    Workload,
    workload_of,
)
from cvxmri.errors import CvxmriError

log = logging.getLogger(__name__)

SCHEMA = "cvxmri.benchmark.memory/1"
GIB = 1024**3
MIB = 1024**2
PRECISIONS = ("fp32", "bf16")
SEARCHES = ("auto", "direct", "fit")


@dataclass
class MemoryBenchConfig:
    """Settings of `run_memory_benchmark`; saved as ``config.yaml`` in its folder.

    Attributes:
        layers: network depth (the paper: 5).
        channels: hidden width (the paper: 256).
        kernel_size: KxK of the hidden layers (the paper: 7).
        size: images are ``size x size`` (the paper: 320).
        budget_gb: memory budget in GiB (the paper's GPU: 12).
        methods: among end-to-end, end-to-end-checkpointing, layerwise-convex, layerwise.
        stage_inputs: layer-wise stage inputs ``cached`` and/or ``recomputed``.
        precisions: ``fp32`` and/or ``bf16`` (autocast).
        pattern_chunk: gate patterns a convex stage processes at once (0: all).
        search: ``direct``, ``fit`` or ``auto`` (see the module docstring).
        fit_batches: batch sizes measured for the straight-line fit (at least two).
        max_batch: the search stops here.
        steps: full-size steps per measurement (after a small step that creates Adam's
            state).
        depths: network depths of the depth sweep (empty: none).
        depth_batch: batch size of the depth sweep and of the pattern-chunk sweep.
        chunks: pattern-chunk sizes of the sweep (empty: none).
        certified_images: training-set sizes (images) at which the certified solve of the
            convex stages is measured (`certified_sweep`; empty: none).
        device: ``cpu``, ``cuda`` or ``auto``.
        trial_timeout: seconds before one measurement is abandoned.
        seed: of the random weights and images.
    """

    layers: int = 5
    channels: int = 256
    kernel_size: int = 7
    size: int = 320
    budget_gb: float = 12.0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    stage_inputs: list[str] = field(default_factory=lambda: list(STAGE_INPUTS))
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    pattern_chunk: int = 32
    search: str = "auto"
    fit_batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    max_batch: int = 4096
    steps: int = 1
    depths: list[int] = field(default_factory=lambda: list(range(2, 13)))
    depth_batch: int = 1
    chunks: list[int] = field(default_factory=lambda: [0, 8, 16, 32, 64])
    certified_images: list[int] = field(default_factory=lambda: [2, 4])
    device: str = "auto"
    trial_timeout: float = 3600.0
    seed: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first impossible setting."""
        if not self.budget_gb > 0 or not math.isfinite(self.budget_gb):
            raise CvxmriError(f"budget must be a positive number of GiB, got {self.budget_gb}")
        for name, values, allowed in (
            ("method", self.methods, METHODS),
            ("stage inputs", self.stage_inputs, STAGE_INPUTS),
            ("precision", self.precisions, PRECISIONS),
        ):
            if not values:
                raise CvxmriError(f"no {name} selected")
            for value in values:
                if value not in allowed:
                    raise CvxmriError(f"unknown {name} {value!r} (choose from {allowed})")
        if self.search not in SEARCHES:
            raise CvxmriError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if len(set(self.fit_batches)) < 2 or min(self.fit_batches) < 1:
            raise CvxmriError(
                f"fit batches must be at least two different sizes >= 1, got {self.fit_batches}"
            )
        for name, value in (
            ("max batch", self.max_batch),
            ("steps", self.steps),
            ("depth batch", self.depth_batch),
        ):
            if value < 1:
                raise CvxmriError(f"{name} must be >= 1, got {value}")
        if any(d < 2 for d in self.depths):
            raise CvxmriError(f"depths must be >= 2, got {self.depths}")
        if any(c < 0 for c in self.chunks) or self.pattern_chunk < 0:
            raise CvxmriError("pattern chunks must be >= 0")
        if self.certified_images and (
            len(set(self.certified_images)) < 2 or min(self.certified_images) < 1
        ):
            raise CvxmriError(
                "certified images must be at least two different sizes >= 1 (or none), got "
                f"{self.certified_images}"
            )
        if not self.trial_timeout > 0:
            raise CvxmriError(f"trial timeout must be > 0, got {self.trial_timeout}")
        self.workload("end-to-end").validate()

    @property
    def budget_bytes(self) -> int:
        """The budget in bytes (GiB = 2^30 bytes)."""
        return int(self.budget_gb * GIB)

    def workload(self, method: str, **changes: Any) -> Workload:
        """The workload of ``method`` at this architecture (batch 1 unless changed)."""
        return workload_of(self, method, **changes)


def max_batch_size(fits: Callable[[int], bool], limit: int, guess: int = 1) -> tuple[int, bool]:
    """The largest batch ``b`` in ``1..limit`` with ``fits(b)``, for a monotone ``fits``.

    Exponential search from ``guess`` (up by 1, 2, 4, ... while it fits; down by 1, 2, 4,
    ... while it does not), then bisection of the bracket; each size is tried at most once.
    From ``guess = 1`` this is doubling then bisection.

    Returns:
        ``(b, capped)``: ``b = 0`` if not even 1 fits; ``capped`` when ``limit`` itself fits
        (the true largest may be larger).
    """
    tried: dict[int, bool] = {}

    def ok(batch: int) -> bool:
        if batch not in tried:
            tried[batch] = fits(batch)
        return tried[batch]

    guess = min(max(1, guess), limit)
    step = 1
    if ok(guess):
        lo, hi = guess, limit + 1
        while lo < limit:
            batch = min(limit, lo + step)
            if not ok(batch):
                hi = batch
                break
            lo, step = batch, 2 * step
    else:
        lo, hi = 0, guess
        while hi > 1:
            batch = max(1, hi - step)
            if ok(batch):
                lo = batch
                break
            hi, step = batch, 2 * step
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if ok(middle):
            lo = middle
        else:
            hi = middle
    return lo, lo == limit


def linear_fit(points: list[dict[str, Any]]) -> tuple[float, float] | None:
    """Least-squares ``peak = fixed + per_image * batch`` through the measured points (not
    out of memory); None with fewer than two batch sizes."""
    good = [(p["batch"], p["peak_bytes"]) for p in points if not p.get("oom")]
    if len({b for b, _ in good}) < 2:
        return None
    n = len(good)
    mean_b = sum(b for b, _ in good) / n
    mean_m = sum(m for _, m in good) / n
    var = sum((b - mean_b) ** 2 for b, _ in good)
    slope = sum((b - mean_b) * (m - mean_m) for b, m in good) / var
    return slope, mean_m - slope * mean_b


def fit_crossing(fit: tuple[float, float], budget: int, limit: int) -> int:
    """The largest batch the line keeps within the budget (at most ``limit``)."""
    slope, fixed = fit
    if slope <= 0:
        return limit
    return max(0, min(limit, math.floor((budget - fixed) / slope)))


class Runner:
    """Runs trials in fresh processes, each workload at most once."""

    def __init__(self, config: MemoryBenchConfig, progress: Any = None) -> None:
        self.config = config
        self.cache: dict[str, dict[str, Any]] = {}
        self.progress = progress

    def trial(self, w: Workload) -> dict[str, Any]:
        """The measured point of ``w`` (from the cache when measured before)."""
        key = w.to_json()
        if key not in self.cache:
            cfg = self.config
            result = run_trial(w, cfg.steps, cfg.budget_bytes, cfg.trial_timeout)
            result["fits"] = (
                not result.get("oom")
                and "peak_bytes" in result
                and result["peak_bytes"] <= cfg.budget_bytes
            )
            self.cache[key] = result
            peak = result.get("peak_bytes")
            log.info(
                "%s, batch %d: %s",
                w.describe(),
                w.batch,
                "out of memory"
                if result.get("oom")
                else result.get("error", f"peak {peak / MIB:.1f} MiB, {result['seconds']:.2f} s"),
            )
            if self.progress is not None:
                self.progress.set_postfix_str(f"{w.describe()} B={w.batch}", refresh=False)
                self.progress.update(1)
        return self.cache[key]


def measure_configuration(runner: Runner, w: Workload, direct: bool) -> dict[str, Any]:
    """Points, fit and largest batch of one configuration (method, stage, inputs, precision)."""
    cfg = runner.config
    budget = cfg.budget_bytes
    points = {b: runner.trial(replace(w, batch=b)) for b in sorted(set(cfg.fit_batches))}
    fit = linear_fit(list(points.values()))
    predicted = fit_crossing(fit, budget, cfg.max_batch) if fit else None
    if direct:

        def fits(batch: int) -> bool:
            points[batch] = runner.trial(replace(w, batch=batch))
            return bool(points[batch]["fits"])

        best, capped = max_batch_size(fits, cfg.max_batch, guess=max(1, predicted or 1))
        kind = "measured"
        fit = linear_fit(list(points.values())) or fit
    else:
        best = predicted if predicted is not None else 0
        capped, kind = best == cfg.max_batch, "extrapolated"
    fields = {
        "method": w.method,
        "stage": w.stage if w.layerwise else None,
        "stage_inputs": w.stage_inputs if w.layerwise and w.stage >= 2 else "-",
        "precision": "bf16" if w.amp else "fp32",
        "pattern_chunk": w.pattern_chunk if w.method == "layerwise-convex" else None,
    }
    return {
        **fields,
        "points": [{"batch": b, **points[b]} for b in sorted(points)],
        "fit": None
        if fit is None
        else {
            "bytes_per_image": fit[0],
            "fixed_bytes": fit[1],
            "max_batch": fit_crossing(fit, budget, cfg.max_batch),
        },
        "max_batch": best,
        "max_batch_capped": capped,
        "max_batch_kind": kind,
    }


def _configurations(cfg: MemoryBenchConfig) -> list[Workload]:
    """The (method, stage, inputs, precision) workloads of the main table."""
    out = []
    for precision in cfg.precisions:
        amp = precision == "bf16"
        for method in cfg.methods:
            if method not in LAYERWISE:
                out.append(cfg.workload(method, amp=amp))
                continue
            for stage in range(1, cfg.layers):
                modes = ["cached"] if stage == 1 else cfg.stage_inputs
                for mode in modes:
                    out.append(cfg.workload(method, amp=amp, stage=stage, stage_inputs=mode))
    return out


def summarise(configurations: list[dict[str, Any]], cfg: MemoryBenchConfig) -> list[dict]:
    """One row per (method, stage inputs, precision); layer-wise over its stages."""
    rows = []
    for precision in cfg.precisions:
        for method in cfg.methods:
            modes = cfg.stage_inputs if method in LAYERWISE else ["-"]
            for mode in modes:
                mine = [
                    c
                    for c in configurations
                    if c["method"] == method
                    and c["precision"] == precision
                    and c["stage_inputs"] in (mode, "-")
                ]
                if not mine:
                    continue
                limiting = min(mine, key=lambda c: (c["max_batch"], -_peak_at(c, 1)))
                largest = max(mine, key=lambda c: _peak_at(c, 1))
                fit = largest["fit"] or {}
                rows.append(
                    {
                        "method": method,
                        "stage_inputs": mode,
                        "precision": precision,
                        "max_batch": limiting["max_batch"],
                        "max_batch_kind": limiting["max_batch_kind"],
                        "capped": limiting["max_batch_capped"],
                        "limiting_stage": limiting["stage"] if method in LAYERWISE else "-",
                        "peak_mib_batch1": round(_peak_at(largest, 1) / MIB, 1),
                        "mib_per_image": round(fit.get("bytes_per_image", math.nan) / MIB, 1),
                    }
                )
    for row in rows:
        reference = next(
            (r for r in rows if r["method"] == "end-to-end" and r["precision"] == row["precision"]),
            None,
        )
        ratio = math.nan
        if reference and reference["max_batch"]:
            ratio = row["max_batch"] / reference["max_batch"]
        row["vs_end_to_end"] = round(ratio, 2)
    return rows


def _peak_at(configuration: dict[str, Any], batch: int) -> float:
    """The measured peak at ``batch`` (or the smallest measured batch), for ordering."""
    points = [p for p in configuration["points"] if "peak_bytes" in p]
    exact = [p for p in points if p["batch"] == batch]
    chosen = exact or sorted(points, key=lambda p: p["batch"])[:1]
    return float(chosen[0]["peak_bytes"]) if chosen else math.inf


def depth_sweep(runner: Runner, cfg: MemoryBenchConfig) -> list[dict[str, Any]]:
    """Peak memory against depth per method at ``depth_batch`` (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    if not cfg.depths:
        return rows
    deepest = max(cfg.depths)
    batch = cfg.depth_batch
    for precision in cfg.precisions:
        amp = precision == "bf16"
        for method in cfg.methods:
            if method not in LAYERWISE:
                for layers in sorted(cfg.depths):
                    w = cfg.workload(method, amp=amp, layers=layers, batch=batch)
                    point = runner.trial(w)
                    rows.append(_depth_row(method, "-", precision, layers, [point], []))
                continue
            for mode in cfg.stage_inputs:
                steps, passes = [], []
                for stage in range(1, deepest):
                    w = cfg.workload(
                        method,
                        amp=amp,
                        layers=cfg.layers if stage < cfg.layers else deepest,
                        stage=stage,
                        stage_inputs="cached" if stage == 1 else mode,
                        batch=batch,
                    )
                    steps.append(runner.trial(w))
                    passes.append(
                        runner.trial(replace(w, part="stage_pass")) if w.has_stage_pass else {}
                    )
                for layers in sorted(cfg.depths):
                    rows.append(
                        _depth_row(
                            method,
                            mode,
                            precision,
                            layers,
                            steps[: layers - 1],
                            passes[: layers - 1],
                        )
                    )
    return rows


def _depth_row(
    method: str,
    mode: str,
    precision: str,
    layers: int,
    steps: list[dict[str, Any]],
    passes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A depth's peak: the largest over its stages' steps and, for layer-wise training,
    their stage passes (the trainer runs both)."""

    def worst(points: list[dict[str, Any]]) -> int | None:
        measured = [p["peak_bytes"] for p in points if "peak_bytes" in p]
        return max(measured) if measured else None

    step, stage_pass = worst(steps), worst(passes)
    oom = any(p.get("oom") for p in [*steps, *passes])
    return {
        "method": method,
        "stage_inputs": mode,
        "precision": precision,
        "layers": layers,
        "peak_bytes": None if oom or step is None else max(step, stage_pass or 0),
        "step_bytes": step,
        "stage_pass_bytes": stage_pass,
        "oom": oom,
    }


def chunk_sweep(runner: Runner, cfg: MemoryBenchConfig) -> dict[str, Any]:
    """The convex stage 2 (cached inputs) at ``depth_batch`` for each pattern chunk."""
    rows: list[dict[str, Any]] = []
    if not cfg.chunks or "layerwise-convex" not in cfg.methods or cfg.layers < 3:
        return {"batch": cfg.depth_batch, "rows": rows, "recommended": None}
    for precision in cfg.precisions:
        for chunk in cfg.chunks:
            w = cfg.workload(
                "layerwise-convex",
                amp=precision == "bf16",
                stage=2,
                pattern_chunk=chunk,
                batch=cfg.depth_batch,
            )
            point = runner.trial(w)
            rows.append(
                {
                    "pattern_chunk": chunk,
                    "precision": precision,
                    "peak_bytes": point.get("peak_bytes"),
                    "seconds": point.get("seconds"),
                }
            )
    return {"batch": cfg.depth_batch, "rows": rows, "recommended": recommend_chunk(rows)}


def certified_sweep(runner: Runner, cfg: MemoryBenchConfig, summary: list[dict]) -> dict:
    """The certified solver of the convex stages (``part="solve"``,
    `cvxmri.benchmark.workload.Prepared.solve`): peak memory and time at each training-set
    size of ``certified_images``, per precision (bf16: the stage inputs held in bf16, as
    the trainer's cache under autocast), on cached stage inputs, as the trainer runs it.
    The solver holds what it needs of its whole training set (the gates, residuals and
    patch-store coordinates; the inputs stay in the cache, here files, and are streamed a
    chunk at a time) and a Gram matrix whose size does not depend on it, so its peak is a
    line in the number of images; the line's crossing of the budget is the largest
    training set (``max_images``, extrapolated), set against end-to-end's largest batch
    at the same precision in ``summary``. Measure at two or more images: a pass holds
    two chunks while the next loads, a one-off that a fit from one image would count per
    image. Stage 1 and stage 2 are measured: every later stage has stage 2's program (the
    same input width, patterns and kernel). On the CPU the solve's child runs with glibc's
    mmap threshold fixed (``measurement``, `MMAP_THRESHOLD_METHOD`)."""
    rows: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    if not cfg.certified_images or "layerwise-convex" not in cfg.methods:
        return {"rows": rows, "totals": totals}
    cuda = cfg.device.startswith("cuda")  # (resolved by run_memory_benchmark)
    budget = cfg.budget_bytes
    for precision in cfg.precisions:
        mine = []
        for stage, stands_for in certified_stages(cfg.layers):
            w = cfg.workload(
                "layerwise-convex",
                stage=stage,
                stage_inputs="cached",
                part="solve",
                amp=precision == "bf16",
            )
            points = [runner.trial(replace(w, batch=n)) for n in sorted(set(cfg.certified_images))]
            fit = linear_fit(points)
            mine.append(
                {
                    "stage": stage,
                    "stands_for": stands_for,
                    "precision": precision,
                    "program_unknowns": program_unknowns(w),
                    "points": points,
                    "fit": None
                    if fit is None
                    else {"bytes_per_image": fit[0], "fixed_bytes": fit[1]},
                    "max_images": fit_crossing(fit, budget, cfg.max_batch) if fit else 0,
                }
            )
        rows += mine
        largest = min(row["max_images"] for row in mine)
        reference = next(
            (
                row["max_batch"]
                for row in summary
                if row["method"] == "end-to-end" and row["precision"] == precision
            ),
            None,
        )
        totals.append(
            {
                "precision": precision,
                "max_images": largest,
                "end_to_end_max_batch": reference,
                "vs_end_to_end": largest / reference if reference else None,
            }
        )
    measurement = CUDA_METHOD if cuda else MMAP_THRESHOLD_METHOD
    return {"rows": rows, "totals": totals, "measurement": measurement}


def recommend_chunk(rows: list[dict[str, Any]]) -> int | None:
    """The fastest chunk size (fp32 where measured) whose peak is within 10% of the lowest
    peak's working memory above the input batch; ties to the larger chunk."""
    fp32 = [r for r in rows if r["precision"] == "fp32" and r["peak_bytes"] is not None]
    chosen = fp32 or [r for r in rows if r["peak_bytes"] is not None]
    if not chosen:
        return None
    lowest = min(r["peak_bytes"] for r in chosen)
    lean = [r for r in chosen if r["peak_bytes"] <= 1.1 * lowest]
    return int(min(lean, key=lambda r: (r["seconds"], -r["pattern_chunk"]))["pattern_chunk"])


def targets(
    summary: list[dict],
    depth: list[dict],
    cfg: MemoryBenchConfig,
    certified: dict[str, Any] | None = None,
) -> list[dict]:
    """The issue's memory targets, checked on this run."""
    out = []
    for total in (certified or {}).get("totals", []):
        if total["vs_end_to_end"] is None:
            continue
        out.append(
            {
                "name": "largest training set of the certified solver over end-to-end's "
                f"largest batch, {total['precision']}",
                "value": round(total["vs_end_to_end"], 2),
                "threshold": 4.0,
                "direction": "at least",
                "met": bool(total["vs_end_to_end"] >= 4.0),
                "note": f"{cfg.layers} layers, {cfg.channels} channels, {cfg.size}x{cfg.size}, "
                "extrapolated",
            }
        )
    architecture = (
        f"{cfg.layers} layers, {cfg.channels} channels, {cfg.kernel_size}x{cfg.kernel_size}, "
        f"{cfg.size}x{cfg.size}"
    )
    for precision in cfg.precisions:
        for row in summary:
            if (
                row["method"] != "layerwise-convex"
                or row["precision"] != precision
                or cfg.layers < 3  # only the narrow first stage: nothing to compare
                or not math.isfinite(row["vs_end_to_end"])  # no end-to-end measured
            ):
                continue
            out.append(
                {
                    "name": f"max batch, layer-wise convex ({row['stage_inputs']} stage inputs) "
                    f"over end-to-end, {precision}",
                    "value": row["vs_end_to_end"],
                    "threshold": 4.0,
                    "direction": "at least",
                    "met": bool(row["vs_end_to_end"] >= 4.0),
                    "note": f"{architecture}, {row['max_batch_kind']}",
                }
            )
    by_key: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in depth:
        if row["method"] in LAYERWISE and row["peak_bytes"] is not None:
            key = (row["method"], row["stage_inputs"], row["precision"])
            by_key.setdefault(key, {})[row["layers"]] = row["peak_bytes"]
    for (method, mode, precision), peaks in by_key.items():
        if 5 in peaks and 12 in peaks:
            ratio = peaks[12] / peaks[5]
            out.append(
                {
                    "name": f"peak at 12 layers over 5 layers, {method} ({mode} stage inputs), "
                    f"{precision}",
                    "value": round(ratio, 3),
                    "threshold": 1.1,
                    "direction": "at most",
                    "met": bool(ratio <= 1.1),
                    "note": f"batch {cfg.depth_batch}",
                }
            )
    return out


def run_memory_benchmark(cfg: MemoryBenchConfig, out: Path) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for, write ``memory.json``, ``memory.csv``,
    ``tables.md`` and the plots into ``out``, and return the results."""

    from cvxmri.training.trainer import resolve_device

    device = resolve_device(cfg.device)
    cfg = replace(cfg, device=str(device))
    cfg.validate()
    direct = cfg.search == "direct" or (cfg.search == "auto" and device.type == "cuda")
    plan = _configurations(cfg)
    estimate = len(plan) * (len(set(cfg.fit_batches)) + (4 if direct else 0))
    estimate += 2 * len(set(cfg.certified_images)) * len(cfg.precisions)
    with tqdm(total=estimate, desc="memory trials", unit="trial", disable=None) as progress:
        runner = Runner(cfg, progress)
        configurations = [measure_configuration(runner, w, direct) for w in plan]
        summary = summarise(configurations, cfg)
        depth = depth_sweep(runner, cfg)
        chunks = chunk_sweep(runner, cfg)
        certified = certified_sweep(runner, cfg, summary)
    result = {
        **result_header(SCHEMA, device),
        "measurement": CUDA_METHOD if device.type == "cuda" else CPU_METHOD,
        "inputs": "random images (B, 2, size, size); layer-wise 'cached': the stage input batch "
        "(bf16 under autocast) is given and the frozen prefix is not resident, as in the "
        "trainer, which drops it while a stage trains (the whole-dataset cache lives on the "
        "host or on disk and is not counted); 'recomputed': the frozen prefix is resident and "
        "runs without autograd inside the step; convex stages get their batch's sign "
        "patterns, which the trainer computes once per stage",
        "search": "measured (direct search)" if direct else "extrapolated from measured points",
        "config": _plain(cfg),
        "budget_bytes": cfg.budget_bytes,
        "results": summary,
        "configurations": configurations,
        "depth": {"batch": cfg.depth_batch, "rows": depth},
        "pattern_chunk": chunks,
        "certified": certified,
        "targets": targets(summary, depth, cfg, certified),
    }
    write_outputs(result, out)
    return result


def _plain(cfg: MemoryBenchConfig) -> dict[str, Any]:
    from cvxmri.config import to_dict

    return to_dict(cfg)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """``memory.json``, ``memory.csv`` (one line per measured point), ``tables.md`` and
    the plots."""
    from cvxmri.benchmark.plots import plot_memory

    (out / "memory.json").write_text(json.dumps(result, indent=2))
    with (out / "memory.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "stage",
                "stage_inputs",
                "precision",
                "pattern_chunk",
                "batch",
                "peak_bytes",
                "state_bytes",
                "seconds",
                "oom",
                "fits",
            ]
        )
        for c in result["configurations"]:
            for p in c["points"]:
                writer.writerow(
                    [
                        c["method"],
                        c["stage"],
                        c["stage_inputs"],
                        c["precision"],
                        c["pattern_chunk"],
                        p["batch"],
                        p.get("peak_bytes"),
                        p.get("state_bytes"),
                        p.get("seconds"),
                        p.get("oom"),
                        p.get("fits"),
                    ]
                )
    (out / "tables.md").write_text(format_tables(result) + "\n")
    plot_memory(result, out)


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


def _mib(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value / MIB:,.0f}"


def format_targets(targets: list[dict[str, Any]]) -> list[str]:
    """A benchmark's targets as Markdown list lines (none: no lines)."""
    if not targets:
        return []
    lines = ["", "Targets:", ""]
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(
            f"- {t['name']}: {t['value']} (target: {t['direction']} {t['threshold']}, "
            f"{t['note']}): {verdict}"
        )
    return lines


def format_tables(result: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    cfg = result["config"]
    lines = [
        f"Memory benchmark, {result['device']}, {cfg['layers']} layers, {cfg['kernel_size']}x"
        f"{cfg['kernel_size']}, {cfg['channels']} channels, {cfg['size']}x{cfg['size']}, "
        f"budget {cfg['budget_gb']:g} GiB; max batch {result['search']}.",
        "",
        "| method | stage inputs | precision | max batch | vs end-to-end | limiting stage "
        "| peak at batch 1 (MiB) | MiB per image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        kind = "" if row["max_batch_kind"] == "measured" else " (extrap.)"
        capped = "+" if row["capped"] else ""
        lines.append(
            f"| {row['method']} | {row['stage_inputs']} | {row['precision']} | "
            f"{row['max_batch']}{capped}{kind} | {_ratio(row['vs_end_to_end'])} | "
            f"{row['limiting_stage']} | {row['peak_mib_batch1']:,.0f} | "
            f"{row['mib_per_image']:,.1f} |"
        )
    batches = sorted({p["batch"] for c in result["configurations"] for p in c["points"]})
    shown = [b for b in batches if b in cfg["fit_batches"]]
    lines += [
        "",
        "Per stage: measured peak (MiB) at each batch size, fitted MiB per image, max batch.",
        "",
        "| method | stage | stage inputs | precision | "
        + " | ".join(f"B={b}" for b in shown)
        + " | MiB per image | max batch |",
        "|---|---|---|---|" + "---|" * (len(shown) + 2),
    ]
    for c in result["configurations"]:
        peaks = {p["batch"]: p for p in c["points"]}
        cells = [
            "OOM" if peaks.get(b, {}).get("oom") else _mib(peaks.get(b, {}).get("peak_bytes"))
            for b in shown
        ]
        per_image = c["fit"]["bytes_per_image"] / MIB if c["fit"] else math.nan
        lines.append(
            f"| {c['method']} | {c['stage'] or '-'} | {c['stage_inputs']} | {c['precision']} | "
            + " | ".join(cells)
            + f" | {per_image:,.1f} | {c['max_batch']} |"
        )
    depth = result["depth"]["rows"]
    if depth:
        layers = sorted({r["layers"] for r in depth})
        lines += [
            "",
            f"Peak memory (MiB) against depth, batch {result['depth']['batch']} "
            "(layer-wise: the largest stage).",
            "",
            "| method | stage inputs | precision | "
            + " | ".join(f"{n} layers" for n in layers)
            + " |",
            "|---|---|---|" + "---|" * len(layers),
        ]
        keys = list(dict.fromkeys((r["method"], r["stage_inputs"], r["precision"]) for r in depth))
        for key in keys:
            peaks = {
                r["layers"]: r
                for r in depth
                if (r["method"], r["stage_inputs"], r["precision"]) == key
            }
            cells = [
                "OOM" if peaks[n]["oom"] else _mib(peaks[n]["peak_bytes"]) if n in peaks else "-"
                for n in layers
            ]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    chunks = result["pattern_chunk"]
    if chunks["rows"]:
        lines += [
            "",
            f"Convex stage 2 (cached inputs), batch {chunks['batch']}, by pattern chunk "
            f"(0: all patterns at once); recommended: {chunks['recommended']}.",
            "",
            "| pattern chunk | precision | peak (MiB) | seconds per step |",
            "|---|---|---|---|",
        ]
        for row in chunks["rows"]:
            seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
            lines.append(
                f"| {row['pattern_chunk']} | {row['precision']} | {_mib(row['peak_bytes'])} | "
                f"{seconds} |"
            )
    certified = result.get("certified") or {"rows": []}
    if certified["rows"]:
        sizes = [p["batch"] for p in certified["rows"][0]["points"]]
        largest = "; ".join(
            f"{t['precision']} {t['max_images']}"
            + ("" if t["vs_end_to_end"] is None else f" ({t['vs_end_to_end']:.2f}x end-to-end)")
            for t in certified["totals"]
        )
        lines += [
            "",
            "Certified solver of the convex stages (cached inputs): peak (MiB) and seconds of "
            "its set-up and one solve, by training-set size N; largest training set in the "
            f"budget (extrapolated): {largest}.",
            "",
            "| stages | precision | "
            + " | ".join(f"N={n}: MiB, s" for n in sizes)
            + " | MiB per image | unknowns per output (solved) | max images |",
            "|---|---|" + "---|" * (len(sizes) + 3),
        ]
        for row in certified["rows"]:
            cells = [_solve_cell(p) for p in row["points"]]
            per_image = row["fit"]["bytes_per_image"] / MIB if row["fit"] else math.nan
            details = row["points"][-1].get("details", {})
            shape = unknowns_cell(row["program_unknowns"], details)
            stages = ", ".join(map(str, row["stands_for"]))
            lines.append(
                f"| {stages} | {row['precision']} | " + " | ".join(cells) + f" | "
                f"{per_image:,.1f} | {shape} | {row['max_images']} |"
            )
    return "\n".join(lines + format_targets(result["targets"]))


def certified_stages(layers: int) -> list[tuple[int, list[int]]]:
    """The convex stages whose certified solve the benchmarks measure, each with the
    stages it stands for: stage 1 (2 input channels) and stage 2, whose program (input
    width, patterns, kernel) every later stage of ``layers`` shares."""
    return [
        (stage, list(range(stage, layers)) if stage == 2 else [stage])
        for stage in range(1, min(layers, 3))
    ]


def program_unknowns(w: Workload) -> int:
    """Unknowns per output channel of the convex stage program of ``w``: ``P C_in K^d``."""
    c_in = IMAGE_CHANNELS if w.stage == 1 else w.channels
    return w.patterns * c_in * w.kernel_size**w.ndim


def unknowns_cell(program: int, details: dict[str, Any]) -> str:
    """A table cell: the program's unknowns per output and, on the subspace route, how
    many the solve worked in (``P r``, its basis rank ``r``)."""
    if details.get("rank") is None:
        return f"{program:,}"
    return f"{program:,} ({int(details['unknowns']):,}: rank {int(details['rank'])})"


def _solve_cell(point: dict[str, Any]) -> str:
    if point.get("oom"):
        return "OOM"
    if "peak_bytes" not in point:
        return "-"
    return f"{_mib(point['peak_bytes'])}, {point['seconds']:.1f}"
