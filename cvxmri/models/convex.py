"""The convex program of one layer-wise training stage (docs/method.md).

A stage regresses the residual ``r = x* - x0`` from its input ``X = h_{i-1}`` with a
two-layer network whose ReLU sign patterns are frozen by P gate filters. With the gates
fixed the model is linear in its weights, so training is a convex program:

- ``program="gated"`` (gated ReLU):
  ``min_v  1/(2N) sum_n ||sum_p D_p(X_n) * conv(X_n, v_p) - r_n||^2 + beta sum_g ||v_g||``
- ``program="cone"``: the exact ReLU program with ``v = w - z`` and group norms of ``w`` and
  ``z``, its cone constraints ``(2 D_p - 1) * conv(X, w_p) >= 0`` (same for ``z``) kept as
  the convex penalty ``cone_penalty * sum relu(-(2 D_p - 1) * conv(X, w_p))``.

Unlike the papers, the data term is divided by the number of samples N ("mean-scaled"), so
the objective of a mini-batch is an unbiased estimate of the full-batch one and ``beta``
does not depend on the size of the training set.

Groups (``output_groups``): ``"separate"`` puts every (pattern, output channel) filter
``v_p[c]`` (shape ``(C_in, K, K)``) in its own group, i.e. the real and imaginary outputs are
separate scalar problems sharing the gates (Sahiner et al., ICLR 2021); ``"frobenius"`` puts
all outputs of a pattern in one group (``v_p``, shape ``(out, C_in, K, K)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cvxmri import distributed
from cvxmri.errors import CvxmriError
from cvxmri.models.conv import conv_ops

PROGRAMS = ("gated", "cone")
OUTPUT_GROUPS = ("separate", "frobenius")

# Gate patterns active on fewer than this fraction (or more than 1 - it) of the sample's
# pixels are "constant", and a pattern agreeing with an accepted one on more than
# DUPLICATE_AGREEMENT of the pixels is a duplicate; both are redrawn.
MIN_ACTIVE_FRACTION = 0.01
DUPLICATE_AGREEMENT = 0.99
# Redraw rounds before init_gates gives up and keeps what it has (with a warning): a sample
# with no spatial variation has no informative hyperplane at all.
GATE_REDRAW_ROUNDS = 20
# A group whose norm is at most this fraction of the largest is dropped by to_relu.
ZERO_GROUP_RELATIVE = 1e-12
# The memory-lean step (`ConvexStage.data_term_and_gradient` with a pattern chunk) works
# through an image in slabs of at most this many positions along its first spatial axis
# (one slab for images up to 2^17 pixels, e.g. every 320x320 slice; 3D patches in slabs).
SLAB_POSITIONS = 2**17
# The exact (float64) pass of the certificate holds a slab's shifted copies of the input,
# ``K * C_in`` rows by the slab's padded positions, of at most this many bytes.
EXACT_SLAB_BYTES = 64 * 2**20
# `ConvexStage.pattern_scores` takes this many candidate patterns at a time (its working
# set: the sample's gated residuals, candidates x outputs maps of the sample's size).
PATTERN_SCORE_CHUNK = 16


@dataclass(frozen=True)
class ConvexStageConfig:
    """Settings of one convex stage.

    Attributes:
        patterns: P, the number of gate filters (sign patterns).
        kernel_size: K, odd size of the square filters ('same' convolutions).
        beta: group-lasso weight, for the mean-scaled data term.
        program: ``"gated"`` (unconstrained gated ReLU) or ``"cone"`` (cone constraints as a
            penalty, pushing towards an exact ReLU network).
        cone_penalty: rho, weight of the constraint-violation penalty (``program="cone"``).
        output_groups: ``"separate"`` (one group per pattern and output channel) or
            ``"frobenius"`` (one group per pattern over all output channels).
        gate_seed: seed of the gate filters and of their active fractions.
        active_fraction: ``(low, high)``: each gate's bias puts its hyperplane at a quantile
            of its response on the sample so that the pattern is active on a fraction of the
            pixels drawn uniformly from this range (pilancilab/scnn's ``active_proportion``).
        gate_pool: candidate patterns drawn per pattern kept. 1: the patterns are the first
            draws. n > 1, when `ConvexStage.init_gates` is given the stage's residual target
            (layer-wise CNN stages; the unrolled iterations draw theirs): n times as many
            candidates, of which the stage keeps those with the largest `pattern_scores`,
            the gradient norms of their groups at the stage's starting point.
    """

    patterns: int = 32
    kernel_size: int = 7
    beta: float = 1e-4
    program: str = "gated"
    cone_penalty: float = 1.0
    output_groups: str = "separate"
    gate_seed: int = 0
    active_fraction: tuple[float, float] = (0.2, 0.8)
    gate_pool: int = 1

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first invalid setting."""
        if not _is_int(self.patterns) or self.patterns < 1:
            raise CvxmriError(f"patterns must be an integer >= 1, got {self.patterns!r}")
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise CvxmriError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")
        if not _is_real(self.beta) or not math.isfinite(self.beta) or self.beta < 0:
            raise CvxmriError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.program not in PROGRAMS:
            raise CvxmriError(f"program must be one of {PROGRAMS}, got {self.program!r}")
        if (
            not _is_real(self.cone_penalty)
            or not math.isfinite(self.cone_penalty)
            or self.cone_penalty < 0
        ):
            raise CvxmriError(
                f"cone_penalty must be a finite number >= 0, got {self.cone_penalty!r}"
            )
        if self.output_groups not in OUTPUT_GROUPS:
            raise CvxmriError(
                f"output_groups must be one of {OUTPUT_GROUPS}, got {self.output_groups!r}"
            )
        if not _is_int(self.gate_seed):
            raise CvxmriError(f"gate_seed must be an integer, got {self.gate_seed!r}")
        low, high = self.active_fraction
        if not (_is_real(low) and _is_real(high) and 0 < low <= high < 1):
            raise CvxmriError(
                "active_fraction must be (low, high) with 0 < low <= high < 1, "
                f"got {self.active_fraction!r}"
            )
        if not _is_int(self.gate_pool) or self.gate_pool < 1:
            raise CvxmriError(f"gate_pool must be an integer >= 1, got {self.gate_pool!r}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True patterns is a configuration mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def group_norms_of(weight: Tensor, output_groups: str) -> Tensor:
    """Group norms of a weight of shape ``(P, out, C_in, K, K)`` (3D: ``K, K, K``).

    ``"separate"``: ``(P, out)`` norms over ``(C_in, K, K)``; ``"frobenius"``: ``(P,)`` norms
    over ``(out, C_in, K, K)``. The same grouping gives the dual norms of a gradient.
    """
    if output_groups == "separate":
        return torch.linalg.vector_norm(weight.flatten(2), dim=2)
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


def group_soft_threshold(weight: Tensor, threshold: float, output_groups: str) -> Tensor:
    """The prox of ``threshold * sum_g ||weight_g||``: ``weight_g * max(0, 1 - t/||weight_g||)``."""
    norms = group_norms_of(weight, output_groups)
    # torch.where keeps 0/0 (a zero group with threshold 0) out of the result.
    scale = torch.where(
        norms > threshold,
        1 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny),
        torch.zeros_like(norms),
    )
    return weight * scale.reshape(*scale.shape, *([1] * (weight.dim() - scale.dim())))


def pack_gates(gates: Tensor) -> Tensor:
    """Bool sign patterns ``(B, P, *spatial)`` (2D ``H, W``; 3D ``D, H, W``) packed 8
    patterns to a byte: uint8 ``(B, ceil(P / 8), *spatial)``, an eighth of the bool tensor (a
    cache of a training set's gates then costs 1/64 of its float32 stage inputs at 256
    channels)."""
    b, p, *spatial = gates.shape
    ones = [1] * len(spatial)
    padded = torch.zeros(b, -(-p // 8) * 8, *spatial, dtype=torch.uint8, device=gates.device)
    padded[:, :p] = gates
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=gates.device)
    groups = padded.view(b, padded.shape[1] // 8, 8, *spatial)
    return (groups * bits.view(1, 1, 8, *ones)).sum(2, dtype=torch.uint8)


def unpack_gates(packed: Tensor, patterns: int) -> Tensor:
    """The inverse of `pack_gates`: bool ``(B, patterns, *spatial)``."""
    spatial = packed.shape[2:]
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=packed.device)
    unpacked = (packed.unsqueeze(2) & bits.view(1, 1, 8, *([1] * len(spatial)))) != 0
    return unpacked.flatten(1, 2)[:, :patterns]


class _ReluUnits(NamedTuple):
    """Hidden units of the mapped ReLU network, one per non-zero (pattern, output) filter."""

    filters: Tensor  # (n, C_in, K, K) (3D: K, K, K): w / sqrt(||w||)
    out_weights: Tensor  # (n,): +-sqrt(||w||)
    out_channels: Tensor  # (n,) long: the output channel each unit feeds
    patterns: Tensor  # (n,) long: the gate pattern each unit came from


class ConvexStage(torch.nn.Module):
    """One stage's convex model ``sum_p D_p(X) * conv(X, v_p)`` with fixed 0/1 gates ``D_p``.

    Buffers (fixed, saved in the state dict): ``gate_weight (P, C_in, K, K)``,
    ``gate_bias (P,)``, ``input_mean (C_in,)``, ``input_std (C_in,)``. Parameters: ``v``
    (gated) or ``w`` and ``z`` (cone), each ``(P, out, C_in, K, K)``, initialised to zero.
    ``ndim`` is the number of spatial dimensions: 2 for images ``(B, C, H, W)``, 3 for
    volumes ``(B, C, D, H, W)``, whose filters are ``K x K x K`` (every shape above then has
    one more ``K``, every ``H, W`` a ``D, H, W``).

    Until `init_gates` is called the gates are seeded Gaussian hyperplanes through the origin
    of the un-normalised input, which are degenerate on non-negative (post-ReLU) inputs; call
    `init_gates` on a sample of the stage's inputs before training.
    """

    gate_weight: Tensor
    gate_bias: Tensor
    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self, in_channels: int, out_channels: int, config: ConvexStageConfig, ndim: int = 2
    ) -> None:
        """A zero model with data-independent gates (see `init_gates`)."""
        super().__init__()
        config.validate()
        self.ops = conv_ops(ndim)
        self.ndim = ndim
        if not _is_int(in_channels) or in_channels < 1:
            raise CvxmriError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        if not _is_int(out_channels) or out_channels < 1:
            raise CvxmriError(f"out_channels must be an integer >= 1, got {out_channels!r}")
        self.config = config
        self.in_channels = in_channels
        self.out_channels = out_channels
        p = config.patterns
        gen = torch.Generator().manual_seed(config.gate_seed)
        self.register_buffer("gate_weight", self._draw_filters(p, gen).float())
        self.register_buffer("gate_bias", torch.zeros(p))
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))
        shape = (p, out_channels, in_channels, *self._kernel)
        if config.program == "gated":
            self.v = torch.nn.Parameter(torch.zeros(shape))
        else:
            self.w = torch.nn.Parameter(torch.zeros(shape))
            self.z = torch.nn.Parameter(torch.zeros(shape))

    # ----------------------------------------------------------------------------- gates

    @property
    def _kernel(self) -> tuple[int, ...]:
        """The filters' spatial shape: ``(K,) * ndim``."""
        return (self.config.kernel_size,) * self.ndim

    def _channel_view(self, values: Tensor) -> Tensor:
        """Per-channel values ``(C,)`` shaped to broadcast over ``(B, C, *spatial)``."""
        return values.view(1, -1, *([1] * self.ndim))

    def _draw_filters(self, count: int, gen: torch.Generator) -> Tensor:
        # Drawn in float64 on the CPU so that the filters depend on the seed alone, not on
        # the device or dtype the module lives on.
        fan_in = self.in_channels * math.prod(self._kernel)
        shape = (count, self.in_channels, *self._kernel)
        return torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)

    def _normalise(self, x: Tensor) -> Tensor:
        mean = self._channel_view(self.input_mean.to(x.dtype))
        std = self._channel_view(self.input_std.to(x.dtype))
        return (x - mean) / std

    @torch.no_grad()
    def init_gates(self, x: Tensor, residual: Tensor | None = None, reserved: int = 0) -> None:
        """Data-dependent gates from a sample batch ``x`` of stage inputs ``(B, C_in, H, W)``
        (3D: ``(B, C_in, D, H, W)``).

        Sets the per-channel input normalisation (used only inside the gate convolution) to
        the sample's mean and std (std clamped at 1e-6, so all-zero channels are harmless)
        and draws the gate filters (`draw_patterns`: Gaussian filters, each bias at a
        quantile of the filter's response, constant and duplicate patterns redrawn).

        ``residual`` (``(B, out, *spatial)``: the sample's targets less the stage's
        starting prediction) with ``gate_pool`` n > 1 selects the gates: n times as many
        candidates are drawn as there are free patterns (all but the first ``reserved``,
        which the caller sets: `carry_prediction`), and the free patterns are the
        candidates with the largest `pattern_scores`, in the order they were drawn; the
        reserved ones are left at zero. Without ``residual`` (or with ``gate_pool`` 1)
        ``reserved`` changes nothing. Deterministic for a given seed and sample.
        """
        self._check_input(x)
        p = self.config.patterns
        if not _is_int(reserved) or not 0 <= reserved < p:
            raise CvxmriError(f"reserved must be an integer in [0, {p}), got {reserved!r}")
        var, mean = torch.var_mean(x, dim=(0, *range(2, 2 + self.ndim)), correction=0)
        self.input_mean.copy_(mean)
        self.input_std.copy_(var.sqrt().clamp_min(1e-6))
        gen = torch.Generator().manual_seed(self.config.gate_seed)
        pool = self.config.gate_pool
        if residual is None or pool == 1:
            weight, bias = self.draw_patterns(x, p, gen)
        else:
            if residual.shape != (x.shape[0], self.out_channels, *x.shape[2:]):
                raise CvxmriError(
                    f"residual of shape {tuple(residual.shape)} for a sample of shape "
                    f"{tuple(x.shape)} and {self.out_channels} outputs"
                )
            free = p - reserved
            candidates, offsets = self.draw_patterns(x, free * pool, gen)
            scores = self.pattern_scores(x, residual, candidates, offsets)
            keep = scores.argsort(descending=True)[:free].sort().values.cpu()
            weight = torch.zeros(p, *candidates.shape[1:], dtype=torch.float64)
            bias = torch.zeros(p, dtype=torch.float64)
            weight[reserved:] = candidates[keep]
            bias[reserved:] = offsets[keep]
        self.gate_weight.copy_(weight)
        self.gate_bias.copy_(bias)

    @torch.no_grad()
    def draw_patterns(self, x: Tensor, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``count`` gate filters and biases (float64, on the CPU) for the sample ``x``,
        from ``gen``, with the input normalisation already set.

        Filters are i.i.d. ``N(0, 1/(C_in K K))``; each bias sets the hyperplane at a
        quantile of the filter's response on the sample (halfway between two neighbouring
        responses, so that no sample pixel sits on a tie): the pattern is active on a
        fraction of the sample's pixels (voxels) drawn uniformly from ``active_fraction``.
        On non-negative inputs a hyperplane through the origin would be active almost
        everywhere, and near-constant patterns make the stage's Gram matrix nearly
        singular. Patterns that are constant on the sample (active fraction < 1% or > 99%)
        or duplicate an accepted pattern (> 99% agreement) are redrawn, for at most 20
        rounds; if some remain (a sample with no spatial variation) they are kept and a
        RuntimeWarning says how many.
        """
        batch, _, *spatial = x.shape
        pad = self.config.kernel_size // 2
        xn = self._normalise(x)
        pixels = batch * math.prod(spatial)
        weight = torch.zeros(count, self.in_channels, *self._kernel, dtype=torch.float64)
        bias = torch.zeros(count, dtype=torch.float64)
        # Accepted patterns as +-1 so that agreements are one matrix product.
        signs = torch.zeros(count, pixels, dtype=x.dtype, device=x.device)
        accepted = torch.zeros(count, dtype=torch.bool)
        todo = list(range(count))
        for _ in range(GATE_REDRAW_ROUNDS):
            if not todo:
                break
            drawn = len(todo)
            filters = self._draw_filters(drawn, gen)
            low, high = self.config.active_fraction
            wanted = low + (high - low) * torch.rand(drawn, generator=gen, dtype=torch.float64)
            response = self.ops.conv(xn, filters.to(x), padding=pad)  # (B, drawn, *spatial)
            # The threshold lies halfway between the sorted responses at the wanted quantile,
            # so that no sample pixel sits on the hyperplane (the patterns of the sample do
            # not flip with the dtype or device at a tie).
            flat = response.transpose(0, 1).reshape(drawn, pixels)
            ranked = flat.sort(dim=1).values
            inactive = ((1 - wanted) * pixels).round().long().clamp(1, pixels - 1).to(x.device)
            rows = torch.arange(drawn, device=x.device)
            threshold = (ranked[rows, inactive - 1] + ranked[rows, inactive]) / 2
            offsets = -threshold
            active = response + self._channel_view(offsets) >= 0
            cand = active.transpose(0, 1).reshape(drawn, pixels).to(x.dtype) * 2 - 1
            fractions = (cand.sum(dim=1) / pixels + 1) / 2
            # Agreement of each candidate with every accepted pattern and every candidate:
            # (1 + <s_a, s_b> / M) / 2.
            with_accepted = (cand @ signs.T / pixels + 1) / 2
            with_cands = (cand @ cand.T / pixels + 1) / 2
            # with_accepted holds the rows of the patterns accepted before this round; those
            # accepted in it are compared through with_cands.
            before = accepted.to(x.device, copy=True)
            remaining = []
            for index, slot in enumerate(todo):
                weight[slot] = filters[index]
                bias[slot] = offsets[index].double().cpu()
                signs[slot] = cand[index]
                fraction = float(fractions[index])
                constant = not MIN_ACTIVE_FRACTION <= fraction <= 1 - MIN_ACTIVE_FRACTION
                earlier = [i for i in range(index) if accepted[todo[i]]]
                duplicate = bool(
                    (with_accepted[index][before] > DUPLICATE_AGREEMENT).any()
                    or (with_cands[index, earlier] > DUPLICATE_AGREEMENT).any()
                )
                if constant or duplicate:
                    remaining.append(slot)
                else:
                    accepted[slot] = True
            todo = remaining
        if todo:
            warnings.warn(
                f"init_gates: {len(todo)} of {count} gate patterns are still constant or "
                f"duplicate after {GATE_REDRAW_ROUNDS} rounds; the sample has too little "
                "spatial variation",
                RuntimeWarning,
                stacklevel=3,
            )
        return weight, bias

    @torch.no_grad()
    def pattern_scores(self, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """How much each candidate pattern (gate filters ``weight``, biases ``bias``) would
        gain the stage: the sum of its groups' dual norms ``||Phi_g^T residual||``
        (`group_norms_of`) on the sample ``x``, ``(count,)``.

        At the stage's starting point (weights zero, or the carried prediction, whose
        residual ``residual`` is), this is the gradient of the data term in the pattern's
        groups: the patterns whose dual constraints the start violates most, the first a
        column-generation (conditional gradient) method over the hyperplane arrangement
        would add. Computed ``PATTERN_SCORE_CHUNK`` candidates at a time, in at least
        float32.
        """
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        residual = residual.to(x)
        xn = self._normalise(x)
        k = self.config.kernel_size
        out = self.out_channels
        scores = []
        for start in range(0, weight.shape[0], PATTERN_SCORE_CHUNK):
            w = weight[start : start + PATTERN_SCORE_CHUNK].to(x)
            b = bias[start : start + PATTERN_SCORE_CHUNK].to(x)
            count = w.shape[0]
            gates = (self.ops.conv(xn, w, b, padding=k // 2) >= 0).to(x.dtype)
            grad_y = (gates.unsqueeze(2) * residual.unsqueeze(1)).flatten(1, 2)
            shape = (count * out, self.in_channels, *self._kernel)
            grad = self.ops.conv_weight(x, shape, grad_y, padding=k // 2)
            norms = group_norms_of(grad.reshape(count, out, -1), self.config.output_groups)
            scores.append(norms.view(count, -1).sum(dim=1))
        return torch.cat(scores)

    @torch.no_grad()
    def gates(self, x: Tensor) -> Tensor:
        """The sign patterns ``1[conv(normalise(x), u_p) + b_p >= 0]``: float 0/1 ``(B, P, H, W)``.

        Computed in the dtype of ``x``, without autograd (the patterns are constants).
        """
        self._check_input(x)
        pre = self.ops.conv(
            self._normalise(x),
            self.gate_weight.to(x.dtype),
            self.gate_bias.to(x.dtype),
            padding=self.config.kernel_size // 2,
        )
        return (pre >= 0).to(x.dtype)

    # ------------------------------------------------------------------------------ model

    def effective_weight(self) -> Tensor:
        """The weight ``v`` of the gated model, ``(P, out, C_in, K, K)`` (cone: ``w - z``)."""
        if self.config.program == "gated":
            return self.v
        return self.w - self.z

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 + self.ndim or x.shape[1] != self.in_channels:
            axes = "H, W" if self.ndim == 2 else "D, H, W"
            raise CvxmriError(
                f"stage input must have shape (B, {self.in_channels}, {axes}), got {tuple(x.shape)}"
            )

    def _responses(self, x: Tensor, weight: Tensor) -> Tensor:
        """``conv(x, weight_p[c])`` for every (p, c) as ``(B, P, out, H, W)``: one convolution."""
        p, out, c_in, *kernel = weight.shape
        y = self.ops.conv(x, weight.reshape(p * out, c_in, *kernel), padding=kernel[0] // 2)
        return y.view(x.shape[0], p, out, *x.shape[2:])

    def apply_weight(self, x: Tensor, weight: Tensor, gates: Tensor | None = None) -> Tensor:
        """The gated model with an arbitrary weight: ``sum_p D_p * conv(x, weight_p[c])``.

        ``gates`` (``(B, P, H, W)``, float or bool) may be passed to reuse precomputed
        patterns; solvers use this to keep the linear operator ``A`` fixed.
        """
        d = self.gates(x) if gates is None else gates
        return (self._responses(x, weight) * d.unsqueeze(2)).sum(dim=1)

    def apply_adjoint(self, x: Tensor, residual: Tensor, gates: Tensor | None = None) -> Tensor:
        """The adjoint of `apply_weight` in the weight: ``A^T residual``, ``(P, out, C_in, K, K)``.

        This is the gradient of ``<apply_weight(x, weight), residual>``, computed with the
        convolution's weight-gradient kernel, without an autograd graph.
        """
        d = self.gates(x) if gates is None else gates
        p, out = self.config.patterns, self.out_channels
        k = self.config.kernel_size
        grad_y = d.unsqueeze(2) * residual.unsqueeze(1)  # (B, P, out, H, W)
        grad_y = grad_y.reshape(x.shape[0], p * out, *x.shape[2:])
        shape = (p * out, self.in_channels, *self._kernel)
        grad = self.ops.conv_weight(x, shape, grad_y, padding=k // 2)
        return grad.view(p, out, self.in_channels, *self._kernel)

    @torch.no_grad()
    def pattern_gates(self, x: Tensor, chunk: int = 0) -> Tensor:
        """The sign patterns as a bool ``(B, P, H, W)`` tensor (a quarter of `gates`' memory).

        ``chunk = 0`` computes them all at once; ``chunk > 0`` one image and ``chunk``
        patterns at a time, so that the normalised copy of the input is one image's.
        """
        self._check_input(x)
        p = self.config.patterns
        step = p if chunk <= 0 else chunk
        images = x.shape[0] if chunk <= 0 else 1
        # At least float32 (a bf16 input, e.g. a stage-input cache under autocast, is
        # widened exactly): bf16 gate convolutions could flip sign patterns.
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.gate_weight.to(dtype)
        bias = self.gate_bias.to(dtype)
        mean = self._channel_view(self.input_mean.to(dtype))
        std = self._channel_view(self.input_std.to(dtype))
        out = torch.empty(x.shape[0], p, *x.shape[2:], dtype=torch.bool, device=x.device)
        for first in range(0, x.shape[0], images):
            # Channels-last: the convolution library then works on the tensor as it is,
            # instead of reordering a copy of it for every call.
            xn = x[first : first + images].to(
                dtype=dtype, memory_format=self.ops.channels_last, copy=True
            )
            xn.sub_(mean).div_(std)
            for lo in range(0, p, step):
                hi = min(p, lo + step)
                pre = self.ops.conv(
                    xn, weight[lo:hi], bias[lo:hi], padding=self.config.kernel_size // 2
                )
                out[first : first + images, lo:hi] = pre >= 0
                del pre
            del xn
        return out

    @torch.no_grad()
    def data_term_and_gradient(
        self,
        x: Tensor,
        r: Tensor,
        chunk: int = 0,
        compute_dtype: torch.dtype | None = None,
        gates: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`data_term` and its gradient in the effective weight, without autograd.

        The model is linear in its weight, so the gradient is ``A^T (A v - r) / B``
        (`apply_weight`, `apply_adjoint`), a sum over images. ``chunk = 0`` computes it for
        the whole batch and all patterns at once (fastest). ``chunk > 0`` bounds the working
        memory: one image and ``chunk`` patterns at a time, so that beyond the input batch
        the step holds one image's channels-last copy, its bool gates and one chunk's
        responses ``(1, chunk * out, H, W)``, whatever the batch size; autograd would keep
        the responses, gated products and their gradients of all patterns and images. An
        image of more than `SLAB_POSITIONS` positions (a large 3D patch) is also worked
        through in slabs along its first spatial axis, each read with the ``K // 2``
        positions around it, so that the working memory does not grow with the patch
        either; the data term and gradient are sums over positions, so this is exact.
        ``compute_dtype`` (e.g. bf16) is the dtype of the convolutions; the sums are
        accumulated in float32. An input already in ``torch.channels_last`` format (and in
        ``compute_dtype``) is used without a copy. ``gates``: the input's `pattern_gates`,
        precomputed (a trainer whose stage inputs are fixed computes them once per stage).

        Returns:
            The data term (0-dim float32) and the gradient ``(P, out, C_in, K, K)`` (float32).
        """
        self._check_input(x)
        batch, _, *spatial = x.shape
        p, out, c_in, k = (
            self.config.patterns,
            self.out_channels,
            self.in_channels,
            self.config.kernel_size,
        )
        step = p if chunk <= 0 else chunk
        images = batch if chunk <= 0 else 1
        across = math.prod(spatial[1:])
        thickness = spatial[0] if chunk <= 0 else max(1, SLAB_POSITIONS // across)
        dtype = compute_dtype or x.dtype
        # Axis orders moving the channel axis last ((0, 2, 3, 1) in 2D) and back.
        last_channel = (0, *range(2, 2 + self.ndim), 1)
        first_channel = (0, 1 + self.ndim, *range(1, 1 + self.ndim))
        weight = self.effective_weight().detach()
        value = torch.zeros((), dtype=torch.float32, device=x.device)
        grad = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        for first in range(0, batch, images):
            last = min(batch, first + images)
            n = last - first
            d_all = self.pattern_gates(x[first:last], chunk) if gates is None else gates[first:last]
            for top in range(0, spatial[0], thickness):
                # The slab's own positions [top, bottom) and the K // 2 positions around
                # them that their convolutions read: the sums over the slabs are exact.
                bottom = min(spatial[0], top + thickness)
                lo_x, hi_x = max(0, top - k // 2), min(spatial[0], bottom + k // 2)
                own = slice(top - lo_x, bottom - lo_x)
                extent = (hi_x - lo_x, *spatial[1:])
                xc = x[first:last, :, lo_x:hi_x].to(
                    dtype=dtype, memory_format=self.ops.channels_last
                )
                d = d_all[:, :, top:bottom]
                pred = torch.zeros(
                    n, out, bottom - top, *spatial[1:], dtype=torch.float32, device=x.device
                )
                for lo in range(0, p, step):
                    hi = min(p, lo + step)
                    y = self._responses(xc, weight[lo:hi].to(dtype))[:, :, :, own]
                    y.mul_(d[:, lo:hi, None])
                    pred += y.sum(dim=1, dtype=torch.float32)
                    del y
                residual = pred.sub_(r[first:last, :, top:bottom].float())
                value += 0.5 * residual.square().sum()
                # (n, X, ..., 1, out): the gradient of the responses is built channels-last.
                residual = residual.to(dtype).permute(*last_channel).unsqueeze(1 + self.ndim)
                # Halo positions are other slabs' outputs: their gradient is zero here.
                make = torch.empty if extent[0] == bottom - top else torch.zeros
                for lo in range(0, p, step):
                    hi = min(p, lo + step)
                    grad_y = make(n, *extent, hi - lo, out, dtype=dtype, device=x.device)
                    gates_last = d[:, lo:hi].permute(*last_channel).unsqueeze(2 + self.ndim)
                    torch.mul(gates_last, residual, out=grad_y[:, own])
                    grad_y = grad_y.view(n, *extent, (hi - lo) * out).permute(*first_channel)
                    shape = ((hi - lo) * out, c_in, *self._kernel)
                    part = self.ops.conv_weight(xc, shape, grad_y, padding=k // 2)
                    grad[lo:hi] += part.view(hi - lo, out, c_in, *self._kernel)
                    del grad_y, part
                del xc, d, pred, residual
        return value / batch, grad / batch

    def forward(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        """``sum_p D_p * conv(x, v_p[c])`` for each output channel c: ``(B, out, H, W)``."""
        self._check_input(x)
        return self.apply_weight(x, self.effective_weight(), gates)

    def data_term(self, x: Tensor, r: Tensor, gates: Tensor | None = None) -> Tensor:
        """``0.5 * sum((forward(x) - r)^2) / B``: summed over channels and pixels, mean over the
        batch, so mini-batch and full-batch objectives agree."""
        return 0.5 * (self.forward(x, gates) - r).square().sum() / x.shape[0]

    def group_norms(self) -> Tensor:
        """Norms of the penalty's groups: separate ``(P, out)``, frobenius ``(P,)``; for the
        cone program those of ``w`` and of ``z`` stacked on a leading axis of size 2."""
        groups = self.config.output_groups
        if self.config.program == "gated":
            return group_norms_of(self.v, groups)
        return torch.stack([group_norms_of(self.w, groups), group_norms_of(self.z, groups)])

    def penalty(self) -> Tensor:
        """``beta * sum of group norms`` (cone: of ``w`` and of ``z``)."""
        return self.config.beta * self.group_norms().sum()

    def cone_violation(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        """Total violation of the cone constraints, mean over the batch (0 for gated).

        ``sum_{p,c,pixels} relu(-(2 D_p - 1) * conv(x, w_p[c])) + (same for z)``, over B.
        """
        self._check_input(x)
        if self.config.program == "gated":
            return x.new_zeros(())
        d = self.gates(x) if gates is None else gates
        sign = (2 * d.to(x.dtype) - 1).unsqueeze(2)
        total = F.relu(-sign * self._responses(x, self.w)).sum()
        total = total + F.relu(-sign * self._responses(x, self.z)).sum()
        return total / x.shape[0]

    def objective(self, x: Tensor, r: Tensor, gates: Tensor | None = None) -> Tensor:
        """The convex objective on this batch: data term + penalty (+ rho * cone violation)."""
        d = self.gates(x) if gates is None else gates
        value = self.data_term(x, r, d) + self.penalty()
        if self.config.program == "cone":
            value = value + self.config.cone_penalty * self.cone_violation(x, d)
        return value

    def hidden(self, x: Tensor, kind: str) -> Tensor:
        """Hidden features passed to the next stage.

        ``kind="gated"``: ``D_p * conv(x, v_p[c])`` for every (p, c), channel ``p * out + c``,
        ``(B, P * out, H, W)`` (cone: ``v = w - z``). ``kind="relu"``:
        ``relu(conv(x, hidden filters of to_relu()))``, ``(B, n_hidden, H, W)``.
        """
        self._check_input(x)
        if kind == "gated":
            y = self._responses(x, self.effective_weight()) * self.gates(x).unsqueeze(2)
            return y.reshape(x.shape[0], -1, *x.shape[2:])
        if kind == "relu":
            first, _ = self.to_relu()
            return F.relu(first(x))
        raise CvxmriError(f"hidden kind must be 'gated' or 'relu', got {kind!r}")

    # ---------------------------------------------------------------- mapping to a ReLU net

    def _relu_units(self) -> _ReluUnits:
        if self.config.program == "gated":
            weights = [(self.v, 1.0)]
        else:
            weights = [(self.w, 1.0), (self.z, -1.0)]
        norms = [group_norms_of(w.detach(), "separate") for w, _ in weights]  # (P, out) each
        largest = max(float(n.max()) for n in norms)
        filters, out_weights, channels, patterns = [], [], [], []
        for (weight, sign), norm in zip(weights, norms, strict=True):
            keep = norm > ZERO_GROUP_RELATIVE * largest if largest > 0 else norm > 0
            index_p, index_c = torch.nonzero(keep, as_tuple=True)
            root = norm[index_p, index_c].sqrt()
            filters.append(
                weight.detach()[index_p, index_c] / root.view(-1, *([1] * (weight.dim() - 2)))
            )
            out_weights.append(sign * root)
            channels.append(index_c)
            patterns.append(index_p)
        return _ReluUnits(
            torch.cat(filters), torch.cat(out_weights), torch.cat(channels), torch.cat(patterns)
        )

    def to_relu(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The ordinary two-layer ReLU network of the solution (docs/method.md's mapping).

        Each non-zero ``w_p[c]`` gives a hidden ``KxK`` filter ``w_p[c] / sqrt(||w_p[c]||)``
        (bias 0) with output weight ``+sqrt(||w_p[c]||)`` into output channel c of a ``1x1``
        convolution (bias 0); each non-zero ``z_p[c]`` the same with ``-sqrt(||z_p[c]||)``.
        Groups with norm <= 1e-12 * the largest are dropped; if all are, one zero hidden
        filter is returned. For the cone program the network equals the convex model on any
        data where the cone constraints hold. For gated solutions ``v_p[c]`` is mapped like
        ``w``; this is exact only where the gate ``D_p`` agrees with the sign of
        ``conv(x, v_p[c])`` (`mapping_report` measures how far it is).

        Returns ``(first, last)``: the ``K``-wide convolution ``C_in -> n_hidden`` (padding
        ``K // 2``) and the 1x1 convolution ``n_hidden -> out``, layers of ``ndim`` spatial
        dimensions (`cvxmri.models.conv`), on the device and dtype of the parameters.
        """
        units = self._relu_units()
        weight = self.effective_weight()
        factory = {"device": weight.device, "dtype": weight.dtype}
        k = self.config.kernel_size
        hidden = max(1, units.filters.shape[0])
        first = self.ops.module(self.in_channels, hidden, k, padding=k // 2, **factory)
        last = self.ops.module(hidden, self.out_channels, 1, **factory)
        with torch.no_grad():
            first.weight.zero_()
            first.bias.zero_()
            last.weight.zero_()
            last.bias.zero_()
            count = units.filters.shape[0]
            if count:
                first.weight.copy_(units.filters)
                units_index = torch.arange(count, device=units.out_channels.device)
                centre = (0,) * self.ndim
                last.weight[(units.out_channels, units_index, *centre)] = units.out_weights
        return first, last

    @torch.no_grad()
    def mapping_report(self, x: Tensor) -> dict[str, float]:
        """How far the `to_relu` network is from the convex model on data ``x``.

        ``violation_fraction``: fraction of (pixel, hidden unit) pairs, over the non-zero
        units, where the unit's gate disagrees with the sign of its pre-activation (a zero
        pre-activation agrees with both); ``relative_output_difference``:
        ``||relu_net(x) - forward(x)|| / ||forward(x)||``; ``hidden_units``: the number of
        non-zero units.
        """
        self._check_input(x)
        units = self._relu_units()
        first, last = self.to_relu()
        model = self.forward(x)
        mapped = last(F.relu(first(x)))
        count = units.filters.shape[0]
        fraction = 0.0
        if count:
            pre = first(x)
            d = self.gates(x)[:, units.patterns] > 0
            disagree = (d & (pre < 0)) | (~d & (pre > 0))
            fraction = float(disagree.to(torch.float64).mean())
        tiny = torch.finfo(x.dtype).tiny
        difference = float(
            torch.linalg.vector_norm(mapped - model)
            / torch.linalg.vector_norm(model).clamp_min(tiny)
        )
        return {
            "violation_fraction": fraction,
            "relative_output_difference": difference,
            "hidden_units": float(count),
        }


# ---------------------------------------------------------------------------- certificate


class ResidualStatistics(NamedTuple):
    """What the certificate needs from one pass over a training set, in float64."""

    gradient: Tensor  # grad L = A^T (A v - r) / N, the weight's shape
    re: float  # <r, e> / N with e = r - A v
    ee: float  # ||e||^2 / N
    violation: float  # mean cone violation (0 for the gated program)
    count: int  # N


def exact_products(
    stage: ConvexStage, x: Tensor, r: Tensor, gates: Tensor, prediction: Tensor | None = None
) -> tuple[Tensor, float, float]:
    """``A^T e``, ``<r, e>`` and ``||e||^2`` of one batch in float64, ``e = r - A v``.

    The convolutions are matrix products (BLAS ``dgemm``) on the zero-padded input
    flattened to ``(C_in, positions)``: its copies shifted by ``0..K-1`` along the last
    axis are stacked into ``(K * C_in, positions)`` rows, and a shift along the other axes
    is an offset into those columns, so a ``K^d`` convolution is ``K^(d-1)`` products and
    its weight gradient the same number. Outputs live on the padded grid (the padding
    columns are computed and dropped). This is 2-3x faster than float64 convolutions,
    which torch runs on a slow path with a full ``im2col`` buffer per call. Images are
    worked through in slabs along their first spatial axis (`EXACT_SLAB_BYTES`).
    ``prediction`` (``A v``, any dtype) skips the forward products.
    """
    weight = stage.effective_weight().detach().double()
    p, out, c_in, *kernel = weight.shape
    k, nd, h = kernel[0], stage.ndim, kernel[0] // 2
    lead = k ** (nd - 1)
    # (leading shifts, P * out, K * C_in): columns ordered (last-axis shift, channel).
    w = weight.reshape(p * out, c_in, *kernel).movedim(1, -1).reshape(p * out, lead, k * c_in)
    w = w.transpose(0, 1).contiguous()
    grad = torch.zeros_like(w)
    re = ee = 0.0
    spatial = x.shape[2:]
    padded = [n + 2 * h for n in spatial]
    across = math.prod(padded[1:])
    thickness = max(1, EXACT_SLAB_BYTES // (8 * k * c_in * across) - 2 * h)
    strides = [math.prod(padded[j + 1 :]) for j in range(nd)]
    offsets = _lead_offsets(k, strides[:-1])
    for b in range(x.shape[0]):
        xp = F.pad(x[b].double(), [h] * (2 * nd))
        d_b = gates[b].double()
        for top in range(0, spatial[0], thickness):
            bottom = min(spatial[0], top + thickness)
            rows = bottom - top
            flat = xp[:, top : bottom + 2 * h].reshape(c_in, -1)
            n_out = rows * across
            # In 3D the last shifts read up to 2h rows of zeros past the slab.
            columns = max(flat.shape[1], offsets[-1] + n_out)
            stacked = flat.new_zeros(k, c_in, columns)
            for shift in range(k):
                stacked[shift, :, : flat.shape[1] - shift] = flat[:, shift:]
            stacked = stacked.view(k * c_in, columns)
            # The valid outputs on the padded grid of the slab.
            valid = (slice(None), slice(None), slice(0, rows), *(slice(0, n) for n in spatial[1:]))
            d = d_b[:, top:bottom].unsqueeze(1)
            if prediction is None:
                y = torch.zeros(p * out, n_out, dtype=torch.float64, device=x.device)
                for index, offset in enumerate(offsets):
                    y.addmm_(w[index], stacked[:, offset : offset + n_out])
                y = y.view(p, out, rows, *padded[1:])[valid]
                pred = (y * d).sum(0)
            else:
                pred = prediction[b][:, top:bottom].double()
            r_b = r[b][:, top:bottom].double()
            e = r_b - pred
            re += float((r_b * e).sum())
            ee += float((e * e).sum())
            grad_y = torch.zeros(p, out, rows, *padded[1:], dtype=torch.float64, device=x.device)
            torch.mul(d, e.unsqueeze(0), out=grad_y[valid])
            grad_y = grad_y.view(p * out, n_out)
            for index, offset in enumerate(offsets):
                grad[index].addmm_(grad_y, stacked[:, offset : offset + n_out].T)
    grad = grad.transpose(0, 1).reshape(p * out, *kernel[:-1], k, c_in).movedim(-1, 1)
    return grad.reshape(p, out, c_in, *kernel), re, ee


def _lead_offsets(k: int, strides: list[int]) -> list[int]:
    """Column offsets of the shifts along the leading axes (all but the last), in the
    row-major order of the kernel's leading axes."""
    offsets = [0]
    for stride in strides:
        offsets = [offset + shift * stride for offset in offsets for shift in range(k)]
    return offsets


def residual_statistics(
    stage: ConvexStage, batches: Iterable[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]
) -> ResidualStatistics:
    """One pass over (x, r, gates or None, prediction or None) batches: the gradient of the
    mean-scaled data term and the residual's inner products, in float64 (near the optimum
    the gradient's group norms are close to ``beta``, and float32 rounding over a training
    set exceeds a small ``beta``). Solvers pass cached gates and the predictions they
    already have to save a convolution. Under torchrun each process passes its share of
    the training set and the sums are over all processes (`cvxmri.distributed`)."""
    weight = stage.effective_weight().detach()
    grad = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    count = 0
    re = ee = violation = 0.0
    with torch.no_grad():
        for x, r, gates, prediction in batches:
            d = stage.gates(x) if gates is None else gates
            products, batch_re, batch_ee = exact_products(stage, x, r, d, prediction)
            grad -= products
            re += batch_re
            ee += batch_ee
            if stage.config.program == "cone":
                violation += float(stage.cone_violation(x, d)) * x.shape[0]
            count += x.shape[0]
    distributed.all_reduce_(grad)
    re, ee, violation, total = distributed.sum_floats(re, ee, violation, count)
    count = int(total)
    if count == 0:
        raise CvxmriError("duality_gap needs at least one sample")
    return ResidualStatistics(grad / count, re / count, ee / count, violation / count, count)


def _certificate(
    stage: ConvexStage, batches: Iterable[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]
) -> dict[str, float]:
    """The certificate from (x, r, gates or None, prediction or None) batches
    (`residual_statistics`)."""
    config = stage.config
    stats = residual_statistics(stage, batches)
    with torch.no_grad():
        norms = float(stage.group_norms().double().sum())
    primal = 0.5 * stats.ee + config.beta * norms + config.cone_penalty * stats.violation
    max_dual = float(group_norms_of(stats.gradient, config.output_groups).max())
    return {
        **certificate_numbers(primal, stats.re, stats.ee, config.beta, max_dual),
        "n": float(stats.count),
    }


def certificate_numbers(
    primal: float, re: float, ee: float, beta: float, max_dual: float
) -> dict[str, float]:
    """Dual value and gap of a group lasso from its primal value, ``<r, e> / N`` and
    ``||e||^2 / N`` (``e = r - A v``) and the largest dual norm of the gradient.

    The dual point is ``s e`` with ``s = clip(<r, e> / ||e||^2, 0, beta / max dual norm)``:
    the multiple of the residual with the largest dual value
    ``s <r, e> / N - s^2 ||e||^2 / (2N)`` among the feasible ones.
    """
    scale = re / ee if ee > 0 else 1.0
    if max_dual > 0:
        scale = min(scale, beta / max_dual)
    scale = max(scale, 0.0)
    dual = scale * re - 0.5 * scale * scale * ee
    gap = primal - dual
    return {
        "primal": primal,
        "dual": dual,
        "gap": gap,
        "relative_gap": gap / max(abs(primal), torch.finfo(torch.float64).tiny),
        "dual_scale": scale,
        "max_dual_norm": max_dual,
    }


def duality_gap(stage: ConvexStage, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """The optimality certificate of the stage's current weights on a fixed training set.

    ``batches`` (iterated once) yields ``(x, r)``; N is the total number of samples. With the
    mean-scaled data term ``L(v) = 1/(2N) sum_n ||A_n v - r_n||^2`` and ``e = r - A v``:

    - ``primal = L + beta * sum of group norms`` (cone: ``L(w - z)``, norms of ``w`` and
      ``z``, plus ``cone_penalty`` times the mean violation);
    - ``g = grad L = -A^T e / N`` (one pass over the data, in float64); the dual norm of a
      group is ``||g_{p,c}||`` (separate) or ``||g_p||_F`` (frobenius), and
      ``s = clip(<r, e> / ||e||^2, 0, beta / max dual norm)`` makes ``theta = s e`` dual
      feasible (`certificate_numbers`);
    - ``dual = (0.5 ||r||^2 - 0.5 ||r - s e||^2) / N``.

    ``primal - dual >= 0`` bounds the suboptimality and is 0 exactly at the optimum of the
    gated program. For ``program="cone"`` the dual point is feasible for the gated
    relaxation, whose optimum is at most the cone program's (``||w|| + ||z|| >= ||w - z||``
    and the violation is >= 0), so the gap is still a valid upper bound on the cone
    program's suboptimality, but it need not reach 0 at the cone optimum.

    Returns ``primal``, ``dual``, ``gap``, ``relative_gap = gap / |primal|``,
    ``dual_scale = s``, ``n = N`` and ``max_dual_norm`` (the largest dual norm of ``g``; at
    ``v = 0`` it is the ``beta`` from which on ``v = 0`` is optimal).
    """
    return _certificate(stage, ((x, r, None, None) for x, r in batches))
