"""`cvxmri reproduce`: the paper's experiment in one command, resumable, with a report.

The plan (`plan`) is a list of parts. Each part writes into its own sub-folder of the
reproduce folder and is finished when its final output file exists, so a rerun skips
finished parts, and an interrupted training part is resumed from its last checkpoint:

1. the dataset: the default one is simulated when the data folder is missing or empty;
   the coil maps of every split are computed (cached under ``<data>/cache``);
2. for each mask (Poisson disc 4x, 1D Cartesian 4x with centre fraction 0.04):
   zero-filled, CS and CG-SENSE on the test split; the layer-wise convex network, then the
   non-convex layer-wise ablation, each trained and its network after every stage
   (``model_depthN.pt``) evaluated on the test split; end-to-end networks of every depth
   (or of the full depth only), each trained and evaluated; a representative test slice
   reconstructed by every method (``examples``); what each layer learned (``inspect``);
3. ``results.json`` (everything the report shows) and the report (`cvxmri.report.build`).

The reproduce folder holds ``config.yaml`` (this run's `ReproduceConfig`), ``log.txt``,
``environment.json``, ``parts.json`` (wall time of every part), ``results.json`` and
``report/``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cvxmri.benchmark.memory import MIB, MemoryBenchConfig, run_memory_benchmark
from cvxmri.benchmark.memory_unrolled import UnrolledMemoryConfig, run_unrolled_memory_benchmark
from cvxmri.config import load_yaml, save_yaml, to_dict
from cvxmri.data.prepare import (
    EspiritConfig,
    default_cache_dir,
    evaluation_mask,
    find_files,
    is_dataset_root,
    prepare_volume,
    volume_id,
)
from cvxmri.data.sample import make_sample
from cvxmri.data.simulate import (
    SPLITS,
    SimulationConfig,
    default_sources,
    load_nifti,
    simulate_dataset,
)
from cvxmri.errors import CvxmriError
from cvxmri.evaluate import (
    EvaluateConfig,
    classical_reconstructor,
    evaluate,
    model_label,
)
from cvxmri.masks import MASK_KINDS, MaskSpec
from cvxmri.metrics import slice_metrics
from cvxmri.models.cnn import ReconCNN
from cvxmri.models.dc import DCConfig
from cvxmri.models.unrolled import load_network
from cvxmri.recon import CLASSICAL_METHODS, CGSenseConfig, CSConfig, network_reconstructor
from cvxmri.report import interpret
from cvxmri.runs import certificate_traces, environment, run_folder
from cvxmri.training.config import PRESETS, OptimConfig, TrainConfig, UnrolledConfig, preset
from cvxmri.training.data import SliceData
from cvxmri.training.run import train
from cvxmri.training.trainer import resolve_device

log = logging.getLogger(__name__)

LAYERWISE = ("layerwise-convex", "layerwise-nonconvex")
# Wall seconds of each kind of part in the quick preset on 2 CPU cores: the weights that
# turn the parts left into an estimate of the time left (calibrated by the parts run).
EXPECTED_SECONDS = {
    "data": 45.0,
    "baselines": 12.0,
    "train layerwise-convex": 230.0,
    "train layerwise-nonconvex": 140.0,
    "train end-to-end per hidden layer": 25.0,
    "test": 2.0,
    "examples": 2.0,
    "inspect": 3.0,
    "memory": 90.0,
    "report": 5.0,
    # Unrolled networks, per iteration (128x128, 18 training slices).
    "train unrolled layerwise-convex per iteration": 20.0,
    "train unrolled layerwise-nonconvex per iteration": 22.0,
    "train unrolled end-to-end per iteration": 11.0,
    "memory unrolled": 60.0,
}
UNROLLED_METHODS = ("layerwise-convex", "layerwise-nonconvex", "end-to-end")
# T_max of the unrolled comparison: the greedy convex network's validation PSNR still
# rose by 0.1 dB per iteration at T = 8 on both masks (docs/benchmarks.md, "Data
# consistency per mask").
COMPARISON_ITERATIONS = 12
# The greedy convex iterations' Gram model on every third of the 54 training slices (18):
# the same certified networks as with the whole set's model, at a third of its build
# (docs/benchmarks.md, "Unrolled networks on every training slice").
COMPARISON_GRAM_IMAGES = 18
# The unrolled networks' data consistency where a mask wants another than
# `UnrolledConfig`'s gradient step, chosen on the validation split (docs/benchmarks.md,
# "Data consistency per mask"): a gradient step leaves the 1D Cartesian aliasing that the
# CG-SENSE proximal step resolves (solved exactly per readout line, lambda from a grid),
# and the proximal step over-fits Poisson-disc data.
UNROLLED_DC_BY_MASK = {"cartesian-4x": DCConfig(kind="direct", lamda=0.02)}


@dataclass(frozen=True)
class MaskClassical:
    """The weights of the classical methods for one mask, chosen on the validation split
    (docs/benchmarks.md, "How the CS weight was chosen"); for that mask they replace
    ``lamda`` of `ReproduceConfig.cs` and ``lamda`` and ``iterations`` of
    `ReproduceConfig.cg_sense`.

    Attributes:
        cs_lamda: CS l1-wavelet weight.
        cg_lamda: CG-SENSE Tikhonov weight.
        cg_iterations: CG-SENSE iterations.
    """

    cs_lamda: float
    cg_lamda: float
    cg_iterations: int


# Chosen on the validation split of the default dataset (docs/benchmarks.md): the two masks
# want clearly different weights (CS: Cartesian 1D undersampling leaves coherent aliasing
# that a large weight smooths into the image; CG-SENSE: Poisson-disc data are
# over-fitted after a few iterations, Cartesian data need many).
CLASSICAL_BY_MASK = {
    "poisson-4x": MaskClassical(cs_lamda=4.22e-3, cg_lamda=0.0, cg_iterations=4),
    "cartesian-4x": MaskClassical(cs_lamda=1.33e-3, cg_lamda=0.0, cg_iterations=12),
}


@dataclass
class UnrolledComparison:
    """The comparison of unrolled networks with data consistency (`UnrolledNet`): each
    method trains one network of ``network.iterations`` (T_max) iterations per mask on
    whole images; the greedy methods are tested after every iteration (the metric against
    T), end-to-end at each of ``end_to_end_iterations``.

    Attributes:
        methods: the training methods compared (empty: no unrolled comparison).
        network: the unrolled network (T_max, width, kernel, data consistency).
        dc_by_mask: data consistency per mask, by `mask_key`; it wins over
            ``network.dc`` for its mask, whose setting applies to the other masks.
        end_to_end_iterations: T of end-to-end networks besides T_max, each its own run
            (the end-to-end curve; empty: T_max only).
        max_train_slices: training slices (0: all); the first ones of the split.
        epochs: epochs of every non-convex greedy iteration, its learning rate halved
            after every third of them.
        end_to_end_epochs: epochs of end-to-end training, its learning rate halved after
            every third of them (0: ``epochs``). End-to-end training updates all T
            iterations from a few images per step: on 18 training slices, 200 epochs
            gained 1.9 dB of validation PSNR over 30 (docs/benchmarks.md, "End-to-end
            training to convergence"); on all 54, 40 epochs take as many steps as 120
            did on 18.
        memory_iterations: T at which peak training memory is measured, each method in
            fresh processes (empty: not measured).
    """

    methods: list[str] = field(default_factory=lambda: list(UNROLLED_METHODS))
    network: UnrolledConfig = field(
        default_factory=lambda: UnrolledConfig(
            iterations=COMPARISON_ITERATIONS, gram_images=COMPARISON_GRAM_IMAGES
        )
    )
    dc_by_mask: dict[str, DCConfig] = field(default_factory=lambda: dict(UNROLLED_DC_BY_MASK))
    end_to_end_iterations: list[int] = field(default_factory=list)
    max_train_slices: int = 0
    epochs: int = 10
    end_to_end_epochs: int = 40
    memory_iterations: list[int] = field(default_factory=lambda: [1, 5, 20])

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings."""
        unknown = [m for m in self.methods if m not in UNROLLED_METHODS]
        if unknown:
            raise CvxmriError(
                f"unrolled.methods: unknown method {unknown[0]!r} "
                f"(choose from {', '.join(UNROLLED_METHODS)})"
            )
        check_mask_keys("unrolled.dc_by_mask", self.dc_by_mask)
        for dc in [self.network.dc, *self.dc_by_mask.values()]:
            for method in ["end-to-end", *self.methods]:
                replace(self.network, dc=dc).validate(method)
        if self.network.shared:
            raise CvxmriError("unrolled.network.shared: the greedy methods cannot share weights")
        checks = {
            "unrolled.end_to_end_iterations": all(
                1 <= t <= self.network.iterations for t in self.end_to_end_iterations
            ),
            "unrolled.max_train_slices": self.max_train_slices >= 0,
            "unrolled.epochs": self.epochs >= 1,
            "unrolled.end_to_end_epochs": self.end_to_end_epochs >= 0,
            "unrolled.memory_iterations": all(t >= 1 for t in self.memory_iterations),
        }
        for name, ok in checks.items():
            if not ok:
                raise CvxmriError(f"{name}: impossible value {getattr(self, name.split('.')[1])!r}")

    def end_to_end(self) -> list[int]:
        """T of every end-to-end network, ascending (T_max always among them)."""
        return sorted({*self.end_to_end_iterations, self.network.iterations})


@dataclass
class ReproduceConfig:
    """What `cvxmri reproduce` runs; saved as ``config.yaml`` in the reproduce folder.

    Attributes:
        preset: training preset of every network (quick, paper or tiny).
        data: dataset root; simulated from ``sources`` when missing or empty.
        sources: NIfTI volumes to simulate from (empty: Colin27 and MNI152).
        simulation: simulation settings of a dataset that has to be built.
        masks: sampling masks; every method runs on each.
        layers: depth of the networks (layer-wise: ``layers - 1`` stages).
        end_to_end_every_depth: train end-to-end networks of every depth from 2 (the
            depth curve of both methods); otherwise of the full depth only.
        split: the split every method is evaluated on.
        cs: compressed-sensing settings.
        cg_sense: CG-SENSE settings.
        classical_by_mask: weights of the classical methods per mask, by `mask_key`
            (``poisson-4x``); they win over ``cs`` and ``cg_sense`` for their mask, whose
            settings apply to the other masks (``{}``: to every mask).
        device: cpu, cuda or auto.
        amp: bf16 autocast in training.
        seed: training seed.
        clusters: k-means clusters of the sign-pattern maps.
        unrolled: the comparison of unrolled networks with data consistency.
    """

    preset: str = "quick"
    data: str = "data/default"
    sources: list[str] = field(default_factory=list)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    masks: list[MaskSpec] = field(
        default_factory=lambda: [MaskSpec("poisson", 4.0), MaskSpec("cartesian", 4.0, 0.04)]
    )
    layers: int = 5
    end_to_end_every_depth: bool = True
    split: str = "test"
    cs: CSConfig = field(default_factory=CSConfig)
    cg_sense: CGSenseConfig = field(default_factory=CGSenseConfig)
    classical_by_mask: dict[str, MaskClassical] = field(
        default_factory=lambda: dict(CLASSICAL_BY_MASK)
    )
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    clusters: int = 6
    unrolled: UnrolledComparison = field(default_factory=UnrolledComparison)

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings."""
        if self.preset not in PRESETS:
            raise CvxmriError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if not self.masks:
            raise CvxmriError("reproduce needs at least one mask")
        keys = [mask_key(m) for m in self.masks]
        if len(set(keys)) != len(keys):
            raise CvxmriError(f"two masks of the same kind and acceleration: {keys}")
        if self.clusters < 2:
            raise CvxmriError(f"clusters must be >= 2, got {self.clusters}")
        self.simulation.validate()
        self.check_data()
        check_mask_keys("classical_by_mask", self.classical_by_mask)
        for mask in self.masks:
            cs, cg = classical_settings(self, mask)
            EvaluateConfig(
                data=self.data, split=self.split, masks=[mask], cs=cs, cg_sense=cg, methods=[]
            ).validate()
        for mask in self.masks:
            train_config(self, "end-to-end", mask, self.layers).validate()
        self.unrolled.validate()
        for mask in self.masks:
            for method in self.unrolled.methods:
                unrolled_train_config(
                    self, method, mask, self.unrolled.network.iterations
                ).validate()

    def check_data(self) -> None:
        """Refuse data that is neither a dataset root with the three splits nor a missing or
        empty folder to simulate one into: one file or a flat folder has no splits."""
        data = Path(self.data)
        expected = (
            "reproduce --data takes a dataset root with multicoil_train/, multicoil_val/ and "
            "multicoil_test/, or a missing or empty folder to simulate one into"
        )
        if data.is_file():
            raise CvxmriError(f"{data}: one file, not a dataset root ({expected})")
        if not data.exists() and data.suffix == ".h5":
            raise CvxmriError(f"{data}: no such file ({expected})")
        if data.is_dir() and any(data.iterdir()):
            missing = [s for s in SPLITS if not is_dataset_root(data, s)]
            if missing:
                raise CvxmriError(f"{data}: no multicoil_{missing[0]}/ folder ({expected})")


def reproduce_preset(name: str) -> ReproduceConfig:
    """The reproduction of a training preset: its depth and Poisson-disc mask, and the 1D
    Cartesian mask at 4x with centre fraction 0.04."""
    base = preset(name)
    unrolled = UnrolledComparison()
    if name == "tiny":
        unrolled = UnrolledComparison(
            network=UnrolledConfig(iterations=2, channels=4, kernel_size=3),
            max_train_slices=4,
            epochs=1,
            end_to_end_epochs=1,
            memory_iterations=[1, 2],
        )
    elif name == "paper":
        unrolled = UnrolledComparison(max_train_slices=0, epochs=40, end_to_end_epochs=0)
    return ReproduceConfig(
        preset=name,
        layers=base.layers,
        masks=[base.mask, MaskSpec("cartesian", 4.0, 0.04)],
        # Quick: end-to-end at full depth only, the paper's comparison (its Fig. 2 adds
        # layers to the layer-wise network); its depth curve cost about 8 of the 36 min
        # the main job took on the slower development machine.
        end_to_end_every_depth=name != "quick",
        unrolled=unrolled,
    )


def mask_key(mask: MaskSpec) -> str:
    """The folder name of a mask's parts, e.g. ``poisson-4x``."""
    return f"{mask.kind}-{mask.acceleration:g}x"


def check_mask_keys(name: str, keys: Iterable[str]) -> None:
    """Raise `CvxmriError` naming the setting ``name`` if one of ``keys`` is not a
    `mask_key` (``poisson-4x``)."""
    for key in keys:
        kind, _, accel = key.rpartition("-")
        if kind not in MASK_KINDS or not accel.endswith("x") or not _is_number(accel[:-1]):
            raise CvxmriError(
                f"{name}: {key!r} is not a mask key like poisson-4x "
                f"(kinds: {', '.join(MASK_KINDS)})"
            )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def classical_settings(config: ReproduceConfig, mask: MaskSpec) -> tuple[CSConfig, CGSenseConfig]:
    """The CS and CG-SENSE settings of ``mask``: ``config.cs`` and ``config.cg_sense`` with
    the mask's weights from ``config.classical_by_mask``, where it has them."""
    tuned = config.classical_by_mask.get(mask_key(mask))
    if tuned is None:
        return config.cs, config.cg_sense
    return (
        replace(config.cs, lamda=tuned.cs_lamda),
        replace(config.cg_sense, lamda=tuned.cg_lamda, iterations=tuned.cg_iterations),
    )


def train_config(config: ReproduceConfig, method: str, mask: MaskSpec, layers: int) -> TrainConfig:
    """The training configuration of one network: the preset for its mask, then this run's
    data, mask, depth, device, precision and seed."""
    return replace(
        preset(config.preset, mask.kind),
        method=method,
        data=config.data,
        mask=mask,
        layers=layers,
        device=config.device,
        amp=config.amp,
        seed=config.seed,
    )


def unrolled_network(config: ReproduceConfig, mask: MaskSpec) -> UnrolledConfig:
    """The unrolled network of ``mask``: ``config.unrolled.network`` with the mask's data
    consistency from ``config.unrolled.dc_by_mask``, where it has one."""
    network = config.unrolled.network
    dc = config.unrolled.dc_by_mask.get(mask_key(mask), network.dc)
    return replace(network, dc=dc)


def unrolled_optim(unrolled: UnrolledComparison, method: str, optim: OptimConfig) -> OptimConfig:
    """The optimiser settings of one unrolled network: the preset's ``optim`` at
    ``unrolled.epochs`` (end-to-end: ``unrolled.end_to_end_epochs`` where set), its
    learning rate halved every third of them."""
    epochs = unrolled.epochs
    if method == "end-to-end" and unrolled.end_to_end_epochs:
        epochs = unrolled.end_to_end_epochs
    return replace(optim, epochs=epochs, step=max(1, epochs // 3), gamma=0.5)


def unrolled_train_config(
    config: ReproduceConfig, method: str, mask: MaskSpec, iterations: int
) -> TrainConfig:
    """The training configuration of one unrolled network of ``iterations``: the preset
    for its mask (optimiser, certified solver, gates) with ``arch: unrolled``, whole
    images, this run's unrolled settings, data, device, precision and seed."""
    unrolled = config.unrolled
    base = train_config(config, method, mask, config.layers)
    return replace(
        base,
        arch="unrolled",
        crop=0,
        crops_per_image=1,
        max_train_slices=unrolled.max_train_slices,
        unrolled=replace(unrolled_network(config, mask), iterations=iterations),
        optim=unrolled_optim(unrolled, method, base.optim),
    )


@dataclass(frozen=True)
class Part:
    """One step of the plan.

    Attributes:
        kind: data, baselines, train, test, examples, inspect or memory.
        title: what the progress line says.
        folder: where it writes, relative to the reproduce folder.
        output: the file in ``folder`` whose existence means the part has finished.
        weight: expected wall seconds in the quick preset on 2 CPU cores.
        mask: the mask it works on (None for the dataset and the memory measurement).
        method: the trained method (train and test parts).
        layers: the network depth (train and test parts of a CNN).
        iterations: T of an unrolled network (its train and test parts; 0: a CNN).
    """

    kind: str
    title: str
    folder: str
    output: str
    weight: float
    mask: MaskSpec | None = None
    method: str = ""
    layers: int = 0
    iterations: int = 0

    def done(self, root: Path) -> bool:
        """Whether the part finished in an earlier run."""
        return (root / self.folder / self.output).is_file()


def run_name(method: str, layers: int) -> str:
    """The folder name of a trained network: the method; end-to-end also its depth."""
    return f"end-to-end-depth{layers}" if method == "end-to-end" else method


def unrolled_run_name(method: str, iterations: int) -> str:
    """The folder name of a trained unrolled network: ``unrolled-`` and the method;
    end-to-end also its T."""
    suffix = f"-T{iterations}" if method == "end-to-end" else ""
    return f"unrolled-{method}{suffix}"


def unrolled_runs(config: ReproduceConfig) -> list[tuple[str, int]]:
    """(method, T) of every unrolled network a mask trains: the greedy methods at T_max,
    end-to-end at each of its T."""
    unrolled = config.unrolled
    runs = [(m, unrolled.network.iterations) for m in unrolled.methods if m != "end-to-end"]
    if "end-to-end" in unrolled.methods:
        runs += [("end-to-end", t) for t in unrolled.end_to_end()]
    return runs


def _unrolled_parts(config: ReproduceConfig, mask: MaskSpec) -> list[Part]:
    """The train and test parts of the unrolled networks of one mask."""
    key, label = mask_key(mask), mask.describe()
    dc = unrolled_network(config, mask).dc
    # An iterative proximal step costs about half a gradient step per normal-operator
    # product; the direct one about as much as a gradient step.
    dc_cost = (1 + dc.cg_iterations) / 2 if dc.kind in ("cg", "chebyshev") else 1.0
    parts = []
    for method, iterations in unrolled_runs(config):
        name = unrolled_run_name(method, iterations)
        weight = EXPECTED_SECONDS[f"train unrolled {method} per iteration"] * iterations * dc_cost
        if method == "end-to-end":
            weight *= (config.unrolled.end_to_end_epochs or config.unrolled.epochs) / 30
        what = f"unrolled {method}, T={iterations}, {label}"
        every = "" if method == "end-to-end" else " (every T)"
        parts += [
            Part(
                "train",
                f"train {what}",
                f"{key}/{name}",
                "metrics_val.json",
                weight,
                mask,
                method,
                iterations=iterations,
            ),
            Part(
                "test",
                f"test {what}{every}",
                f"{key}/test-{name}",
                "summary.json",
                EXPECTED_SECONDS["test"],
                mask,
                method,
                iterations=iterations,
            ),
        ]
    return parts


def plan(config: ReproduceConfig) -> list[Part]:
    """Every part of the reproduction, in the order they run."""
    parts = [
        Part("data", "dataset and coil maps", "data", "dataset.json", EXPECTED_SECONDS["data"])
    ]
    depths = range(2, config.layers + 1) if config.end_to_end_every_depth else [config.layers]
    trained = [(m, config.layers) for m in LAYERWISE] + [("end-to-end", d) for d in depths]
    for mask in config.masks:
        key, label = mask_key(mask), mask.describe()
        parts.append(
            Part(
                "baselines",
                f"zero-filled, CS and CG-SENSE, {label}",
                f"{key}/baselines",
                "summary.json",
                EXPECTED_SECONDS["baselines"],
                mask,
            )
        )
        for method, layers in trained:
            name = run_name(method, layers)
            if method == "end-to-end":
                weight = EXPECTED_SECONDS["train end-to-end per hidden layer"] * (layers - 1)
            else:
                weight = EXPECTED_SECONDS[f"train {method}"]
            what = f"{method}, {layers} layers, {label}"
            parts.append(
                Part(
                    "train",
                    f"train {what}",
                    f"{key}/{name}",
                    "metrics_val.json",
                    weight,
                    mask,
                    method,
                    layers,
                )
            )
            parts.append(
                Part(
                    "test",
                    f"test {what}" + (" (every depth)" if method in LAYERWISE else ""),
                    f"{key}/test-{name}",
                    "summary.json",
                    EXPECTED_SECONDS["test"],
                    mask,
                    method,
                    layers,
                )
            )
        parts += _unrolled_parts(config, mask)
        for kind, title in (
            ("examples", "representative test slice, every method"),
            ("inspect", "what each layer learned"),
        ):
            parts.append(
                Part(
                    kind,
                    f"{title}, {label}",
                    f"{key}/{kind}",
                    f"{kind}.json",
                    EXPECTED_SECONDS[kind],
                    mask,
                )
            )
    parts.append(
        Part(
            "memory",
            "peak training memory per method (fresh processes)",
            "memory",
            "memory.json",
            EXPECTED_SECONDS["memory"],
        )
    )
    if config.unrolled.methods and config.unrolled.memory_iterations:
        parts.append(
            Part(
                "memory-unrolled",
                "peak training memory of unrolled networks against T (fresh processes)",
                "memory-unrolled",
                "memory.json",
                EXPECTED_SECONDS["memory unrolled"],
            )
        )
    return parts


def tested_models(part: Part) -> list[tuple[int, str]]:
    """(depth, model file relative to the reproduce folder) of a test part: the network
    after every stage of a layer-wise run, the one network of an end-to-end run. For an
    unrolled network the depth is T: a greedy run's network after every iteration
    (``model_iterT.pt``), an end-to-end run's one network."""
    assert part.mask is not None
    if part.iterations:
        run = f"{mask_key(part.mask)}/{unrolled_run_name(part.method, part.iterations)}"
        if part.method == "end-to-end":
            return [(part.iterations, f"{run}/model.pt")]
        return [(t, f"{run}/model_iter{t}.pt") for t in range(1, part.iterations + 1)]
    run = f"{mask_key(part.mask)}/{run_name(part.method, part.layers)}"
    if part.method in LAYERWISE:
        return [(d, f"{run}/model_depth{d}.pt") for d in range(2, part.layers + 1)]
    return [(part.layers, f"{run}/model.pt")]


# ------------------------------------------------------------------------------ the parts


def _run_data(config: ReproduceConfig, root: Path, part: Part) -> None:
    data = Path(config.data)
    built = not (data.is_dir() and any(data.iterdir()))
    if built:
        sources = [load_nifti(p) for p in config.sources] if config.sources else default_sources()
        simulate_dataset(sources, data, config.simulation)
    files = {}
    for split in SPLITS:
        paths = find_files(data, split)
        for path in tqdm(paths, desc=f"coil maps {split}", unit="file", leave=False, disable=None):
            prepare_volume(path, default_cache_dir(data), EspiritConfig())
        files[split] = [volume_id(p, data) for p in paths]
    manifest_path = data / "manifest.json"
    record = {
        "root": str(data),
        "built_by_this_run": built,
        "files": files,
        "file_counts": {split: len(names) for split, names in files.items()},
        "manifest": json.loads(manifest_path.read_text()) if manifest_path.is_file() else None,
    }
    write_json(root / part.folder / part.output, record)


def _run_evaluation(config: ReproduceConfig, root: Path, part: Part) -> None:
    assert part.mask is not None
    if part.kind == "baselines":
        methods, models = list(CLASSICAL_METHODS), []
    else:
        methods, models = [], [str(root / path) for _, path in tested_models(part)]
    cs, cg = classical_settings(config, part.mask)
    eval_config = EvaluateConfig(
        data=config.data,
        split=config.split,
        methods=methods,
        models=models,
        masks=[part.mask],
        cs=cs,
        cg_sense=cg,
    )
    with run_folder(root / part.folder, eval_config, overwrite=True) as folder:
        evaluate(eval_config, folder)


def _run_train(config: ReproduceConfig, root: Path, part: Part) -> None:
    assert part.mask is not None
    out = root / part.folder
    resume = (out / "config.yaml").is_file()
    if part.iterations:
        run = unrolled_train_config(config, part.method, part.mask, part.iterations)
    else:
        run = train_config(config, part.method, part.mask, part.layers)
    train(run, out, resume=resume, force=True)


def _network_paths(config: ReproduceConfig, root: Path, mask: MaskSpec) -> dict[str, Path]:
    """The full-depth network of every trained method."""
    key = mask_key(mask)
    return {
        m: root / key / run_name(m, config.layers) / "model.pt" for m in (*LAYERWISE, "end-to-end")
    }


def median_row(metrics_csv: Path, label: str) -> tuple[dict[str, str], float]:
    """The row of an evaluation's ``per_slice.csv`` or ``per_volume.csv`` whose PSNR (of
    the method ``label``) is closest to the median of that method's rows, and the median."""
    with metrics_csv.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["method"] == label]
    if not rows:
        raise CvxmriError(f"{metrics_csv}: no rows for {label}")
    median = statistics.median(float(r["psnr"]) for r in rows)
    return min(rows, key=lambda r: abs(float(r["psnr"]) - median)), median


def representative_slice(per_slice_csv: Path, label: str) -> dict[str, Any]:
    """The test slice whose PSNR (of the network ``label``) is closest to the median."""
    chosen, median = median_row(per_slice_csv, label)
    return {"file": chosen["file"], "slice": int(chosen["slice"]), "median_psnr": median}


def _run_examples(config: ReproduceConfig, root: Path, part: Part) -> None:
    assert part.mask is not None
    key, mask = mask_key(part.mask), part.mask
    networks = _network_paths(config, root, mask)
    label = model_label(networks["layerwise-convex"].with_name(f"model_depth{config.layers}.pt"))
    choice = representative_slice(root / key / "test-layerwise-convex" / "per_slice.csv", label)
    files = find_files(config.data, config.split)
    path = next(p for p in files if volume_id(p, config.data) == choice["file"])
    volume = prepare_volume(path, default_cache_dir(config.data), EspiritConfig())
    index = slice(choice["slice"], choice["slice"] + 1)
    sampling = evaluation_mask(
        mask, volume.name, volume.kspace.shape[-2:], volume.padding, volume.mask
    )
    sample = make_sample(
        torch.from_numpy(volume.kspace[index]),
        torch.from_numpy(sampling.astype(np.float32)),
        torch.from_numpy(volume.maps[index]),
        volume.recon_shape,
        reference=torch.from_numpy(np.abs(volume.target[index])),
        volume=choice["file"],
        slice_index=[choice["slice"]],
    )
    assert sample.reference is not None
    target = sample.reference.numpy() / sample.scale.numpy()[:, None, None]
    cs, cg = classical_settings(config, mask)
    reconstructors = {m: classical_reconstructor(m, cs, cg) for m in CLASSICAL_METHODS}
    for method, model_path in networks.items():
        reconstructors[method] = network_reconstructor(ReconCNN.load(model_path).eval())
    t_max = config.unrolled.network.iterations
    for method in config.unrolled.methods:
        model_path = root / key / unrolled_run_name(method, t_max) / "model.pt"
        reconstructors[f"unrolled-{method}"] = network_reconstructor(
            load_network(model_path).eval()
        )
    arrays = {
        "target": target[0],
        "x0": sample.x0[0].numpy(),
        "mask": sampling.astype(np.float32),
    }
    methods = []
    for method, reconstruct in reconstructors.items():
        image = reconstruct(sample).abs().numpy()
        arrays[f"recon_{method}"] = image[0]
        values = slice_metrics(target, image)
        methods.append({"method": method, **{name: v[0] for name, v in values.items()}})
    folder = root / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "images.npz", **arrays)
    record = {
        "mask": key,
        **choice,
        "rule": f"the {config.split} slice whose layer-wise convex PSNR is closest to the median",
        "methods": methods,
    }
    write_json(folder / part.output, record)


def _run_inspect(config: ReproduceConfig, root: Path, part: Part) -> None:
    assert part.mask is not None
    key = mask_key(part.mask)
    images = np.load(root / key / "examples" / "images.npz")
    x0 = torch.from_numpy(images["x0"])[None]
    networks = {
        m: ReconCNN.load(p).eval() for m, p in _network_paths(config, root, part.mask).items()
    }
    convex = networks["layerwise-convex"]
    radius = max(interpret.receptive_radius(n) for n in networks.values())
    zero_filled = np.hypot(images["x0"][0], images["x0"][1])
    pixels = interpret.choose_pixels(images["target"], zero_filled, radius)
    arrays: dict[str, np.ndarray] = {}
    patterns = []
    for method in ("layerwise-convex", "end-to-end"):
        layers = interpret.activation_patterns(networks[method], x0)
        arrays[f"clusters_{method}"] = np.stack(
            [interpret.cluster_patterns(p, config.clusters, config.seed) for p in layers]
        )
        patterns.append(
            {
                "method": method,
                "units": [int(p.shape[0]) for p in layers],
                "distinct_patterns": [interpret.distinct_patterns(p) for p in layers],
                "active_fraction": [float(p.mean()) for p in layers],
            }
        )
    filters = []
    depth_models = [
        ("layerwise-convex", d, root / key / "layerwise-convex" / f"model_depth{d}.pt")
        for d in range(2, config.layers + 1)
    ]
    depth_models.append(
        ("end-to-end", config.layers, _network_paths(config, root, part.mask)["end-to-end"])
    )
    for method, depth, path in depth_models:
        name = f"{method}-{depth}"
        coords = [(int(p["row"]), int(p["col"])) for p in pixels]
        arrays[f"filters_{name}"] = interpret.effective_filters(
            ReconCNN.load(path), x0, coords, radius
        )
        filters.append({"name": name, "method": method, "layers": depth})
    norms = interpret.group_norms(convex)
    folder = root / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "inspect.npz", **arrays)
    record = {
        "mask": key,
        "pixels": pixels,
        "radius": radius,
        "filters": filters,
        "clusters": config.clusters,
        "patterns": patterns,
        "group_norms": [n.tolist() for n in norms],
        "units": [len(n) for n in norms],
        "surviving_relative": interpret.SURVIVING_RELATIVE,
        "surviving": [interpret.surviving_units(n) for n in norms],
    }
    write_json(folder / part.output, record)


def memory_config(config: ReproduceConfig, root: Path) -> MemoryBenchConfig:
    """The memory measurement of a reproduction (`cvxmri.benchmark.memory`): one training
    step of every method and stage at this run's own depth, width, kernel, crop (or image
    size: a square of the same pixel count) and precision, at batch 1 and at its batch
    size, each in a fresh process; the largest batch in the default budget is extrapolated
    from them."""
    train = train_config(config, "layerwise-convex", config.masks[0], config.layers)
    size = train.crop
    if size == 0:
        shape = SliceData(config.data, "train", config.masks[0], max_slices=1).recon_shape
        size = round(math.sqrt(shape[0] * shape[1]))
    batch = train.optim.batch_size
    return MemoryBenchConfig(
        layers=config.layers,
        channels=train.channels,
        kernel_size=train.kernel_size,
        size=size,
        methods=["end-to-end", *LAYERWISE],
        stage_inputs=["cached" if train.stage_cache != "none" else "recomputed"],
        precisions=["bf16" if config.amp else "fp32"],
        pattern_chunk=train.pattern_chunk,
        search="fit",
        fit_batches=sorted({1, max(2, batch)}),
        # Small networks fit thousands of images: no cap below the budget's crossing.
        max_batch=10**7,
        depths=[config.layers],
        depth_batch=batch,
        chunks=[],
        device=config.device,
        seed=config.seed,
    )


def _run_memory(config: ReproduceConfig, root: Path, part: Part) -> None:
    bench = memory_config(config, root)
    with run_folder(root / part.folder, bench, overwrite=True) as folder:
        run_memory_benchmark(bench, folder)


def unrolled_memory_config(config: ReproduceConfig) -> UnrolledMemoryConfig:
    """The unrolled memory measurement of a reproduction
    (`cvxmri.benchmark.memory_unrolled`): one training step of every compared method (and
    end-to-end with checkpointing) at each of ``unrolled.memory_iterations``, at this
    run's regulariser, data consistency (``unrolled.network.dc``: the benchmark draws its
    own random 2D masks), image size (a square of the same pixel count) and coils, batch 1,
    each in a fresh process."""
    data = SliceData(config.data, "train", config.masks[0], max_slices=1)
    shape = data.recon_shape
    network = config.unrolled.network
    methods = list(config.unrolled.methods)
    if "end-to-end" in methods:
        methods.insert(methods.index("end-to-end") + 1, "end-to-end-checkpointing")
    return UnrolledMemoryConfig(
        iterations=sorted(set(config.unrolled.memory_iterations)),
        channels=network.channels,
        kernel_size=network.kernel_size,
        size=round(math.sqrt(shape[0] * shape[1])),
        coils=int(data.maps.shape[1]),
        dc=network.dc.kind,
        methods=methods,
        device=config.device,
        seed=config.seed,
    )


def _run_memory_unrolled(config: ReproduceConfig, root: Path, part: Part) -> None:
    bench = unrolled_memory_config(config)
    with run_folder(root / part.folder, bench, overwrite=True) as folder:
        run_unrolled_memory_benchmark(bench, folder)


RUNNERS = {
    "data": _run_data,
    "baselines": _run_evaluation,
    "train": _run_train,
    "test": _run_evaluation,
    "examples": _run_examples,
    "inspect": _run_inspect,
    "memory": _run_memory,
    "memory-unrolled": _run_memory_unrolled,
}


# ---------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One line per part: its number, what it does, the time elapsed and an estimate of the
    time left: the expected seconds of the parts left (`EXPECTED_SECONDS`), scaled by how
    fast the training parts run so far went against their expectation."""

    def __init__(self, weights: list[float], finished: list[bool]) -> None:
        self.total = len(weights)
        self.left = sum(w for w, f in zip(weights, finished, strict=True) if not f)
        self.began = time.perf_counter()
        self.expected_trained = 0.0
        self.seconds_trained = 0.0

    def _say(self, text: str) -> None:
        print(text, flush=True)
        log.info("%s", text)

    def skip(self, index: int, title: str) -> None:
        """A part that finished in an earlier run."""
        self._say(f"[{index}/{self.total}] {title}: finished before, skipped")

    def start(self, index: int, title: str) -> None:
        """A part starts."""
        rate = self.seconds_trained / self.expected_trained if self.expected_trained else 1.0
        elapsed = time.perf_counter() - self.began
        self._say(
            f"[{index}/{self.total}] {title} (elapsed {_duration(elapsed)}, "
            f"about {_duration(self.left * rate)} left)"
        )

    def end(self, weight: float, seconds: float, training: bool) -> None:
        """A part ended after ``seconds``; it was expected to take ``weight``. Training
        parts, which take most of the time, calibrate the estimate."""
        self.left -= weight
        if training:
            self.expected_trained += weight
            self.seconds_trained += seconds
        self._say(f"    done in {_duration(seconds)}")


# -------------------------------------------------------------------------- entry points


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (the file's existence marks a finished part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """A JSON file's contents."""
    return json.loads(path.read_text())


BENCHMARK_FILES = {"memory": "benchmark_memory.json", "speed": "benchmark_speed.json"}


def read_benchmark_json(path: Path, kind: str) -> dict[str, Any]:
    """A benchmark's results (``cvxmri benchmark memory``'s ``memory.json`` or ``speed``'s
    ``speed.json``): a JSON object with ``results``, a list of objects each naming its
    ``method``. The report shows their scalar fields (peak memory, largest batch, hours,
    ...) as they are, and so the optional ``depth.rows`` (memory against depth),
    ``targets``, ``device`` and ``command``."""
    if not path.is_file():
        raise CvxmriError(f"{path}: no such {kind} benchmark file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CvxmriError(f"{path}: not valid JSON ({err})") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise CvxmriError(f"{path}: expected an object with a non-empty 'results' list")
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise CvxmriError(f"{path}: every entry of 'results' needs a 'method' string")
    return data


def _add_benchmarks(out: Path, benchmarks: dict[str, Path] | None) -> None:
    """Validate the given benchmark JSONs (kind: path) and copy them into ``out``."""
    for kind, path in (benchmarks or {}).items():
        read_benchmark_json(path, kind)
    for kind, path in (benchmarks or {}).items():
        shutil.copyfile(path, out / BENCHMARK_FILES[kind])


def _saved_config(path: Path, kind: type) -> object:
    """A folder's saved configuration (of class ``kind``) with the defaults of settings
    added since it was written (so a folder begun before a new setting, at its default,
    goes on); as read when it is not a valid configuration."""
    try:
        return to_dict(load_yaml(kind, path))
    except CvxmriError:
        return yaml.safe_load(path.read_text())


def _open_folder(config: Any, out: Path, force: bool) -> None:
    saved = out / "config.yaml"
    if saved.is_file() and not force:
        if _saved_config(saved, type(config)) != to_dict(config):
            raise CvxmriError(
                f"{out}: started with another configuration (use --force to start again, "
                "or another --out)"
            )
    elif out.exists() and (force or any(out.iterdir())):
        if not force:
            raise CvxmriError(f"{out}: exists and is not a reproduce folder (use --force)")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CvxmriError(f"{out}: cannot create the folder ({err.strerror})") from None
    save_yaml(config, saved)


def machine() -> dict[str, object]:
    """Software versions and the machine, for the report."""
    import matplotlib
    import scipy
    import sigpy

    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        **environment(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sigpy": sigpy.__version__,
        "matplotlib": matplotlib.__version__,
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(pages * os.sysconf("SC_PAGE_SIZE") / 1024**3, 1) if pages else 0,
    }


def reproduce(
    config: ReproduceConfig,
    out: Path,
    force: bool = False,
    benchmarks: dict[str, Path] | None = None,
) -> Path:
    """Run every unfinished part of `plan` into ``out``, then write ``results.json`` and
    the report; return the path of ``report/report.html``.

    Args:
        config: what to run; a folder started with another configuration is refused
            unless ``force`` (which starts it again).
        out: the reproduce folder.
        force: delete ``out`` first.
        benchmarks: benchmark JSONs to show in the report, by kind (``memory``, ``speed``;
            see `read_benchmark_json`), copied into the folder (`BENCHMARK_FILES`).
    """
    config.validate()
    for kind, path in (benchmarks or {}).items():
        read_benchmark_json(path, kind)

    def report(folder: Path) -> Path:
        return rebuild_report(folder, benchmarks)

    return run_plan(config, out, force, plan(config), RUNNERS, EXPECTED_SECONDS["report"], report)


def run_plan(
    config: Any,
    out: Path,
    force: bool,
    parts: list[Part],
    runners: dict[str, Callable[[Any, Path, Part], None]],
    report_weight: float,
    report: Callable[[Path], Path],
) -> Path:
    """Open the reproduce folder ``out`` for ``config`` (refusing one begun with another
    configuration unless ``force``), run every unfinished part with its runner
    (``runners[part.kind](config, out, part)``), recording wall times in ``parts.json``
    and progress in ``log.txt``, then ``report(out)``; return what it returns."""
    resolve_device(config.device)  # a missing device is refused before the folder exists
    _open_folder(config, out, force)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        write_json(out / "environment.json", machine())
        finished = [p.done(out) for p in parts]
        progress = Progress([p.weight for p in parts] + [report_weight], [*finished, False])
        timings_path = out / "parts.json"
        timings = read_json(timings_path) if timings_path.is_file() else {}
        for index, (part, done) in enumerate(zip(parts, finished, strict=True), 1):
            if done:
                progress.skip(index, part.title)
                continue
            progress.start(index, part.title)
            resumed = (out / part.folder).exists()
            began = time.perf_counter()
            runners[part.kind](config, out, part)
            seconds = time.perf_counter() - began
            timings[part.folder] = {"seconds": seconds, "resumed": resumed}
            write_json(timings_path, timings)
            progress.end(part.weight, seconds, part.kind == "train")
        progress.start(len(parts) + 1, "results and report")
        began = time.perf_counter()
        path = report(out)
        progress.end(report_weight, time.perf_counter() - began, False)
        return path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def rebuild_report(out: Path, benchmarks: dict[str, Path] | None = None) -> Path:
    """Collect ``results.json`` from a finished reproduce folder and build its report;
    ``benchmarks`` (as for `reproduce`) are first copied into the folder."""
    from cvxmri.report.build import build_report

    if benchmarks:
        if not (out / "config.yaml").is_file():
            raise CvxmriError(f"{out}: not a reproduce folder (no config.yaml)")
        _add_benchmarks(out, benchmarks)
    results = collect(out)
    write_json(out / "results.json", results)
    return build_report(out, results)


# ------------------------------------------------------------------------------ results


def _final_certificates(
    mask: str, certificates: list[dict[str, Any]], beta: float
) -> list[dict[str, Any]]:
    """The last certificate of every stage (of a beta path: the selected beta's), with the
    stage's mapping report."""
    rows: dict[int, dict[str, Any]] = {}
    chosen: set[int] = set()
    for entry in certificates:
        stage = int(entry["stage"])
        row = rows.setdefault(stage, {"mask": mask, "stage": stage, "beta": beta})
        if "mapping" in entry:
            row.update(entry["mapping"])
        elif stage not in chosen:
            row.update({k: v for k, v in entry.items() if k not in ("stage", "trace")})
            if entry.get("selected"):
                chosen.add(stage)
    return [rows[s] for s in sorted(rows)]


def _mean(final: dict[str, dict[str, Any]], method: str, metric: str) -> float:
    return float(final[method]["volume"][metric]["mean"])


def _difference(final: dict[str, dict[str, Any]], method: str, other: str) -> dict[str, float]:
    """``method`` minus ``other`` in volume PSNR and SSIM."""
    return {m: _mean(final, method, m) - _mean(final, other, m) for m in ("psnr", "ssim")}


def _answers(
    config: ReproduceConfig,
    metrics: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    certificates: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The paper's questions, per mask, in numbers (volume PSNR and SSIM at full depth)."""
    answers = []
    for mask in config.masks:
        key = mask_key(mask)
        final = {
            m["method"]: m
            for m in metrics
            if m["mask"] == key and m["layers"] in (None, config.layers)
        }

        seconds = {
            r["method"]: r["train_seconds"]
            for r in runs
            if r["mask"] == key and r["layers"] == config.layers
        }
        gaps = [c["relative_gap"] for c in certificates if c["mask"] == key and "relative_gap" in c]
        tol = next(
            (
                r["config"]["certified"]["tol"]
                for r in runs
                if r["mask"] == key and r["method"] == "layerwise-convex"
            ),
            None,
        )
        answers.append(
            {
                "mask": key,
                "label": mask.describe(),
                "layers": config.layers,
                "psnr": {m: _mean(final, m, "psnr") for m in final},
                "ssim": {m: _mean(final, m, "ssim") for m in final},
                "convex_minus_end_to_end": _difference(final, "layerwise-convex", "end-to-end"),
                "ablation_minus_end_to_end": _difference(
                    final, "layerwise-nonconvex", "end-to-end"
                ),
                "convex_minus_zero_filled": _difference(final, "layerwise-convex", "zero-filled"),
                "convex_minus_cs": _difference(final, "layerwise-convex", "cs"),
                "relative_gap_range": [min(gaps), max(gaps)] if gaps else None,
                "largest_gap": max(gaps) if gaps else None,
                "tol": tol,
                "certified": max(gaps) <= tol if gaps and tol is not None else None,
                "train_seconds": seconds,
            }
        )
    return answers


def _check_reproduce_folder(out: Path) -> None:
    """Refuse, in one line, the folder of a training run or an evaluation (whose config
    would otherwise be reported key by key as unknown)."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except yaml.YAMLError:
        return  # load_yaml says what is wrong with the file
    if not isinstance(saved, dict) or set(saved) <= {f.name for f in fields(ReproduceConfig)}:
        return
    kind = "a training run" if "method" in saved else "an evaluation" if "methods" in saved else ""
    if kind:
        raise CvxmriError(
            f"{out}: {kind}, not a reproduce folder (cvxmri report rebuilds the report of a "
            "folder written by cvxmri reproduce)"
        )


def collect(out: Path) -> dict[str, Any]:
    """Everything the report shows, from the files of a finished reproduce folder."""
    if not (out / "config.yaml").is_file():
        raise CvxmriError(f"{out}: not a reproduce folder (no config.yaml)")
    _check_reproduce_folder(out)
    config = load_yaml(ReproduceConfig, out / "config.yaml")
    parts = plan(config)
    timings = finished_timings(out, parts, "cvxmri reproduce")
    metrics: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    certificates: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []
    examples, inspections = [], []
    for part in parts:
        folder = out / part.folder
        key = mask_key(part.mask) if part.mask is not None else ""
        if part.iterations or part.kind == "memory-unrolled":
            continue  # `collect_unrolled`
        if part.kind in ("baselines", "test"):
            summary = read_json(folder / "summary.json")
            layers = (
                {model_label(out / path): depth for depth, path in tested_models(part)}
                if part.kind == "test"
                else {}
            )
            for entry in summary["results"]:
                label = entry["method"]
                metrics.append(
                    {
                        "method": part.method or label,
                        "mask": key,
                        "layers": layers.get(label),
                        "label": label,
                        "folder": part.folder,
                        "volume": entry["volume"],
                        "slice": entry["slice"],
                        "seconds": entry["seconds"],
                    }
                )
        elif part.kind == "train":
            val = read_json(folder / "metrics_val.json")
            run_config = yaml.safe_load((folder / "config.yaml").read_text())
            with (folder / "history.csv").open() as handle:
                epochs = sum(1 for _ in csv.DictReader(handle))
            runs.append(
                {
                    "method": part.method,
                    "mask": key,
                    "layers": part.layers,
                    "folder": part.folder,
                    "epochs": epochs,
                    "train_seconds": val["train_seconds"],
                    "wall_seconds": timings.get(part.folder, {}).get("seconds"),
                    "resumed": timings.get(part.folder, {}).get("resumed"),
                    "val": val["final"],
                    "config": run_config,
                }
            )
            if part.method == "layerwise-convex":
                raw = read_json(folder / "certificates.json")
                certificates += _final_certificates(key, raw, run_config["convex"]["beta"])
                tol = run_config["certified"]["tol"]
                traces += [{"mask": key, "tol": tol, **t} for t in certificate_traces(folder)]
        elif part.kind == "examples":
            examples.append(read_json(folder / "examples.json"))
        elif part.kind == "inspect":
            inspections.append(read_json(folder / "inspect.json"))
    benchmarks = {
        kind: read_benchmark_json(out / name, kind) if (out / name).is_file() else None
        for kind, name in BENCHMARK_FILES.items()
    }
    return {
        "preset": config.preset,
        "folder": str(out),
        "collected": f"{datetime.now():%Y-%m-%d %H:%M}",
        "total_seconds": sum(t["seconds"] for t in timings.values()),
        "config": to_dict(config),
        "environment": read_json(out / "environment.json"),
        "dataset": read_json(out / "data" / "dataset.json"),
        "masks": [{"key": mask_key(m), "label": m.describe(), **to_dict(m)} for m in config.masks],
        "answers": _answers(config, metrics, runs, certificates),
        "metrics": metrics,
        "runs": runs,
        "certificates": certificates,
        "gap_traces": traces,
        "examples": examples,
        "inspect": inspections,
        "parts": [
            {"title": p.title, "folder": p.folder, **timings.get(p.folder, {})} for p in parts
        ],
        "memory_run": memory_summary(read_json(out / "memory" / "memory.json")),
        "unrolled": collect_unrolled(out, config, parts, timings, metrics),
        **benchmarks,
    }


def finished_timings(out: Path, parts: list[Part], command: str) -> dict[str, Any]:
    """The wall times (``parts.json``) of a folder whose ``parts`` have all finished;
    refuses one with a part left, naming the first and the ``command`` that finishes it."""
    missing = [p.title for p in parts if not p.done(out)]
    if missing:
        raise CvxmriError(
            f"{out}: {len(missing)} part(s) not finished, first: {missing[0]} "
            f"(run {command} again to finish them)"
        )
    return read_json(out / "parts.json") if (out / "parts.json").is_file() else {}


def _metric_rows(out: Path, part: Part) -> list[dict[str, Any]]:
    """The test metrics of an unrolled network after each tested T."""
    assert part.mask is not None
    summary = read_json(out / part.folder / "summary.json")
    iterations = {model_label(out / path): t for t, path in tested_models(part)}
    return [
        {
            "method": part.method,
            "mask": mask_key(part.mask),
            "iterations": iterations[entry["method"]],
            "label": entry["method"],
            "folder": part.folder,
            "volume": entry["volume"],
            "slice": entry["slice"],
            "seconds": entry["seconds"],
        }
        for entry in summary["results"]
    ]


def collect_unrolled(
    out: Path,
    config: ReproduceConfig,
    parts: list[Part],
    timings: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The unrolled comparison's results (None when it did not run): test metrics against
    T, training runs, the selected certificate of every convex iteration and the gap
    against time of all of them (`certificate_traces`), the memory
    measurement and, per mask, the answers at T_max (``metrics``: the classical rows)."""
    unrolled = config.unrolled
    if not unrolled.methods:
        return None
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    certificates: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []
    for part in parts:
        if not part.iterations:
            continue
        assert part.mask is not None
        key, folder = mask_key(part.mask), out / part.folder
        if part.kind == "test":
            rows += _metric_rows(out, part)
            continue
        val = read_json(folder / "metrics_val.json")
        runs.append(
            {
                "method": part.method,
                "mask": key,
                "iterations": part.iterations,
                "folder": part.folder,
                "train_seconds": val["train_seconds"],
                "wall_seconds": timings.get(part.folder, {}).get("seconds"),
                "val": val["by_depth"],
            }
        )
        if part.method == "layerwise-convex":
            tol = yaml.safe_load((folder / "config.yaml").read_text())["certified"]["tol"]
            traces += [{"mask": key, "tol": tol, **t} for t in certificate_traces(folder)]
            certificates += [
                {"mask": key, "iteration": int(c["stage"])}
                | {k: c[k] for k in ("beta", "beta_fraction", "relative_gap", "certified")}
                | {k: c[k] for k in ("passes", "iterations", "seconds")}
                for c in read_json(folder / "certificates.json")
                if c.get("selected")
            ]
    memory_path = out / "memory-unrolled" / "memory.json"
    memory = None
    if memory_path.is_file():
        measured = read_json(memory_path)
        memory = {key: measured[key] for key in ("config", "device", "measurement", "targets")}
        memory["rows"] = [
            {
                "method": row["method"],
                "iterations": row["iterations"],
                "peak_mib": None
                if row["peak_bytes"] is None
                else round(row["peak_bytes"] / MIB, 1),
            }
            for row in measured["rows"]
        ]
    return {
        "iterations": unrolled.network.iterations,
        "network": to_dict(unrolled.network),
        "dc_by_mask": {
            mask_key(mask): to_dict(unrolled_network(config, mask).dc) for mask in config.masks
        },
        "max_train_slices": unrolled.max_train_slices,
        "epochs": unrolled.epochs,
        "end_to_end_epochs": unrolled.end_to_end_epochs or unrolled.epochs,
        "metrics": rows,
        "runs": runs,
        "certificates": certificates,
        "gap_traces": traces,
        "memory": memory,
        "answers": _unrolled_answers(out, config, rows, runs, certificates, traces, metrics),
    }


def _unrolled_answers(
    out: Path,
    config: ReproduceConfig,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    certificates: list[dict[str, Any]],
    traces: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per mask, the volume PSNR and SSIM of every unrolled method at T_max and of the
    classical methods, the certificates' largest gap against the runs' ``tol`` (from the
    ``traces``), and the differences the issue's targets speak of."""
    t_max = config.unrolled.network.iterations
    answers = []
    for mask in config.masks:
        key = mask_key(mask)
        final = {r["method"]: r for r in rows if r["mask"] == key and r["iterations"] == t_max}
        final |= {m["method"]: m for m in metrics if m["mask"] == key and m["layers"] is None}
        gaps = [c["relative_gap"] for c in certificates if c["mask"] == key]
        answer: dict[str, Any] = {
            "mask": key,
            "label": mask.describe(),
            "iterations": t_max,
            "psnr": {m: _mean(final, m, "psnr") for m in final},
            "ssim": {m: _mean(final, m, "ssim") for m in final},
            "largest_gap": max(gaps) if gaps else None,
            "tol": next((t["tol"] for t in traces if t["mask"] == key), None),
            "certified": all(c["certified"] for c in certificates if c["mask"] == key)
            if gaps
            else None,
            "train_seconds": {
                r["method"]: r["train_seconds"]
                for r in runs
                if r["mask"] == key and r["iterations"] == t_max
            },
        }
        if "layerwise-convex" in final:
            for other in ("cs", "end-to-end", "layerwise-nonconvex"):
                if other in final:
                    name = f"convex_minus_{other.replace('-', '_')}"
                    answer[name] = _difference(final, "layerwise-convex", other)
                    answer[name]["paired"] = paired_difference(
                        out, final["layerwise-convex"], final[other]
                    )
        answers.append(answer)
    return answers


def _volume_psnr(out: Path, row: dict[str, Any]) -> dict[str, float]:
    """Volume PSNR by file of one metrics row (its evaluation's ``per_volume.csv``, the
    method named ``label``)."""
    with (out / row["folder"] / "per_volume.csv").open() as handle:
        return {
            r["file"]: float(r["psnr"])
            for r in csv.DictReader(handle)
            if r["method"] == row["label"]
        }


def paired_difference(
    out: Path, row: dict[str, Any], other: dict[str, Any]
) -> dict[str, float | None]:
    """The volume-paired PSNR difference of two metrics rows: mean, standard deviation and
    standard error over the test volumes (``n``), which says whether a difference is
    resolved by this test split."""
    mine, theirs = _volume_psnr(out, row), _volume_psnr(out, other)
    differences = [mine[f] - theirs[f] for f in sorted(mine) if f in theirs]
    n = len(differences)
    std = statistics.stdev(differences) if n > 1 else None
    return {
        "mean": statistics.fmean(differences) if n else None,
        "std": std,
        "standard_error": None if std is None else std / math.sqrt(n),
        "n": n,
    }


def memory_summary(measured: dict[str, Any]) -> dict[str, Any]:
    """The report's view of a reproduction's memory measurement (`memory_config`): per
    method, the peak of one step at the run's batch size (layer-wise: its largest stage),
    MiB per image, and the largest batch in the budget."""
    cfg, batch = measured["config"], measured["depth"]["batch"]
    peaks = {
        (r["method"], r["stage_inputs"], r["precision"]): r["step_bytes"]
        for r in measured["depth"]["rows"]
        if r["layers"] == cfg["layers"]
    }
    rows = []
    for r in measured["results"]:
        peak = peaks.get((r["method"], r["stage_inputs"], r["precision"]))
        rows.append(
            {
                "method": r["method"],
                "stage_inputs": r["stage_inputs"],
                "precision": r["precision"],
                "peak_mib": None if peak is None else round(peak / MIB, 1),
                "mib_per_image": r["mib_per_image"],
                "max_batch": r["max_batch"],
                "vs_end_to_end": r["vs_end_to_end"],
            }
        )
    return {
        "batch": batch,
        "layers": cfg["layers"],
        "channels": cfg["channels"],
        "kernel_size": cfg["kernel_size"],
        "size": cfg["size"],
        "budget_gb": cfg["budget_gb"],
        "device": measured["device"],
        "measurement": measured["measurement"],
        "rows": rows,
    }


def default_folder(preset_name: str) -> Path:
    """``runs/reproduce-<preset>``."""
    return Path("runs") / f"reproduce-{preset_name}"


def _result_line(mask: str, name: str, volume: dict[str, Any]) -> str:
    psnr, ssim = volume["psnr"], volume["ssim"]
    return (
        f"{mask:<14} {name:<30} {psnr['mean']:>7.2f} ± {psnr['std']:<5.2f} "
        f"{ssim['mean']:>8.4f} ± {ssim['std']:<6.4f}"
    )


def format_results(results: dict[str, Any]) -> str:
    """The full-depth test metrics as a fixed-width table (volume PSNR and SSIM, and the
    certificates of the convex networks), then the unrolled networks at T_max."""
    from cvxmri.report.build import certification

    lines = [f"{'mask':<14} {'method':<30} {'PSNR dB':>15} {'SSIM':>17}  certificate"]
    layers = results["config"]["layers"]
    cnn = {a["mask"]: certification(a) for a in results["answers"]}
    for entry in results["metrics"]:
        if entry["layers"] in (None, layers):
            line = _result_line(entry["mask"], entry["method"], entry["volume"])
            if entry["method"] == "layerwise-convex":
                line += f"  {cnn[entry['mask']]}"
            lines.append(line)
    unrolled = results.get("unrolled")
    greedy = {a["mask"]: certification(a) for a in unrolled["answers"]} if unrolled else {}
    for entry in unrolled["metrics"] if unrolled else []:
        if entry["iterations"] == unrolled["iterations"]:
            name = f"unrolled {entry['method']}"
            line = _result_line(entry["mask"], name, entry["volume"])
            if entry["method"] == "layerwise-convex":
                line += f"  {greedy[entry['mask']]}"
            lines.append(line)
    return "\n".join(lines)
