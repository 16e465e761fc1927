"""The report of a reproduce folder: ``report/report.html`` (self-contained, images as
base64) and ``report/report.md`` with its PNGs beside it.

Both are rendered from one list of sections, so they say the same. Every number comes from
``results.json`` (formatted, never recomputed); the images come from the folder's NumPy
files, drawn by `cvxmri.report.figures`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvxmri.report import figures


@dataclass
class Table:
    """A table: header and rows of cell text."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    """A PNG figure with a caption; ``name`` is its file name beside ``report.md``."""

    name: str
    data: bytes
    caption: str


@dataclass
class Code:
    """A collapsed block of text (a config, the manifest) under a one-line summary."""

    summary: str
    text: str
    language: str = ""


@dataclass
class Section:
    """A titled part of the report: text paragraphs, bullet lists, tables, images, code."""

    title: str
    blocks: list[str | list[str] | Table | Image | Code] = field(default_factory=list)


def _pm(stat: dict[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def _name(method: str) -> str:
    return figures.NAMES.get(method, method)


# ----------------------------------------------------------------------------- sections


def _overview(results: dict[str, Any]) -> Section:
    config = results["config"]
    dataset = results["dataset"]
    counts = dataset["file_counts"]
    text = (
        f"Preset **{results['preset']}**: networks of {config['layers']} layers trained "
        f"layer-wise (convex stages, and the non-convex ablation) and end-to-end on the "
        f"dataset `{dataset['root']}` ({counts['train']} train, {counts['val']} val, "
        f"{counts['test']} test files), evaluated on the **{config['split']}** split. "
        f"Folder `{results['folder']}`, collected {results['collected']}; the parts took "
        f"{results['total_seconds']:.0f} s of wall time in all."
    )
    caveat = (
        "The data are simulated multi-coil k-space from magnitude images of real anatomy: "
        "absolute PSNR and SSIM are optimistic (an 'implicit data crime', Shimron et al., "
        "PNAS); comparisons between methods on the same data are fair. Metrics follow "
        "fastMRI: per volume, data range = the volume's maximum (mean ± std over volumes), "
        "and per slice (data range = the slice's maximum)."
    )
    return Section("Overview", [text, caveat])


def _glance(results: dict[str, Any]) -> Section:
    items = []
    for answer in results["answers"]:
        psnr, ssim = answer["psnr"], answer["ssim"]
        convex, ablation = answer["convex_minus_end_to_end"], answer["ablation_minus_end_to_end"]
        line = (
            f"**{answer['label']}**, {answer['layers']} layers: layer-wise convex "
            f"{psnr['layerwise-convex']:.2f} dB / {ssim['layerwise-convex']:.4f}, end-to-end "
            f"{psnr['end-to-end']:.2f} dB / {ssim['end-to-end']:.4f}: difference "
            f"{_signed(convex['psnr'], 2)} dB, {_signed(convex['ssim'], 4)} SSIM. Non-convex "
            f"layer-wise: {psnr['layerwise-nonconvex']:.2f} dB "
            f"({_signed(ablation['psnr'], 2)} dB against "
            f"end-to-end). References: zero-filled {psnr['zero-filled']:.2f} dB, CS "
            f"{psnr['cs']:.2f} dB (layer-wise convex "
            f"{_signed(answer['convex_minus_cs']['psnr'], 2)} dB against CS)."
        )
        gaps = answer["relative_gap_range"]
        if gaps is not None:
            low, high = f"{gaps[0]:.2e}", f"{gaps[1]:.2e}"
            span = low if low == high else f"{low} to {high}"
            line += (
                f" Final relative duality gaps of the convex stages: {span} (0 = certified "
                "global optimum, 1 = nothing certified)"
            )
            if answer.get("certified") is not None:
                every = "every" if answer["certified"] else "not every"
                line += f": {every} convex stage certified to {answer['tol']:g}"
            line += "."
        seconds = answer["train_seconds"]
        line += (
            f" Training wall time: layer-wise convex {seconds['layerwise-convex']:.0f} s, "
            f"end-to-end {seconds['end-to-end']:.0f} s."
        )
        items.append(line)
    for answer in (results.get("unrolled") or {}).get("answers", []):
        items.append(_unrolled_glance(answer))
    run = results["memory_run"]
    peaks = {r["method"]: r for r in run["rows"]}
    if {"end-to-end", "layerwise-convex"} <= peaks.keys():
        convex, e2e = peaks["layerwise-convex"], peaks["end-to-end"]
        items.append(
            f"**Memory** (one training step at batch {run['batch']}, measured in this run): "
            f"layer-wise convex {_cell(convex['peak_mib'])} MiB, end-to-end "
            f"{_cell(e2e['peak_mib'])} MiB; largest batch in {run['budget_gb']:g} GiB "
            f"{convex['max_batch']} against {e2e['max_batch']} "
            f"({_cell(convex['vs_end_to_end'])}x, extrapolated)." + _certified_memory(results)
        )
    return Section("At a glance", [items])


def _certified_memory(results: dict[str, Any]) -> str:
    """What the certified solver held, where this run's convex stages used it: the memory
    rows measure one mini-batch step (Adam's), which it does not take."""
    held = [c["held_mib"] for c in results["certificates"] if "held_mib" in c]
    if not held:
        return ""
    return (
        " That is an Adam mini-batch step; the certified solver of this run's convex stages "
        f"works on a stage's whole training set and held up to {max(held):.0f} MiB (its "
        "patch coordinates and Gram matrix), more than either: its memory does not show "
        "the layer-wise advantage."
    )


def _depth(results: dict[str, Any], images: list[Image]) -> Section:
    rows = []
    layers = results["config"]["layers"]
    for mask in results["masks"]:
        for method in figures.METHOD_STYLE:
            by_depth = {
                m["layers"]: m
                for m in results["metrics"]
                if m["mask"] == mask["key"] and m["method"] == method
            }
            cells = [
                f"{by_depth[d]['volume']['psnr']['mean']:.2f} / "
                f"{by_depth[d]['volume']['ssim']['mean']:.4f}"
                if d in by_depth
                else ""
                for d in range(2, layers + 1)
            ]
            rows.append([mask["label"], _name(method), *cells])
    figure = Image(
        "depth.png",
        figures.png(figures.depth_curves(results)),
        "Test PSNR and SSIM (volume means) against the number of layers; layer-wise: the "
        "network after every stage. Dotted: zero-filled; dash-dotted: CS; dashed grey: CG-SENSE.",
    )
    images.append(figure)
    table = Table(["mask", "method", *(f"{d} layers" for d in range(2, layers + 1))], rows)
    return Section(
        "Metrics against the number of layers (the paper's Fig. 2)",
        [figure, "Test PSNR (dB) / SSIM, volume means:", table],
    )


def certification(answer: dict[str, Any]) -> str:
    """What the certificates of a mask's convex network say, from its answer (`collect`):
    ``certified to 1e-3`` when every stage's relative gap is at most ``tol``, otherwise the
    largest gap; empty without certificates."""
    if answer.get("largest_gap") is None:
        return ""
    if answer["certified"]:
        return f"certified to {answer['tol']:g}"
    return f"largest gap {answer['largest_gap']:.2e}"


def _results_table(results: dict[str, Any]) -> Section:
    layers = results["config"]["layers"]
    rows = []
    n_volumes = n_slices = 0
    certified = {a["mask"]: certification(a) for a in results["answers"]}
    for mask in results["masks"]:
        for entry in results["metrics"]:
            if entry["mask"] != mask["key"] or entry["layers"] not in (None, layers):
                continue
            volume, per_slice = entry["volume"], entry["slice"]
            n_volumes, n_slices = volume["psnr"]["n"], per_slice["psnr"]["n"]
            rows.append(
                [
                    mask["label"],
                    _name(entry["method"]),
                    _pm(volume["psnr"], 2),
                    _pm(volume["ssim"], 4),
                    _pm(per_slice["psnr"], 2),
                    _pm(per_slice["ssim"], 4),
                    _pm(volume["nmse"], 4),
                    certified[mask["key"]] if entry["method"] == "layerwise-convex" else "",
                ]
            )
    header = [
        "mask",
        "method",
        "PSNR (dB)",
        "SSIM",
        "PSNR slice (dB)",
        "SSIM slice",
        "NMSE",
        "certificate",
    ]
    text = (
        f"Networks at full depth ({layers} layers). Mean ± standard deviation over the "
        f"{n_volumes} {results['config']['split']} volumes (PSNR, SSIM, NMSE) and over the "
        f"{n_slices} slices (slice-based PSNR and SSIM). Certificate: every convex stage "
        "certified to the run's relative duality gap tolerance, or the largest gap reached."
    )
    return Section("Results", [text, Table(header, rows)])


def _timing(results: dict[str, Any]) -> Section:
    recon = {(m["mask"], m["method"], m["layers"]): m["seconds"] for m in results["metrics"]}
    labels = {m["key"]: m["label"] for m in results["masks"]}
    rows = []
    for run in results["runs"]:
        rows.append(
            [
                labels[run["mask"]],
                _name(run["method"]),
                str(run["layers"]),
                str(run["epochs"]),
                _seconds(run["train_seconds"]),
                _seconds(run["wall_seconds"]) + (" (resumed)" if run["resumed"] else ""),
                f"{recon[(run['mask'], run['method'], run['layers'])]:.2f}",
            ]
        )
    for entry in results["metrics"]:
        if entry["layers"] is None:
            rows.append(
                [
                    labels[entry["mask"]],
                    _name(entry["method"]),
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{entry['seconds']:.2f}",
                ]
            )
    header = [
        "mask",
        "method",
        "layers",
        "epochs (all stages)",
        "training s",
        "part wall s",
        f"{results['config']['split']} reconstruction s",
    ]
    text = (
        "Training s: the sum of the epochs' times (training, validation and certificates). "
        "Part wall s: the whole training part (data loading, stage inputs, export), for "
        "the session that finished it. Reconstruction s: the whole split with each method."
    )
    return Section("Wall time", [text, Table(header, rows)])


def _examples(results: dict[str, Any], folder: Path, images: list[Image]) -> Section:
    blocks: list[str | list[str] | Table | Image | Code] = []
    for mask, record in zip(results["masks"], results["examples"], strict=True):
        arrays = dict(np.load(folder / mask["key"] / "examples" / "images.npz"))
        figure = Image(
            f"examples-{mask['kind']}.png",
            figures.png(figures.examples(arrays, record, mask["label"])),
            f"{mask['label']}: {record['rule']} ({record['file']}, slice {record['slice']}; "
            f"median {record['median_psnr']:.2f} dB). Top: images with a zoomed inset; "
            "bottom: the sampling mask and the error magnitudes on one scale. Titles: "
            "slice PSNR and SSIM.",
        )
        images.append(figure)
        blocks.append(figure)
    return Section("Representative test slices (the paper's Fig. 3)", blocks)


def _certificates(results: dict[str, Any], images: list[Image]) -> Section:
    labels = {m["key"]: m["label"] for m in results["masks"]}
    rows = [
        [
            labels[c["mask"]],
            str(c["stage"]),
            str(c.get("epoch", c.get("iteration", "-"))),
            f"{c['primal']:.4g}",
            f"{c['dual']:.4g}",
            f"{c['relative_gap']:.2e}",
            f"{c['max_dual_norm']:.3g}",
            f"{c['beta']:g}",
            f"{c.get('violation_fraction', float('nan')):.3f}",
        ]
        for c in results["certificates"]
    ]
    text = (
        "Each convex stage is a group-lasso problem on its fixed training set (whole images, "
        "fixed masks). From the stage's final weights: the primal value, the value of a "
        "dual-feasible point (the residual scaled by clip(<r, e> / ||e||^2, 0, beta / largest "
        "dual group norm), accumulated in float64) "
        "and the relative duality gap (primal - dual) / primal, which bounds the "
        "suboptimality: 0 certifies the global optimum, 1 certifies nothing. The last column "
        "is the fraction of (pixel, unit) pairs where the exact ReLU mapping of the stage "
        "disagrees with its gates (`certificates.json` in each layer-wise convex run folder)."
    )
    header = [
        "mask",
        "stage",
        "epoch",
        "primal",
        "dual",
        "relative gap",
        "largest dual norm",
        "beta",
        "ReLU mapping violation",
    ]
    blocks: list[str | list[str] | Table | Image | Code] = [text, Table(header, rows)]
    figure = _gap_figure(
        images,
        results["masks"],
        results.get("gap_traces", []),
        "layer-wise convex CNN",
        "gaps.png",
        "Relative duality gap of every convex stage against the seconds spent on it: for "
        "Adam, at its certificate epochs; for the certified solver, along its beta path "
        "(set-up not counted). Below the dashed line a stage is certified.",
    )
    if figure is not None:
        blocks.append(figure)
    return Section("Optimality certificates of the convex stages", blocks)


def _gap_figure(
    images: list[Image],
    masks: list[dict[str, Any]],
    traces: list[dict[str, Any]],
    network: str,
    name: str,
    caption: str,
    unit: str = "stage",
) -> Image | None:
    """The gap-against-time figure (`figures.gap_traces`) of ``traces``, a panel per mask
    that has any, added to ``images``; None when no mask has any."""
    panels = [
        (f"{network}, {mask['label']}", chosen)
        for mask in masks
        if (chosen := [t for t in traces if t["mask"] == mask["key"]])
    ]
    if not panels:
        return None
    tol = panels[0][1][0]["tol"]
    figure = Image(name, figures.png(figures.gap_traces(panels, tol, unit)), caption)
    images.append(figure)
    return figure


def _memory(results: dict[str, Any]) -> Section:
    run = results["memory_run"]
    folder = results["folder"]
    blocks: list[str | list[str] | Table | Image | Code] = [
        f"Measured in this run (`memory/`): the peak memory of one training step (forward, "
        f"backward, Adam update) of every method at this run's architecture ({run['layers']} "
        f"layers, {run['channels']} channels, {run['kernel_size']}x{run['kernel_size']}, "
        f"{run['size']}x{run['size']} crops) and batch size {run['batch']}; layer-wise: its "
        f"largest stage. Each point is a fresh process on {run['device']}: "
        f"{run['measurement']}. The largest batch in {run['budget_gb']:g} GiB is extrapolated "
        "from the peaks at batch 1 and the run's batch size.",
        Table(
            [
                "method",
                "stage inputs",
                "precision",
                f"peak at batch {run['batch']} (MiB)",
                "MiB per image",
                f"largest batch in {run['budget_gb']:g} GiB",
                "vs end-to-end",
            ],
            [
                [
                    r["method"],
                    r["stage_inputs"],
                    r["precision"],
                    _cell(r["peak_mib"]),
                    _cell(r["mib_per_image"]),
                    _cell(r["max_batch"]),
                    f"{_cell(r['vs_end_to_end'])}x",
                ]
                for r in run["rows"]
            ],
        ),
    ]
    for kind, title in (("memory", "Memory benchmark"), ("speed", "Speed benchmark")):
        bench = results.get(kind)
        if bench is None:
            blocks.append(
                f"No {kind} benchmark in this folder: run `cvxmri benchmark {kind}` (for "
                f"example at the paper's size on a GPU) and rebuild the report with "
                f"`cvxmri report {folder} --{kind}-json FILE`."
            )
            continue
        about = "".join(f"; {key}: {bench[key]}" for key in ("device", "command") if key in bench)
        blocks.append(f"{title} (`{kind}.json`{about}):")
        blocks.append(_scalar_table(bench["results"]))
        depth = bench.get("depth")
        if isinstance(depth, dict) and isinstance(depth.get("rows"), list) and depth["rows"]:
            blocks += ["Peak memory against depth:", _scalar_table(depth["rows"])]
        if isinstance(bench.get("targets"), list) and bench["targets"]:
            blocks += [f"The {kind} benchmark's targets:", _scalar_table(bench["targets"])]
    return Section("Memory and speed", blocks)


def _standard_error(difference: dict[str, Any]) -> str:
    """`` (standard error 0.12 dB over 3 volumes)`` of a paired difference, if known."""
    paired = difference.get("paired") or {}
    if paired.get("standard_error") is None:
        return ""
    return f" (standard error {paired['standard_error']:.2f} dB over {paired['n']} volumes)"


def _unrolled_glance(answer: dict[str, Any]) -> str:
    """One "At a glance" line: the convex unrolled network against CS and end-to-end."""
    psnr, ssim = answer["psnr"], answer["ssim"]
    line = f"**Unrolled, {answer['label']}**, T = {answer['iterations']}:"
    if "layerwise-convex" in psnr:
        line += f" greedy convex {psnr['layerwise-convex']:.2f} dB / {ssim['layerwise-convex']:.4f}"
        if "convex_minus_cs" in answer:
            diff = answer["convex_minus_cs"]["psnr"]
            line += (
                f"; against CS ({psnr['cs']:.2f} dB): {_signed(diff, 2)} dB"
                f"{_standard_error(answer['convex_minus_cs'])}, target +1 dB "
                f"{'met' if diff >= 1.0 else 'missed'}"
            )
        if "convex_minus_end_to_end" in answer:
            diff = answer["convex_minus_end_to_end"]
            line += (
                f"; against end-to-end ({psnr['end-to-end']:.2f} dB): "
                f"{_signed(diff['psnr'], 2)} dB{_standard_error(diff)}, "
                f"{_signed(diff['ssim'], 4)} SSIM"
            )
        if answer["largest_gap"] is not None:
            word = "every" if answer["certified"] else "not every"
            line += (
                f"; {word} iteration certified (largest relative gap {answer['largest_gap']:.1e})"
            )
        line += "."
    else:
        line += " " + ", ".join(f"{_name(m)} {v:.2f} dB" for m, v in psnr.items()) + "."
    return line


def _dc_step(dc: dict[str, Any]) -> str:
    """What the report calls a data-consistency setting (`cvxmri.models.dc.DCConfig`)."""
    if dc["kind"] == "gradient":
        return f"a gradient step (eta {dc['eta']:g})"
    solve = {
        "cg": f"{dc['cg_iterations']} CG iterations",
        "chebyshev": f"a Chebyshev polynomial of degree {dc['cg_iterations']}",
        "direct": "solved exactly per readout line",
    }[dc["kind"]]
    return f"the CG-SENSE proximal step ({solve}, lambda {dc['lamda']:g})"


def _unrolled(results: dict[str, Any], folder: Path, images: list[Image]) -> Section:
    unrolled = results["unrolled"]
    network = unrolled["network"]
    labels = {m["key"]: m["label"] for m in results["masks"]}
    steps = {key: _dc_step(dc) for key, dc in unrolled["dc_by_mask"].items()}
    step = (
        next(iter(steps.values()))
        if len(set(steps.values())) == 1
        else "; ".join(f"{labels[key]}: {text}" for key, text in steps.items())
    )
    count = unrolled["max_train_slices"]
    slices = f"the first {count} training slices" if count else "all training slices"
    epochs = unrolled["epochs"]
    model = network.get("gram_images", 0)
    model_text = (
        f"; the solver's Gram model from {model} of the slices, its certificate from all"
        if model
        else ""
    )
    ways = {
        "layerwise-convex": "greedy convex (every iteration a group lasso solved along a beta "
        f"path and certified, beta chosen on validation{model_text})",
        "layerwise-nonconvex": "greedy non-convex (each iteration by Adam on the fixed "
        f"previous iterate, {epochs} epochs)",
        "end-to-end": f"end-to-end ({unrolled.get('end_to_end_epochs', epochs)} epochs "
        "through all iterations)",
    }
    blocks: list[str | list[str] | Table | Image | Code] = [
        f"Unrolled networks with data consistency, T = {unrolled['iterations']} "
        "iterations: each iteration adds a learned regulariser's output to the previous "
        f"iterate and applies data consistency (DC): {step}. Each regulariser is a "
        f"{network['kernel_size']}x{network['kernel_size']} convolution of "
        f"{network['channels']} channels, a ReLU (or gates) and a 1x1 convolution. Trained "
        f"on whole images, {slices}: "
        + "; ".join(ways[m] for m in results["config"]["unrolled"]["methods"])
        + ". The greedy curves are one network each, tested after every iteration; each "
        "end-to-end point is its own network."
    ]
    figure = Image(
        "unrolled.png",
        figures.png(figures.unrolled_curves(results)),
        "Unrolled networks: test PSNR and SSIM (volume means) against T. Dotted: "
        "zero-filled; dash-dotted: CS; dashed grey: CG-SENSE.",
    )
    images.append(figure)
    blocks.append(figure)
    t_values = sorted({m["iterations"] for m in unrolled["metrics"]})
    rows = []
    for mask in results["masks"]:
        for method in ("layerwise-convex", "layerwise-nonconvex", "end-to-end"):
            by_t = {
                m["iterations"]: m
                for m in unrolled["metrics"]
                if m["mask"] == mask["key"] and m["method"] == method
            }
            if not by_t:
                continue
            cells = [
                f"{by_t[t]['volume']['psnr']['mean']:.2f} / {by_t[t]['volume']['ssim']['mean']:.4f}"
                if t in by_t
                else ""
                for t in t_values
            ]
            rows.append([mask["label"], _name(method), *cells])
    blocks += [
        "Test PSNR (dB) / SSIM, volume means, by T:",
        Table(["mask", "method", *(f"T={t}" for t in t_values)], rows),
    ]
    seconds = [
        [
            labels[r["mask"]],
            _name(r["method"]),
            str(r["iterations"]),
            _seconds(r["train_seconds"]),
            _seconds(r["wall_seconds"]),
        ]
        for r in unrolled["runs"]
    ]
    blocks += [
        "Training time (s):",
        Table(["mask", "method", "T", "training s", "part wall s"], seconds),
    ]
    if unrolled["certificates"]:
        blocks += [
            "The selected beta of every greedy convex iteration and its certificate (the "
            "relative duality gap bounds the suboptimality; `certificates.json` holds the "
            "whole path):",
            Table(
                ["mask", "iteration", "beta", "beta / beta_max", "relative gap", "certified"],
                [
                    [
                        labels[c["mask"]],
                        str(c["iteration"]),
                        f"{c['beta']:.3g}",
                        f"{c['beta_fraction']:g}",
                        f"{c['relative_gap']:.2e}",
                        "yes" if c["certified"] else "no",
                    ]
                    for c in unrolled["certificates"]
                ],
            ),
        ]
    figure = _gap_figure(
        images,
        results["masks"],
        unrolled.get("gap_traces", []),
        "greedy convex unrolled",
        "gaps-unrolled.png",
        "Relative duality gap of every greedy convex iteration against the seconds its "
        "solver spent, along the beta path (the Gram matrix's build not counted; each "
        "smaller beta starts from the previous solution, above the line). Below the dashed "
        "line an iteration is certified.",
        "iteration",
    )
    if figure is not None:
        blocks.append(figure)
    memory = unrolled["memory"]
    if memory is not None:
        config = memory["config"]
        peaks: dict[str, dict[int, float | None]] = {}
        for row in memory["rows"]:
            peaks.setdefault(row["method"], {})[row["iterations"]] = row["peak_mib"]
        ts = sorted(config["iterations"])
        blocks += [
            f"Peak training memory (MiB) against T, measured in this run (`memory-unrolled/`) "
            f"on {memory['device']}: one training step at batch {config['batch']} "
            f"({config['size']}x{config['size']}, {config['coils']} coils), each point a "
            f"fresh process ({memory['measurement']}). Greedy methods: iteration T's step "
            "(the convex one: its Gram build and solve).",
            Table(
                ["method", *(f"T={t}" for t in ts)],
                [[method, *(_cell(v.get(t)) for t in ts)] for method, v in peaks.items()],
            ),
        ]
        if memory["targets"]:
            blocks.append(_scalar_table(memory["targets"]))
    for mask, record in zip(results["masks"], results["examples"], strict=True):
        arrays = dict(np.load(folder / mask["key"] / "examples" / "images.npz"))
        networks = tuple(m for m in figures.UNROLLED_STYLE if f"recon_{m}" in arrays)
        if not networks:
            continue
        figure = Image(
            f"examples-unrolled-{mask['kind']}.png",
            figures.png(figures.examples(arrays, record, mask["label"], networks)),
            f"{mask['label']}: the representative slice of the previous section, by the "
            f"unrolled networks at T = {unrolled['iterations']}. Titles: slice PSNR and SSIM.",
        )
        images.append(figure)
        blocks.append(figure)
    return Section("Unrolled networks with data consistency", blocks)


def _scalar_table(rows: list[dict[str, Any]]) -> Table:
    """The scalar fields of a list of JSON objects, as they are."""
    keys = list(
        dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, dict | list))
    )
    return Table(keys, [[_cell(row.get(k, "")) for k in keys] for row in rows])


def _cell(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _inspect(results: dict[str, Any], folder: Path, images: list[Image]) -> Section:
    blocks: list[str | list[str] | Table | Image | Code] = []
    records = results["inspect"]
    relative = records[0]["surviving_relative"]
    rows = []
    for mask, record in zip(results["masks"], records, strict=True):
        counts = zip(record["surviving"], record["units"], strict=True)
        rows.append([mask["label"], *(f"{s} / {u}" for s, u in counts)])
    stages = len(records[0]["group_norms"])
    blocks.append(
        "**Surviving neurons.** The group lasso of each convex stage drives whole units to "
        f"zero; a unit survives when its group norm exceeds {relative:g} of the stage's "
        "largest. Surviving units / units per stage:"
    )
    blocks.append(Table(["mask", *(f"stage {s}" for s in range(1, stages + 1))], rows))
    figure = Image(
        "group-norms.png",
        figures.png(figures.group_norms(records, results["masks"])),
        "Group norms of every convex stage, sorted, relative to the stage's largest.",
    )
    images.append(figure)
    blocks.append(figure)
    blocks.append(
        "**Effective filters.** The networks are piecewise linear: with the gate and ReLU "
        "patterns at an input fixed, each output pixel is a linear filter of the zero-filled "
        "image (plus an offset). Shown: the filter of the learned correction (the skip's "
        "identity removed), real output from real input, over the receptive field, at three "
        "pixels, for the convex network after every stage and for end-to-end (autograd "
        "Jacobian rows)."
    )
    # Each mask's inspection arrays and example images, read once for both figures.
    loaded = [
        (
            dict(np.load(folder / mask["key"] / "inspect" / "inspect.npz")),
            dict(np.load(folder / mask["key"] / "examples" / "images.npz")),
        )
        for mask in results["masks"]
    ]
    for mask, record, (arrays, images_npz) in zip(results["masks"], records, loaded, strict=True):
        pixels = ", ".join(
            f"{p['name']} (row {p['row']}, column {p['col']})" for p in record["pixels"]
        )
        figure = Image(
            f"filters-{mask['kind']}.png",
            figures.png(figures.filters(arrays, record, images_npz["target"])),
            f"{mask['label']}: effective filters at {pixels}; radius {record['radius']} pixels.",
        )
        images.append(figure)
        blocks.append(figure)
    blocks.append(
        "**Sign-pattern clusters.** At every pixel a hidden layer has a 0/1 pattern (which "
        "gates or ReLUs are on), which selects its linear piece. k-means (Hamming distance) "
        "of these per-pixel vectors over the representative test slice shows which regions "
        "each layer treats alike."
    )
    for mask, record, (arrays, images_npz) in zip(results["masks"], records, loaded, strict=True):
        figure = Image(
            f"clusters-{mask['kind']}.png",
            figures.png(figures.clusters(arrays, record, images_npz)),
            f"{mask['label']}: {record['clusters']} clusters per layer; titles give the "
            "number of distinct patterns over the slice.",
        )
        images.append(figure)
        blocks.append(figure)
    return Section("What each layer learned", blocks)


def _provenance(results: dict[str, Any]) -> Section:
    env = results["environment"]
    blocks: list[str | list[str] | Table | Image | Code] = [
        Table(["software / machine", "value"], [[k, str(v)] for k, v in env.items()])
    ]
    dataset = results["dataset"]
    manifest = dataset["manifest"]
    if manifest is not None:
        sources = "; ".join(f"{s['name']}: {s['origin']}" for s in manifest["sources"])
        counts = manifest["counts"]
        blocks.append(
            f"Dataset `{dataset['root']}` ({manifest['kind']}): sources {sources}. Slices: "
            f"train {counts['train']}, val {counts['val']}, test {counts['test']}. Split rule: "
            f"{manifest['split_rule']}."
        )
        blocks.append(
            Code("dataset manifest (manifest.json)", json.dumps(manifest, indent=2), "json")
        )
    else:
        blocks.append(f"Dataset `{dataset['root']}`: no manifest.json (not simulated by cvxmri).")
    blocks.append(
        Code(
            "reproduce configuration (config.yaml)",
            yaml.safe_dump(results["config"], sort_keys=False),
            "yaml",
        )
    )
    for run in results["runs"]:
        blocks.append(
            Code(
                f"training configuration: {run['folder']}",
                yaml.safe_dump(run["config"], sort_keys=False),
                "yaml",
            )
        )
    return Section("Configuration, data and machine", blocks)


def sections(results: dict[str, Any], folder: Path) -> tuple[list[Section], list[Image]]:
    """The report's sections and the images they hold."""
    images: list[Image] = []
    parts = [
        _overview(results),
        _glance(results),
        _depth(results, images),
        _results_table(results),
        _examples(results, folder, images),
        *([_unrolled(results, folder, images)] if results.get("unrolled") else []),
        _timing(results),
        _certificates(results, images),
        _memory(results),
        _inspect(results, folder, images),
        _provenance(results),
    ]
    return parts, images


# ---------------------------------------------------------------------------- rendering

TITLE = "cvxmri: layer-wise convex against end-to-end training"


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_markdown(parts: list[Section], title: str = TITLE) -> str:
    """The report as Markdown; images are referenced by file name."""
    lines = [f"# {title}", ""]
    for section in parts:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, str):
                lines += [block, ""]
            elif isinstance(block, list):
                lines += [f"- {item}" for item in block] + [""]
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += [
                    "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                    for row in block.rows
                ]
                lines.append("")
            elif isinstance(block, Image):
                lines += [f"![{block.caption}]({block.name})", "", f"*{block.caption}*", ""]
            else:
                lines += [
                    f"<details><summary>{html.escape(block.summary)}</summary>",
                    "",
                    f"```{block.language}",
                    block.text.rstrip(),
                    "```",
                    "",
                    "</details>",
                    "",
                ]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: .9em; color: #555; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
code { background: #f2f2f2; padding: 0 .2em; }
"""


def to_html(parts: list[Section], title: str = TITLE) -> str:
    """The report as one self-contained HTML page (images inlined as base64 PNGs)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in parts:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, str):
                out.append(f"<p>{_inline_html(block)}</p>")
            elif isinstance(block, list):
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block) + "</ul>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                    for row in block.rows
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.data).decode()
                out.append(
                    f'<figure><img alt="{html.escape(block.caption)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>'
                    f"{_inline_html(block.caption)}</figcaption></figure>"
                )
            else:
                out.append(
                    f"<details><summary>{html.escape(block.summary)}</summary>"
                    f"<pre>{html.escape(block.text)}</pre></details>"
                )
    out.append("</body></html>")
    return "\n".join(out)


def build_report(folder: Path, results: dict[str, Any]) -> Path:
    """Write ``report.html``, ``report.md`` and the PNGs into ``<folder>/report/``; return the
    path of ``report.html``."""
    parts, images = sections(results, folder)
    return write_report(folder, parts, images, TITLE)


def write_report(folder: Path, parts: list[Section], images: list[Image], title: str) -> Path:
    """Write ``report.html``, ``report.md`` and the PNGs of ``parts`` into
    ``<folder>/report/``; return the path of ``report.html``."""
    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    for image in images:
        (out / image.name).write_bytes(image.data)
    (out / "report.md").write_text(to_markdown(parts, title))
    path = out / "report.html"
    path.write_text(to_html(parts, title))
    return path
