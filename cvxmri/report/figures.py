"""The report's figures (matplotlib's object API, no pyplot state), as PNG bytes.

Each function takes what ``results.json`` and the folder's NumPy files hold and returns a
`Figure`; `png` renders one.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.ndimage import gaussian_filter

METHOD_STYLE = {
    "layerwise-convex": {"color": "C0", "marker": "o", "label": "layer-wise convex"},
    "layerwise-nonconvex": {
        "color": "C2",
        "marker": "s",
        "ls": "--",
        "label": "layer-wise, non-convex",
    },
    "end-to-end": {"color": "C3", "marker": "^", "label": "end-to-end"},
}
UNROLLED_STYLE = {
    "unrolled-layerwise-convex": {"color": "C0", "marker": "o", "label": "greedy convex"},
    "unrolled-layerwise-nonconvex": {
        "color": "C2",
        "marker": "s",
        "ls": "--",
        "label": "greedy non-convex",
    },
    "unrolled-end-to-end": {"color": "C3", "marker": "^", "ls": "", "label": "end-to-end"},
}
REFERENCE_STYLE = {
    "zero-filled": {"color": "0.45", "ls": ":", "label": "zero-filled"},
    "cs": {"color": "k", "ls": "-.", "label": "CS (L1-wavelet)"},
    "cg-sense": {"color": "0.6", "ls": "--", "label": "CG-SENSE"},
}
NAMES = {
    "target": "fully sampled",
    "zero-filled": "zero-filled",
    "cs": "CS (L1-wavelet)",
    "cg-sense": "CG-SENSE",
    "end-to-end": "end-to-end",
    "layerwise-convex": "layer-wise convex",
    "layerwise-nonconvex": "layer-wise, non-convex",
    "unrolled-layerwise-convex": "unrolled, greedy convex",
    "unrolled-layerwise-nonconvex": "unrolled, greedy non-convex",
    "unrolled-end-to-end": "unrolled, end-to-end",
}
METRIC_LABEL = {"psnr": "test PSNR (dB)", "ssim": "test SSIM"}


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def depth_curves(results: dict[str, Any]) -> Figure:
    """Test PSNR and SSIM (volume means) against the number of layers, per mask, with
    zero-filled, CS and CG-SENSE (where the results have it: reproduce folders made
    before it was added do not) as horizontal reference lines (the paper's Fig. 2)."""
    masks = results["masks"]
    layers = results["config"]["layers"]
    figure = Figure(figsize=(5.6 * len(masks), 7.2), layout="constrained")
    axes = figure.subplots(2, len(masks), squeeze=False)
    for col, mask in enumerate(masks):
        rows = [m for m in results["metrics"] if m["mask"] == mask["key"]]
        for row, metric in enumerate(("psnr", "ssim")):
            ax = axes[row, col]
            for method, style in METHOD_STYLE.items():
                points = sorted(
                    (m["layers"], m["volume"][metric]["mean"])
                    for m in rows
                    if m["method"] == method
                )
                ax.plot(*zip(*points, strict=True), **style)
            for method, style in REFERENCE_STYLE.items():
                for m in rows:
                    if m["method"] == method:
                        ax.axhline(m["volume"][metric]["mean"], **style)
            ax.set_xticks(range(2, layers + 1))
            ax.set_xlabel("number of layers")
            ax.set_ylabel(METRIC_LABEL[metric])
            ax.set_title(mask["label"])
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return figure


def unrolled_curves(results: dict[str, Any]) -> Figure:
    """Test PSNR and SSIM (volume means) of the unrolled networks against their number of
    iterations T, per mask: the greedy methods after every iteration of one network, the
    end-to-end networks at their own T; the classical methods as horizontal lines."""
    masks = results["masks"]
    unrolled = results["unrolled"]
    figure = Figure(figsize=(5.6 * len(masks), 7.2), layout="constrained")
    axes = figure.subplots(2, len(masks), squeeze=False)
    for col, mask in enumerate(masks):
        rows = [m for m in unrolled["metrics"] if m["mask"] == mask["key"]]
        references = [
            m for m in results["metrics"] if m["mask"] == mask["key"] and m["layers"] is None
        ]
        for row, metric in enumerate(("psnr", "ssim")):
            ax = axes[row, col]
            for name, style in UNROLLED_STYLE.items():
                method = name.removeprefix("unrolled-")
                points = sorted(
                    (m["iterations"], m["volume"][metric]["mean"])
                    for m in rows
                    if m["method"] == method
                )
                if points:
                    ax.plot(*zip(*points, strict=True), **style)
            for method, style in REFERENCE_STYLE.items():
                for m in references:
                    if m["method"] == method:
                        ax.axhline(m["volume"][metric]["mean"], **style)
            ax.set_xticks(range(1, unrolled["iterations"] + 1))
            ax.set_xlabel("iterations T")
            ax.set_ylabel(METRIC_LABEL[metric])
            ax.set_title(f"unrolled, {mask['label']}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return figure


def gap_traces(
    panels: list[tuple[str, list[dict[str, Any]]]], tol: float, unit: str = "stage"
) -> Figure:
    """The relative duality gap of every convex stage against the seconds spent on it
    (`cvxmri.runs.certificate_traces`), log scale, one panel per ``(title, traces)``, one
    line per stage (named ``unit``: an unrolled network's stages are its iterations), and
    ``tol`` (the certified level) as a dashed line."""
    figure = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, traces) in zip(axes, panels, strict=True):
        for trace in traces:
            gaps = np.maximum(np.asarray(trace["relative_gap"], dtype=float), 1e-12)
            ax.plot(trace["seconds"], gaps, marker=".", label=f"{unit} {trace['stage']}")
        ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"certified ({tol:g})")
        ax.set_yscale("log")
        ax.set_xlabel(f"seconds spent on the {unit}")
        ax.set_ylabel("relative duality gap")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def _zoom_window(target: np.ndarray, zero_filled: np.ndarray) -> tuple[int, int, int]:
    """(top, left, size) of a square around the largest smoothed zero-filled error."""
    size = max(8, target.shape[0] // 4)
    error = gaussian_filter(np.abs(zero_filled - target), 3)
    row, col = np.unravel_index(int(np.argmax(error)), error.shape)
    top = int(np.clip(row - size // 2, 0, target.shape[0] - size))
    left = int(np.clip(col - size // 2, 0, target.shape[1] - size))
    return top, left, size


CNN_COLUMNS = ("end-to-end", "layerwise-convex", "layerwise-nonconvex")


def examples(
    images: dict[str, np.ndarray],
    record: dict[str, Any],
    label: str,
    networks: tuple[str, ...] = CNN_COLUMNS,
) -> Figure:
    """A test slice by the classical methods and the ``networks`` (names of ``recon_*``
    images), with error maps and a zoomed inset (the paper's Fig. 3). The error row starts
    with the sampling mask. CG-SENSE is shown where the images have it (reproduce folders
    made before it was added do not)."""
    columns = [
        "target",
        "zero-filled",
        "cs",
        *(["cg-sense"] if "recon_cg-sense" in images else []),
        *networks,
    ]
    metrics = {m["method"]: m for m in record["methods"]}
    target = images["target"]
    shown = {c: target if c == "target" else images[f"recon_{c}"] for c in columns}
    vmax = float(np.percentile(target, 99.5))
    errors = {c: np.abs(shown[c] - target) for c in columns[1:]}
    error_max = max(float(np.percentile(e, 99.5)) for e in errors.values())
    top, left, size = _zoom_window(target, shown["zero-filled"])
    figure = Figure(figsize=(3.1 * len(columns), 6.9), layout="constrained")
    axes = figure.subplots(2, len(columns))
    for col, name in enumerate(columns):
        ax = axes[0, col]
        ax.imshow(shown[name], cmap="gray", vmin=0, vmax=vmax)
        title = NAMES[name]
        if name in metrics:
            title += f"\n{metrics[name]['psnr']:.2f} dB, SSIM {metrics[name]['ssim']:.4f}"
        ax.set_title(title, fontsize=10)
        inset = ax.inset_axes((0.58, 0.0, 0.42, 0.42))
        inset.imshow(shown[name], cmap="gray", vmin=0, vmax=vmax)
        inset.set_xlim(left - 0.5, left + size - 0.5)
        inset.set_ylim(top + size - 0.5, top - 0.5)
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor("yellow")
        ax.indicate_inset_zoom(inset, edgecolor="yellow")
        bottom = axes[1, col]
        if name == "target":
            bottom.imshow(images["mask"], cmap="gray", interpolation="nearest")
            bottom.set_title("sampling mask (k-space)", fontsize=10)
        else:
            shown_error = bottom.imshow(errors[name], cmap="magma", vmin=0, vmax=error_max)
            bottom.set_title(f"|error|, {NAMES[name]}", fontsize=10)
        for a in (ax, bottom):
            a.set_xticks([])
            a.set_yticks([])
    figure.colorbar(shown_error, ax=axes[1, :], shrink=0.8, label="|error|")
    figure.suptitle(f"{label}: {record['file']}, slice {record['slice']}")
    return figure


def group_norms(inspections: list[dict[str, Any]], masks: list[dict[str, Any]]) -> Figure:
    """The group norms of every convex stage, largest first, relative to the stage's
    largest, with the survival threshold."""
    figure = Figure(figsize=(5.6 * len(masks), 3.8), layout="constrained")
    axes = figure.subplots(1, len(masks), squeeze=False)[0]
    for ax, mask, record in zip(axes, masks, inspections, strict=True):
        for stage, norms in enumerate(record["group_norms"], 1):
            values = np.asarray(norms)
            ax.semilogy(
                np.arange(1, len(values) + 1), values / values.max(), ".-", label=f"stage {stage}"
            )
        ax.axhline(record["surviving_relative"], color="k", ls=":", label="survival threshold")
        ax.set_xlabel("hidden unit (sorted)")
        ax.set_ylabel("group norm / largest of the stage")
        ax.set_title(mask["label"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure


def _filter_title(entry: dict[str, Any]) -> str:
    return f"{NAMES[entry['method']]}\n{entry['layers']} layers"


def filters(arrays: dict[str, np.ndarray], record: dict[str, Any], target: np.ndarray) -> Figure:
    """Effective filters (real output from real input, skip removed) at the chosen pixels:
    rows are pixels, columns the convex network after every stage and end-to-end."""
    pixels, entries = record["pixels"], record["filters"]
    figure = Figure(figsize=(2.5 * (len(entries) + 1), 2.6 * len(pixels)), layout="constrained")
    axes = figure.subplots(len(pixels), len(entries) + 1, squeeze=False)
    colours = ["#ffd700", "#00e5ff", "#ff4fd8"]
    for row, pixel in enumerate(pixels):
        ax = axes[row, 0]
        ax.imshow(target, cmap="gray")
        for other, p in enumerate(pixels):
            ax.plot(
                p["col"],
                p["row"],
                "o",
                ms=9 if other == row else 4,
                mfc="none",
                mec=colours[other % 3],
                mew=2,
            )
        ax.set_title(pixel["name"], fontsize=9)
        kernels = [arrays[f"filters_{e['name']}"][row, 0, 0] for e in entries]
        limit = max(float(np.abs(k).max()) for k in kernels) or 1.0
        for col, (entry, kernel) in enumerate(zip(entries, kernels, strict=True), 1):
            shown = axes[row, col].imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
            if row == 0:
                axes[row, col].set_title(_filter_title(entry), fontsize=9)
        figure.colorbar(shown, ax=axes[row, -1], shrink=0.8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    return figure


def clusters(
    arrays: dict[str, np.ndarray], record: dict[str, Any], images: dict[str, np.ndarray]
) -> Figure:
    """k-means clusters of the per-pixel activation patterns of every hidden layer, for the
    convex network (gates) and end-to-end (ReLU patterns), beside the images."""
    methods = [p["method"] for p in record["patterns"]]
    layers = arrays[f"clusters_{methods[0]}"].shape[0]
    figure = Figure(figsize=(2.8 * (layers + 1), 3.0 * len(methods)), layout="constrained")
    axes = figure.subplots(len(methods), layers + 1, squeeze=False)
    backgrounds = [
        (images["target"], "fully sampled"),
        (np.hypot(images["x0"][0], images["x0"][1]), "zero-filled input"),
    ]
    for row, pattern in enumerate(record["patterns"]):
        image, title = backgrounds[row % 2]
        axes[row, 0].imshow(image, cmap="gray")
        axes[row, 0].set_title(title, fontsize=9)
        maps = arrays[f"clusters_{pattern['method']}"]
        for layer in range(layers):
            ax = axes[row, layer + 1]
            ax.imshow(maps[layer], cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            ax.set_title(
                f"{NAMES[pattern['method']]}, layer {layer + 1}\n"
                f"{pattern['distinct_patterns'][layer]} distinct patterns",
                fontsize=9,
            )
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    return figure


def orthogonal_slices(
    volumes: dict[str, np.ndarray], record: dict[str, Any], titles: dict[str, str]
) -> Figure:
    """The central readout, ky and kz planes of a test volume (rows) by every method
    (columns: the reference, then ``titles``' order), each titled with its volume PSNR,
    and a last row of the readout plane's error."""
    target = volumes["target"]
    names = list(titles)
    metrics = {m["method"]: m for m in record["methods"]}
    centre = [n // 2 for n in target.shape]

    def planes(volume: np.ndarray) -> list[np.ndarray]:
        return [volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]]]

    columns = ["target", *names]
    vmax = float(np.percentile(target, 99.5))
    error_max = max(
        float(np.percentile(np.abs(volumes[f"recon_{n}"] - target), 99.5)) for n in names
    )
    x, y, _ = target.shape
    # A thin slab's ky and kz planes are drawn stretched along x to a quarter of the
    # readout plane's height at least (the row label says by how much).
    thin = max(x, y / 4)
    stretch = thin / x
    figure = Figure(figsize=(1.9 * len(columns), 1.2 + 2.2 * (2 * y + 2 * thin) / y))
    figure.set_layout_engine("constrained")
    axes = figure.subplots(4, len(columns), gridspec_kw={"height_ratios": [y, thin, thin, y]})
    plane_names = ("readout plane", "ky plane", "kz plane")
    for col, name in enumerate(columns):
        volume = target if name == "target" else volumes[f"recon_{name}"]
        for row, image in enumerate(planes(volume)):
            aspect = "equal" if row == 0 else "auto"
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=vmax, aspect=aspect)
        title = textwrap.fill("fully sampled" if name == "target" else titles[name], 18)
        if name in metrics:
            title += f"\n{metrics[name]['psnr']:.2f} dB"
        axes[0, col].set_title(title, fontsize=8)
        if name == "target":
            axes[3, col].axis("off")
        else:
            error = np.abs(volume - target)[centre[0]]
            shown = axes[3, col].imshow(error, cmap="magma", vmin=0, vmax=error_max)
        for row in range(4):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    for row, text in enumerate(plane_names):
        axes[row, 0].set_ylabel(text, fontsize=8)
    figure.colorbar(shown, ax=axes[3, :], shrink=0.8, label="|error|")
    along = f"; ky and kz planes stretched {stretch:.1f}x along x" if stretch > 1 else ""
    figure.suptitle(f"{record['file']}: central planes, |error| of the readout plane{along}")
    return figure
