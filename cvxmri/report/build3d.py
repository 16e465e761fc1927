"""The report of a 3D reproduce folder (`cvxmri.reproduce3d`): the same rendering as
`cvxmri.report.build`, its own sections. Every number comes from ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvxmri.report import figures
from cvxmri.report.build import Code, Image, Section, Table, write_report

TITLE = "cvxmri: 3D volumes, layer-wise convex against end-to-end training"
CLASSICAL_TITLES = {"zero-filled": "zero-filled", "cs": "CS (3D wavelets)", "cg-sense": "CG-SENSE"}


def _title(row: dict[str, Any]) -> str:
    return CLASSICAL_TITLES.get(row["name"], row["title"])


def _se(difference: dict[str, Any]) -> str:
    se = difference["standard_error"]
    return "" if se is None else f" (standard error {se:.2f} dB over {difference['n']} volumes)"


def _verdict(difference: dict[str, Any]) -> str:
    """Whether a paired difference meets the +1 dB target, and whether the test volumes
    resolve it (the mean more than two standard errors above 1 dB)."""
    mean, se = difference["mean"], difference["standard_error"]
    if mean < 1.0:
        return "target +1 dB: missed"
    if se is not None and mean - 2 * se < 1.0:
        return "target +1 dB: met by the mean, not resolved by these test volumes"
    return "target +1 dB: met"


def _network(row: dict[str, Any]) -> str:
    if "channels" not in row:
        return "-"
    if row["arch"] == "unrolled":
        return f"unrolled, T={row['depth']}, {row['channels']} channels"
    return f"CNN, {row['depth']} layers, {row['channels']} channels"


def _pm(stat: dict[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _overview(results: dict[str, Any]) -> Section:
    config, dataset = results["config"], results["dataset"]
    counts = dataset["file_counts"]
    text = (
        f"Preset **{results['preset']}**: on the 3D volumes of `{dataset['root']}` "
        f"({counts['train']} train, {counts['val']} val, {counts['test']} test volumes), "
        f"mask {results['mask']} over (ky, kz), networks of {config['layers']} layers "
        f"trained on the decoupled view (2D CNN on every readout position's (ky, kz) plane) "
        f"and as 3D CNNs (3x3x3 convolutions, cubic patches), layer-wise convex and "
        f"end-to-end, evaluated on whole **{config['split']}** volumes. Folder "
        f"`{results['folder']}`, collected {results['collected']}; the parts took "
        f"{results['total_seconds']:.0f} s of wall time in all."
    )
    metrics = (
        "Metrics follow fastMRI per volume: PSNR over the volume with its maximum as data "
        "range, SSIM the mean over the readout planes (mean ± std over volumes). The data "
        "are simulated from magnitude volumes: absolute numbers are optimistic, "
        "comparisons between methods are fair."
    )
    return Section("Overview", [text, metrics])


def _glance(results: dict[str, Any]) -> Section:
    answers, memory = results["answers"], results["memory"]
    difference = answers["convex_minus_budget_end_to_end"]
    rows = {r["name"]: r for r in results["rows"]}
    best = max(
        (r for r in results["rows"] if "channels" in r), key=lambda r: r["volume"]["psnr"]["mean"]
    )
    cs = rows["cs"]["volume"]["psnr"]["mean"]
    same_t = answers["unrolled_convex_minus_end_to_end"]
    at_budget = answers["unrolled_convex_minus_budget_end_to_end"]
    depth = rows["3d-unrolled-layerwise-convex"]["depth"]
    budget_t = answers["unrolled_budget_iterations"]
    items = [
        f"**Layer-wise convex 3D against end-to-end 3D at the same memory: "
        f"{difference['mean']:+.2f} dB{_se(difference)}** ({_verdict(difference)}). "
        f"The convex step's peak is "
        f"{memory['budget_mib']:.1f} MiB at patches {'x'.join(map(str, memory['patch']))}, "
        f"batch {memory['batch']}; the widest end-to-end network that fits has "
        f"{answers['budget_channels']} channels (the convex one "
        f"{memory['convex_channels']}).",
        f"**Unrolled networks (3D): greedy convex (T = {depth}) against end-to-end at the "
        f"same memory (T = {budget_t}, the deepest that fits): {at_budget['mean']:+.2f} dB"
        f"{_se(at_budget)}** ({_verdict(at_budget)}); against end-to-end at the same "
        f"T = {depth}: {same_t['mean']:+.2f} dB{_se(same_t)} (that end-to-end network takes "
        f"{1 / answers['unrolled_memory_ratio']:.2f}x the greedy training's memory).",
        f"**Wall time: {answers['minutes']:.1f} min** (target 30 min on 2 idle CPU cores: "
        f"{'met' if answers['thirty_minutes'] else 'missed'} on this machine, "
        f"{results['environment']['cpu_count']} CPUs).",
        f"Best network: {_title(best)}, {best['volume']['psnr']['mean']:.2f} dB, against CS "
        f"{cs:.2f} dB ({best['volume']['psnr']['mean'] - cs:+.2f} dB).",
    ]
    return Section("At a glance", [items])


def _results(results: dict[str, Any]) -> Section:
    table = Table(
        ["method", "view", "network", "training s", "test PSNR (dB)", "test SSIM"],
        [
            [
                _title(r),
                "decoupled 2D" if r["view"] == "decoupled" else "3D",
                _network(r),
                "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}",
                _pm(r["volume"]["psnr"], 2),
                _pm(r["volume"]["ssim"], 4),
            ]
            for r in results["rows"]
        ],
    )
    return Section("Results", [table])


def _memory(results: dict[str, Any]) -> Section:
    memory = results["memory"]
    rows = [
        [
            f"layer-wise convex, stage {s['stage']}",
            str(memory["convex_channels"]),
            f"{s['peak_mib']:.1f}",
            "(the budget)" if s["peak_mib"] == memory["budget_mib"] else "",
        ]
        for s in memory["convex_stages"]
    ]
    rows += [
        ["end-to-end", str(w["channels"]), f"{w['peak_mib']:.1f}", "fits" if w["fits"] else ""]
        for w in memory["end_to_end"]
    ]
    text = (
        f"Peak memory of one training step (patches {'x'.join(map(str, memory['patch']))}, "
        f"batch {memory['batch']}, {memory['layers']} layers, {memory['kernel_size']}^3 "
        f"kernels, device {memory['device']}): {memory['method']}. End-to-end widths are "
        "tried widest first; the first that fits is trained. The whole-volume passes "
        "without gradients (gates, stage inputs, validation) are not counted."
    )
    unrolled = memory["unrolled"]
    volume = "x".join(map(str, unrolled["volume"]))
    unrolled_rows = [
        [
            "greedy convex (any T)",
            f"{unrolled['budget_mib']:.1f}",
            "(the budget: "
            + ", ".join(f"{k} {v['peak_mib']:.1f}" for k, v in unrolled["convex_parts"].items())
            + ")",
        ]
    ] + [
        [
            f"end-to-end, T = {r['iterations']}",
            f"{r['peak_mib']:.1f}",
            "fits" if r["fits"] else "",
        ]
        for r in unrolled["end_to_end"]
    ]
    note = (
        f"The unrolled networks train on whole {volume} volumes, batch 1: greedy convex "
        "training's peak is its iteration's Gram build (step) or a solve, whatever T; "
        "end-to-end's is one step through all T iterations. End-to-end T are tried deepest "
        "first; the first that fits is trained (and T of the greedy network, for the "
        "same-T comparison)."
    )
    return Section(
        "Memory budget",
        [
            text,
            Table(["step", "width", "peak MiB", ""], rows),
            note,
            Table(["unrolled training", "peak MiB", ""], unrolled_rows),
        ],
    )


def _examples(results: dict[str, Any], folder: Path, images: list[Image]) -> Section:
    record = results["examples"]
    with np.load(folder / "examples" / "volumes.npz") as data:
        volumes = {k: data[k] for k in data.files}
    titles = {r["name"]: _title(r) for r in results["rows"] if f"recon_{r['name']}" in volumes}
    image = Image(
        "volumes.png",
        figures.png(figures.orthogonal_slices(volumes, record, titles)),
        f"{record['file']}: {record['rule']}; central planes of every method.",
    )
    images.append(image)
    return Section("Example volume", [image])


def _provenance(results: dict[str, Any]) -> Section:
    env = results["environment"]
    parts = Table(
        ["part", "seconds", "resumed"],
        [
            [p["title"], f"{p.get('seconds', 0):.0f}", str(p.get("resumed", "-"))]
            for p in results["parts"]
        ],
    )
    return Section(
        "Configuration, data and machine",
        [
            Table(["software / machine", "value"], [[k, str(v)] for k, v in env.items()]),
            parts,
            Code(
                "reproduce configuration (config.yaml)",
                yaml.safe_dump(results["config"], sort_keys=False),
                "yaml",
            ),
        ],
    )


def build_report3d(folder: Path, results: dict[str, Any]) -> Path:
    """Write the 3D report into ``<folder>/report/``; return the path of ``report.html``."""
    images: list[Image] = []
    parts = [
        _overview(results),
        _glance(results),
        _results(results),
        _memory(results),
        _examples(results, folder, images),
        _provenance(results),
    ]
    return write_report(folder, parts, images, TITLE)
