"""`cvxmri benchmark speed --arch unrolled`: the training time of an unrolled network against
its number of iterations T, per training method.

Every point is one `Workload` with ``arch="unrolled"`` (`cvxmri.benchmark.unrolled` says
what each method's step builds and runs), built in this process, run once untimed at full
size after a warm-up on a small image, then timed ``repeats`` times (the median; CUDA:
synchronised, `cvxmri.benchmark.speed.timed`):

- ``end-to-end``, ``end-to-end-checkpointing``: one Adam step through T iterations;
- ``layerwise-nonconvex``: one Adam step of greedy iteration T, and its once-per-iteration
  pass (the images advanced through the trained block);
- ``layerwise-convex``: the Gram build of greedy iteration T over the batch (its ``P * 2 *
  K^2`` columns through the data consistency's linear part, per image), and its
  once-per-iteration pass.

A greedy iteration's step does not depend on t (the previous iterate is computed once per
iteration, outside the step), so the training time for ``epochs`` epochs of ``images``
images is projected as:

- end-to-end: ``epochs * images * step(T) / batch``;
- non-convex greedy: ``T * images * (epochs * step(T) + pass(T)) / batch``;
- convex greedy: ``T * images * (gram(T) + pass(T)) / batch``: one Gram build and one pass
  per iteration. The beta path's solves are not in it (each exact pass of the certificate
  is one more forward and adjoint pass over the images, a few per beta;
  `benchmarks/bench_unrolled.py` times whole training runs).

Output (``speed.json``, schema ``cvxmri.benchmark.speed-unrolled/1``): ``device``,
``command``, ``date``, ``environment``, ``config`` (the resolved `UnrolledSpeedConfig`),
``rows`` (per method and T: ``seconds_per_step``, ``images_per_second``, and for greedy
methods ``pass_seconds``), ``totals`` and ``results`` (per method and T: ``seconds``,
``hours``, ``vs_end_to_end``), ``targets`` (none: the issue sets no speed target here).
"""

from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cvxmri.benchmark.measure import result_header
from cvxmri.benchmark.speed import timed
from cvxmri.benchmark.unrolled import UnrolledBenchSettings
from cvxmri.benchmark.workload import LAYERWISE, Workload, prepare
from cvxmri.errors import CvxmriError

log = logging.getLogger(__name__)

SCHEMA = "cvxmri.benchmark.speed-unrolled/1"


@dataclass
class UnrolledSpeedConfig(UnrolledBenchSettings):
    """Settings of `run_unrolled_speed_benchmark`; saved as ``config.yaml``. The workload
    settings are `UnrolledBenchSettings`'s; and:

    Attributes:
        repeats: timed runs per point (the median is reported).
        epochs: epochs of the projected training time (per greedy iteration for the
            non-convex method; the convex one has no epochs).
        images: training images of the projected training time.
    """

    repeats: int = 3
    epochs: int = 30
    images: int = 18

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first impossible setting."""
        for name in ("repeats", "epochs", "images"):
            if getattr(self, name) < 1:
                raise CvxmriError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.validate_workloads()


def measure_unrolled_speed(w: Workload, repeats: int) -> dict[str, Any]:
    """Seconds of one workload's step (and of its once-per-iteration pass)."""
    device = torch.device(w.device)
    prepared = prepare(w)
    prepared.warmup()
    prepared.step()
    seconds = timed(prepared.step, repeats, device)
    row: dict[str, Any] = {
        "method": w.method,
        "iterations": w.iterations,
        "batch": w.batch,
        "seconds_per_step": seconds,
        "images_per_second": w.batch / seconds,
    }
    if prepared.stage_pass is not None:
        prepared.stage_pass()
        row["pass_seconds"] = timed(prepared.stage_pass, repeats, device)
    del prepared
    gc.collect()
    return row


def training_times(rows: list[dict[str, Any]], cfg: UnrolledSpeedConfig) -> list[dict[str, Any]]:
    """Projected training time per method and T (module docstring)."""
    totals = []
    for r in rows:
        t, per_image = r["iterations"], r["seconds_per_step"] / cfg.batch
        passes = r.get("pass_seconds", 0.0) / cfg.batch
        if r["method"] not in LAYERWISE:
            seconds = cfg.epochs * cfg.images * per_image
        elif r["method"] == "layerwise-nonconvex":
            seconds = t * cfg.images * (cfg.epochs * per_image + passes)
        else:
            seconds = t * cfg.images * (per_image + passes)
        totals.append(
            {
                "method": r["method"],
                "iterations": t,
                "epochs": cfg.epochs,
                "images": cfg.images,
                "seconds": seconds,
                "hours": round(seconds / 3600, 4),
            }
        )
    for row in totals:
        reference = next(
            (
                o["seconds"]
                for o in totals
                if o["method"] == "end-to-end" and o["iterations"] == row["iterations"]
            ),
            math.nan,
        )
        row["vs_end_to_end"] = round(row["seconds"] / reference, 3)
    return totals


def run_unrolled_speed_benchmark(cfg: UnrolledSpeedConfig, out: Path) -> dict[str, Any]:
    """Measure every method at every T of ``cfg``, write ``speed.json`` and ``tables.md``
    into ``out``, and return the results."""
    from cvxmri.config import to_dict
    from cvxmri.training.trainer import resolve_device

    device = resolve_device(cfg.device)
    cfg = replace(cfg, device=str(device))
    cfg.validate()
    rows = []
    plan = [(m, t) for m in cfg.methods for t in sorted(set(cfg.iterations))]
    for method, t in tqdm(plan, desc="speed", unit="point", disable=None):
        row = measure_unrolled_speed(cfg.workload(method, t), cfg.repeats)
        log.info("%s, T=%d: %s", method, t, row)
        rows.append(row)
    totals = training_times(rows, cfg)
    result = {
        **result_header(SCHEMA, device),
        "config": to_dict(cfg),
        "rows": rows,
        "totals": totals,
        "results": totals,
        "targets": [],
    }
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    (out / "tables.md").write_text(format_unrolled_speed(result) + "\n")
    return result


def format_unrolled_speed(result: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    cfg = result["config"]
    lines = [
        f"Unrolled speed benchmark, {result['device']}: {cfg['channels']} channels, "
        f"{cfg['kernel_size']}x{cfg['kernel_size']}, {cfg['size']}x{cfg['size']}, "
        f"{cfg['coils']} coils, {cfg['dc']} data consistency, batch {cfg['batch']}, median of "
        f"{cfg['repeats']} runs.",
        "",
        "| method | T | s / step | images / s | pass s |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        passes = r.get("pass_seconds")
        lines.append(
            f"| {r['method']} | {r['iterations']} | {r['seconds_per_step']:.3g} | "
            f"{r['images_per_second']:.3g} | {'-' if passes is None else f'{passes:.3g}'} |"
        )
    lines += [
        "",
        f"Training time for {cfg['epochs']} epochs of {cfg['images']} images (non-convex "
        "greedy: per iteration; convex greedy: one Gram build and pass per iteration, the "
        "beta path's solves excluded), projected from the measured steps.",
        "",
        "| method | T | seconds | vs end-to-end |",
        "|---|---|---|---|",
    ]
    for t in result["totals"]:
        lines.append(
            f"| {t['method']} | {t['iterations']} | {t['seconds']:.4g} | {t['vs_end_to_end']:g} |"
        )
    return "\n".join(lines)
