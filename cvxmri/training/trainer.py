"""Training: layer-wise (convex or not) and end-to-end, with exact resume.

Layer-wise training (docs/method.md) builds the network one stage at a time. Stage ``i`` trains
a two-layer model on the output ``h_{i-1}`` of the frozen prefix to predict the residual
``x* - x0``; then its first layer is frozen and appended, and its second layer is dropped
unless it is the last stage. The prefix runs without autograd, and with fixed masks its
output (the stage input) is computed once per stage for the training and validation images
and kept in memory or on disk (bf16 under autocast); the prefix itself is then dropped
while the stage trains (the exported ``model_depthN.pt`` holds it), so a stage's memory
does not grow with depth. With fixed inputs a convex stage's sign patterns are fixed too:
they are computed once per stage on whole images and kept packed, 8 to a byte.

- ``layerwise-convex``: the stage is a `ConvexStage` trained on its convex objective with
  Adam; its optimality certificate (relative duality gap) is logged per epoch.
- ``layerwise-nonconvex``: the same greedy schedule with an ordinary conv-ReLU-1x1 stage trained by
  backpropagation (the non-convex ablation).
- ``end-to-end``: the ordinary ReLU CNN of the same depth and width trained jointly.

Stages come from `cvxmri.models.stages.build_stage` and are driven through the `Stage`
interface; epochs, optimisers and seeds are those of the library functions in
`cvxmri.training.fit`. The trainer adds the data, crops, caches, validation, logs and
checkpoints.

Every stage and epoch writes ``checkpoints/last.pt`` (the frozen prefix is read back from
``model_depthN.pt``); a resumed run continues from it and
ends with the same weights as an uninterrupted one, to the bit, because every
random choice (masks, crops, batch order, initialisation) is derived from (seed, stage,
epoch). ``history.csv`` is rewritten with every history row, so an interrupted run has
its finished epochs' rows. An end-to-end run may resume with more ``optim.epochs`` than it
was started with (`check_resumable`): it continues to the new count and ends as a run
started with it would, the schedule depending on the epoch index only.

Under torchrun (`cvxmri.distributed`) every process runs this trainer: each steps on its
part of every global batch, the solvers and certificates sum over its share of the
images, and rank 0 alone writes files (docs/method.md, "Many processes").
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cvxmri import distributed
from cvxmri.config import to_dict
from cvxmri.errors import CvxmriError
from cvxmri.metrics import slice_metrics, volume_metrics
from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStage, pack_gates, unpack_gates
from cvxmri.models.stages import Stage, build_stage
from cvxmri.models.unrolled import UnrolledNet
from cvxmri.training import data as data_module
from cvxmri.training.certified import StageSolver
from cvxmri.training.checkpoint import load_checkpoint, save_checkpoint
from cvxmri.training.config import TrainConfig
from cvxmri.training.data import (
    PairSet,
    check_patch,
    crop_windows,
    crops_apply,
    derived_seed,
    epoch_batches,
    split_data,
    take_crops,
)
from cvxmri.training.fista import fista
from cvxmri.training.fit import end_to_end_epoch, make_optimizer, stage_epoch, stage_seed

log = logging.getLogger(__name__)

# Pixels per no-grad pass (stage inputs, sign patterns, validation, certificates): 8 images
# of 128x128, 1 of 320x320, so that these passes need about as much memory as a training
# step at batch 1 whatever the image size.
CHUNK_PIXELS = 8 * 128 * 128


def chunk_images(shape: tuple[int, ...], ndim: int = 2) -> int:
    """Images per no-grad pass for images of ``shape`` (``(..., H, W)``; volumes
    ``(..., X, Y, Z)`` with ``ndim`` 3)."""
    return max(1, CHUNK_PIXELS // math.prod(shape[-ndim:]))


def check_resources(config: TrainConfig, images: int, shape: tuple[int, ...], out: Path) -> None:
    """Refuse up front a run whose cached stage inputs cannot fit, instead of failing
    midway: the widest stage input (``channels`` per pixel, float32 or bf16 under autocast,
    of every training and validation image, ``images`` in all, twice: the next stage's
    inputs are computed from the previous stage's) must fit in available memory
    (``stage_cache: memory``) or free disk (``disk``)."""
    if config.method == "end-to-end" or config.stage_cache == "none" or config.layers < 3:
        return
    # Every variant's hidden layers are ``channels`` wide (2 outputs x channels/2 patterns).
    need = 2 * images * config.channels * math.prod(shape) * (2 if config.amp else 4)
    gib = 1024**3
    if config.stage_cache == "memory":
        # Every process on this machine keeps its own copy (torchrun).
        need *= distributed.local_world_size()
        have = data_module.available_memory()
        where = "available memory"
    else:
        out.mkdir(parents=True, exist_ok=True)
        have = shutil.disk_usage(out).free
        where = f"free disk under {out}"
    # Keep a margin for the model, the data and the other stage's inputs.
    if need > 0.8 * have:
        raise CvxmriError(
            f"cached stage inputs need {need / gib:.1f} GiB but only {have / gib:.1f} GiB of "
            f"{where}: use stage_cache none or disk, fewer training slices, or fewer channels"
        )


def step_memory(config: TrainConfig, shape: tuple[int, ...]) -> tuple[int, int]:
    """Estimated bytes per image of one training step (activations, gradients and the
    convolutions' work space) and bytes of a whole-image validation pass: an upper-side
    estimate for the up-front guard, not a measurement (``cvxmri benchmark memory`` measures).

    Feature maps of ``channels`` per pixel: end-to-end keeps two per hidden layer (the
    convolution's output and the ReLU's; one with checkpointing) plus two in the backward
    pass; a layer-wise stage holds its input, the prefix's two while computing it, and about
    four (convex: responses, their gated product and gradient; non-convex: the hidden
    activations and their gradients). ``shape``: the recon matrix (h, w), or the volumes'
    (x, y, z) in 3D (crops are cubes then).
    """
    pixels = config.crop ** len(shape) if config.crop else math.prod(shape)
    width = 2 if config.amp else 4
    channels, hidden = config.channels, config.layers - 1
    if config.method == "end-to-end":
        maps = (hidden if config.checkpointing else 2 * hidden) * channels + 2 * channels
    else:
        maps = 6 * channels
    validation = chunk_images(shape, len(shape)) * math.prod(shape) * 3 * channels * 4
    return pixels * (maps + 8) * width, validation


def check_step_fits(config: TrainConfig, shape: tuple[int, ...], device: torch.device) -> None:
    """Refuse up front a batch whose training step (`step_memory`) cannot fit in the
    device's free memory (CUDA) or the available memory (CPU)."""
    if device.type == "cuda":
        have, _ = torch.cuda.mem_get_info(device)
        where = f"free memory on {device}"
    else:
        have = data_module.available_memory()
        where = "available memory"
    # Under torchrun a process steps on its part of the global batch.
    processes = distributed.world_size()
    batch = math.ceil(config.optim.batch_size / processes)
    per_image, validation = step_memory(config, shape)
    need = max(batch * per_image, validation)
    limit = 0.9 * have
    if need <= limit:
        return
    fits = processes * int(limit // per_image) if validation <= limit else 0
    advice = (
        f"use optim.batch_size {fits} or less"
        if fits
        else "use a smaller crop, fewer channels, or another device"
    )
    gib = 1024**3
    raise CvxmriError(
        f"a training step at batch size {config.optim.batch_size} needs about "
        f"{need / gib:.1f} GiB but only "
        f"{have / gib:.1f} GiB of {where}: {advice}"
    )


def config_differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """The keys on which two configurations (nested dicts) differ, as
    ``optim.lr: 0.001 -> 0.01`` (``saved -> new``; a missing key reads ``(none)``)."""
    missing = "(none)"
    if isinstance(saved, dict) or isinstance(new, dict):
        # A section missing on one side is compared key by key, so leaves are named.
        saved = {} if saved == missing else saved
        new = {} if new == missing else new
    if isinstance(saved, dict) and isinstance(new, dict):
        found = []
        for key in dict.fromkeys([*saved, *new]):
            found += config_differences(
                saved.get(key, missing), new.get(key, missing), f"{prefix}{key}."
            )
        return found
    if saved == new:
        return []
    shown = ["''" if value == "" else value for value in (saved, new)]
    return [f"{prefix.rstrip('.')}: {shown[0]} -> {shown[1]}"]


def check_resumable(saved: Any, new: dict[str, Any], out: Path) -> None:
    """Refuse to resume the run in ``out`` (started with ``saved``) with ``new``, naming the
    keys that differ, unless they are the same or an end-to-end run gets more epochs."""
    if not isinstance(saved, dict):
        raise CvxmriError(f"{out}: the run's configuration is not a mapping; nothing to resume")
    # Runs started before 3D training have no ``dims``: they are 2D.
    changes = config_differences({"dims": 2, **saved} if "dims" in new else saved, new)
    if not changes:
        return
    if [c.split(":")[0] for c in changes] == ["optim.epochs"]:
        before, after = saved["optim"]["epochs"], new["optim"]["epochs"]
        if new.get("method") != "end-to-end":
            raise CvxmriError(
                f"{out}: extending a run by more epochs ({before} -> {after}) is only "
                "supported for end-to-end training (layer-wise epochs are per stage)"
            )
        if after > before:
            return
        raise CvxmriError(
            f"{out}: the run was started with optim.epochs {before}; resuming can only "
            f"add epochs, not take them away ({after})"
        )
    shown = changes[:5] + ([f"{len(changes) - 5} more"] if len(changes) > 5 else [])
    raise CvxmriError(
        f"{out}: the run was started with another configuration: {'; '.join(shown)} "
        "(resume without these options, or start a new run)"
    )


class TrainingStopped(Exception):
    """Raised when ``stop_after`` epochs have run; the run folder can be resumed."""


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when available; a CUDA device that is not there is refused here,
    before any work starts. Under torchrun ``cuda`` and ``auto`` mean this process's GPU,
    ``cuda:LOCAL_RANK`` (`cvxmri.distributed.local_device`)."""
    if name == "auto":
        return distributed.local_device(
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CvxmriError(f"unknown device {name!r} (choose cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CvxmriError(f"device {name} requested but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CvxmriError(
                f"device {name} requested but only {count} CUDA device(s) are available"
            )
    return distributed.local_device(device)


class Trainer:
    """Trains one network as configured, writing into ``out`` (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        out: Path,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``progress``: called with every history row (an epoch, or a solver's check)."""
        config.validate()
        self.config = config
        self.progress = progress
        self.out = out
        self.device = resolve_device(config.device)
        self.train_data = split_data(
            config.data, "train", config.mask, config.dims, config.max_train_slices
        )
        self.val_data = split_data(config.val_data or config.data, "val", config.mask, config.dims)
        if config.dims == 3:
            check_patch(self.train_data.recon_shape, config.crop)
        if len(self.train_data) < distributed.world_size():
            raise CvxmriError(
                f"{len(self.train_data)} training slices for {distributed.world_size()} "
                "processes: every process needs at least one"
            )
        # Each process caches the stage inputs of its share of the training images and of
        # every validation image.
        share = math.ceil(len(self.train_data) / distributed.world_size())
        images = share + len(self.val_data)
        check_resources(config, images, self.train_data.recon_shape, out)
        check_step_fits(config, self.train_data.recon_shape, self.device)
        self.val_pairs = self.val_data.pairs(self.val_data.evaluation_masks())
        self.fixed_pairs = (
            self.train_data.pairs(self.train_data.training_masks(config.seed, None))
            if config.fixed_masks
            else None
        )
        self.history: list[dict[str, Any]] = []
        self.certificates: list[dict[str, Any]] = []
        self.depth_metrics: list[dict[str, Any]] = []
        self.writer: Any = None
        # The certified solver's patch store buffer, passed from stage to stage.
        self._patch_buffer: Tensor | None = None

    # ------------------------------------------------------------------ shared helpers

    def _chunk(self, shape: tuple[int, ...]) -> int:
        """Images (volumes) per no-grad pass for a batch of ``shape`` (`chunk_images`)."""
        return chunk_images(shape, self.config.dims)

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    def _pairs(self, epoch: int) -> PairSet:
        if self.fixed_pairs is not None:
            return self.fixed_pairs
        masks = self.train_data.training_masks(self.config.seed, epoch)
        return self.train_data.pairs(masks)

    @torch.no_grad()
    def _apply(
        self,
        module: Callable[..., Tensor],
        *images: Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``module`` over ``images`` (one or more tensors, the module's arguments) in chunks
        of images, on the device, results in ``dtype`` on the CPU."""
        outputs = []
        step = self._chunk(images[0].shape)
        for start in range(0, images[0].shape[0], step):
            chunks = [x[start : start + step].to(self.device) for x in images]
            with self._autocast():
                outputs.append(module(*chunks).to(dtype).cpu())
        return torch.cat(outputs)

    def validation_metrics(
        self, model: ReconCNN, stage_inputs: Tensor | None = None
    ) -> dict[str, float]:
        """Whole-image validation metrics (fastMRI volume and slice conventions).

        ``stage_inputs``: the validation images' cached stage inputs ``h_{i-1}``; then ``model``
        holds the stage's layers only (its prediction is ``x0 + final(hidden(h_{i-1}))``)
        and the frozen prefix is not needed.
        """
        model.eval()
        pairs = self.val_pairs
        if stage_inputs is None:
            pred = self._apply(model, pairs.x0)
        else:

            def tail(x0: Tensor, h: Tensor) -> Tensor:
                return x0 + model.final(model.last_hidden(h))

            pred = self._apply(tail, pairs.x0, stage_inputs)
        return image_metrics(pred, pairs.target, pairs.support, pairs.scale, pairs.files)

    def _record(self, row: dict[str, Any], step: int) -> None:
        """Add a history row: to ``history.csv`` (rewritten every epoch, so that an
        interrupted run has the rows of its finished epochs), the log, TensorBoard and
        the ``progress`` callback."""
        self.history.append(row)
        if not distributed.is_main():
            return
        write_history(self.out / "history.csv", self.history)
        log.info("%s", row)
        if self.progress is not None:
            self.progress(row)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def _batches(
        self,
        inputs: Tensor,
        targets: Tensor,
        stage: int,
        epoch: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        gates: Tensor | None = None,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """This epoch's shuffled, cropped batches, made one at a time on the device.
        ``transform`` (the frozen prefix, when stage inputs are not cached) runs on whole
        images before cropping, so cached and recomputed inputs are the same. ``gates``
        (packed sign patterns of the whole images, `pack_gates`) are cropped alongside;
        None when not given. ``inputs``, ``targets`` and ``gates`` are of this process's
        share of the training images (`cvxmri.distributed.shard`), and it gets the draws
        of every global batch that fall on them (`cvxmri.distributed.owned`)."""
        cfg = self.config
        shape = tuple(inputs.shape[2:])
        images = len(self.train_data)
        n = images * cfg.crops_per_image
        corners = crop_windows(n, shape, cfg.crop, cfg.seed, stage, epoch)
        for batch in epoch_batches(n, cfg.optim.batch_size, cfg.seed, stage, epoch):
            draw = distributed.owned(batch, images)
            index = distributed.share_positions(draw % images)
            corner = corners[draw]
            x = inputs[index].to(self.device)
            if transform is not None:
                with torch.no_grad(), self._autocast():
                    x = transform(x).float()
            packed = None if gates is None else gates[index].to(self.device)
            yield (
                take_crops(x, corner, cfg.crop),
                take_crops(targets[index].to(self.device), corner, cfg.crop),
                None if packed is None else take_crops(packed, corner, cfg.crop),
            )

    def _save(self, state: dict[str, Any]) -> None:
        state.update(
            history=json.dumps(self.history),
            certificates=json.dumps(self.certificates),
            depth_metrics=json.dumps(self.depth_metrics),
            config=json.dumps(to_dict(self.config)),
        )
        if distributed.is_main():
            save_checkpoint(self.out / "checkpoints" / "last.pt", state)
        distributed.barrier()

    def _load(self) -> dict[str, Any] | None:
        path = self.out / "checkpoints" / "last.pt"
        if not path.exists():
            return None
        state = load_checkpoint(path)
        check_resumable(json.loads(state["config"]), to_dict(self.config), path)
        self.history = json.loads(state["history"])
        self.certificates = json.loads(state["certificates"])
        self.depth_metrics = json.loads(state["depth_metrics"])
        return state

    # ---------------------------------------------------------------------- entry point

    def fit(self, stop_after: int | None = None) -> ReconCNN:
        """Train (resuming from ``checkpoints/last.pt`` if present) and return the network.

        Args:
            stop_after: stop after this many epochs in this call (to test resumption); the
                run is then resumable.
        """
        from torch.utils.tensorboard import SummaryWriter

        if distributed.is_main():
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        try:
            state = self._load()
            budget = [math.inf if stop_after is None else stop_after]
            if self.config.method == "end-to-end":
                return self._fit_end_to_end(state, budget)
            return self._fit_layerwise(state, budget)
        finally:
            if self.writer is not None:
                self.writer.close()

    # ------------------------------------------------------------------------ end-to-end

    def _fit_end_to_end(self, state: dict[str, Any] | None, budget: list[float]) -> ReconCNN:
        cfg = self.config
        torch.manual_seed(derived_seed(cfg.seed, 1000))
        model = ReconCNN.relu(cfg.layers, cfg.channels, cfg.kernel_size, ndim=cfg.dims)
        model = model.to(self.device)
        optimizer, scheduler = make_optimizer(model.parameters(), cfg.optim)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["epoch"])
        for epoch in range(start, cfg.optim.epochs):
            if budget[0] <= 0:
                raise TrainingStopped
            began = time.perf_counter()
            pairs = self._pairs(epoch)
            batches = self._batches(
                distributed.shard(pairs.x0), distributed.shard(pairs.target), 0, epoch
            )
            steps = math.ceil(len(pairs) * cfg.crops_per_image / cfg.optim.batch_size)
            desc = f"end-to-end epoch {epoch + 1}/{cfg.optim.epochs}"
            quiet = None if distributed.is_main() else True
            progress = tqdm(batches, total=steps, desc=desc, leave=False, disable=quiet)
            train_loss = end_to_end_epoch(
                model,
                ((x0, target) for x0, target, _ in progress),
                optimizer,
                amp=cfg.amp,
                checkpointing=cfg.checkpointing,
            )
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row = {
                "method": cfg.method,
                "stage": 0,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                **self.validation_metrics(model),
                "seconds": time.perf_counter() - began,
            }
            self._record(row, epoch)
            self._save(
                {
                    "method": cfg.method,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                }
            )
            budget[0] -= 1
        self.depth_metrics = [{"layers": cfg.layers, **self.validation_metrics(model)}]
        return model.cpu()

    # ------------------------------------------------------------------------ layer-wise

    def _prefix(self, stage: int, device: torch.device | None = None) -> ReconCNN | None:
        """The frozen network before stage ``stage`` (0-based), read onto ``device`` (default:
        the training device) from the network of depth ``stage + 1`` that the previous stage
        exported (None before the first)."""
        if stage == 0:
            return None
        path = self.out / f"model_depth{stage + 1}.pt"
        prefix = ReconCNN.load(path, device or self.device).eval()
        for parameter in prefix.parameters():
            parameter.requires_grad_(False)
        return prefix

    def _cache_inputs(
        self, layers: Callable[[Tensor], Tensor], x: Tensor, stage: int, split: str
    ) -> Tensor:
        """``layers`` over ``x`` (a split's previous stage inputs or zero-filled images), in
        memory or on disk; bf16 under autocast (the layers' output is bf16 numbers then, so
        nothing is lost)."""
        dtype = torch.bfloat16 if self.config.amp else torch.float32
        features = self._apply(layers, x, dtype=dtype)
        if self.config.stage_cache == "memory":
            return features
        path = self._cache_path(stage + 1, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, path)
        del features
        return torch.load(path, mmap=True, weights_only=True)

    def _stage_inputs(self, stage: int, previous: StageInputs | None) -> StageInputs:
        """What stage ``stage`` trains on.

        Cached inputs are the previous stage's cached inputs (or the zero-filled images)
        through the one layer that stage froze, so this pass costs one layer whatever the
        depth; a resumed run computes them once through the whole prefix (the same numbers:
        cached values are exact). The prefix is then not resident while the stage trains
        (only the exported network file holds it), so a stage's memory does not grow with
        depth. The previous stage's cache is released (its files deleted). Each process
        caches its share of the training images (`cvxmri.distributed.shard`) and every
        validation image."""
        cfg = self.config
        if stage == 0:
            return StageInputs()
        if cfg.stage_cache == "none":
            return StageInputs(prefix=self._prefix(stage))
        pairs = self._pairs(0)
        if previous is not None and previous.frozen is not None:
            layers: Callable[[Tensor], Tensor] = previous.frozen
            train = distributed.shard(pairs.x0) if previous.cached is None else previous.cached
            val = self.val_pairs.x0 if previous.val is None else previous.val
        else:
            prefix = self._prefix(stage)
            assert prefix is not None
            layers, val = prefix.last_hidden, self.val_pairs.x0
            train = distributed.shard(pairs.x0)
        inputs = StageInputs(
            cached=self._cache_inputs(layers, train, stage, "train"),
            val=self._cache_inputs(layers, val, stage, "val"),
        )
        if previous is not None:
            previous.cached = previous.val = previous.frozen = None
        for split in ("train", "val"):
            self._cache_path(stage, split).unlink(missing_ok=True)
        return inputs

    def _cache_path(self, stage: int, split: str) -> Path:
        """The file of stage ``stage``'s (1-based) cached inputs of ``split``; one per
        process under torchrun (each process keeps its own)."""
        part = f"_rank{distributed.rank()}" if distributed.world_size() > 1 else ""
        return self.out / "cache" / f"stage{stage}_{split}_inputs{part}.pt"

    def _training_share(self, inputs: StageInputs, pairs: PairSet) -> tuple[Tensor, Tensor]:
        """The stage inputs (cached, or the zero-filled images) and residuals ``x* - x0``
        of this process's share of the training images (`cvxmri.distributed.shard`)."""
        x = inputs.cached if inputs.cached is not None else distributed.shard(pairs.x0)
        return x, distributed.shard(pairs.target - pairs.x0)

    def _inputs_sample(self, inputs: StageInputs, n: int) -> Tensor:
        """The stage inputs of the first ``n`` training images (float32, on the CPU), the
        same on every process (`cvxmri.distributed.gather_first`)."""
        if inputs.cached is not None:
            return distributed.gather_first(inputs.cached, n)
        x0 = self._pairs(0).x0[:n]
        return x0 if inputs.prefix is None else self._apply(inputs.prefix.last_hidden, x0)

    @torch.no_grad()
    def _gate_cache(self, stage: Stage, inputs: StageInputs) -> Tensor:
        """The packed sign patterns (`pack_gates`) of every whole training image of this
        process's share: fixed for the stage, so computed once instead of in every step;
        crops take theirs from it."""
        x, _ = self._training_share(inputs, self._pairs(0))
        packed = []
        step = self._chunk(x.shape)
        for start in range(0, len(x), step):
            chunk = x[start : start + step].to(self.device)
            if inputs.transform is not None:
                with self._autocast():
                    chunk = inputs.transform(chunk).float()
            gates = stage.sign_patterns(chunk)
            assert gates is not None
            packed.append(pack_gates(gates).cpu())
        return torch.cat(packed)

    def _new_stage(
        self, stage: int, sample: Tensor, residual: Tensor | None, inputs: StageInputs
    ) -> Stage:
        """Stage ``stage`` from the run's `StageSpec` (`build_stage`), its gates from
        ``sample`` (selected on ``residual``, its images' residual targets, with
        ``convex.gate_pool`` above 1); a carried stage starts at the prefix's output
        layer."""
        cfg = self.config
        previous_final = None
        if cfg.carry and stage > 0:
            prefix = inputs.prefix or self._prefix(stage)
            assert prefix is not None
            previous_final = prefix.final
        return build_stage(
            cfg.stage_spec(),
            stage,
            sample.shape[1],
            sample,
            residual=residual,
            seed=stage_seed(cfg.seed, stage, cfg.method),
            previous_final=previous_final,
            device=self.device,
        )

    def _certificate(
        self, stage: Stage, x: Tensor, residual: Tensor, inputs: StageInputs
    ) -> dict[str, float] | None:
        """The duality gap on whole training images (the fixed convex problem; ``x`` and
        ``residual`` of this process's share); None for a stage without a certificate."""

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            step = self._chunk(x.shape)
            for i in range(0, len(x), step):
                chunk = x[i : i + step].to(self.device)
                if inputs.transform is not None:
                    with torch.no_grad():
                        chunk = inputs.transform(chunk)
                yield chunk.float(), residual[i : i + step].to(self.device)

        return stage.certificate(batches())

    def _validate_stage(self, stage: Stage, inputs: StageInputs) -> dict[str, float]:
        """Validation metrics of the network of this depth: on the cached validation
        features when there are (the prefix is not resident), else through the prefix."""
        first, last = stage.freeze()
        if inputs.val is not None:
            return self.validation_metrics(ReconCNN([first], last).to(self.device), inputs.val)
        hidden = list(inputs.prefix.hidden) if inputs.prefix is not None else []
        return self.validation_metrics(ReconCNN([*hidden, first], last).to(self.device))

    def _area_ratio(self, x: Tensor) -> float:
        """Whole-image area over crop area (1 for whole images; see `convex_stage_step`)."""
        crop, spatial = self.config.crop, tuple(x.shape[2:])
        if not crops_apply(spatial, crop):
            return 1.0
        return math.prod(spatial) / crop ** len(spatial)

    def _fit_layerwise(self, state: dict[str, Any] | None, budget: list[float]) -> ReconCNN:
        cfg = self.config
        stages = cfg.layers - 1
        start_stage, start_epoch = 0, 0
        if state is not None:
            start_stage, start_epoch = int(state["stage"]), int(state["epoch"])
        inputs: StageInputs | None = None
        for index in range(start_stage, stages):
            inputs = self._stage_inputs(index, inputs)
            stage, optimizer, scheduler, first_epoch = self._start_stage(
                inputs, index, state if index == start_stage else None, start_epoch
            )
            program = stage.convex_program if cfg.solver != "adam" else None
            if stage.patterns and cfg.fixed_masks and program is None:
                inputs.gates = self._gate_cache(stage, inputs)
            if program is not None and cfg.solver == "certified":
                self._solve_certified(stage, program, inputs, index)
            elif program is not None:
                self._solve_fista(stage, program, inputs, index)
            else:
                self._train_stage(stage, optimizer, scheduler, inputs, index, first_epoch, budget)
            self._finish_stage(stage, inputs, index)
        self._patch_buffer = None
        final = self._prefix(stages, torch.device("cpu"))
        assert final is not None
        return final

    def _train_stage(
        self,
        stage: Stage,
        optimizer: torch.optim.Adam,
        scheduler: torch.optim.lr_scheduler.StepLR,
        inputs: StageInputs,
        index: int,
        first_epoch: int,
        budget: list[float],
    ) -> None:
        """The stage's epochs of mini-batch training, each validated and checkpointed."""
        cfg = self.config
        stages = cfg.layers - 1
        for epoch in range(first_epoch, cfg.optim.epochs):
            if budget[0] <= 0:
                raise TrainingStopped
            began = time.perf_counter()
            pairs = self._pairs(index * cfg.optim.epochs + epoch)
            x, residual = self._training_share(inputs, pairs)
            batches = self._batches(x, residual, index + 1, epoch, inputs.transform, inputs.gates)
            steps = math.ceil(len(pairs) * cfg.crops_per_image / cfg.optim.batch_size)
            desc = f"{cfg.method} stage {index + 1}/{stages} epoch {epoch + 1}/{cfg.optim.epochs}"
            quiet = None if distributed.is_main() else True
            progress = tqdm(batches, total=steps, desc=desc, leave=False, disable=quiet)
            unpacked = (
                (x, r, None if packed is None else unpack_gates(packed, stage.patterns))
                for x, r, packed in progress
            )
            train_loss = stage_epoch(stage, unpacked, optimizer, self._area_ratio(x))
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row: dict[str, Any] = {
                "method": cfg.method,
                "stage": index + 1,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                **self._validate_stage(stage, inputs),
            }
            last_epoch = epoch + 1 == cfg.optim.epochs
            every = cfg.certificate_every
            if last_epoch or (every and (epoch + 1) % every == 0):
                cert = self._certificate(stage, x, residual, inputs)
                if cert is not None:
                    row.update({f"cert_{k}": v for k, v in cert.items() if k != "n"})
                    self.certificates.append({"stage": index + 1, "epoch": epoch + 1, **cert})
            row["seconds"] = time.perf_counter() - began
            self._record(row, index * cfg.optim.epochs + epoch)
            budget[0] -= 1
            if not last_epoch:
                self._save(
                    {
                        "method": cfg.method,
                        "stage": index,
                        "epoch": epoch + 1,
                        "stage_module": stage.module.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    }
                )

    def _solve_fista(
        self, stage: Stage, program: ConvexStage, inputs: StageInputs, index: int
    ) -> None:
        """Solve the stage's convex program on whole images with FISTA, logging the
        certificate every 10 iterations. A stage interrupted here restarts on resume. Each
        process passes its share of the images (`cvxmri.distributed.shard`)."""
        cfg = self.config
        x, residual = self._training_share(inputs, self._pairs(0))
        step = self._chunk(x.shape)
        batches = [
            (x[i : i + step].to(self.device).float(), residual[i : i + step].to(self.device))
            for i in range(0, len(x), step)
        ]
        last = [time.perf_counter()]

        def record(iteration: int, cert: dict[str, float]) -> None:
            # Seconds since the previous row, so that rows add up to the training time.
            now = time.perf_counter()
            row = {
                "method": cfg.method,
                "stage": index + 1,
                "epoch": iteration,
                **{f"cert_{k}": v for k, v in cert.items() if k != "n"},
                "seconds": now - last[0],
            }
            last[0] = now
            self.certificates.append({"stage": index + 1, "iteration": iteration, **cert})
            self._record(row, index * cfg.fista_iterations + iteration)

        result = fista(program, batches, cfg.fista_iterations, cfg.fista_tol, callback=record)
        self.history[-1].update(self._validate_stage(stage, inputs))
        log.info("stage %d FISTA: %s", index + 1, result)

    def _solve_certified(
        self, stage: Stage, program: ConvexStage, inputs: StageInputs, index: int
    ) -> None:
        """Solve the stage's program on whole training images along the beta path
        (`CertifiedConfig`), every beta to the relative gap ``tol`` (`StageSolver`), and
        keep the beta with the best validation PSNR. Every beta adds a history row and a
        certificate (with its gap-against-time trace); the chosen one is marked
        ``selected``. A stage interrupted here restarts on resume. Each process passes its
        share of the images (`cvxmri.distributed.shard`)."""
        cfg, settings = self.config, self.config.certified
        x, residual = self._training_share(inputs, self._pairs(0))
        step = self._chunk(x.shape)
        data = []
        for i in range(0, len(x), step):
            # The inputs stay in the cache (host memory or a file, in its dtype: bf16 under
            # autocast); the solver moves a chunk at a time to the device.
            chunk = x[i : i + step]
            gates = program.pattern_gates(chunk.to(self.device))
            data.append((chunk, residual[i : i + step].to(self.device), gates))
        began = time.perf_counter()
        solver = StageSolver(
            program,
            data,
            tol=settings.tol,
            max_seconds=settings.seconds or math.inf,
            gram_unknowns=settings.gram_unknowns,
            check_every=settings.check_every,
            max_iterations=settings.max_iterations,
            subspace=settings.subspace,
            subspace_rounds=settings.subspace_rounds,
            subspace_unknowns=settings.subspace_unknowns,
            screen=settings.screen,
            buffer=self._patch_buffer,
        )
        largest = solver.beta_max()
        store = solver.store
        # The next stage's patch store takes the buffer over (its pages already touched).
        self._patch_buffer = None if store is None else store.buffer
        log.info(
            "stage %d: %s route, %d unknowns per output, set-up %.1f s, beta_max %.4g%s",
            index + 1,
            solver.route,
            solver.unknowns,
            solver.setup_seconds,
            largest,
            "" if store is None else f", {store.groups.counts.numel()} gate codes",
        )
        best: tuple[float, float, dict[str, Tensor], dict[str, Any]] | None = None
        seen: list[float] = []
        for position, fraction in enumerate(settings.betas):
            beta = fraction * largest
            program.config = replace(program.config, beta=beta)
            trace: list[list[float]] = []
            cert = solver.solve(
                beta, callback=lambda t, c, out=trace: out.append([t, c["relative_gap"]])
            )
            metrics = self._validate_stage(stage, inputs)
            seconds = time.perf_counter() - began
            began = time.perf_counter()
            row = {
                "method": cfg.method,
                "stage": index + 1,
                "epoch": position + 1,
                "beta": beta,
                **metrics,
                **{f"cert_{k}": v for k, v in cert.items()},
                "seconds": seconds,
            }
            record = {
                "stage": index + 1,
                "path_index": position + 1,
                "beta": beta,
                "beta_fraction": fraction,
                "route": solver.route,
                **cert,
                "val_psnr": metrics["val_psnr"],
                "certified": cert["relative_gap"] <= settings.tol,
                "trace": trace,
            }
            self.certificates.append(record)
            self._record(row, index * len(settings.betas) + position + 1)
            if best is None or metrics["val_psnr"] > best[0]:
                state = {k: v.detach().clone() for k, v in program.state_dict().items()}
                best = (metrics["val_psnr"], beta, state, record)
            seen.append(metrics["val_psnr"])
            if settings.path_done(seen):
                break
        assert best is not None
        _, beta, state, record = best
        program.config = replace(program.config, beta=beta)
        program.load_state_dict(state)
        record["selected"] = True
        log.info(
            "stage %d: beta %.4g selected, relative gap %.2e",
            index + 1,
            beta,
            record["relative_gap"],
        )

    def _start_stage(
        self, inputs: StageInputs, index: int, state: dict[str, Any] | None, epoch: int
    ) -> tuple[Stage, torch.optim.Adam, torch.optim.lr_scheduler.StepLR, int]:
        """A new stage (gates from a sample of its inputs), or the one a checkpoint holds."""
        # 16 images of 128x128 (2 of 320x320): the gates' sample, bounded in memory.
        sample = self._inputs_sample(inputs, 2 * self._chunk(self.val_pairs.x0.shape))
        residual = None
        spec = self.config.stage_spec()
        if spec.convex_method and spec.convex.gate_pool > 1:
            # Only gate selection needs the sample's residual targets (`ConvexStage.init_gates`).
            pairs = self._pairs(0)
            residual = (pairs.target[: len(sample)] - pairs.x0[: len(sample)]).to(self.device)
        stage = self._new_stage(index, sample.to(self.device), residual, inputs)
        optimizer, scheduler = make_optimizer(stage.module.parameters(), self.config.optim)
        if state is None or epoch == 0:
            return stage, optimizer, scheduler, 0
        stage.module.load_state_dict(state["stage_module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return stage, optimizer, scheduler, epoch

    def _finish_stage(self, stage: Stage, inputs: StageInputs, index: int) -> None:
        """Freeze the stage, export and validate the network of this depth, checkpoint."""
        cfg = self.config
        program = stage.convex_program
        if program is not None:
            sample = self._inputs_sample(inputs, self._chunk(self.val_pairs.x0.shape))
            report = program.mapping_report(sample.to(self.device))
            self.certificates.append({"stage": index + 1, "mapping": report})
        first, last = stage.freeze()
        for parameter in [*first.parameters(), *last.parameters()]:
            parameter.requires_grad_(False)
        # The exported network is assembled on the CPU from the previous one's file: the
        # prefix does not come back to the device.
        prefix = self._prefix(index, torch.device("cpu"))
        hidden = [*(prefix.hidden if prefix else []), copy.deepcopy(first).cpu()]
        depth = index + 2
        if distributed.is_main():
            ReconCNN(hidden, copy.deepcopy(last).cpu()).save(
                self.out / f"model_depth{depth}.pt", {"layers": depth, "method": cfg.method}
            )
        del prefix, hidden
        self.depth_metrics.append({"layers": depth, **self._validate_stage(stage, inputs)})
        inputs.frozen = first.to(self.device).eval()
        self._save({"method": cfg.method, "stage": index + 1, "epoch": 0})


@dataclass
class StageInputs:
    """The inputs of one layer-wise stage.

    Attributes:
        prefix: the frozen prefix, resident only when its features are recomputed for
            every batch (``stage_cache: none``); None for the first stage or when cached.
        cached: the prefix's features of every training image (``stage_cache`` memory or
            disk); None for the first stage (its input is the zero-filled image) or when
            recomputed.
        val: the same for the validation images.
        gates: a convex stage's packed sign patterns of every training image (fixed masks).
        frozen: the stage's hidden layer once trained (the next stage's inputs come from
            this stage's through it).
    """

    prefix: ReconCNN | None = None
    cached: Tensor | None = None
    val: Tensor | None = None
    gates: Tensor | None = None
    frozen: nn.Module | None = None

    @property
    def transform(self) -> Callable[[Tensor], Tensor] | None:
        """The prefix's features, run on every batch (recomputed inputs only)."""
        return None if self.prefix is None else self.prefix.last_hidden


def image_metrics(
    pred: Tensor, target: Tensor, support: Tensor, scale: Tensor, files: list[str]
) -> dict[str, float]:
    """Validation metrics of normalised 2-channel predictions (N, 2, h, w) against their
    targets: restricted to the coil ``support``, magnitudes back in the data's units
    (``scale``), volume metrics grouped by ``files`` and averaged (fastMRI's convention),
    and per-slice means. Whole volumes (N, 2, x, y, z) are scored as `cvxmri evaluate`
    scores 3D files: each is its own volume, its slices the readout planes (axis 0)."""
    pred = pred * support
    per_item = scale.view(-1, *[1] * (pred.dim() - 2))
    planes = pred.shape[-2:]
    pred_mag = torch.linalg.vector_norm(pred, dim=1) * per_item
    target_mag = torch.linalg.vector_norm(target, dim=1) * per_item
    volumes = []
    for name in dict.fromkeys(files):
        index = [i for i, f in enumerate(files) if f == name]
        volumes.append(
            volume_metrics(
                target_mag[index].reshape(-1, *planes), pred_mag[index].reshape(-1, *planes)
            )
        )
    per_slice = slice_metrics(target_mag.reshape(-1, *planes), pred_mag.reshape(-1, *planes))
    return {
        "val_psnr": float(sum(v["psnr"] for v in volumes) / len(volumes)),
        "val_ssim": float(sum(v["ssim"] for v in volumes) / len(volumes)),
        "val_nmse": float(sum(v["nmse"] for v in volumes) / len(volumes)),
        "val_psnr_slice": float(sum(per_slice["psnr"]) / len(per_slice["psnr"])),
        "val_ssim_slice": float(sum(per_slice["ssim"]) / len(per_slice["ssim"])),
    }


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """``history`` as CSV (the union of the rows' keys as columns), replacing ``path``
    whole (written beside it, then renamed); nothing for an empty history."""
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    partial.replace(path)


def epoch_summary(row: dict[str, Any]) -> str:
    """One line for a history row: where training is, its loss, validation PSNR, time."""
    where = f"{row.get('method', '')}"
    if row.get("stage"):
        where += f" stage {row['stage']}"
    parts = [f"{where} epoch {row.get('epoch')}"]
    for key, label, fmt in (
        ("train_loss", "loss", ".4g"),
        ("val_psnr", "val PSNR", ".2f"),
        ("cert_relative_gap", "gap", ".2e"),
    ):
        if isinstance(row.get(key), float):
            parts.append(f"{label} {row[key]:{fmt}}")
    if isinstance(row.get("seconds"), float):
        parts.append(f"{row['seconds']:.1f} s")
    return ", ".join(parts)


def write_outputs(trainer: Trainer, model: ReconCNN | UnrolledNet) -> dict[str, Any]:
    """The exported network (``model.pt``; a greedy unrolled run also its first t
    iterations as ``model_iter{t}.pt``), history (CSV), certificates and metrics (JSON) of
    a run."""
    out = trainer.out
    config = trainer.config
    size = (
        {"iterations": model.iterations}
        if isinstance(model, UnrolledNet)
        else {"layers": model.depth}
    )
    about = {"method": config.method, "arch": config.arch, "mask": config.mask.describe()}
    model.save(out / "model.pt", {**about, **size})
    if isinstance(model, UnrolledNet) and config.method != "end-to-end":
        # A greedy network after every iteration, as layer-wise CNNs keep model_depthN.pt.
        for t in range(1, model.iterations + 1):
            prefix = UnrolledNet(list(model.blocks[:t]), model.dc)
            prefix.save(out / f"model_iter{t}.pt", {**about, "iterations": t})
    write_history(out / "history.csv", trainer.history)
    (out / "certificates.json").write_text(json.dumps(trainer.certificates, indent=2))
    metrics = {
        "method": config.method,
        "mask": config.mask.describe(),
        "final": trainer.depth_metrics[-1] if trainer.depth_metrics else {},
        "by_depth": trainer.depth_metrics,
        "train_seconds": sum(float(r.get("seconds", 0.0)) for r in trainer.history),
    }
    (out / "metrics_val.json").write_text(json.dumps(metrics, indent=2))
    return metrics
