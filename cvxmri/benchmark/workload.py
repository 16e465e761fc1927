"""One measured training configuration: the real modules and the real optimiser step.

A `Workload` names a method (end-to-end, end-to-end with gradient checkpointing, a stage of
layer-wise convex training, a stage of the non-convex layer-wise ablation), its architecture,
batch size, precision and device. `prepare` builds what the trainer builds for it and returns
the step that the trainer calls, with Adam:

- end-to-end: ``ReconCNN.relu(layers, channels, kernel)`` and `end_to_end_step`;
- layer-wise stage ``j``: the stage that the trainer's factory builds (`build_stage` from a
  `StageSpec` of the workload; a convex stage's gates initialised on a small sample) and its
  `Stage.step`, given the batch's sign patterns (the trainer computes them once per stage),
  on top of a frozen prefix of ``j - 1`` hidden layers (the frozen layers of stages built
  the same way, with random weights).
  With ``stage_inputs="recomputed"`` the prefix is resident and the step first runs it
  without autograd on the zero-filled batch (the trainer with ``stage_cache: none``). With
  ``"cached"`` the stage input batch is given (bf16 under autocast) and the prefix is not
  resident during the step (``stage_cache: memory`` or ``disk``: the trainer drops it).
- the stage pass (`Prepared.stage_pass`), once per stage in the trainer: cached inputs come
  from the previous stage's through the one layer it froze (recomputed: the whole prefix),
  then a convex stage's sign patterns; without autograd.

With ``arch="unrolled"`` the workload is one of an unrolled network of ``iterations``
iterations (`cvxmri.models.unrolled`, trained by `cvxmri.training.unrolled`); the same
method names mean the unrolled trainer's methods, built by
`cvxmri.benchmark.unrolled.prepare_unrolled` (see its docstring).

Images are random (memory and speed do not depend on the values of these dense
computations). `step_flops` counts the step's convolution FLOPs analytically. With
``ndim=3`` the images are cubic patches ``size x size x size`` and every convolution is 3D,
as in true 3D training (`cvxmri train --dims 3`); an unrolled network's are whole volumes
of shape ``volume`` instead (its training uses whole volumes).
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN, ReluConv
from cvxmri.models.convex import ConvexStage
from cvxmri.models.stages import StageSpec, build_stage
from cvxmri.training.steps import end_to_end_step

METHODS = ("end-to-end", "end-to-end-checkpointing", "layerwise-convex", "layerwise-nonconvex")
LAYERWISE = ("layerwise-convex", "layerwise-nonconvex")
STAGE_INPUTS = ("cached", "recomputed")
ARCHS = ("cnn", "unrolled")
# What a measurement runs (`Prepared.part`).
PARTS = ("step", "stage_pass", "solve")
LR = 1e-4
# Input and output images have 2 channels (real, imaginary), as in training.
IMAGE_CHANNELS = 2
# Side of the images of the small warm-up step that creates Adam's state before a measured
# step (the state has the parameters' shapes, whatever the image size) and of the sample the
# convex stages' gates are initialised on.
WARMUP_SIZE = 16
GATE_SAMPLE_SIZE = 32
# A measured certified solve's refinement rounds stop after this many seconds each, and
# their model solves after this many iterations (the rounds repeat the same exact pass and
# Gram solve: their number does not change its memory; the basis still grows).
SOLVE_SECONDS = 1.0
SOLVE_ITERATIONS = 100
# The solves that only load the code before a measurement stop each round after its first
# pass: a round's time does not shrink with the images (its model has the basis's size), so
# at `SOLVE_SECONDS` the three of them took about 80% of a stage-2 measurement.
WARMUP_SOLVE_SECONDS = 0.0


@dataclass(frozen=True)
class Workload:
    """One training step to measure.

    Attributes:
        method: one of `METHODS`.
        batch: images per step.
        layers: network depth (hidden layers + the final 1x1); a layer-wise stage ``j``
            needs ``j <= layers - 1``.
        stage: layer-wise stage (1-based; 0 for end-to-end).
        stage_inputs: layer-wise: ``cached`` (the stage input batch is given) or
            ``recomputed`` (the frozen prefix runs in the step). Stage 1 has no prefix.
        channels: hidden width (convex stages: ``channels // 2`` patterns x 2 outputs).
        kernel_size: KxK of the hidden layers (KxKxK in 3D).
        size: images are ``size x size`` (3D: patches ``size x size x size``).
        amp: bf16 autocast (convex stages: bf16 convolutions, gates in float32).
        pattern_chunk: convex stages: gate patterns processed at once (0: all).
        device: ``cpu`` or ``cuda[:n]``.
        seed: of the random weights and images.
        part: what a measurement runs (`PARTS`): the training ``step``, the once-per-stage
            ``stage_pass`` (`Prepared.stage_pass`) or, for a convex stage or a greedy
            convex iteration of an unrolled network, the certified ``solve``
            (`Prepared.solve`): the stage's solver on ``batch`` training images (its
            training set) and one solve at one beta.
        arch: ``cnn`` (the paper's network) or ``unrolled`` (an unrolled network; then
            ``layers``, ``stage``, ``stage_inputs``, ``amp`` and ``pattern_chunk`` are not
            used: see `cvxmri.benchmark.unrolled`).
        iterations: unrolled: T, the iterations of end-to-end training, or the greedy
            iteration being trained (after T - 1 frozen ones).
        coils: unrolled: receive coils of the random multi-coil data.
        dc: unrolled: the data-consistency step, ``gradient`` or ``cg`` (`DCConfig.kind`).
        ndim: spatial dimensions, 2 (images) or 3 (the CNN: cubic patches; unrolled:
            whole volumes of shape ``volume``).
        volume: unrolled with ``ndim`` 3: the volumes' shape ``(x, y, z)``, readout first
            (``size`` is then not used); empty otherwise.
    """

    method: str
    batch: int = 1
    layers: int = 5
    stage: int = 0
    stage_inputs: str = "cached"
    channels: int = 256
    kernel_size: int = 7
    size: int = 320
    amp: bool = False
    pattern_chunk: int = 0
    device: str = "cpu"
    seed: int = 0
    part: str = "step"
    arch: str = "cnn"
    iterations: int = 1
    coils: int = 8
    dc: str = "gradient"
    ndim: int = 2
    volume: tuple[int, ...] = ()

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first impossible setting."""
        if self.method not in METHODS:
            raise CvxmriError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.arch not in ARCHS:
            raise CvxmriError(f"unknown architecture {self.arch!r} (choose from {ARCHS})")
        if self.channels < 2 or self.channels % 2:
            raise CvxmriError(f"channels must be even and >= 2, got {self.channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise CvxmriError(f"kernel size must be odd and >= 1, got {self.kernel_size}")
        if self.size < self.kernel_size:
            raise CvxmriError(
                f"image size {self.size} is smaller than the kernel size {self.kernel_size}"
            )
        if self.batch < 1:
            raise CvxmriError(f"batch size must be >= 1, got {self.batch}")
        if self.ndim not in (2, 3):
            raise CvxmriError(f"ndim must be 2 or 3, got {self.ndim}")
        volumes = self.ndim == 3 and self.arch == "unrolled"
        if volumes and (len(self.volume) != 3 or min(self.volume) < self.kernel_size):
            shape = "x".join(map(str, self.volume)) or "none"
            raise CvxmriError(
                f"volume {shape}: a 3D unrolled workload needs a volume XxYxZ, each side at "
                f"least the kernel size {self.kernel_size}"
            )
        if self.volume and not volumes:
            raise CvxmriError("volume applies to a 3D unrolled workload (ndim 3)")
        if self.arch == "unrolled":
            self._validate_unrolled()
            return
        if self.layers < 2:
            raise CvxmriError(f"the network needs at least 2 layers, got {self.layers}")
        if self.pattern_chunk < 0:
            raise CvxmriError(f"pattern chunk must be >= 0, got {self.pattern_chunk}")
        if self.part not in PARTS:
            raise CvxmriError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.part == "solve" and self.method != "layerwise-convex":
            raise CvxmriError(f"{self.method} has no convex solve")
        if self.stage_inputs not in STAGE_INPUTS:
            raise CvxmriError(f"stage inputs must be cached or recomputed, got {self.stage_inputs}")
        if self.method in LAYERWISE and not 1 <= self.stage <= self.layers - 1:
            raise CvxmriError(
                f"stage must be in 1..{self.layers - 1} for {self.layers} layers, got {self.stage}"
            )
        if self.part == "solve" and self.recomputes_prefix:
            raise CvxmriError("the certified solve runs on cached stage inputs, not recomputed")

    def _validate_unrolled(self) -> None:
        from cvxmri.models.dc import DC_KINDS

        if self.iterations < 1:
            raise CvxmriError(f"iterations must be >= 1, got {self.iterations}")
        if self.coils < 1:
            raise CvxmriError(f"coils must be >= 1, got {self.coils}")
        if self.dc not in DC_KINDS:
            raise CvxmriError(f"unknown data consistency {self.dc!r} (choose from {DC_KINDS})")
        if self.dc == "direct":
            raise CvxmriError(
                "data consistency direct needs 1D Cartesian masks; the unrolled benchmarks "
                "draw random 2D ones (use chebyshev for the same proximal step)"
            )
        if self.amp:
            raise CvxmriError("unrolled training has no bf16 autocast: fp32 only")
        if self.part not in PARTS:
            raise CvxmriError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.part == "stage_pass" and not self.layerwise:
            raise CvxmriError(f"{self.method} has no once-per-iteration pass")
        if self.part == "solve" and self.method != "layerwise-convex":
            raise CvxmriError(f"{self.method} has no convex solve")

    @property
    def layerwise(self) -> bool:
        """A stage of layer-wise training."""
        return self.method in LAYERWISE

    @property
    def recomputes_prefix(self) -> bool:
        """The step runs a frozen prefix (layer-wise, stage >= 2, inputs not cached)."""
        return self.layerwise and self.stage >= 2 and self.stage_inputs == "recomputed"

    def describe(self) -> str:
        """A short label, e.g. ``layerwise-convex stage 2 (recomputed), bf16`` or
        ``unrolled layerwise-convex T=5, solve``."""
        if self.arch == "unrolled":
            text = f"unrolled {self.method} T={self.iterations}"
            text += f", 3D {'x'.join(map(str, self.volume))}" if self.ndim == 3 else ""
            return text + ("" if self.part == "step" else f", {self.part.replace('_', ' ')}")
        text = self.method
        if self.layerwise:
            text += f" stage {self.stage}"
            if self.stage >= 2:
                text += f" ({self.stage_inputs})"
        text += ", bf16" if self.amp else ", fp32"
        text += ", 3D" if self.ndim == 3 else ""
        return (
            text
            + {"step": "", "stage_pass": ", stage pass", "solve": ", certified solve"}[self.part]
        )

    def stage_spec(self) -> StageSpec:
        """The spec of its layer-wise stages (`build_stage`), as a training run of this
        architecture has."""
        return StageSpec(
            method=self.method,
            channels=self.channels,
            kernel_size=self.kernel_size,
            amp=self.amp,
            pattern_chunk=self.pattern_chunk,
            ndim=self.ndim,
        )

    @property
    def patterns(self) -> int:
        """Gate patterns of a convex stage of this architecture (`StageSpec.convex_config`)."""
        return self.stage_spec().convex_config().patterns

    @property
    def has_stage_pass(self) -> bool:
        """Whether the trainer runs a stage pass for it (a convex stage's sign patterns, a
        later stage's inputs; unrolled: every greedy iteration advances the images)."""
        if self.arch == "unrolled":
            return self.layerwise
        return self.method == "layerwise-convex" or (self.layerwise and self.stage >= 2)

    def to_json(self) -> str:
        """The workload as a JSON object (for a worker process)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        """Inverse of `to_json`."""
        fields = json.loads(text)
        return cls(**{**fields, "volume": tuple(fields.get("volume", ()))})


# The architecture settings that the memory and speed configurations share with a Workload.
ARCHITECTURE = ("layers", "channels", "kernel_size", "size", "pattern_chunk", "device", "seed")


def workload_of(settings: Any, method: str, **changes: Any) -> Workload:
    """The workload of ``method`` with the `ARCHITECTURE` settings of a benchmark
    configuration (batch 1 unless changed)."""
    base = Workload(method=method, **{name: getattr(settings, name) for name in ARCHITECTURE})
    return replace(base, **changes)


def _check_cnn(w: Workload) -> None:
    if w.arch != "cnn":
        raise CvxmriError(f"FLOPs are counted for the CNN's workloads only, not {w.describe()}")


def conv_flops(c_in: int, c_out: int, kernel: int, pixels: int, ndim: int = 2) -> int:
    """Multiply-adds x 2 of one 'same' convolution (``kernel**ndim`` taps) over ``pixels``
    output pixels (voxels). The backward pass costs as much again for the weight gradient
    and for the input gradient."""
    return 2 * c_in * c_out * kernel**ndim * pixels


def _prefix_flops(w: Workload, pixels: int) -> int:
    """Forward FLOPs of the frozen prefix of stage ``w.stage`` (``stage - 1`` layers)."""
    total = 0
    for i in range(w.stage - 1):
        c_in = IMAGE_CHANNELS if i == 0 else w.channels
        total += conv_flops(c_in, w.channels, w.kernel_size, pixels, w.ndim)
        if w.method == "layerwise-convex":  # the gated layer's gate convolution
            total += conv_flops(c_in, w.patterns, w.kernel_size, pixels, w.ndim)
    return total


def step_flops(w: Workload) -> int:
    """Convolution FLOPs of one training step of ``w`` (element-wise work not counted).

    - end-to-end: every layer forward and weight gradient, input gradients of every layer
      but the first (``x0`` needs none); checkpointing adds one more forward of the hidden
      layers;
    - convex stage: the responses (``C_in -> 2P``) and their weight gradient (the gates
      come from the stage pass, `stage_pass_flops`);
    - non-convex stage: the KxK layer forward and weight gradient (its input needs no
      gradient), the 1x1 layer forward, weight and input gradients;
    - plus the prefix's forward when it is recomputed.

    The paper's CNN only (``arch="cnn"``).
    """
    _check_cnn(w)
    pixels, d = w.size**w.ndim, w.ndim
    c, k, io = w.channels, w.kernel_size, IMAGE_CHANNELS
    total = 0
    if not w.layerwise:
        forward = 0
        for i in range(w.layers - 1):
            c_in = io if i == 0 else c
            layer = conv_flops(c_in, c, k, pixels, d)
            forward += layer
            total += 2 * layer if i == 0 else 3 * layer
        total += 3 * conv_flops(c, io, 1, pixels, d)
        if w.method == "end-to-end-checkpointing":
            total += forward
        return w.batch * total
    c_in = io if w.stage == 1 else c
    if w.method == "layerwise-convex":
        total += 2 * conv_flops(c_in, w.patterns * io, k, pixels, d)
    else:
        total += 2 * conv_flops(c_in, c, k, pixels, d) + 3 * conv_flops(c, io, 1, pixels, d)
    if w.recomputes_prefix:
        total += _prefix_flops(w, pixels)
    return w.batch * total


def stage_pass_flops(w: Workload) -> int:
    """FLOPs of the stage pass over a batch (once per stage): the forward of the prefix
    (cached inputs: of its last layer only, applied to the previous stage's inputs) and, for
    a convex stage, the gate convolution (``C_in -> P``). The paper's CNN only."""
    _check_cnn(w)
    pixels = w.size**w.ndim
    total = _prefix_flops(w, pixels)
    if w.stage >= 2 and not w.recomputes_prefix:
        total -= _prefix_flops(replace(w, stage=w.stage - 1), pixels)
    if w.method == "layerwise-convex":
        c_in = IMAGE_CHANNELS if w.stage == 1 else w.channels
        total += conv_flops(c_in, w.patterns, w.kernel_size, pixels, w.ndim)
    return w.batch * total


class Prepared:
    """The modules, optimiser and inputs of a workload, ready to step.

    Attributes:
        step: one real optimiser step on the full-size batch; returns the loss (a
            certified-solve workload: its solve on a budget that only loads the code).
        warmup: one step on a small batch (creates Adam's state, loads kernels).
        stage_pass: layer-wise: the once-per-stage pass over the batch (the frozen prefix
            without autograd, the convex stage's sign patterns); None when there is
            nothing to compute (a non-convex first stage, end-to-end).
        solve: a convex stage, or a greedy convex iteration of an unrolled network: one
            certified solve at one beta; None otherwise.
    """

    def __init__(
        self,
        step: Callable[[], float],
        warmup: Callable[[], float],
        stage_pass: Callable[[], Tensor] | None,
        solve: Callable[[], Any] | None = None,
    ) -> None:
        self.step = step
        self.warmup = warmup
        self.stage_pass = stage_pass
        self.solve = solve

    def part(self, name: str) -> Callable[[], Any]:
        """The callable that a measurement of part ``name`` (`PARTS`) runs."""
        run = {"step": self.step, "stage_pass": self.stage_pass, "solve": self.solve}[name]
        if run is None:
            raise ValueError(f"this workload has no {name.replace('_', ' ')}")
        return run


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    # Made on the device by the device's generator: no host copy of a large batch.
    return torch.randn(shape, generator=gen, device=device)


def _gated_prefix(w: Workload, gen: torch.Generator, start: int = 0) -> list[nn.Module]:
    """The hidden layers ``start ..`` a layer-wise convex run would have frozen before stage
    ``w.stage``: each a convex stage built by `build_stage` (gates initialised on a small
    sample) with random weights, frozen (`Stage.freeze`) into a gated layer."""
    layers: list[nn.Module] = []
    size = (2, IMAGE_CHANNELS, *_cube(GATE_SAMPLE_SIZE, w))
    sample = torch.randn(size, generator=gen)
    if start > 0:  # a later layer's input: non-negative features
        sample = torch.rand((2, w.channels, *size[2:]), generator=gen)
    for i in range(start, w.stage - 1):
        stage = build_stage(w.stage_spec(), i, sample.shape[1], sample, seed=w.seed + i)
        assert stage.convex_program is not None
        with torch.no_grad():
            stage.convex_program.v.normal_(
                0.0, (sample.shape[1] * w.kernel_size**w.ndim) ** -0.5, generator=gen
            )
        first, _ = stage.freeze()
        with torch.no_grad():
            sample = first(sample)
        layers.append(first)
    return layers


def _relu_prefix(w: Workload, start: int = 0) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(start, w.stage - 1):
        c_in = IMAGE_CHANNELS if i == 0 else w.channels
        layers.append(ReluConv(c_in, w.channels, w.kernel_size, w.ndim))
    return layers


def _cube(side: int, w: Workload) -> tuple[int, ...]:
    """The spatial shape of an image (``side x side``) or a 3D patch of the workload."""
    return (side,) * w.ndim


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def prepare(w: Workload) -> Prepared:
    """Build ``w`` as the trainer would (see the module docstring)."""
    w.validate()
    if w.arch == "unrolled":
        from cvxmri.benchmark.unrolled import prepare_unrolled

        return prepare_unrolled(w)
    device = torch.device(w.device)
    gen = torch.Generator().manual_seed(w.seed)
    batch_gen = torch.Generator(device=device).manual_seed(w.seed)
    torch.manual_seed(w.seed)
    shape = (w.batch, IMAGE_CHANNELS, *_cube(w.size, w))
    small = (1, IMAGE_CHANNELS, *_cube(WARMUP_SIZE, w))
    if not w.layerwise:
        model = ReconCNN.relu(w.layers, w.channels, w.kernel_size, IMAGE_CHANNELS, w.ndim)
        model = model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        checkpointing = w.method == "end-to-end-checkpointing"
        x0, target = _randn(shape, batch_gen, device), _randn(shape, batch_gen, device)
        x_small, t_small = _randn(small, batch_gen, device), _randn(small, batch_gen, device)

        def e2e(x: Tensor, t: Tensor) -> float:
            return end_to_end_step(model, x, t, optimizer, amp=w.amp, checkpointing=checkpointing)

        return Prepared(lambda: e2e(x0, target), lambda: e2e(x_small, t_small), None)

    in_channels = IMAGE_CHANNELS if w.stage == 1 else w.channels
    convex = w.method == "layerwise-convex"

    def build_prefix(start: int = 0) -> nn.Module:
        # Hidden layers start .. stage - 2 of the frozen prefix.
        gen = torch.Generator().manual_seed(w.seed)
        hidden = _gated_prefix(w, gen, start) if convex else _relu_prefix(w, start)
        prefix = nn.Sequential(*hidden).to(device).eval()
        for parameter in prefix.parameters():
            parameter.requires_grad_(False)
        return prefix

    # Cached stage inputs: the prefix is built only when the stage pass runs, as the trainer
    # drops it while the stage trains.
    resident = build_prefix() if w.recomputes_prefix else None

    sample = torch.rand(2, in_channels, *_cube(GATE_SAMPLE_SIZE, w), generator=gen)
    if w.stage == 1:
        sample = sample - 0.5
    stage = build_stage(
        w.stage_spec(), w.stage - 1, in_channels, sample, seed=w.seed + w.stage, device=device
    )
    if w.part == "solve":
        program = stage.convex_program
        assert program is not None
        return _prepare_solve(w, program, batch_gen, device)
    optimizer = torch.optim.Adam(stage.module.parameters(), lr=LR)
    cached_dtype = torch.bfloat16 if w.amp else torch.float32

    def stage_input(prefix: nn.Module, x0: Tensor) -> Tensor:
        # As the trainer's cache pass and its per-batch transform: no autograd, autocast.
        with torch.no_grad(), _autocast(device, w.amp):
            return prefix(x0).float()

    def patterns(x: Tensor) -> Tensor | None:
        # The trainer's once-per-stage gates: unpacked from its cache for every batch.
        return stage.sign_patterns(x)

    def stage_step(x: Tensor, r: Tensor, gates: Tensor | None) -> float:
        return stage.step(x, r, optimizer, gates=gates)

    r = _randn(shape, batch_gen, device)
    r_small = _randn(small, batch_gen, device)
    if resident is not None:
        x0 = _randn(shape, batch_gen, device)
        x0_small = _randn(small, batch_gen, device)
        gates = patterns(stage_input(resident, x0))
        gates_small = patterns(stage_input(resident, x0_small))

        def recomputed_pass() -> Tensor:
            x = stage_input(resident, x0)
            program = stage.convex_program
            return x if program is None else program.pattern_gates(x)

        return Prepared(
            lambda: stage_step(stage_input(resident, x0), r, gates),
            lambda: stage_step(stage_input(resident, x0_small), r_small, gates_small),
            recomputed_pass,
        )
    # Cached stage inputs: non-negative like post-ReLU features (stage 1: the zero-filled
    # image itself), in the cache's dtype.
    x_shape = (w.batch, in_channels, *_cube(w.size, w))
    x = torch.rand(x_shape, generator=batch_gen, device=device).to(cached_dtype)
    x_small = torch.rand(
        (1, in_channels, *_cube(WARMUP_SIZE, w)), generator=batch_gen, device=device
    ).to(cached_dtype)
    if w.stage == 1:
        x, x_small = x - 0.5, x_small - 0.5
    gates, gates_small = patterns(x), patterns(x_small)
    held: list[Any] = []

    def cached_pass() -> Tensor:
        # As the trainer: the previous stage's inputs through the one layer it froze, then
        # the sign patterns. The layer and its input batch are made on first use only, so
        # that they are not counted in the memory of the step.
        if w.stage == 1:
            out = patterns(x)
            assert out is not None
            return out
        if not held:
            last = build_prefix(w.stage - 2)
            c_prev = IMAGE_CHANNELS if w.stage == 2 else w.channels
            h_prev = torch.rand(
                (w.batch, c_prev, *_cube(w.size, w)), generator=batch_gen, device=device
            )
            held.extend([last, h_prev.to(cached_dtype)])
        h = stage_input(held[0], held[1]).to(cached_dtype)
        out = patterns(h)
        return h if out is None else out

    return Prepared(
        lambda: stage_step(x, r, gates),
        lambda: stage_step(x_small, r_small, gates_small),
        cached_pass if w.has_stage_pass else None,
    )


class _TensorFiles:
    """A temporary folder of saved tensors, removed when its last loader is freed (or at
    exit)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="cvxmri-solve-"))
        self._names = itertools.count()
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def loader(self, x: Tensor) -> Callable[[], Tensor]:
        """Save ``x`` in a file of its own; a function that loads it (to the CPU)."""
        path = self.folder / f"{next(self._names)}.pt"
        torch.save(x.cpu(), path)
        return functools.partial(self._load, path)

    def _load(self, path: Path) -> Tensor:
        return torch.load(path, map_location="cpu", weights_only=True)


def _prepare_solve(
    w: Workload, program: ConvexStage, gen: torch.Generator, device: torch.device
) -> Prepared:
    """A convex stage's certified solve (``part="solve"``), as the trainer's
    (`cvxmri.training.trainer.Trainer._solve_certified`): the stage's `StageSolver` with the
    default `CertifiedConfig` on ``w.batch`` cached stage inputs (its training set, in the
    trainer's chunks, held in files and loaded a chunk at a time by the solver's passes, as
    from a cache on disk or in host memory: the memory measured is the solver's), then
    ``beta_max`` and one solve at the path's first beta, its refinement rounds stopped
    after `SOLVE_SECONDS` and `SOLVE_ITERATIONS` model iterations each (the basis still
    grows, up to the configured rounds: the route's largest arrays are made). The warm-up
    (one small image) and the step (the training set; `measure_here` runs it on small
    images before its baseline) solve the same with rounds stopped after
    `WARMUP_SOLVE_SECONDS`: they only load the code."""
    from cvxmri.training.certified import ChunkInputs, StageSolver
    from cvxmri.training.config import CertifiedConfig
    from cvxmri.training.trainer import chunk_images

    settings = CertifiedConfig()
    # The training set's inputs on disk, as a stage-input cache there, loaded a chunk at a
    # time by the solver's passes: the measured memory is what solving needs beside it.
    files = _TensorFiles()

    def data_of(batch: int, side: int) -> list[tuple[ChunkInputs, Tensor, Tensor]]:
        shape = (program.in_channels, *_cube(side, w))
        step = chunk_images(shape, w.ndim)
        data: list[tuple[ChunkInputs, Tensor, Tensor]] = []
        for first in range(0, batch, step):
            count = min(step, batch - first)
            x = torch.rand((count, *shape), generator=gen, device=device)
            if w.stage == 1:
                x = x - 0.5
            # The trainer's cache: bf16 under autocast.
            x = x.to(torch.bfloat16 if w.amp else torch.float32)
            r = _randn((count, IMAGE_CHANNELS, *_cube(side, w)), gen, device)
            data.append((files.loader(x), r, program.pattern_gates(x)))
        return data

    def solve(data: list[tuple[ChunkInputs, Tensor, Tensor]], seconds: float) -> dict[str, float]:
        solver = StageSolver(
            program,
            data,
            tol=settings.tol,
            max_seconds=seconds,
            gram_unknowns=settings.gram_unknowns,
            check_every=settings.check_every,
            max_iterations=SOLVE_ITERATIONS,
            subspace=settings.subspace,
            subspace_rounds=settings.subspace_rounds,
            subspace_unknowns=settings.subspace_unknowns,
            screen=settings.screen,
        )
        cert = solver.solve(settings.betas[0] * solver.beta_max())
        with torch.no_grad():
            program.v.zero_()
        return {**cert, "setup_seconds": solver.setup_seconds, "unknowns": solver.unknowns}

    full = data_of(w.batch, w.size)
    small = data_of(1, max(w.kernel_size, WARMUP_SIZE))

    def warmup() -> float:
        return solve(small, WARMUP_SOLVE_SECONDS)["primal"]

    def step() -> float:
        return solve(full, WARMUP_SOLVE_SECONDS)["primal"]

    def run() -> dict[str, float]:
        return solve(full, SOLVE_SECONDS)

    return Prepared(step, warmup, None, run)


def with_batch(w: Workload, batch: int) -> Workload:
    """``w`` at another batch size."""
    return replace(w, batch=batch)


def workload_fields(w: Workload) -> dict[str, Any]:
    """The identifying fields of a result row (everything but the batch size)."""
    fields = asdict(w)
    fields.pop("batch")
    return fields
