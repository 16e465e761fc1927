"""`cvxmri reproduce --preset quick3d`: the 3D comparison in one command, resumable, with a
report.

On 3D volume files (`cvxmri.data.volume3d`; the default ``data/default3d`` is simulated
when missing), one (ky, kz) mask, the test split:

1. the dataset, its decoupled 2D view (`cvxmri.data.decoupled`);
2. zero-filled, CS (3D wavelets) and CG-SENSE in 3D;
3. the memory budgets, each point measured in a fresh process (`cvxmri.benchmark.measure`):
   the peak of one layer-wise convex CNN training step (its largest stage) at the run's
   patch and batch, and the widest end-to-end CNN of the same depth whose step fits in it;
   the peak of greedy convex unrolled training (its Gram build or a solve, whatever T) on
   volumes of the data's shape, and the deepest end-to-end unrolled network that fits in it;
4. networks, each trained and tested on whole test volumes: the CNN trained on the
   decoupled view (every readout position's (ky, kz) plane a 2D sample) layer-wise convex
   and end-to-end; the 3D CNN (3x3x3 convolutions on cubic patches) layer-wise convex,
   end-to-end at the same width, and end-to-end as wide as fits the convex step's memory;
   the unrolled network on whole volumes, greedily (every iteration a certified convex
   program), end-to-end at the same T, and end-to-end as deep as fits the greedy memory;
5. orthogonal slices of the test volume whose convex 3D PSNR is the median, every method;
6. ``results.json`` and the report (`cvxmri.report.build3d`).

Parts, resumption and the folder's files are those of `cvxmri.reproduce`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvxmri.benchmark.measure import run_trial
from cvxmri.benchmark.memory import MIB
from cvxmri.benchmark.workload import Workload
from cvxmri.config import load_yaml, to_dict
from cvxmri.data.decoupled import decouple_dataset
from cvxmri.data.prepare import default_cache_dir, find_files, volume_id
from cvxmri.data.simulate import SPLITS, default_sources
from cvxmri.data.simulate3d import Simulation3DConfig, simulate_dataset3d
from cvxmri.data.volume3d import file_dims, read_volume3d
from cvxmri.errors import CvxmriError
from cvxmri.evaluate import (
    EvaluateConfig,
    classical_reconstructor,
    evaluate,
    magnitude,
    model_label,
    prepare_file,
)
from cvxmri.masks import MaskSpec
from cvxmri.metrics import volume_metrics
from cvxmri.models.unrolled import load_network
from cvxmri.recon import CLASSICAL_METHODS, CGSenseConfig, CSConfig, network_reconstructor
from cvxmri.reproduce import (
    Part,
    finished_timings,
    median_row,
    paired_difference,
    read_json,
    run_plan,
    write_json,
)
from cvxmri.training.config import TrainConfig, UnrolledConfig, preset
from cvxmri.training.run import train

# Wall seconds of each kind of part on 2 idle CPU cores (the progress estimate's weights;
# measured 2026-12-01, docs/benchmarks.md).
EXPECTED_SECONDS = {
    "data": 20.0,
    "baselines": 10.0,
    "memory": 140.0,
    "train decoupled layerwise-convex": 445.0,
    "train decoupled end-to-end": 305.0,
    "train 3d layerwise-convex": 257.0,
    "train 3d end-to-end": 35.0,
    "train unrolled layerwise-convex": 273.0,
    "train unrolled end-to-end": 46.0,
    "train unrolled end-to-end budget": 173.0,
    "test": 2.0,
    "examples": 5.0,
    "report": 5.0,
}
VIEWS = ("decoupled", "3d")
# Bytes a measurement child may use (its data segment is limited to twice this).
MEASURE_LIMIT = 4 * 1024**3


@dataclass(frozen=True)
class Network:
    """One trained network of the comparison.

    Attributes:
        name: its folder (``3d-layerwise-convex``, ...).
        view: ``decoupled`` (2D CNN on the (ky, kz) planes) or ``3d`` (3D convolutions).
        method: the training method.
        budget: end-to-end as large as fits the convex training's memory (the memory part
            decides): the CNN as wide, the unrolled network as deep (T) as fits.
        arch: ``cnn`` or ``unrolled`` (3D only: `Reproduce3DConfig.iterations` iterations
            of a 3x3x3 regulariser and gradient-step data consistency, on whole volumes).
    """

    name: str
    view: str
    method: str
    budget: bool = False
    arch: str = "cnn"

    def title(self) -> str:
        """What tables call it."""
        view = "decoupled 2D" if self.view == "decoupled" else "3D"
        arch = "unrolled, " if self.arch == "unrolled" else ""
        return f"{arch}{self.method} ({view}{', at the convex memory' if self.budget else ''})"

    @property
    def kind(self) -> str:
        """Its key in `EXPECTED_SECONDS` (after ``train ``)."""
        kind = f"{'unrolled' if self.arch == 'unrolled' else self.view} {self.method}"
        return kind + (" budget" if self.budget and self.arch == "unrolled" else "")


NETWORKS = (
    Network("decoupled-layerwise-convex", "decoupled", "layerwise-convex"),
    Network("decoupled-end-to-end", "decoupled", "end-to-end"),
    Network("3d-layerwise-convex", "3d", "layerwise-convex"),
    Network("3d-end-to-end", "3d", "end-to-end"),
    Network("3d-end-to-end-budget", "3d", "end-to-end", budget=True),
    Network("3d-unrolled-layerwise-convex", "3d", "layerwise-convex", arch="unrolled"),
    Network("3d-unrolled-end-to-end", "3d", "end-to-end", arch="unrolled"),
    Network("3d-unrolled-end-to-end-budget", "3d", "end-to-end", budget=True, arch="unrolled"),
)


@dataclass
class Reproduce3DConfig:
    """What `cvxmri reproduce --preset quick3d` runs; saved as ``config.yaml``.

    Attributes:
        preset: ``quick3d``.
        training: the training preset every network starts from (`preset`, 2D for the
            decoupled networks, 3D for the others).
        data: 3D dataset root; simulated (`simulation`) when missing or empty.
        simulation: settings of a dataset that has to be built.
        mask: the (ky, kz) sampling mask.
        split: the split every method is tested on.
        cs: compressed sensing (3D wavelets), chosen on the validation split
            (docs/benchmarks.md, "3D data").
        cg_sense: CG-SENSE, chosen likewise.
        layers: depth of every CNN.
        channels: hidden width of every CNN but the one at the convex memory.
        crops_per_image: random cubic patches per training volume and epoch (3D CNNs).
        widths: end-to-end widths tried at the convex step's memory, widest first.
        unrolled: the unrolled networks (T, regulariser width and kernel, data
            consistency), trained greedily (convex, certified) and end-to-end (one whole
            volume per step) on whole volumes.
        depths: T of the end-to-end unrolled network tried at the greedy convex
            training's memory, deepest first.
        device: cpu, cuda or auto.
        seed: training seed.
    """

    preset: str = "quick3d"
    training: str = "quick"
    data: str = "data/default3d"
    simulation: Simulation3DConfig = field(default_factory=Simulation3DConfig)
    mask: MaskSpec = field(default_factory=lambda: MaskSpec("poisson", 4.0))
    split: str = "test"
    cs: CSConfig = field(default_factory=lambda: CSConfig(lamda=7e-3))
    cg_sense: CGSenseConfig = field(default_factory=lambda: CGSenseConfig(iterations=6))
    layers: int = 5
    channels: int = 32
    crops_per_image: int = 16
    widths: list[int] = field(default_factory=lambda: [32, 24, 16, 12, 8, 4])
    unrolled: UnrolledConfig = field(
        default_factory=lambda: UnrolledConfig(iterations=4, channels=16, kernel_size=3)
    )
    depths: list[int] = field(default_factory=lambda: [16, 12, 8, 4, 2, 1])
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings."""
        self.mask.validate(ndim=3)
        if self.split not in SPLITS:
            raise CvxmriError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not self.widths or any(w < 2 or w % 2 for w in self.widths):
            raise CvxmriError(f"widths must be even numbers >= 2, got {self.widths}")
        if not self.depths or min(self.depths) < 1:
            raise CvxmriError(f"depths must be iterations >= 1, got {self.depths}")
        data = Path(self.data)
        if data.is_file():
            raise CvxmriError(f"{data}: one file, not a 3D dataset root")
        if not data.exists() and data.suffix == ".h5":
            raise CvxmriError(
                f"{data}: no such file (a missing --data is simulated as a dataset root: "
                "give a folder)"
            )
        if data.is_dir() and any(data.iterdir()):
            missing = [s for s in SPLITS if not (data / f"multicoil_{s}").is_dir()]
            if missing:
                raise CvxmriError(f"{data}: no multicoil_{missing[0]}/ folder (a 3D dataset root)")
            first = find_files(data, "train")[0]
            if file_dims(first) != 3:
                raise CvxmriError(
                    f"{first}: a 2D file; quick3d needs 3D volume files (cvxmri data "
                    "simulate --dims 3 writes them)"
                )
        for network in NETWORKS:
            train_config(self, network, self.channels).validate()


def decoupled_root(config: Reproduce3DConfig) -> Path:
    """The decoupled 2D view of the run's data."""
    return Path(config.data) / "decoupled"


def train_config(config: Reproduce3DConfig, network: Network, channels: int) -> TrainConfig:
    """The training configuration of ``network`` at width ``channels``: the training preset
    (decoupled: 2D on the decoupled view; 3D: 3x3x3 kernels, cubic patches, with the run's
    patches per volume; unrolled: whole volumes, one per step, the run's `UnrolledConfig`),
    the run's mask, depth, device and seed."""
    if network.arch == "unrolled":
        base = preset(config.training, config.mask.kind, dims=3)
        base = replace(
            base,
            data=config.data,
            arch="unrolled",
            crop=0,
            crops_per_image=1,
            unrolled=config.unrolled,
            optim=replace(base.optim, batch_size=1),
        )
    elif network.view == "decoupled":
        base = replace(preset(config.training, config.mask.kind), data=str(decoupled_root(config)))
    else:
        base = replace(
            preset(config.training, config.mask.kind, dims=3),
            data=config.data,
            crops_per_image=config.crops_per_image,
        )
    return replace(
        base,
        method=network.method,
        mask=config.mask,
        layers=config.layers,
        channels=channels,
        device=config.device,
        seed=config.seed,
    )


def plan(config: Reproduce3DConfig) -> list[Part]:
    """Every part of the 3D comparison, in the order they run."""
    parts = [
        Part(
            "data",
            "3D dataset and its decoupled view",
            "data",
            "dataset.json",
            EXPECTED_SECONDS["data"],
        ),
        Part(
            "baselines",
            f"zero-filled, CS and CG-SENSE in 3D, {config.mask.describe()}",
            "baselines",
            "summary.json",
            EXPECTED_SECONDS["baselines"],
            config.mask,
        ),
        Part(
            "memory",
            "memory budgets: convex peaks, the largest end-to-end within them (fresh processes)",
            "memory",
            "memory.json",
            EXPECTED_SECONDS["memory"],
        ),
    ]
    for network in NETWORKS:
        parts += [
            Part(
                "train",
                f"train {network.title()}",
                network.name,
                "metrics_val.json",
                EXPECTED_SECONDS[f"train {network.kind}"],
                config.mask,
                network.method,
                config.layers,
            ),
            Part(
                "test",
                f"test {network.title()}",
                f"test-{network.name}",
                "summary.json",
                EXPECTED_SECONDS["test"],
                config.mask,
                network.method,
                config.layers,
            ),
        ]
    parts.append(
        Part(
            "examples",
            "orthogonal slices of the median test volume, every method",
            "examples",
            "examples.json",
            EXPECTED_SECONDS["examples"],
            config.mask,
        )
    )
    return parts


def _named(name: str) -> Network:
    return next(n for n in NETWORKS if n.name == name)


def _network_of(part: Part) -> Network:
    return _named(part.folder.removeprefix("test-"))


# ------------------------------------------------------------------------------ the parts


def _run_data(config: Reproduce3DConfig, root: Path, part: Part) -> None:
    data = Path(config.data)
    built = not (data.is_dir() and any(data.iterdir()))
    if built:
        simulate_dataset3d(default_sources(dims=3), data, config.simulation)
    decoupled = decouple_dataset(data)
    files = {split: [volume_id(p, data) for p in find_files(data, split)] for split in SPLITS}
    manifest = data / "manifest.json"
    write_json(
        root / part.folder / part.output,
        {
            "root": str(data),
            "decoupled": str(decoupled),
            "built_by_this_run": built,
            "files": files,
            "file_counts": {split: len(names) for split, names in files.items()},
            "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
        },
    )


def _evaluate_config(config: Reproduce3DConfig, **changes: Any) -> EvaluateConfig:
    return replace(
        EvaluateConfig(
            data=config.data,
            split=config.split,
            masks=[config.mask],
            cs=config.cs,
            cg_sense=config.cg_sense,
            device=config.device,
            methods=[],
        ),
        **changes,
    )


def _run_baselines(config: Reproduce3DConfig, root: Path, part: Part) -> None:
    eval_config = _evaluate_config(config, methods=list(CLASSICAL_METHODS), dims=3)
    _evaluate_into(eval_config, root / part.folder)


def _evaluate_into(eval_config: EvaluateConfig, folder: Path) -> None:
    from cvxmri.runs import run_folder

    with run_folder(folder, eval_config, overwrite=True) as out:
        evaluate(eval_config, out)


def _peak(workload: Workload) -> dict[str, Any]:
    """One fresh-process measurement of a training step (two steps, the peak)."""
    result = run_trial(workload, 2, MEASURE_LIMIT)
    if result.get("oom"):
        raise CvxmriError(f"{workload.describe()}: out of memory in the measurement")
    return {
        "peak_mib": result["peak_bytes"] / MIB,
        "state_mib": result["state_bytes"] / MIB,
        "seconds": result["seconds"],
    }


def _run_memory(config: Reproduce3DConfig, root: Path, part: Part) -> None:
    convex = train_config(config, _named("3d-layerwise-convex"), config.channels)
    base = Workload(
        method="layerwise-convex",
        batch=convex.optim.batch_size,
        layers=config.layers,
        channels=config.channels,
        kernel_size=convex.kernel_size,
        size=convex.crop,
        pattern_chunk=convex.pattern_chunk,
        device="cuda" if convex.device == "cuda" else "cpu",
        seed=config.seed,
        ndim=3,
    )
    stages = [{"stage": s, **_peak(replace(base, stage=s))} for s in (1, 2)]
    budget = max(s["peak_mib"] for s in stages)
    widths = []
    chosen = None
    for width in sorted(config.widths, reverse=True):
        row = {"channels": width, **_peak(replace(base, method="end-to-end", channels=width))}
        row["fits"] = row["peak_mib"] <= budget
        widths.append(row)
        if row["fits"]:
            chosen = width
            break
    if chosen is None:
        raise CvxmriError(
            f"no end-to-end width among {config.widths} fits the convex step's {budget:.1f} "
            "MiB: add narrower widths"
        )
    write_json(
        root / part.folder / part.output,
        {
            "patch": [convex.crop] * 3,
            "batch": convex.optim.batch_size,
            "layers": config.layers,
            "kernel_size": convex.kernel_size,
            "convex_channels": config.channels,
            "convex_stages": stages,
            "budget_mib": budget,
            "end_to_end": widths,
            "chosen_channels": chosen,
            "unrolled": _unrolled_peaks(config, base.device),
            "device": base.device,
            "method": "peak resident memory of one training step beyond the process's "
            "baseline, fresh process per configuration (cvxmri.benchmark.measure)",
        },
    )


def _unrolled_peaks(config: Reproduce3DConfig, device: str) -> dict[str, Any]:
    """The unrolled networks' memory on volumes of the data's shape: greedy convex's peak
    (its iteration's Gram build, ``step``, or one solve; it does not depend on T), then
    end-to-end at each of `Reproduce3DConfig.depths`, deepest first, until one fits in it
    (``chosen_iterations``), and end-to-end at the greedy network's T."""
    path = find_files(config.data, "train")[0]
    coils, *volume = read_volume3d(path, check_finite=False).kspace.shape
    settings = config.unrolled
    base = Workload(
        method="layerwise-convex",
        arch="unrolled",
        iterations=settings.iterations,
        channels=settings.channels,
        kernel_size=settings.kernel_size,
        coils=coils,
        dc=settings.dc.kind,
        device=device,
        seed=config.seed,
        ndim=3,
        volume=tuple(volume),
    )
    parts = {p: _peak(replace(base, part=p)) for p in ("step", "solve")}
    budget = max(p["peak_mib"] for p in parts.values())
    rows, chosen = [], None
    for iterations in sorted({*config.depths, settings.iterations}, reverse=True):
        if chosen is not None and iterations != settings.iterations:
            continue
        row = {
            "iterations": iterations,
            **_peak(replace(base, method="end-to-end", iterations=iterations)),
        }
        row["fits"] = row["peak_mib"] <= budget
        rows.append(row)
        if row["fits"] and chosen is None and iterations in config.depths:
            chosen = iterations
    if chosen is None:
        raise CvxmriError(
            f"no end-to-end unrolled network of T in {config.depths} fits the greedy convex "
            f"training's {budget:.1f} MiB: add smaller T"
        )
    return {
        "volume": volume,
        "convex_iterations": settings.iterations,
        "convex_parts": parts,
        "budget_mib": budget,
        "end_to_end": rows,
        "chosen_iterations": chosen,
    }


def _run_train(config: Reproduce3DConfig, root: Path, part: Part) -> None:
    network = _network_of(part)
    channels = config.channels
    if network.budget:
        memory = read_json(root / "memory" / "memory.json")
        if network.arch == "unrolled":
            iterations = memory["unrolled"]["chosen_iterations"]
            config = replace(config, unrolled=replace(config.unrolled, iterations=iterations))
        else:
            channels = memory["chosen_channels"]
    out = root / part.folder
    resume = (out / "config.yaml").is_file()
    train(train_config(config, network, channels), out, resume=resume, force=True)


def _run_test(config: Reproduce3DConfig, root: Path, part: Part) -> None:
    network = _network_of(part)
    model = str(root / network.name / "model.pt")
    if network.view == "decoupled":
        eval_config = _evaluate_config(config, data=str(decoupled_root(config)), models=[model])
    else:
        eval_config = _evaluate_config(config, models=[model], dims=3)
    _evaluate_into(eval_config, root / part.folder)


def median_volume(per_volume_csv: Path, label: str) -> dict[str, Any]:
    """The test volume whose PSNR (of the method ``label``) is closest to the median."""
    chosen, median = median_row(per_volume_csv, label)
    return {"file": chosen["file"], "median_psnr": median}


def _reconstruct(
    config: Reproduce3DConfig, data: Path, name: str, dims: int, reconstructors: dict[str, Any]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reference and every reconstruction (magnitudes (X, Y, Z)) of the file ``name``
    of ``data``'s split, as `cvxmri.evaluate` computes them."""
    eval_config = _evaluate_config(config, data=str(data), dims=dims)
    path = next(p for p in find_files(data, config.split) if volume_id(p, data) == name)
    target, _, sample_of = prepare_file(path, name, dims, eval_config, default_cache_dir(data))
    sample = sample_of(config.mask)
    images = {
        method: magnitude(reconstruct(sample), sample).reshape(target.shape)
        for method, reconstruct in reconstructors.items()
    }
    images["zero-filled input"] = magnitude(sample.x0[:, 0] + 1j * sample.x0[:, 1], sample)
    return target, images


def _run_examples(config: Reproduce3DConfig, root: Path, part: Part) -> None:
    convex = _named("3d-layerwise-convex")
    label = model_label(root / convex.name / "model.pt")
    choice = median_volume(root / f"test-{convex.name}" / "per_volume.csv", label)
    data = Path(config.data)
    three_d = {m: classical_reconstructor(m, config.cs, config.cg_sense) for m in CLASSICAL_METHODS}
    decoupled = {}
    for network in NETWORKS:
        model = network_reconstructor(load_network(root / network.name / "model.pt").eval())
        (decoupled if network.view == "decoupled" else three_d)[network.name] = model
    target, images = _reconstruct(config, data, choice["file"], 3, three_d)
    images.pop("zero-filled input")
    _, planes = _reconstruct(config, decoupled_root(config), choice["file"], 2, decoupled)
    planes.pop("zero-filled input")
    images.update(planes)
    arrays = {"target": target, **{f"recon_{m}": v for m, v in images.items()}}
    methods = [{"method": m, **volume_metrics(target, image)} for m, image in images.items()]
    folder = root / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "volumes.npz", **arrays)
    write_json(
        folder / part.output,
        {
            **choice,
            "rule": f"the {config.split} volume whose 3D layer-wise convex PSNR is closest "
            "to the median",
            "methods": methods,
        },
    )


RUNNERS = {
    "data": _run_data,
    "baselines": _run_baselines,
    "memory": _run_memory,
    "train": _run_train,
    "test": _run_test,
    "examples": _run_examples,
}


def reproduce3d(config: Reproduce3DConfig, out: Path, force: bool = False) -> Path:
    """Run every unfinished part of `plan` into ``out``, then write ``results.json`` and
    the report; return the path of ``report/report.html``."""
    config.validate()
    return run_plan(
        config,
        out,
        force,
        plan(config),
        RUNNERS,
        EXPECTED_SECONDS["report"],
        rebuild_report3d,
    )


def is_folder3d(out: Path) -> bool:
    """Whether ``out`` is a folder of `reproduce3d` (its config says ``preset: quick3d``)."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and saved.get("preset") == "quick3d"


def rebuild_report3d(out: Path) -> Path:
    """Collect ``results.json`` of a finished 3D reproduce folder and build its report."""
    from cvxmri.report.build3d import build_report3d

    results = collect3d(out)
    write_json(out / "results.json", results)
    return build_report3d(out, results)


# ------------------------------------------------------------------------------ results


def collect3d(out: Path) -> dict[str, Any]:
    """Everything the 3D report shows, from the files of a finished folder."""
    config = load_yaml(Reproduce3DConfig, out / "config.yaml")
    parts = plan(config)
    timings = finished_timings(out, parts, "cvxmri reproduce --preset quick3d")
    memory = read_json(out / "memory" / "memory.json")
    rows = []
    for entry in read_json(out / "baselines" / "summary.json")["results"]:
        rows.append(_row("baselines", entry, entry["method"], "3d", None))
    for network in NETWORKS:
        (entry,) = read_json(out / f"test-{network.name}" / "summary.json")["results"]
        folder = out / network.name
        val = read_json(folder / "metrics_val.json")
        run = load_yaml(TrainConfig, folder / "config.yaml")
        row = _row(f"test-{network.name}", entry, network.name, network.view, network)
        unrolled = network.arch == "unrolled"
        row.update(
            arch=network.arch,
            channels=run.unrolled.channels if unrolled else run.channels,
            depth=run.unrolled.iterations if unrolled else run.layers,
            train_seconds=val["train_seconds"],
            wall_seconds=timings.get(network.name, {}).get("seconds"),
            val=val["final"],
        )
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    convex, budget = by_name["3d-layerwise-convex"], by_name["3d-end-to-end-budget"]
    difference = paired_difference(out, convex, budget)
    unrolled = paired_difference(
        out, by_name["3d-unrolled-layerwise-convex"], by_name["3d-unrolled-end-to-end"]
    )
    unrolled_budget = paired_difference(
        out, by_name["3d-unrolled-layerwise-convex"], by_name["3d-unrolled-end-to-end-budget"]
    )
    same_t = next(
        r for r in memory["unrolled"]["end_to_end"] if r["iterations"] == config.unrolled.iterations
    )
    total = sum(t["seconds"] for t in timings.values())
    return {
        "preset": config.preset,
        "folder": str(out),
        "collected": f"{datetime.now():%Y-%m-%d %H:%M}",
        "total_seconds": total,
        "config": to_dict(config),
        "environment": read_json(out / "environment.json"),
        "dataset": read_json(out / "data" / "dataset.json"),
        "mask": config.mask.describe(),
        "rows": rows,
        "memory": memory,
        "examples": read_json(out / "examples" / "examples.json"),
        "answers": {
            "convex_minus_budget_end_to_end": difference,
            "one_db": difference["mean"] is not None and difference["mean"] >= 1.0,
            "budget_channels": memory["chosen_channels"],
            "unrolled_convex_minus_end_to_end": unrolled,
            "unrolled_convex_minus_budget_end_to_end": unrolled_budget,
            "unrolled_one_db": unrolled_budget["mean"] is not None
            and unrolled_budget["mean"] >= 1.0,
            "unrolled_budget_iterations": memory["unrolled"]["chosen_iterations"],
            "unrolled_memory_ratio": memory["unrolled"]["budget_mib"] / same_t["peak_mib"],
            "minutes": total / 60,
            "thirty_minutes": total <= 1800,
        },
        "parts": [
            {"title": p.title, "folder": p.folder, **timings.get(p.folder, {})} for p in parts
        ],
    }


def _row(
    folder: str, entry: dict[str, Any], name: str, view: str, network: Network | None
) -> dict[str, Any]:
    """A results row: ``label`` is the method's name in the evaluation's files."""
    return {
        "name": name,
        "title": network.title() if network else name,
        "view": view,
        "method": network.method if network else name,
        "folder": folder,
        "label": entry["method"],
        "volume": entry["volume"],
        "seconds": entry["seconds"],
    }


def format_results3d(results: dict[str, Any]) -> str:
    """The test metrics of every method as a fixed-width table (volume PSNR and SSIM)."""
    lines = [f"{'method':<52} {'PSNR dB':>15} {'SSIM':>17}"]
    for row in results["rows"]:
        psnr, ssim = row["volume"]["psnr"], row["volume"]["ssim"]
        name = row["title"] + (f", {row['channels']} ch" if "channels" in row else "")
        if row.get("arch") == "unrolled":
            name += f", T={row['depth']}"
        lines.append(
            f"{name:<52} {psnr['mean']:>7.2f} ± {psnr['std']:<5.2f} "
            f"{ssim['mean']:>8.4f} ± {ssim['std']:<6.4f}"
        )
    return "\n".join(lines)
