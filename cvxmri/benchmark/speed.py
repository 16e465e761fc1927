"""`cvxmri benchmark speed`: training throughput per method and stage, training time for the
same number of epochs, and compute efficiency against the machine's convolution peak.

Each configuration (`cvxmri.benchmark.workload`) is built in this process and its real
training step is run once untimed at full size (after a small warm-up step), then timed
``repeats`` times; the median is reported (CUDA: synchronised). Throughput is images per
second of the step. For layer-wise stages the stage pass is timed too: what the trainer
computes once per stage (the frozen prefix without autograd for cached inputs, a convex
stage's sign patterns).

Training time for ``epochs`` epochs of ``images`` images is projected from the measured
throughput: end-to-end ``epochs * images / throughput``; layer-wise the sum over stages of
``epochs * images / throughput(stage)``, plus one stage pass over the images per stage
(recomputed inputs: the prefix is also inside every step). Validation and
certificates are not included (`benchmarks/bench_training.py` times whole training runs).

Compute efficiency: the step's convolution FLOPs, counted analytically
(`cvxmri.benchmark.workload.step_flops`: ``2 C_in C_out K^2 H W`` per forward convolution,
as much again for the weight gradient and for the input gradient), over its time, against
the machine's convolution peak measured in the same run: the best of 3 timed forward
passes of one ``channels -> channels`` KxK convolution of the benchmark's batch and image
size, in the step's precision, in the faster of the contiguous and channels-last layouts.

The certified solver of the convex stages (`certified_times`) is timed once per
training-set size: its set-up, the pass giving ``beta_max`` and one solve at the path's
first beta.

Output (``speed.json``, schema ``cvxmri.benchmark.speed/1``): ``device``, ``command``,
``date``, ``environment``, ``config``, ``conv_peak`` (per precision: ``gflops``,
``layout``, ``seconds``, ``shape``), ``rows`` (per method, stage, stage inputs and
precision: ``seconds_per_step``, ``images_per_second``, ``gflop_per_step``, ``gflops``,
``efficiency``, and for layer-wise stages with a stage pass
``stage_pass_images_per_second`` and ``stage_pass_gflops``), ``totals`` and
``results`` (per method, stage inputs and precision: ``seconds``, ``hours``,
``vs_end_to_end``), ``certified`` (per precision, stage and training-set size:
``stage``, ``stands_for``, ``precision``, ``images``, ``seconds``,
``seconds_per_image``, ``setup_seconds``, ``solve_seconds``, ``passes``,
``program_unknowns``, ``unknowns``, ``rank``, ``relative_gap``), ``targets``
(``name``, ``value``, ``threshold``, ``direction``, ``met``, ``note``).
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cvxmri.benchmark.measure import result_header
from cvxmri.benchmark.memory import (
    PRECISIONS,
    certified_stages,
    format_targets,
    program_unknowns,
    unknowns_cell,
)
from cvxmri.benchmark.workload import (
    LAYERWISE,
    METHODS,
    STAGE_INPUTS,
    Workload,
    conv_flops,
    prepare,
    stage_pass_flops,
    step_flops,
    workload_of,
)
from cvxmri.errors import CvxmriError

log = logging.getLogger(__name__)

SCHEMA = "cvxmri.benchmark.speed/1"


@dataclass
class SpeedBenchConfig:
    """Settings of `run_speed_benchmark`; saved as ``config.yaml`` in its folder.

    Attributes:
        layers, channels, kernel_size, size: the architecture (the paper: 5, 256, 7, 320).
        batch: images per step.
        methods, stage_inputs, precisions: what to measure (as the memory benchmark).
        pattern_chunk: gate patterns a convex stage processes at once (0: all).
        repeats: timed steps per configuration (the median is reported).
        epochs: epochs (per stage for layer-wise) of the projected training time.
        images: training images of the projected training time.
        certified_images: training-set sizes (images) at which the certified solve of the
            convex stages is timed (`certified_times`; empty: none).
        device: ``cpu``, ``cuda`` or ``auto``.
        seed: of the random weights and images.
    """

    layers: int = 5
    channels: int = 256
    kernel_size: int = 7
    size: int = 320
    batch: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    stage_inputs: list[str] = field(default_factory=lambda: list(STAGE_INPUTS))
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    pattern_chunk: int = 32
    repeats: int = 3
    epochs: int = 40
    images: int = 1000
    certified_images: list[int] = field(default_factory=lambda: [2])
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first impossible setting."""
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
        for name, value in (
            ("repeats", self.repeats),
            ("epochs", self.epochs),
            ("images", self.images),
        ):
            if value < 1:
                raise CvxmriError(f"{name} must be >= 1, got {value}")
        if any(n < 1 for n in self.certified_images):
            raise CvxmriError(f"certified images must be >= 1, got {self.certified_images}")
        self.workload("end-to-end").validate()

    def workload(self, method: str, **changes: Any) -> Workload:
        """The workload of ``method`` at this architecture."""
        return workload_of(self, method, **{"batch": self.batch, **changes})


def _plan(cfg: SpeedBenchConfig) -> list[Workload]:
    out = []
    for precision in cfg.precisions:
        amp = precision == "bf16"
        for method in cfg.methods:
            if method not in LAYERWISE:
                out.append(cfg.workload(method, amp=amp))
                continue
            for stage in range(1, cfg.layers):
                for mode in ["cached"] if stage == 1 else cfg.stage_inputs:
                    out.append(cfg.workload(method, amp=amp, stage=stage, stage_inputs=mode))
    return out


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls (CUDA: synchronised)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def conv_peak(cfg: SpeedBenchConfig, amp: bool, device: torch.device) -> dict[str, Any]:
    """The machine's convolution throughput: the best of 3 forward passes of one
    ``channels -> channels`` KxK convolution at the benchmark's batch and size."""
    dtype = torch.bfloat16 if amp else torch.float32
    c, k, s = cfg.channels, cfg.kernel_size, cfg.size
    x = torch.randn(cfg.batch, c, s, s, device=device, dtype=dtype)
    weight = torch.randn(c, c, k, k, device=device, dtype=dtype) / math.sqrt(c * k * k)
    flops = cfg.batch * conv_flops(c, c, k, s * s)
    best: dict[str, Any] = {}
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)

            def forward(xl: torch.Tensor = xl) -> torch.Tensor:
                return F.conv2d(xl, weight, padding=k // 2)

            forward()
            seconds = min(timed(forward, 1, device) for _ in range(3))
            gflops = flops / seconds / 1e9
            if not best or gflops > best["gflops"]:
                name = "channels_last" if layout == torch.channels_last else "contiguous"
                best = {"gflops": gflops, "seconds": seconds, "layout": name}
    best["shape"] = f"({cfg.batch}, {c}, {s}, {s}) -> {c} channels, {k}x{k}, {dtype}"
    return best


def measure_speed(w: Workload, repeats: int, peak_gflops: float) -> dict[str, Any]:
    """Throughput and efficiency of one workload's step (and its stage pass)."""
    device = torch.device(w.device)
    prepared = prepare(w)
    prepared.warmup()
    prepared.step()
    seconds = timed(prepared.step, repeats, device)
    flops = step_flops(w)
    row: dict[str, Any] = {
        "method": w.method,
        "stage": w.stage if w.layerwise else None,
        "stage_inputs": w.stage_inputs if w.layerwise and w.stage >= 2 else "-",
        "precision": "bf16" if w.amp else "fp32",
        "batch": w.batch,
        "seconds_per_step": seconds,
        "images_per_second": w.batch / seconds,
        "gflop_per_step": flops / 1e9,
        "gflops": flops / seconds / 1e9,
        "efficiency": flops / seconds / 1e9 / peak_gflops,
    }
    if prepared.stage_pass is not None:
        prepared.stage_pass()
        pass_seconds = timed(prepared.stage_pass, repeats, device)
        row["stage_pass_images_per_second"] = w.batch / pass_seconds
        row["stage_pass_gflops"] = stage_pass_flops(w) / pass_seconds / 1e9
    del prepared
    gc.collect()
    return row


def certified_times(cfg: SpeedBenchConfig) -> list[dict[str, Any]]:
    """The certified solver of the convex stages, timed once per precision and
    training-set size of ``certified_images`` (cached inputs, bf16 ones under autocast;
    `cvxmri.benchmark.workload.Prepared.solve`, after its warm-up on a small image): its
    set-up (patch basis, Gram matrix), the pass at zero that gives ``beta_max``, and one
    solve at the path's first beta (its refinement rounds bounded as the workload says,
    the basis growing as in training). A training run solves a path of such betas. Stage
    1 and stage 2 are timed: every later stage has stage 2's program."""
    rows: list[dict[str, Any]] = []
    if "layerwise-convex" not in cfg.methods:
        return rows
    device = torch.device(cfg.device)
    plan = [
        (precision, stage, stands_for, images)
        for precision in cfg.precisions
        for stage, stands_for in certified_stages(cfg.layers)
        for images in cfg.certified_images
    ]
    for precision, stage, stands_for, images in plan:
        w = cfg.workload(
            "layerwise-convex",
            stage=stage,
            stage_inputs="cached",
            part="solve",
            batch=images,
            amp=precision == "bf16",
        )
        prepared = prepare(w)
        prepared.warmup()
        assert prepared.solve is not None
        began = time.perf_counter()
        cert = prepared.solve()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        rows.append(
            {
                "stage": stage,
                "stands_for": stands_for,
                "precision": precision,
                "images": images,
                "seconds": seconds,
                "seconds_per_image": seconds / images,
                "setup_seconds": cert["setup_seconds"],
                "solve_seconds": cert["seconds"],
                "passes": cert["passes"],
                "program_unknowns": program_unknowns(w),
                "unknowns": cert["unknowns"],
                "rank": cert.get("rank"),
                "relative_gap": cert["relative_gap"],
            }
        )
        log.info("%s, %d images: %s", w.describe(), images, rows[-1])
        del prepared
        gc.collect()
    return rows


def training_times(rows: list[dict[str, Any]], cfg: SpeedBenchConfig) -> list[dict[str, Any]]:
    """Projected training time per method, stage inputs and precision (module docstring)."""
    totals = []
    work = cfg.epochs * cfg.images
    for precision in cfg.precisions:
        mine = [r for r in rows if r["precision"] == precision]
        for method in cfg.methods:
            if method not in LAYERWISE:
                found = [r for r in mine if r["method"] == method]
                if found:
                    seconds = work / found[0]["images_per_second"]
                    totals.append(_total(method, "-", precision, seconds, cfg))
                continue
            for mode in cfg.stage_inputs:
                stages = [
                    r for r in mine if r["method"] == method and r["stage_inputs"] in (mode, "-")
                ]
                if len(stages) != cfg.layers - 1:
                    continue
                seconds = sum(work / r["images_per_second"] for r in stages)
                seconds += sum(
                    cfg.images / r["stage_pass_images_per_second"]
                    for r in stages
                    if "stage_pass_images_per_second" in r
                )
                totals.append(_total(method, mode, precision, seconds, cfg))
    for row in totals:
        reference = next(
            (
                t["seconds"]
                for t in totals
                if t["method"] == "end-to-end" and t["precision"] == row["precision"]
            ),
            math.nan,
        )
        row["vs_end_to_end"] = round(row["seconds"] / reference, 3)
    return totals


def _total(method: str, mode: str, precision: str, seconds: float, cfg: SpeedBenchConfig) -> dict:
    return {
        "method": method,
        "stage_inputs": mode,
        "precision": precision,
        "epochs": cfg.epochs,
        "images": cfg.images,
        "seconds": seconds,
        "hours": round(seconds / 3600, 3),
    }


def run_speed_benchmark(cfg: SpeedBenchConfig, out: Path) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for, write ``speed.json``, ``speed.csv``,
    ``tables.md`` and the plots into ``out``, and return the results."""
    from cvxmri.config import to_dict
    from cvxmri.training.trainer import resolve_device

    device = resolve_device(cfg.device)
    cfg = replace(cfg, device=str(device))
    cfg.validate()
    peaks = {}
    for precision in cfg.precisions:
        peaks[precision] = conv_peak(cfg, precision == "bf16", device)
        log.info("convolution peak %s: %s", precision, peaks[precision])
    rows = []
    for w in tqdm(_plan(cfg), desc="speed", unit="config", disable=None):
        precision = "bf16" if w.amp else "fp32"
        row = measure_speed(w, cfg.repeats, peaks[precision]["gflops"])
        log.info("%s: %s", w.describe(), row)
        rows.append(row)
    totals = training_times(rows, cfg)
    certified = certified_times(cfg)
    result = {
        **result_header(SCHEMA, device),
        "config": to_dict(cfg),
        "conv_peak": peaks,
        "rows": rows,
        "totals": totals,
        "results": totals,
        "certified": certified,
        "targets": speed_targets(totals),
    }
    write_outputs(result, out)
    return result


def speed_targets(totals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layer-wise training time no more than end-to-end's (same epochs, same depth)."""
    out = []
    for row in totals:
        if row["method"] not in LAYERWISE:
            continue
        out.append(
            {
                "name": f"training time, {row['method']} ({row['stage_inputs']} stage inputs) "
                f"over end-to-end, {row['precision']}",
                "value": row["vs_end_to_end"],
                "threshold": 1.0,
                "direction": "at most",
                "met": bool(row["vs_end_to_end"] <= 1.0),
                "note": f"{row['epochs']} epochs per stage",
            }
        )
    return out


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """``speed.json``, ``speed.csv``, ``tables.md`` and the plots."""
    from cvxmri.benchmark.plots import plot_speed

    (out / "speed.json").write_text(json.dumps(result, indent=2))
    keys = list(dict.fromkeys(k for row in result["rows"] for k in row))
    with (out / "speed.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result["rows"])
    (out / "tables.md").write_text(format_tables(result) + "\n")
    plot_speed(result, out)


def format_tables(result: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    cfg = result["config"]
    peaks = ", ".join(
        f"{p}: {v['gflops']:.0f} GFLOP/s ({v['layout']})" for p, v in result["conv_peak"].items()
    )
    lines = [
        f"Speed benchmark, {result['device']}, {cfg['layers']} layers, {cfg['kernel_size']}x"
        f"{cfg['kernel_size']}, {cfg['channels']} channels, {cfg['size']}x{cfg['size']}, "
        f"batch {cfg['batch']}, median of {cfg['repeats']} steps. Convolution peak "
        f"(one {cfg['channels']}->{cfg['channels']} forward convolution): {peaks}.",
        "",
        "| method | stage | stage inputs | precision | s / step | images / s | GFLOP / step "
        "| GFLOP/s | of peak | stage pass images / s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cache = r.get("stage_pass_images_per_second")
        lines.append(
            f"| {r['method']} | {r['stage'] or '-'} | {r['stage_inputs']} | {r['precision']} | "
            f"{r['seconds_per_step']:.3g} | {r['images_per_second']:.3g} | "
            f"{r['gflop_per_step']:.4g} | {r['gflops']:.0f} | {100 * r['efficiency']:.0f}% | "
            f"{'-' if cache is None else f'{cache:.3g}'} |"
        )
    lines += [
        "",
        f"Training time for {cfg['epochs']} epochs (per stage for layer-wise) of "
        f"{cfg['images']} images, projected from the measured throughput.",
        "",
        "| method | stage inputs | precision | hours | vs end-to-end |",
        "|---|---|---|---|---|",
    ]
    for t in result["totals"]:
        lines.append(
            f"| {t['method']} | {t['stage_inputs']} | {t['precision']} | "
            f"{t['seconds'] / 3600:.3g} | {t['vs_end_to_end']:.2f}x |"
        )
    if result.get("certified"):
        lines += [
            "",
            "Certified solver of the convex stages (cached inputs), timed once: set-up "
            "(patch basis, Gram matrix), the pass giving beta_max and one solve at the path's "
            "first beta (a training run solves a path of betas).",
            "",
            "| stages | precision | images | seconds | s / image | set-up s | solve s "
            "| exact passes | unknowns per output (solved) | relative gap |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["certified"]:
            lines.append(
                f"| {', '.join(map(str, r['stands_for']))} | {r['precision']} | {r['images']} | "
                f"{r['seconds']:.3g} | {r['seconds_per_image']:.3g} | "
                f"{r['setup_seconds']:.3g} | {r['solve_seconds']:.3g} | {int(r['passes'])} | "
                f"{unknowns_cell(r['program_unknowns'], r)} | {r['relative_gap']:.1e} |"
            )
    return "\n".join(lines + format_targets(result["targets"]))
