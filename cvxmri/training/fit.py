"""Training as library functions: any iterable of ``(x0, target)`` batches in, a `ReconCNN` out.

``batches`` is iterated once per epoch, so it must be re-iterable: a
``torch.utils.data.DataLoader`` over a ``TensorDataset`` of a user's own 2-channel images
(real, imaginary; ``(B, 2, H, W)``, 3D ``(B, 2, D, H, W)``), or a list of tensor pairs.

- `fit_layerwise`: stage by stage (docs/method.md). Stage ``i`` is built by `build_stage` with its
  gates from the first batch(es) of its inputs, trained for ``optim.epochs`` epochs on the
  residual ``target - x0`` from the frozen prefix's features (run without autograd on every
  batch), then frozen and appended.
- `fit_end_to_end`: the ordinary ReLU CNN of the same depth and width, trained jointly.

The `Trainer` (`cvxmri.training.trainer`) runs the same stages, steps and epochs
(`make_optimizer`, `stage_seed`, `stage_epoch`, `end_to_end_epoch`) and adds the data
pipeline, crops, checkpoints, resume, stage-input caches, validation and the run folder.

In a process group (torchrun) the steps average their gradients across processes
(`cvxmri.distributed.average_gradients`), so each process passes its part of every batch;
`fit_layerwise` takes a convex stage's gates from each process's own first batches, so
those must be the same batches everywhere (``cvxmri train`` arranges all of this).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

import torch
from torch import Tensor, nn

from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStageConfig
from cvxmri.models.stages import Stage, StageSpec, build_stage
from cvxmri.training.config import OptimConfig
from cvxmri.training.data import derived_seed
from cvxmri.training.steps import end_to_end_step

Batch = Sequence[Tensor]


def stage_seed(seed: int, index: int, method: str) -> int:
    """The seed of stage ``index`` (0-based) of a run seeded ``seed``: a convex stage's gate
    seed, or the initialisation seed of a non-convex stage."""
    return derived_seed(seed, index, 7 if method == "layerwise-convex" else 8)


def make_optimizer(
    params: Iterable[nn.Parameter], optim: OptimConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.StepLR]:
    """Adam at ``optim.lr``, multiplied by ``optim.gamma`` every ``optim.step`` epochs."""
    optimizer = torch.optim.Adam(list(params), lr=optim.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, optim.step, optim.gamma)
    return optimizer, scheduler


def _mean(losses: list[float]) -> float:
    if not losses:
        raise CvxmriError("an epoch needs at least one batch")
    return sum(losses) / len(losses)


def stage_epoch(
    stage: Stage,
    batches: Iterable[tuple[Tensor, Tensor, Tensor | None]],
    optimizer: torch.optim.Optimizer,
    area_ratio: float = 1.0,
) -> float:
    """One epoch of `Stage.step` over ``(x, r, gates or None)`` batches; the mean loss."""
    stage.module.train()
    return _mean(
        [stage.step(x, r, optimizer, area_ratio=area_ratio, gates=gates) for x, r, gates in batches]
    )


def end_to_end_epoch(
    model: ReconCNN,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool = False,
    checkpointing: bool = False,
) -> float:
    """One epoch of `end_to_end_step` over ``(x0, target)`` batches; the mean loss."""
    model.train()
    return _mean(
        [
            end_to_end_step(model, x0, target, optimizer, amp=amp, checkpointing=checkpointing)
            for x0, target in batches
        ]
    )


def _on(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
    x0, target = batch[0], batch[1]
    return x0.to(device), target.to(device)


def fit_layerwise(
    batches: Iterable[Batch],
    *,
    layers: int = 3,
    channels: int = 32,
    kernel_size: int = 3,
    method: str = "layerwise-convex",
    optim: OptimConfig | None = None,
    convex: ConvexStageConfig | None = None,
    hidden_layer: str = "gated",
    carry: bool = False,
    amp: bool = False,
    pattern_chunk: int = 0,
    gate_batches: int = 1,
    seed: int = 0,
    ndim: int = 2,
    device: str | torch.device = "cpu",
) -> ReconCNN:
    """Train a ``layers``-deep network layer-wise on ``(x0, target)`` batches.

    Each of the ``layers - 1`` stages (`build_stage`, from a `StageSpec` of ``method``,
    ``channels``, ``kernel_size``, ``convex``, ``hidden_layer``, ``carry``, ``amp``,
    ``pattern_chunk``, ``ndim``) gets its gates from its inputs on the first
    ``gate_batches`` batches (selected on their residuals with ``convex.gate_pool`` above
    1), trains for ``optim.epochs`` epochs with Adam (`make_optimizer`) on
    ``r = target - x0`` from the frozen prefix's features, and is frozen (`Stage.freeze`):
    its hidden layer is appended, and its 1x1 output layer is the network's until the next
    stage replaces it. ``method``: ``layerwise-convex`` or
    ``layerwise-nonconvex`` (non-convex stages). Every random choice derives from ``seed``
    (`stage_seed`); the batch order is the iterable's.

    Returns:
        The network ``x0 + f(h_k)`` on ``device``, in eval mode, with frozen parameters.
    """
    if layers < 2:
        raise CvxmriError(f"the network needs at least 2 layers, got {layers}")
    if gate_batches < 1:
        raise CvxmriError(f"gate_batches must be >= 1, got {gate_batches}")
    optim = optim or OptimConfig()
    spec = StageSpec(
        method=method,
        channels=channels,
        kernel_size=kernel_size,
        convex=convex or ConvexStageConfig(),
        hidden_layer=hidden_layer,
        carry=carry,
        amp=amp,
        pattern_chunk=pattern_chunk,
        ndim=ndim,
    )
    spec.validate()
    device = torch.device(device)
    hidden: list[nn.Module] = []
    final: nn.Module | None = None

    @torch.no_grad()
    def stage_inputs(x0: Tensor) -> Tensor:
        # The frozen prefix's features h_{i-1}, without autograd (x0 itself for stage 1).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for layer in hidden:
                x0 = layer(x0)
        return x0.float()

    for index in range(layers - 1):
        gate_pairs = [_on(b, device) for b in islice(batches, gate_batches)]
        sample = torch.cat([stage_inputs(x0) for x0, _ in gate_pairs])
        stage = build_stage(
            spec,
            index,
            sample.shape[1],
            sample,
            residual=torch.cat([t - x0 for x0, t in gate_pairs]),
            seed=stage_seed(seed, index, method),
            previous_final=final,
            device=device,
        )
        optimizer, scheduler = make_optimizer(stage.module.parameters(), optim)
        for _ in range(optim.epochs):
            pairs = (_on(b, device) for b in batches)
            stage_epoch(stage, ((stage_inputs(x0), t - x0, None) for x0, t in pairs), optimizer)
            scheduler.step()
        first, final = stage.freeze()
        for parameter in [*first.parameters(), *final.parameters()]:
            parameter.requires_grad_(False)
        hidden.append(first.eval())
    assert final is not None
    return ReconCNN(hidden, final).to(device).eval()


def fit_end_to_end(
    batches: Iterable[Batch],
    *,
    layers: int = 3,
    channels: int = 32,
    kernel_size: int = 3,
    optim: OptimConfig | None = None,
    amp: bool = False,
    checkpointing: bool = False,
    seed: int = 0,
    ndim: int = 2,
    device: str | torch.device = "cpu",
) -> ReconCNN:
    """Train the ordinary ReLU CNN (`ReconCNN.relu`) jointly on ``(x0, target)`` batches
    by backpropagation (`end_to_end_step`), ``optim.epochs`` epochs of Adam; initialised
    from ``seed`` as the trainer does. Returns the network on ``device`` in eval mode."""
    optim = optim or OptimConfig()
    device = torch.device(device)
    torch.manual_seed(derived_seed(seed, 1000))
    model = ReconCNN.relu(layers, channels, kernel_size, ndim=ndim).to(device)
    optimizer, scheduler = make_optimizer(model.parameters(), optim)
    for _ in range(optim.epochs):
        pairs = (_on(b, device) for b in batches)
        end_to_end_epoch(model, pairs, optimizer, amp=amp, checkpointing=checkpointing)
        scheduler.step()
    return model.eval()
