"""Plots of the memory and speed benchmarks (PNG, matplotlib without pyplot's global state).

- ``memory_max_batch.png``: the largest batch per method that fits the budget (as the
  paper's Fig. 4); hatched bars are extrapolated from measured points.
- ``memory_batch.png``: measured peak memory against batch size, the fitted lines and the
  budget.
- ``memory_depth.png``: peak memory against network depth.
- ``speed_throughput.png``: images per second of each method's step (layer-wise: per
  stage).
- ``speed_total.png``: training time for the same epochs (layer-wise: all stages).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

MIB = 1024**2
GIB = 1024**3
COLOURS = {"fp32": "#1f77b4", "bf16": "#ff7f0e"}
NAMES = {
    "end-to-end": "end-to-end",
    "end-to-end-checkpointing": "end-to-end\n+ checkpointing",
    "layerwise-convex": "layer-wise convex",
    "layerwise-nonconvex": "layer-wise\n(non-convex)",
}


def _label(method: str, mode: str) -> str:
    name = NAMES.get(method, method)
    return name if mode == "-" else f"{name}\n({mode} inputs)"


def plot_memory(result: dict[str, Any], out: Path) -> list[Path]:
    """Write the memory plots into ``out``; returns their paths."""
    paths = [_max_batch(result, out / "memory_max_batch.png")]
    paths.append(_batch(result, out / "memory_batch.png"))
    if result["depth"]["rows"]:
        paths.append(_depth(result, out / "memory_depth.png"))
    return paths


def _grouped_bars(
    ax: Any,
    labels: list[str],
    series: dict[str, list[float]],
    hatches: dict[str, list[bool]] | None = None,
    fmt: str = "{:.0f}",
) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        marks = (hatches or {}).get(name, [False] * len(values))
        for x, value, hatched in zip(xs, values, marks, strict=True):
            if value is None or not math.isfinite(value):
                continue
            ax.bar(
                x,
                value,
                width,
                color=COLOURS.get(name, None),
                hatch="//" if hatched else None,
                edgecolor="white" if hatched else None,
                label=name if x == xs[0] else None,
            )
            ax.annotate(
                fmt.format(value),
                (x, value),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)


def _max_batch(result: dict[str, Any], path: Path) -> Path:
    rows = result["results"]
    keys = list(dict.fromkeys((r["method"], r["stage_inputs"]) for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    series: dict[str, list[float]] = {}
    hatches: dict[str, list[bool]] = {}
    for precision in precisions:
        found = {(r["method"], r["stage_inputs"]): r for r in rows if r["precision"] == precision}
        series[precision] = [float(found[k]["max_batch"]) if k in found else math.nan for k in keys]
        hatches[precision] = [
            k in found and found[k]["max_batch_kind"] == "extrapolated" for k in keys
        ]
    fig = Figure(figsize=(max(6.0, 1.3 * len(keys)), 4.0))
    ax = fig.add_subplot()
    _grouped_bars(ax, [_label(*k) for k in keys], series, hatches)
    cfg = result["config"]
    ax.set_ylabel(f"largest batch within {cfg['budget_gb']:g} GiB")
    title = (
        f"{cfg['layers']} layers, {cfg['kernel_size']}x{cfg['kernel_size']}, "
        f"{cfg['channels']} channels, {cfg['size']}x{cfg['size']} ({result['device']})"
    )
    if any(any(h) for h in hatches.values()):
        title += "\nhatched: extrapolated from measured points"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _batch(result: dict[str, Any], path: Path) -> Path:
    precisions = list(dict.fromkeys(c["precision"] for c in result["configurations"]))
    fig = Figure(figsize=(5.0 * len(precisions), 4.0))
    budget = result["budget_bytes"] / GIB
    for index, precision in enumerate(precisions):
        ax = fig.add_subplot(1, len(precisions), index + 1)
        summary = [r for r in result["results"] if r["precision"] == precision]
        top = 0.0
        for row in summary:
            config = _limiting_configuration(result, row)
            if config is None:
                continue
            points = [p for p in config["points"] if "peak_bytes" in p]
            xs = [p["batch"] for p in points]
            ys = [p["peak_bytes"] / GIB for p in points]
            (line,) = ax.plot(xs, ys, "o", label=_label(row["method"], row["stage_inputs"]))
            fit = config["fit"]
            if fit and fit["bytes_per_image"] > 0:
                end = max([*xs, fit["max_batch"] + 1])
                ax.plot(
                    [0, end],
                    [
                        fit["fixed_bytes"] / GIB,
                        (fit["fixed_bytes"] + fit["bytes_per_image"] * end) / GIB,
                    ],
                    "--",
                    color=line.get_color(),
                    linewidth=0.8,
                )
            top = max([top, *ys])
        ax.axhline(budget, color="black", linewidth=0.8)
        ax.text(0, budget, f" budget {budget:g} GiB", va="bottom", fontsize=7)
        ax.set_ylim(0, max(1.15 * budget, 1.1 * top))
        ax.set_xlim(left=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak training memory (GiB)")
        ax.set_title(f"{precision}: measured points, fitted lines", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _limiting_configuration(result: dict[str, Any], row: dict[str, Any]) -> dict | None:
    for config in result["configurations"]:
        if (
            config["method"] == row["method"]
            and config["precision"] == row["precision"]
            and config["stage_inputs"] in (row["stage_inputs"], "-")
            and (row["limiting_stage"] == "-" or config["stage"] == row["limiting_stage"])
        ):
            return config
    return None


def _depth(result: dict[str, Any], path: Path) -> Path:
    rows = result["depth"]["rows"]
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    fig = Figure(figsize=(5.0 * len(precisions), 4.0))
    for index, precision in enumerate(precisions):
        ax = fig.add_subplot(1, len(precisions), index + 1)
        keys = list(
            dict.fromkeys(
                (r["method"], r["stage_inputs"]) for r in rows if r["precision"] == precision
            )
        )
        for method, mode in keys:
            mine = sorted(
                (
                    r
                    for r in rows
                    if (r["method"], r["stage_inputs"], r["precision"]) == (method, mode, precision)
                    and r["peak_bytes"] is not None
                ),
                key=lambda r: r["layers"],
            )
            ax.plot(
                [r["layers"] for r in mine],
                [r["peak_bytes"] / GIB for r in mine],
                "o-",
                label=_label(method, mode).replace("\n", " "),
            )
        ax.set_xlabel("layers")
        ax.set_ylabel("peak training memory (GiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(
            f"{precision}, batch {result['depth']['batch']} (layer-wise: largest stage)",
            fontsize=8,
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_speed(result: dict[str, Any], out: Path) -> list[Path]:
    """Write the speed plots into ``out``; returns their paths."""
    rows = result["rows"]
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["stage"], r["stage_inputs"]) for r in rows))

    def name(key: tuple[str, int | None, str]) -> str:
        method, stage, mode = key
        text = NAMES.get(method, method)
        if stage:
            text += f"\nstage {stage}" + ("" if mode == "-" else f" ({mode[:5]}.)")
        return text

    series = {}
    for precision in precisions:
        found = {
            (r["method"], r["stage"], r["stage_inputs"]): r
            for r in rows
            if r["precision"] == precision
        }
        series[precision] = [
            found[k]["images_per_second"] if k in found else math.nan for k in keys
        ]
    fig = Figure(figsize=(max(6.0, 0.9 * len(keys)), 4.0))
    ax = fig.add_subplot()
    _grouped_bars(ax, [name(k) for k in keys], series, fmt="{:.2g}")
    # Stage 1 (2 input channels) is far faster than the rest: a log scale shows both.
    ax.set_yscale("log")
    ax.set_ylabel("images per second (one training step)")
    cfg = result["config"]
    ax.set_title(
        f"{cfg['layers']} layers, {cfg['channels']} channels, {cfg['size']}x{cfg['size']}, "
        f"batch {cfg['batch']} ({result['device']})",
        fontsize=8,
    )
    for label in ax.get_xticklabels():
        label.set_fontsize(6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    throughput = out / "speed_throughput.png"
    fig.savefig(throughput, dpi=120)

    totals = result["totals"]
    keys2 = list(dict.fromkeys((t["method"], t["stage_inputs"]) for t in totals))
    series2 = {}
    for precision in precisions:
        found2 = {
            (t["method"], t["stage_inputs"]): t for t in totals if t["precision"] == precision
        }
        series2[precision] = [
            found2[k]["seconds"] / 3600 if k in found2 else math.nan for k in keys2
        ]
    fig = Figure(figsize=(max(6.0, 1.3 * len(keys2)), 4.0))
    ax = fig.add_subplot()
    _grouped_bars(ax, [_label(*k) for k in keys2], series2, fmt="{:.3g}")
    ax.set_ylabel("training time (hours, projected)")
    ax.set_title(
        f"{cfg['epochs']} epochs (per stage for layer-wise) of {cfg['images']} images, "
        "from the measured throughput",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    total = out / "speed_total.png"
    fig.savefig(total, dpi=120)
    return [throughput, total]
