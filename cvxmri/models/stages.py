"""The stages of layer-wise training and the one factory that builds them (docs/method.md).

Stage ``i`` of layer-wise training fits a two-layer model ``X -> r`` from its input
``X = h_{i-1}`` (the frozen prefix's features) to the residual ``r = x* - x0``, then hands its
hidden layer (and, for the last stage, its output layer) to the network as ordinary modules.
Every stage offers the same interface, `Stage`:

- `Stage.prepare`: data-dependent set-up from a sample of its inputs (a convex stage's gates);
- `Stage.step`: one optimiser step on a batch ``(x, r)``;
- `Stage.certificate`: the optimality certificate (duality gap) on a fixed training set, or
  None for a non-convex stage;
- `Stage.freeze`: ``(hidden layer, 1x1 output layer)`` as network modules.

Two kinds implement it: `ConvexTrainingStage` (a `ConvexStage`, the convex program of a
gated-ReLU two-layer network) and `NonConvexTrainingStage` (`TwoLayerStage`, conv-ReLU-1x1
trained by backpropagation, the ablation). `build_stage` builds either from a `StageSpec`;
the trainer, the library training functions and the benchmarks all call it.

The step functions (`convex_stage_step`, `two_layer_stage_step`) are what the memory
benchmark measures, so its numbers are those of real training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from cvxmri import distributed
from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import GatedConv, ReluConv, zero_conv1x1
from cvxmri.models.conv import conv_ops
from cvxmri.models.convex import ConvexStage, ConvexStageConfig, duality_gap

STAGE_METHODS = ("layerwise-convex", "layerwise-nonconvex")
HIDDEN_LAYERS = ("gated", "relu")
# Input and output images have 2 channels (real, imaginary).
IMAGE_CHANNELS = 2


def _autocast(x: Tensor, amp: bool) -> torch.autocast:
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)


# ------------------------------------------------------------------------------ modules


class TwoLayerStage(nn.Module):
    """The non-convex stage: ``conv(KxK) -> ReLU -> conv(1x1)``, trained by backprop."""

    def __init__(self, in_channels: int, hidden: int, kernel_size: int, ndim: int = 2) -> None:
        super().__init__()
        self.first = ReluConv(in_channels, hidden, kernel_size, ndim)
        self.last = zero_conv1x1(hidden, IMAGE_CHANNELS, ndim)

    def forward(self, x: Tensor) -> Tensor:
        """Predicted residual."""
        return self.last(self.first(x))


def gated_layers(stage: ConvexStage) -> tuple[GatedConv, nn.Module]:
    """The gated hidden layer and the 1x1 summation of a convex stage, as network modules.

    ``x0 + last(first(x))`` equals ``x0 + stage(x)`` exactly: channel ``p * out + c`` of the
    hidden layer is ``D_p * conv(x, v_p[c])`` and the 1x1 layer sums it into output ``c``.
    """
    patterns, out, in_channels, *kernel = stage.effective_weight().shape
    first = GatedConv(in_channels, patterns, out, kernel[0], stage.ndim)
    with torch.no_grad():
        first.value.weight.copy_(
            stage.effective_weight().reshape(patterns * out, in_channels, *kernel)
        )
        first.gate_weight.copy_(stage.gate_weight)
        first.gate_bias.copy_(stage.gate_bias)
        first.input_mean.copy_(stage.input_mean)
        first.input_std.copy_(stage.input_std)
    last = conv_ops(stage.ndim).module(patterns * out, out, 1)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        for c in range(out):
            last.weight[c, c::out] = 1.0
    return first, last


def relu_layers(stage: ConvexStage) -> tuple[ReluConv, nn.Module]:
    """The mapped ReLU hidden layer and output layer of a convex stage (`to_relu`)."""
    first_conv, last = stage.to_relu()
    first = ReluConv(
        first_conv.in_channels, first_conv.out_channels, first_conv.kernel_size[0], stage.ndim
    )
    first.conv = first_conv
    return first, last


def carry_prediction(stage: ConvexStage, previous_final: nn.Module) -> None:
    """Make pattern 0 of a gated stage always on (``u_0 = 0``, ``b_0 = 1``: a member of the
    hyperplane arrangement) and set its weights to the previous stage's 1x1 output layer,
    so that the stage starts at the previous depth's prediction. The program stays convex
    and the hidden width is unchanged; the other patterns learn the correction."""
    if stage.config.program != "gated":
        raise CvxmriError("carry needs convex.program=gated")
    weight = previous_final.weight.detach().flatten(2)[:, :, 0]
    if weight.shape[1] != stage.in_channels:
        raise CvxmriError("carry: the previous output layer does not match the stage input")
    centre = (stage.config.kernel_size // 2,) * stage.ndim
    with torch.no_grad():
        stage.gate_weight[0].zero_()
        stage.gate_bias[0] = 1.0
        stage.v[0].zero_()
        stage.v[(0, slice(None), slice(None), *centre)] = weight.to(stage.v.dtype)


# -------------------------------------------------------------------------------- steps


def convex_stage_step(
    module: ConvexStage,
    x: Tensor,
    r: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    area_ratio: float = 1.0,
    amp: bool = False,
    pattern_chunk: int = 0,
    gates: Tensor | None = None,
) -> float:
    """One step on the convex objective of a batch of (cropped) stage inputs.

    A gated stage is linear in its weight, so its data-term gradient ``A^T (A v - r)`` is
    computed directly, a chunk of patterns at a time, without an autograd graph
    (`ConvexStage.data_term_and_gradient`); only the group-lasso penalty goes through
    autograd. The cone program (whose violation penalty is not linear) uses autograd.

    The pixel sums (data term, cone violation) are scaled by ``area_ratio`` (whole image over crop
    area), so that the crop objective estimates the whole-image objective that the
    certificate measures, with the same group-lasso weight. The gates are always computed
    in full precision (bf16 could flip sign patterns); ``amp`` runs the other convolutions
    in bf16. ``pattern_chunk`` bounds the patterns processed at once (0: all). ``gates``:
    the batch's sign patterns (bool ``(B, P, H, W)``) when precomputed, which saves the gate
    convolution of every step.

    Under torchrun ``x`` is this process's part of the global batch and the gradient,
    the hand-computed part included, is averaged across processes before the step
    (`cvxmri.distributed.average_gradients`); an empty part takes an idle step.
    """
    if x.shape[0] == 0:
        return distributed.idle_step(module.parameters(), optimizer)
    optimizer.zero_grad(set_to_none=True)
    if module.config.program == "gated":
        dtype = torch.bfloat16 if amp else None
        value, grad = module.data_term_and_gradient(x, r, pattern_chunk, dtype, gates)
        penalty = module.penalty()
        penalty.backward()
        assert module.v.grad is not None
        # Added by hand, after the penalty's backward pass: averaged across processes
        # below with the rest of the gradient (a DDP hook would not see it).
        module.v.grad.add_(grad, alpha=area_ratio)
        loss = area_ratio * value + penalty.detach()
        result = distributed.average_gradients(module.parameters(), x.shape[0], loss)
        optimizer.step()
        return result
    gates = module.gates(x.float()) if gates is None else gates.float()
    with _autocast(x, amp):
        pixels = module.data_term(x, r, gates=gates).float()
        violation = module.cone_violation(x, gates=gates).float()
        pixels = pixels + module.config.cone_penalty * violation
    loss = area_ratio * pixels + module.penalty()
    loss.backward()
    result = distributed.average_gradients(module.parameters(), x.shape[0], loss)
    optimizer.step()
    return result


def two_layer_stage_step(
    module: nn.Module,
    x: Tensor,
    r: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool = False,
) -> float:
    """One backpropagation step of a non-convex stage on ``0.5 ||stage(x) - r||^2 / B``
    (gradients averaged across processes, `cvxmri.distributed.average_gradients`)."""
    if x.shape[0] == 0:
        return distributed.idle_step(module.parameters(), optimizer)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x, amp):
        pred = module(x)
    loss = 0.5 * (pred.float() - r).pow(2).sum() / x.shape[0]
    loss.backward()
    result = distributed.average_gradients(module.parameters(), x.shape[0], loss)
    optimizer.step()
    return result


# --------------------------------------------------------------------- spec and factory


@dataclass(frozen=True)
class StageSpec:
    """How to build every stage of a layer-wise network.

    Attributes:
        method: ``layerwise-convex`` (convex stages) or ``layerwise-nonconvex`` (the non-convex
            conv-ReLU-1x1 ablation).
        channels: hidden width of every stage. A convex stage gets ``channels // 2`` gate
            patterns (``hidden_layer="gated"``: 2 outputs each) or ``channels // 4``
            (``"relu"``: a ``w`` and a ``z`` unit per output), so the hidden layers have
            about the same width.
        kernel_size: KxK (3D: KxKxK) of the hidden layers.
        convex: the convex program (its ``patterns`` and ``kernel_size`` are set from
            ``channels`` and ``kernel_size``; its ``gate_seed`` from the stage's seed).
        hidden_layer: what a frozen convex stage becomes: ``gated`` (its gated features, exact) or
            ``relu`` (the mapped ReLU units, exact where the cone constraints hold).
        carry: convex stages after the first start at the previous depth's prediction
            (`carry_prediction`; gated program only).
        amp: bf16 autocast in the step (convex: bf16 convolutions, gates in full precision).
        pattern_chunk: a convex step's gradient is computed this many patterns at a time
            (0: all at once).
        ndim: spatial dimensions, 2 (images) or 3 (volumes).
    """

    method: str = "layerwise-convex"
    channels: int = 32
    kernel_size: int = 3
    convex: ConvexStageConfig = field(default_factory=ConvexStageConfig)
    hidden_layer: str = "gated"
    carry: bool = False
    amp: bool = False
    pattern_chunk: int = 0
    ndim: int = 2

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first invalid setting."""
        if self.method not in STAGE_METHODS:
            raise CvxmriError(f"stage method must be one of {STAGE_METHODS}, got {self.method!r}")
        if self.hidden_layer not in HIDDEN_LAYERS:
            raise CvxmriError(
                f"hidden_layer must be one of {HIDDEN_LAYERS}, got {self.hidden_layer!r}"
            )
        if self.channels < 2 or self.channels % 2:
            raise CvxmriError(f"channels must be even and >= 2, got {self.channels}")
        conv_ops(self.ndim)
        self.convex_config().validate()

    @property
    def convex_method(self) -> bool:
        """Whether the stages are convex programs."""
        return self.method == "layerwise-convex"

    def convex_config(self, gate_seed: int | None = None) -> ConvexStageConfig:
        """The convex program with the pattern count that gives ``channels`` hidden units and
        the network's kernel size (and ``gate_seed`` when given)."""
        per_pattern = 2 if self.hidden_layer == "gated" else 4
        config = replace(
            self.convex,
            patterns=max(1, self.channels // per_pattern),
            kernel_size=self.kernel_size,
        )
        return config if gate_seed is None else replace(config, gate_seed=gate_seed)


class Stage(ABC):
    """One stage of layer-wise training (see the module docstring).

    Attributes:
        module: the trained model; its parameters are what the optimiser steps and its state
            dict is what a checkpoint keeps.
        patterns: the number of fixed sign patterns of the stage (0: none). A caller whose
            stage inputs are fixed may compute them once (`sign_patterns`) and pass each
            batch's to `step`.
    """

    module: nn.Module
    patterns: int = 0

    def prepare(self, sample: Tensor) -> None:  # noqa: B027 (a stage may need no set-up)
        """Data-dependent set-up from a sample batch of stage inputs (nothing by default)."""

    @abstractmethod
    def step(
        self,
        x: Tensor,
        r: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        area_ratio: float = 1.0,
        gates: Tensor | None = None,
    ) -> float:
        """One optimiser step on stage inputs ``x`` and residuals ``r``; returns the loss.

        ``area_ratio``: whole-image over crop area (the pixel sums are scaled by it, so a crop's
        objective estimates the whole image's); ``gates``: the batch's precomputed sign
        patterns (`sign_patterns`), if any.
        """

    def sign_patterns(self, x: Tensor) -> Tensor | None:
        """The stage's fixed sign patterns of inputs ``x`` (bool ``(B, patterns, ...)``),
        None for a stage without any."""
        return None

    def certificate(self, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float] | None:
        """The optimality certificate on the ``(x, r)`` batches (iterated once), or None for
        a stage without one (non-convex)."""
        return None

    @property
    def convex_program(self) -> ConvexStage | None:
        """The convex program, for what works on it directly (a solver such as FISTA, the
        ReLU mapping's report); None for a non-convex stage."""
        return None

    @abstractmethod
    def freeze(self) -> tuple[nn.Module, nn.Module]:
        """The stage's hidden layer and 1x1 output layer as network modules."""


class ConvexTrainingStage(Stage):
    """A convex stage (`ConvexStage`) as a `Stage`: step on its convex objective, duality
    gap as certificate, frozen to gated layers (exact) or mapped ReLU layers."""

    module: ConvexStage

    def __init__(self, module: ConvexStage, spec: StageSpec) -> None:
        self.module = module
        self.spec = spec
        self.patterns = module.config.patterns

    def prepare(self, sample: Tensor, residual: Tensor | None = None, reserved: int = 0) -> None:
        """Data-dependent gates from a sample of stage inputs (`ConvexStage.init_gates`),
        selected on ``residual`` (the sample's targets less the stage's starting
        prediction) when the program's ``gate_pool`` is above 1; the first ``reserved``
        patterns are left to the caller."""
        self.module.init_gates(sample, residual, reserved)

    def step(
        self,
        x: Tensor,
        r: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        area_ratio: float = 1.0,
        gates: Tensor | None = None,
    ) -> float:
        """`convex_stage_step` with the spec's precision and pattern chunk."""
        return convex_stage_step(
            self.module,
            x,
            r,
            optimizer,
            area_ratio=area_ratio,
            amp=self.spec.amp,
            pattern_chunk=self.spec.pattern_chunk,
            gates=gates,
        )

    def sign_patterns(self, x: Tensor) -> Tensor:
        """`ConvexStage.pattern_gates` in the spec's pattern chunks."""
        return self.module.pattern_gates(x, self.spec.pattern_chunk)

    def certificate(self, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """`duality_gap` of the current weights."""
        return duality_gap(self.module, batches)

    @property
    def convex_program(self) -> ConvexStage:
        """The stage's `ConvexStage`."""
        return self.module

    def freeze(self) -> tuple[nn.Module, nn.Module]:
        """`gated_layers` or `relu_layers`, as the spec's ``hidden_layer`` says."""
        if self.spec.hidden_layer == "gated":
            return gated_layers(self.module)
        return relu_layers(self.module)


class NonConvexTrainingStage(Stage):
    """The non-convex `TwoLayerStage` as a `Stage`: backpropagation steps, no certificate;
    its own layers are the frozen ones."""

    module: TwoLayerStage

    def __init__(self, module: TwoLayerStage, spec: StageSpec) -> None:
        self.module = module
        self.spec = spec

    def step(
        self,
        x: Tensor,
        r: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        area_ratio: float = 1.0,
        gates: Tensor | None = None,
    ) -> float:
        """`two_layer_stage_step` (the loss is a mean over images: ``area_ratio`` is not used)."""
        return two_layer_stage_step(self.module, x, r, optimizer, amp=self.spec.amp)

    def freeze(self) -> tuple[nn.Module, nn.Module]:
        """The stage's ReLU layer and 1x1 output layer."""
        return self.module.first, self.module.last


def build_stage(
    spec: StageSpec,
    index: int,
    in_channels: int,
    sample: Tensor,
    *,
    residual: Tensor | None = None,
    seed: int = 0,
    previous_final: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> Stage:
    """Stage ``index`` (0-based) of a layer-wise network, ready to train on ``device``.

    A convex stage is a `ConvexStage` with gate seed ``seed``, gates initialised on
    ``sample`` (a batch of its inputs, on the device the gates are computed on) and, with
    ``spec.carry`` after the first stage, started at the previous depth's prediction
    (``previous_final``: the previous network's 1x1 output layer, on ``sample``'s device).
    ``residual`` (the residual targets ``x* - x0`` of ``sample``'s images, on its device)
    lets a program with ``gate_pool`` above 1 select its gates on what the stage starts
    from: ``residual`` less the carried prediction (`ConvexStage.init_gates`). A
    non-convex stage is a `TwoLayerStage` initialised from ``torch.manual_seed(seed)``.
    """
    spec.validate()
    if spec.convex_method:
        convex = ConvexStage(
            in_channels, IMAGE_CHANNELS, spec.convex_config(gate_seed=seed), spec.ndim
        )
        stage: Stage = ConvexTrainingStage(convex, spec)
        carried = previous_final if spec.carry and index > 0 else None
        if spec.carry and index > 0 and carried is None:
            raise CvxmriError("carry needs the previous network's output layer")
        if carried is not None and residual is not None:
            with torch.no_grad():
                residual = residual - carried(sample).to(residual)
        stage.prepare(sample, residual, reserved=0 if carried is None else 1)
        if carried is not None:
            carry_prediction(convex, carried)
    else:
        torch.manual_seed(seed)
        module = TwoLayerStage(in_channels, spec.channels, spec.kernel_size, spec.ndim)
        stage = NonConvexTrainingStage(module, spec)
    if device is not None:
        stage.module.to(device)
    return stage
