"""The workloads of unrolled training (``Workload(arch="unrolled")``): what the unrolled
trainer (`cvxmri.training.unrolled.UnrolledTrainer`) builds and runs for ``T =
w.iterations``, on random multi-coil data (`random_batch`), with Adam:

- ``end-to-end``: ``UnrolledNet.relu(T, channels, kernel, dc)`` and one step that
  backpropagates through all T iterations (`unrolled_forward`, the trainer's forward pass);
  ``end-to-end-checkpointing``: the same with every iteration checkpointed.
- greedy iteration T (``layerwise-nonconvex``, ``layerwise-convex``): T - 1 frozen
  regularisers are resident (random ReLU blocks: the trainer keeps the trained ones, a few
  weights each) and the batch's previous iterate ``x_{T-1}`` is computed through them
  without autograd before the measurement (the trainer keeps the iterates of the training
  set and advances them once per iteration). Then:

  - non-convex step: one Adam step of a new ReLU block on the detached ``x_{T-1}``,
    ``DC(block(x_{T-1}))`` against the target;
  - convex step: the Gram system of the iteration over the batch (`dc_gram_system`, one
    image at a time, its ``P * 2 * K^d`` design columns through ``L`` in chunks of
    `COLUMN_CHUNK`), from the iteration's `IterationData` (the iterate, the residual
    ``x* - DC(x)`` and the sign patterns);
  - convex solve (``part="solve"``): one `IterationSolver.solve` at the first beta of the
    default path (`UnrolledConfig.betas`), the solver (its Gram matrix) built beforehand, its
    refinement rounds stopped after `SOLVE_SECONDS`;
  - stage pass (once per iteration in the trainer): the images advanced through the trained
    block, ``DC(block(x))`` without autograd in chunks of `IMAGE_CHUNK` (convex: the gated
    block of the stage, after the residual and the sign patterns that the iteration starts
    with).

The memory of a greedy iteration does not depend on T; that of end-to-end training does.

With ``w.ndim`` 3 the images are whole volumes of shape ``w.volume`` (true 3D training of
the unrolled network, `cvxmri train --dims 3 --arch unrolled`): 3D regularisers
(``KxKxK``), k-space on the volume's grid, masks over (ky, kz) shared by the readout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cvxmri.benchmark.workload import (
    LR,
    METHODS,
    SOLVE_SECONDS,
    WARMUP_SIZE,
    Prepared,
    Workload,
)
from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN, to_channels, to_complex
from cvxmri.models.convex import ConvexStage, ConvexStageConfig
from cvxmri.models.dc import DC_KINDS, DataConsistency, DCConfig
from cvxmri.models.stages import gated_layers
from cvxmri.models.unrolled import UnrolledNet
from cvxmri.physics import recon_sense
from cvxmri.training.config import CertifiedConfig, UnrolledConfig
from cvxmri.training.unrolled import (
    IMAGE_CHUNK,
    IterationData,
    IterationSolver,
    dc_gram_system,
    unrolled_forward,
)

# Fraction of k-space lines sampled at random outside the fully sampled calibration centre
# (a side of 1/8 of the image) of the random masks.
SAMPLED_FRACTION = 0.25


@dataclass
class UnrolledBenchSettings:
    """The workload settings that the unrolled memory and speed benchmarks share
    (`cvxmri.benchmark.memory_unrolled.UnrolledMemoryConfig`,
    `cvxmri.benchmark.speed_unrolled.UnrolledSpeedConfig`).

    Attributes:
        iterations: the values of T measured.
        channels: hidden width of every regulariser (the quick preset's 16).
        kernel_size: KxK of the regularisers' hidden layer (5; KxKxK in 3D).
        size: images are ``size x size`` (128; not used in 3D).
        coils: receive coils of the random data (8).
        dc: data consistency, ``gradient`` or ``cg`` (`DCConfig.kind`).
        batch: images per step (the convex Gram build: images of the batch, one at a time).
        methods: among end-to-end, end-to-end-checkpointing, layerwise-convex,
            layerwise-nonconvex.
        device: ``cpu``, ``cuda`` or ``auto``.
        seed: of the random weights and data.
        dims: 2 (images) or 3 (whole volumes of shape ``volume``).
        volume: with ``dims`` 3, the volumes' shape ``(x, y, z)``, readout first (the
            default: a slab of ``data/default3d``, 12x96x80).
    """

    iterations: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    channels: int = 16
    kernel_size: int = 5
    size: int = 128
    coils: int = 8
    dc: str = "gradient"
    batch: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    device: str = "auto"
    seed: int = 0
    dims: int = 2
    volume: list[int] = field(default_factory=lambda: [12, 96, 80])

    def validate_workloads(self) -> None:
        """Raise `CvxmriError` naming the first impossible shared setting (the T values,
        the methods, the data consistency, and each method's workload at the smallest T)."""
        if not self.iterations:
            raise CvxmriError("no iterations selected")
        if min(self.iterations) < 1:
            raise CvxmriError(f"iterations must be >= 1, got {self.iterations}")
        if not self.methods:
            raise CvxmriError("no method selected")
        for method in self.methods:
            if method not in METHODS:
                raise CvxmriError(f"unknown method {method!r} (choose from {METHODS})")
        if self.dc not in DC_KINDS:
            raise CvxmriError(f"unknown data consistency {self.dc!r} (choose from {DC_KINDS})")
        if self.batch < 1:
            raise CvxmriError(f"batch must be >= 1, got {self.batch}")
        for method in self.methods:
            self.workload(method, min(self.iterations)).validate()

    def workload(self, method: str, iterations: int, part: str = "step") -> Workload:
        """The unrolled workload of ``method`` at T = ``iterations``."""
        return Workload(
            method,
            batch=self.batch,
            channels=self.channels,
            kernel_size=self.kernel_size,
            size=self.size,
            device=self.device,
            seed=self.seed,
            part=part,
            arch="unrolled",
            iterations=iterations,
            coils=self.coils,
            dc=self.dc,
            ndim=self.dims,
            volume=tuple(self.volume) if self.dims == 3 else (),
        )

    def describe(self) -> str:
        """The measured architecture and data in words (`describe_settings`)."""
        return describe_settings(vars(self))


def describe_settings(cfg: Mapping[str, Any]) -> str:
    """``16 channels, 5x5, 128x128, 8 coils, gradient DC, batch 1`` (3D: ``3x3x3,
    12x96x80 volumes``) from `UnrolledBenchSettings`' fields (a results file's
    ``config``; files written before 3D have no ``dims``: 2D)."""
    k = cfg["kernel_size"]
    if cfg.get("dims", 2) == 3:
        grid = f"{k}x{k}x{k}, {'x'.join(map(str, cfg['volume']))} volumes"
    else:
        grid = f"{k}x{k}, {cfg['size']}x{cfg['size']}"
    return (
        f"{cfg['channels']} channels, {grid}, {cfg['coils']} coils, {cfg['dc']} DC, "
        f"batch {cfg['batch']}"
    )


@dataclass
class UnrolledBatch:
    """Random multi-coil data of ``B`` images on a grid (``size x size``; volumes
    ``x, y, z``).

    Attributes:
        x0: (B, 2, *grid) the zero-filled images ``A^H y``.
        y: complex (B, C, *grid) the measured k-space.
        mask: (B, 1, *grid) the 0/1 sampling masks (volumes: (B, 1, 1, y, z)).
        maps: complex (B, C, *grid) coil maps of unit root-sum-of-squares.
        target: (B, 2, *grid) the images.
    """

    x0: Tensor
    y: Tensor
    mask: Tensor
    maps: Tensor
    target: Tensor


def _centre(side: int) -> slice:
    """The fully sampled calibration centre of a k-space axis: 1/8 of it."""
    calib = max(1, side // 8)
    return slice(side // 2 - calib // 2, side // 2 - calib // 2 + calib)


def random_batch(
    batch: int,
    coils: int,
    grid: int | tuple[int, ...],
    gen: torch.Generator,
    device: torch.device,
) -> UnrolledBatch:
    """Random images, coil maps normalised to unit root-sum-of-squares, and random 0/1
    masks with a fully sampled calibration centre; ``y = A x``, ``x0 = A^H y``. ``grid``:
    a side (``size x size`` images) or the spatial shape (``(x, y, z)``: volumes, whose
    masks are drawn over (y, z) and shared by the readout)."""
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    ndim = len(grid)
    maps = torch.randn((batch, coils, *grid), generator=gen, device=device, dtype=torch.complex64)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
    drawn = grid if ndim == 2 else (1, *grid[1:])
    mask = (torch.rand((batch, 1, *drawn), generator=gen, device=device) < SAMPLED_FRACTION).float()
    mask[(..., *(_centre(side) for side in grid[-2:]))] = 1.0
    image = torch.randn((batch, *grid), generator=gen, device=device, dtype=torch.complex64)
    op = recon_sense(maps, mask, grid, ndim)
    y = op(image)
    return UnrolledBatch(to_channels(op.H(y), ndim), y, mask, maps, to_channels(image, ndim))


def _grid(w: Workload, side: int | None = None) -> tuple[int, ...]:
    """The spatial shape of the workload's images (at most ``side`` along every axis for
    the warm-up's small ones)."""
    if w.ndim == 2:
        return (w.size if side is None else side,) * 2
    return tuple(w.volume) if side is None else tuple(min(n, side) for n in w.volume)


def _frozen_blocks(w: Workload, device: torch.device) -> list[ReconCNN]:
    """The T - 1 iterations before greedy iteration T: ReLU blocks with random weights
    (the output layer too, so that every iteration changes the image), frozen."""
    blocks = []
    for _ in range(w.iterations - 1):
        block = ReconCNN.relu(2, w.channels, w.kernel_size, ndim=w.ndim).to(device).eval()
        with torch.no_grad():
            block.final.weight.normal_(0.0, 0.1 / w.channels**0.5)
        block.requires_grad_(False)
        blocks.append(block)
    return blocks


@torch.no_grad()
def advance(block: nn.Module, dc: DataConsistency, x: Tensor, data: UnrolledBatch) -> Tensor:
    """``DC(block(x))`` for every image, in chunks of `IMAGE_CHUNK` without autograd, as
    the trainer advances its images once per greedy iteration."""
    out = []
    ndim = x.dim() - 2
    for start in range(0, len(x), IMAGE_CHUNK):
        part = slice(start, start + IMAGE_CHUNK)
        op = recon_sense(data.maps[part], data.mask[part], tuple(x.shape[2:]), ndim)
        z = to_complex(block(x[part]), ndim)
        out.append(to_channels(dc(z, op, op.H(data.y[part])), ndim))
    return torch.cat(out)


def _loss(pred: Tensor, target: Tensor) -> Tensor:
    """The trainer's loss: half the squared error, summed, per image."""
    return 0.5 * (pred - target).pow(2).sum() / len(pred)


@dataclass
class _Inputs:
    """One batch of a workload: its data, the previous iterate (greedy: through the frozen
    iterations) and, for a convex iteration, its `IterationData` and solver (made on first
    use)."""

    data: UnrolledBatch
    x: Tensor
    iteration_data: list[IterationData] | None = None
    solver: IterationSolver | None = None


class _Unrolled:
    """The modules and optimiser of one unrolled workload (see the module docstring)."""

    def __init__(self, w: Workload, device: torch.device) -> None:
        self.w, self.device = w, device
        self.dc = DCConfig(kind=w.dc).build()
        self.frozen = _frozen_blocks(w, device) if w.layerwise else []
        self.stage: ConvexStage | None = None
        params: list[nn.Parameter] = []
        if not w.layerwise:
            self.model = UnrolledNet.relu(
                w.iterations, w.channels, w.kernel_size, self.dc.config(), ndim=w.ndim
            )
            params = list(self.model.to(device).parameters())
        elif w.method == "layerwise-nonconvex":
            self.block = ReconCNN.relu(2, w.channels, w.kernel_size, ndim=w.ndim).to(device)
            params = list(self.block.parameters())
        else:
            config = ConvexStageConfig(
                patterns=w.channels // 2,
                kernel_size=w.kernel_size,
                output_groups="frobenius",
                gate_seed=w.seed,
            )
            self.stage = ConvexStage(2, 2, config, w.ndim).to(device)
        self.optimizer = torch.optim.Adam(params, lr=LR) if params else None

    def inputs(self, grid: tuple[int, ...], batch: int) -> _Inputs:
        """A random batch of images of shape ``grid`` and its previous iterate ``x_{T-1}``
        (end-to-end: ``x0``)."""
        gen = torch.Generator(device=self.device).manual_seed(self.w.seed + grid[-1])
        data = random_batch(batch, self.w.coils, grid, gen, self.device)
        x = data.x0
        for block in self.frozen:
            x = advance(block, self.dc, x, data)
        return _Inputs(data, x)

    def _iteration_data(self, inp: _Inputs) -> list[IterationData]:
        """As the trainer's convex iteration: residual and sign patterns, in image chunks."""
        assert self.stage is not None
        residual = inp.data.target - advance(nn.Identity(), self.dc, inp.x, inp.data)
        chunks = []
        for start in range(0, len(inp.x), IMAGE_CHUNK):
            part = slice(start, start + IMAGE_CHUNK)
            x, d = inp.x[part], inp.data
            gates = self.stage.pattern_gates(x)
            chunks.append(IterationData(x, residual[part], gates, d.maps[part], d.mask[part]))
        return chunks

    def prepare_convex(self, inp: _Inputs) -> None:
        """The convex iteration's data of ``inp`` and, to measure a solve, its solver."""
        inp.iteration_data = self._iteration_data(inp)
        if self.w.part == "solve":
            certified = CertifiedConfig()
            assert self.stage is not None
            inp.solver = IterationSolver(
                self.stage,
                inp.iteration_data,
                self.dc,
                tol=certified.tol,
                max_seconds=SOLVE_SECONDS,
                max_iterations=certified.max_iterations,
            )

    def step(self, inp: _Inputs) -> float:
        """The measured step (see the module docstring); returns its loss (convex: the
        mean squared norm of the residual, from the Gram system)."""
        if self.stage is not None:
            assert inp.iteration_data is not None
            return dc_gram_system(self.stage, inp.iteration_data, self.dc).rr
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        d = inp.data
        if self.w.layerwise:
            ndim = self.w.ndim
            op = recon_sense(d.maps, d.mask, tuple(inp.x.shape[2:]), ndim)
            z = to_complex(self.block(inp.x), ndim)
            pred = to_channels(self.dc(z, op, op.H(d.y)), ndim)
        else:
            checkpointing = self.w.method == "end-to-end-checkpointing"
            pred = unrolled_forward(self.model, d.x0, d.y, d.mask, d.maps, checkpointing)
        loss = _loss(pred, d.target)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def stage_pass(self, inp: _Inputs) -> Tensor:
        """The once-per-iteration pass (see the module docstring)."""
        if self.stage is None:
            return advance(self.block, self.dc, inp.x, inp.data)
        inp.iteration_data = self._iteration_data(inp)
        first, last = gated_layers(self.stage)
        return advance(ReconCNN([first], last), self.dc, inp.x, inp.data)

    def solve(self, inp: _Inputs) -> dict[str, float]:
        """One certified solve at the first beta of the default path."""
        assert inp.solver is not None
        beta = UnrolledConfig().betas[0] * inp.solver.beta_max()
        return inp.solver.solve(beta, [])


def prepare_unrolled(w: Workload) -> Prepared:
    """Build the unrolled workload ``w`` (see the module docstring). Its warm-up runs the
    step and the measured part on one small image with the same modules (creating Adam's
    state and loading the code they run)."""
    device = torch.device(w.device)
    torch.manual_seed(w.seed)
    case = _Unrolled(w, device)
    full = case.inputs(_grid(w), w.batch)
    small = case.inputs(_grid(w, WARMUP_SIZE), 1)
    if case.stage is not None:
        case.stage.init_gates(full.x[:16])
        case.prepare_convex(small)
        case.prepare_convex(full)
    parts: dict[str, Callable[[_Inputs], Any]] = {
        "step": case.step,
        "stage_pass": case.stage_pass,
        "solve": case.solve,
    }

    def warmup() -> float:
        loss = case.step(small)
        if w.part != "step":
            parts[w.part](small)
        return loss

    return Prepared(
        lambda: case.step(full),
        warmup,
        (lambda: case.stage_pass(full)) if w.layerwise else None,
        (lambda: case.solve(full)) if w.method == "layerwise-convex" else None,
    )
