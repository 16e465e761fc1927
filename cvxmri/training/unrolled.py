"""Training unrolled networks (``arch: unrolled``): end-to-end, or greedily one iteration
at a time, each iteration a non-convex fit or a certified convex program.

Greedy training fixes the previous iterate ``x`` (the output of the frozen iterations
before) and fits iteration t alone: ``min ||DC(x + R_t(x)) - x*||^2``. With a gated
regulariser ``R_t(x) = sum_p D_p conv(x, v_p)`` (gates fixed from ``x``) and the affine
data consistency ``DC(z) = DC(0) + L z`` (`cvxmri.models.dc`), the iteration's output is
``DC(x) + L Phi v``: linear in the weights. So the iteration is the group lasso

    min_v  1/(2N) sum_n ||L_n Phi_n v - r_n||^2 + beta sum_p ||v_p||,   r = x* - DC(x)

with one group per pattern (its real and imaginary outputs together: ``L`` mixes them).
The regulariser's output is complex, ``Phi w`` with complex coefficients ``w = a + i b``
(``a`` the weights of the real output channel, ``b`` of the imaginary one), and ``L`` is
complex-linear, so the design is ``B = L Phi`` with complex columns ``L phi_j``. Its Gram
matrix ``H = B^H B / N`` and ``B^H r / N`` are accumulated once over the training set, or
over every k-th image of it (`dc_gram_system`: ``P * C_in * K^d`` applications of ``L``
per image, the cost of this route; `UnrolledConfig.gram_images`), in the real form
``[[Re H, -Im H], [Im H, Re H]]`` on ``(a, b)``. That matrix is the model of refinement
rounds (`IterationSolver`): each round solves the model with the certified solver's Gram
route (`cvxmri.training.certified.solve_gram`) and the exact gradient of a float64 pass
through the real operators over the whole training set, which also certifies the
solution; a model from fewer images takes more rounds to the same optimum.

True 3D training (``dims`` 3) runs the same code on whole volumes: 3D regularisers
(``KxKxK``, ``d = 3``) and the volumes' own SENSE operators.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cvxmri import distributed
from cvxmri.data.sample import Sample
from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStage, ConvexStageConfig, certificate_numbers
from cvxmri.models.dc import DataConsistency
from cvxmri.models.stages import gated_layers
from cvxmri.models.unrolled import UnrolledNet
from cvxmri.physics import LinearOperator, recon_sense
from cvxmri.training.certified import (
    BlockMetric,
    GramSystem,
    _patches,
    metric_lipschitz,
    refinement_model,
    solve_gram,
)
from cvxmri.training.data import derived_seed, epoch_batches
from cvxmri.training.fit import make_optimizer
from cvxmri.training.trainer import Trainer, TrainingStopped, image_metrics

log = logging.getLogger(__name__)

# Columns of the design mapped through L at once: bounds the memory of the Gram build
# (columns x coils x grid complex values); 16 ran 2x faster per column than 64 (cache).
COLUMN_CHUNK = 16
# The fast Gram route holds an image's mapped design: its m columns (float32), their
# images through L (complex64) and the real stack of those (float32), 20 bytes per column
# and pixel. Beyond this many bytes (a 12x96x80 volume at 8 patterns: 760 MiB) the lean
# route builds the Gram matrix from L^2 (L self-adjoint) in chunks of `LEAN_CHUNK` columns.
MAPPED_BYTES = 256 * 2**20
LEAN_CHUNK = 4
# Images per chunk when applying iterations to a whole set.
IMAGE_CHUNK = 8
# Refinement rounds of a convex iteration's solve (each one exact float64 pass).
MAX_ROUNDS = 20
# The farthest multiple of a refinement round's step that its line search tries.
LINE_REACH = 16.0
# A round whose line search shortens the model's step below this fraction overshot
# (`IterationSolver.solve`): the model's curvature is doubled.
OVERSHOOT = 0.5
# Exact passes of one beta after which a greedy convex iteration's Gram model, if it is a
# subset's, grows to the whole training set (`IterationSolver`): a safety net for a subset
# that represents the set poorly. Growing costs twice the subset's build. Before line
# searches, a third of the default data's 54 training images certified most betas in 4 to
# 8 passes, and at 6 the model grew in 10 of the main job's 12 Poisson-disc iterations; with
# them, 3 to 6 passes and it never grew (docs/benchmarks.md).
MODEL_ROUNDS = 12


def _complex(channels: Tensor) -> Tensor:
    """Real (B, 2, ...) -> complex (B, ...) in the matching precision (float64 stays
    double, unlike `cvxmri.models.cnn.to_complex`); images or volumes alike."""
    return torch.complex(channels[:, 0], channels[:, 1])


def _channels(image: Tensor) -> Tensor:
    """Complex (B, ...) -> real (B, 2, ...), the inverse of `_complex`; images or volumes
    alike."""
    return torch.stack([image.real, image.imag], dim=1)


@dataclass
class IterationData:
    """A chunk of training images of one greedy iteration, on the device. Volumes (true
    3D training) have three spatial axes where images have two: ``(x, y, z)`` for
    ``(h, w)``, the k-space grid ``(kx, ky, kz)`` for ``(H, W)``.

    Attributes:
        x: (b, 2, h, w) the previous iterate (the iteration's input).
        r: (b, 2, h, w) the residual ``x* - DC(x)`` the regulariser must explain.
        gates: bool (b, P, h, w) the iteration's sign patterns on ``x``.
        maps: complex (b, C, H, W) coil maps.
        mask: (b, 1, H, W) sampling masks (volumes: (b, 1, 1, ky, kz)).
    """

    x: Tensor
    r: Tensor
    gates: Tensor
    maps: Tensor
    mask: Tensor
    _operators: dict[torch.dtype, LinearOperator] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def operator(self, dtype: torch.dtype = torch.complex64) -> LinearOperator:
        """``A`` of the chunk's images in complex ``dtype``: built once per dtype, so that
        what an operator keeps (the direct DC's line inverses) serves every pass."""
        if dtype not in self._operators:
            real = dtype.to_real()
            shape = tuple(self.x.shape[2:])
            maps, mask = self.maps.to(dtype), self.mask.to(real)
            self._operators[dtype] = recon_sense(maps, mask, shape, len(shape))
        return self._operators[dtype]


def _group_norms(weight: Tensor) -> Tensor:
    """Per-pattern norms of a weight (P, 2, C_in, K, K) (3D: (P, 2, C_in, K, K, K)): one
    group per pattern."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


@torch.no_grad()
def dc_gram_system(
    stage: ConvexStage, data: list[IterationData], dc: DataConsistency
) -> GramSystem:
    """The `GramSystem` of a greedy convex iteration (see the module docstring), in the
    real form, one output column, unknowns ordered per pattern as ``(a_p, b_p)``, each the
    pattern's ``C_in * K^d`` weights of one output channel (the layout of the stage's
    weight ``(P, 2, C_in, K, K)`` flattened; ``(P, 2, C_in, K, K, K)`` for a 3D stage on
    volumes, ``d = stage.ndim``).

    Per image, the ``m = P C_in K^d`` design columns (the gated patches) go through ``L``
    in chunks of `COLUMN_CHUNK` (complex64, the operator's own precision), and their
    products are accumulated in float64 (`_mapped_products`); where the mapped design of
    an image would exceed `MAPPED_BYTES` and ``L`` is self-adjoint, through ``L^2`` a few
    columns at a time (`_lean_products`).
    """
    began = time.perf_counter()
    p = stage.config.patterns
    m0 = stage.in_channels * stage.config.kernel_size**stage.ndim
    m = p * m0
    device = stage.gate_weight.device
    gram = torch.zeros(2 * m, 2 * m, dtype=torch.float64, device=device)
    rhs = torch.zeros(2 * m, dtype=torch.float64, device=device)
    rr, count = 0.0, 0
    for chunk in data:
        for i in range(chunk.x.shape[0]):
            x = chunk.x[i : i + 1].float()
            u = _patches(stage, x)  # (pixels, m0)
            d = chunk.gates[i].reshape(p, -1).T.float()  # (pixels, P)
            shape = tuple(x.shape[2:])
            single = recon_sense(
                chunk.maps[i : i + 1], chunk.mask[i : i + 1].float(), shape, stage.ndim
            )
            r = chunk.r[i].reshape(2, -1)
            lean = dc.self_adjoint and 20 * m * u.shape[0] > MAPPED_BYTES
            products = _lean_products if lean else _mapped_products
            re_h, im_h, image_rhs = products(u, d, r, dc, single, shape)
            gram += torch.cat([torch.cat([re_h, -im_h], dim=1), torch.cat([im_h, re_h], dim=1)])
            rhs += image_rhs
            rr += float(r.double().square().sum())
            count += 1
    distributed.all_reduce_(gram)
    distributed.all_reduce_(rhs)
    rr, total = distributed.sum_floats(rr, count)
    count = int(total)
    if count == 0:
        raise CvxmriError("the training set is empty: no images")
    order = torch.tensor(
        [o * m + q * m0 + j for q in range(p) for o in range(2) for j in range(m0)],
        device=device,
    )
    return GramSystem(
        gram[order][:, order] / count,
        (rhs[order] / count)[:, None],
        rr / count,
        count,
        p,
        "separate",
        time.perf_counter() - began,
    )


def _mapped_products(
    u: Tensor,
    d: Tensor,
    r: Tensor,
    dc: DataConsistency,
    op: LinearOperator,
    shape: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """``Re H``, ``Im H`` (m, m) and the real form of ``B^H r`` (2m) of one image, float64,
    from its mapped design ``B = L Phi`` held whole (the fast route: one ``L`` per column).
    ``u`` (pixels, m0) are the patches, ``d`` (pixels, P) the gates, ``r`` (2, pixels)
    the residual; ``dc.linear`` with the image's operator ``op`` applies ``L`` to complex
    images (c, *shape)."""
    m = d.shape[1] * u.shape[1]
    columns = (d[:, :, None] * u[:, None, :]).reshape(u.shape[0], m).T
    mapped = torch.empty(m, u.shape[0], dtype=torch.complex64, device=u.device)
    for start in range(0, m, COLUMN_CHUNK):
        part = columns[start : start + COLUMN_CHUNK].reshape(-1, *shape)
        mapped[start : start + COLUMN_CHUNK] = dc.linear(part.to(torch.complex64), op).reshape(
            part.shape[0], -1
        )
    stacked = torch.cat([mapped.real, mapped.imag])  # (2m, pixels)
    products = (stacked @ stacked.T).double()
    re_h = products[:m, :m] + products[m:, m:]
    im_h = products[:m, m:] - products[m:, :m]
    r = r.double()
    br, bi = mapped.real.double(), mapped.imag.double()
    return re_h, im_h, torch.cat([br @ r[0] + bi @ r[1], br @ r[1] - bi @ r[0]])


def _lean_products(
    u: Tensor,
    d: Tensor,
    r: Tensor,
    dc: DataConsistency,
    op: LinearOperator,
    shape: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """What `_mapped_products` returns, for a self-adjoint ``L``, holding `LEAN_CHUNK`
    mapped columns at a time: ``H_ij = (L phi_i)^H (L phi_j) = phi_i^T (L^2 phi_j)`` with
    real columns ``phi``, so a chunk of columns of ``H`` is ``Phi^T`` of ``L^2`` of the
    chunk, and ``B^H r = Phi^T (L r)``. Two ``L`` per column instead of one; memory of a
    few columns instead of the whole mapped design."""
    pixels, m0 = u.shape
    p = d.shape[1]
    m = p * m0

    def design_t(y: Tensor) -> Tensor:
        """``Phi^T y`` for real y (pixels, k): (m, k), column index ``q * m0 + j``."""
        k = y.shape[1]
        weighted = (d[:, :, None] * y[:, None, :]).reshape(pixels, p * k)
        return (u.T @ weighted).reshape(m0, p, k).permute(1, 0, 2).reshape(m, k)

    re_h = torch.empty(m, m, dtype=torch.float64, device=u.device)
    im_h = torch.empty_like(re_h)
    for start in range(0, m, LEAN_CHUNK):
        index = torch.arange(start, min(m, start + LEAN_CHUNK), device=u.device)
        part = (d[:, index // m0] * u[:, index % m0]).T.reshape(-1, *shape)
        w = dc.linear(dc.linear(part.to(torch.complex64), op), op).reshape(len(index), -1)
        block = design_t(torch.cat([w.real, w.imag]).T).double()
        re_h[:, index] = block[:, : len(index)]
        im_h[:, index] = block[:, len(index) :]
    # H is Hermitian: its real part symmetric, its imaginary part antisymmetric.
    re_h = (re_h + re_h.T) / 2
    im_h = (im_h - im_h.T) / 2
    mapped_r = dc.linear(torch.complex(r[0], r[1]).reshape(1, *shape), op).reshape(-1)
    b = design_t(torch.stack([mapped_r.real, mapped_r.imag], dim=1)).double()
    return re_h, im_h, torch.cat([b[:, 0], b[:, 1]])


def split_images(
    data: list[IterationData], step: int
) -> tuple[list[IterationData], list[IterationData]]:
    """Every ``step``-th image of ``data`` (counted across its chunks, from the first) and
    the others, each in chunks as they lie (copies of the chosen rows)."""
    chosen: list[IterationData] = []
    others: list[IterationData] = []
    offset = 0
    for chunk in data:
        size = chunk.x.shape[0]
        keep = (torch.arange(size) + offset) % step == 0
        for part, rows in ((chosen, keep), (others, ~keep)):
            if rows.any():
                index = rows.nonzero().flatten().to(chunk.x.device)
                part.append(
                    IterationData(
                        *(t.index_select(0, index) for t in (chunk.x, chunk.r, chunk.gates)),
                        chunk.maps.index_select(0, index),
                        chunk.mask.index_select(0, index),
                    )
                )
        offset += size
    return chosen, others


def _merged(a: GramSystem, b: GramSystem) -> GramSystem:
    """The Gram system of the images of ``a`` and ``b`` together (means over both)."""
    n = a.count + b.count
    return GramSystem(
        (a.gram * a.count + b.gram * b.count) / n,
        (a.rhs * a.count + b.rhs * b.count) / n,
        (a.rr * a.count + b.rr * b.count) / n,
        n,
        a.patterns,
        a.output_groups,
        a.seconds + b.seconds,
    )


@dataclass
class ExactPass:
    """One float64 pass through the real operators over the whole training set at the
    weight ``weight`` (P, 2, C_in, K...): everything its certificate needs at any beta.

    Attributes:
        weight: the weight (float64).
        gradient: the exact gradient of the data term ``||e||^2 / (2N)``.
        ee: ``||e||^2 / N`` (``e = r - L Phi w``).
        re: ``<r, e> / N``.
        errors: ``e`` of each chunk of this process's images.
    """

    weight: Tensor
    gradient: Tensor
    ee: float
    re: float
    errors: list[Tensor]

    def certificate(self, beta: float) -> dict[str, float]:
        """Primal, dual and relative gap of the weight at ``beta``, and its groups."""
        norms = _group_norms(self.weight)
        primal = 0.5 * self.ee + beta * float(norms.sum())
        max_dual = float(_group_norms(self.gradient).max())
        return {
            **certificate_numbers(primal, self.re, self.ee, beta, max_dual),
            "groups": float((norms > 0).sum()),
        }


@torch.no_grad()
def exact_pass(
    stage: ConvexStage, weight: Tensor, data: list[IterationData], dc: DataConsistency
) -> ExactPass:
    """The exact pass (`ExactPass`) of ``weight`` (P, 2, C_in, K...) through ``data``."""
    w = weight.double()
    ee = re = 0.0
    gradient = torch.zeros_like(w)
    errors = []
    count = 0
    for chunk in data:
        op = chunk.operator(torch.complex128)
        x, gates = chunk.x.double(), chunk.gates.double()
        pred = _channels(dc.linear(_complex(stage.apply_weight(x, w, gates)), op))
        e = chunk.r.double() - pred
        ee += float(e.square().sum())
        re += float((chunk.r.double() * e).sum())
        back = _channels(dc.linear(_complex(e), op))
        gradient -= stage.apply_adjoint(x, back, gates)
        errors.append(e)
        count += x.shape[0]
    distributed.all_reduce_(gradient)
    ee, re, count = distributed.sum_floats(ee, re, count)
    return ExactPass(w, gradient / count, ee / count, re / count, errors)


def _objective_slope(
    old: Tensor, step: Tensor, a: float, od: float, dd: float, beta: float
) -> float:
    """The derivative in ``a`` of the objective along ``old + a step`` (``od`` and ``dd``
    from `line_search`)."""
    w = old + a * step
    norms = _group_norms(w)
    inner = (w * step).flatten(1).sum(1)
    # Where a group is zero, its right derivative: beta ||step_p||.
    slopes = torch.where(norms > 0, inner / norms.clamp_min(1e-300), _group_norms(step))
    return od + a * dd + beta * float(slopes.sum())


def line_search(old: ExactPass, new: ExactPass, beta: float) -> tuple[ExactPass, float]:
    """The exact minimiser of the objective at ``beta`` on the ray from ``old`` through
    ``new`` (``old + a (new - old)``, ``0 <= a <= LINE_REACH``), and its ``a``, without
    another pass: the residual, gradient and ``<r, e>`` are affine in ``a``, so the two
    passes give them everywhere on the ray (``||e||^2`` from one more inner product per
    image)."""
    od = dd = 0.0
    for e_old, e_new in zip(old.errors, new.errors, strict=True):
        delta = e_new - e_old
        od += float((e_old * delta).sum())
        dd += float(delta.square().sum())
    od, dd, count = distributed.sum_floats(od, dd, sum(e.shape[0] for e in old.errors))
    od, dd = od / count, dd / count
    step = new.weight - old.weight
    lo, hi = 0.0, 1.0
    while hi < LINE_REACH and _objective_slope(old.weight, step, hi, od, dd, beta) < 0:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        middle = 0.5 * (lo + hi)
        if _objective_slope(old.weight, step, middle, od, dd, beta) < 0:
            lo = middle
        else:
            hi = middle
    a = 0.5 * (lo + hi)
    point = ExactPass(
        old.weight + a * step,
        old.gradient + a * (new.gradient - old.gradient),
        old.ee + 2 * a * od + a * a * dd,
        old.re + a * (new.re - old.re),
        [e_old + a * (e_new - e_old) for e_old, e_new in zip(old.errors, new.errors, strict=True)],
    )
    # Bisection to the float64 floor: keep whichever of the three is lowest.
    candidates = [(point, a), (new, 1.0), (old, 0.0)]
    return min(candidates, key=lambda c: c[0].certificate(beta)["primal"])


class IterationSolver:
    """Solves a greedy convex iteration at any ``beta`` to the relative gap ``tol``,
    warm-started from the stage's weights (which it overwrites): the Gram route of
    `cvxmri.training.certified.StageSolver` with `dc_gram_system` as the model and
    `exact_pass` as the exact pass.

    With ``model_step`` k > 1 the model starts as the Gram matrix of every k-th training
    image (`UnrolledConfig.gram_images`): each round still takes the exact gradient of
    the whole set, so the rounds converge to the whole set's optimum and the certificate
    is the whole set's; only the number of rounds depends on the model. Should a beta
    take more than `MODEL_ROUNDS` exact passes, the model grows to the whole set (the
    other images' matrix is added to it), so a subset that represents the set poorly
    costs a few passes, not a slow solve. Each round ends with an exact line search
    along its step (`line_search`); should it cut the step below `OVERSHOOT` of the
    model's (the model's curvature too small along it), the model's curvature is doubled.
    """

    def __init__(
        self,
        stage: ConvexStage,
        data: list[IterationData],
        dc: DataConsistency,
        *,
        tol: float,
        max_seconds: float,
        max_iterations: int,
        model_step: int = 1,
    ) -> None:
        began = time.perf_counter()
        self.stage, self.data, self.dc = stage, data, dc
        self.tol, self.max_seconds, self.max_iterations = tol, max_seconds, max_iterations
        model, self._rest = split_images(data, model_step) if model_step > 1 else (data, [])
        # Whether the model is the whole set's: the same on every process under torchrun
        # (a process's share of the other images may be empty).
        self._whole = model_step == 1
        # The last exact pass (`_pass`) and the number taken.
        self._last: ExactPass | None = None
        self.passes = 0
        self._use(dc_gram_system(stage, model, dc))
        self.setup_seconds = time.perf_counter() - began

    def _use(self, system: GramSystem) -> None:
        """Make ``system`` the model: its metric and step."""
        self.system = system
        self.metric = BlockMetric.from_gram(system)

        def hessian(u: Tensor) -> Tensor:
            return system.per_pattern(system.times(system.flat(u)))

        shape = (system.patterns, 1, system.block)
        self.lipschitz = metric_lipschitz(hessian, self.metric, shape, 100)
        self.unknowns = system.gram.shape[0]

    def _grow(self) -> None:
        """The model becomes the whole set's: the other images' matrix added to it."""
        began = time.perf_counter()
        rest = dc_gram_system(self.stage, self._rest, self.dc)
        self._rest, self._whole = [], True
        self._use(_merged(self.system, rest))
        log.info(
            "the Gram model grew to all %d images in %.1f s",
            self.system.count,
            time.perf_counter() - began,
        )

    def _stored(self, weight: Tensor) -> Tensor:
        """``weight`` as the stage stores it (its dtype), in float64: the weights that
        every reported certificate is of."""
        return weight.to(self.stage.v.dtype).double()

    def _flat(self, weight: Tensor) -> Tensor:
        return weight.detach().double().reshape(-1, 1)

    def _set(self, v: Tensor) -> None:
        with torch.no_grad():
            self.stage.v.copy_(v.reshape(self.stage.v.shape).to(self.stage.v.dtype))

    def _pass(self, weight: Tensor) -> ExactPass:
        """The exact pass of ``weight``; the last one is kept, so a solve that starts
        where the previous one ended (the next beta of a path) reuses it."""
        if self._last is None or not torch.equal(self._last.weight, weight.double()):
            self._last = exact_pass(self.stage, weight, self.data, self.dc)
            self.passes += 1
        return self._last

    def beta_max(self) -> float:
        """The smallest ``beta`` at which the zero weight is optimal: the largest group norm
        of the exact gradient at zero (one pass over the whole training set)."""
        zero = torch.zeros_like(self.stage.v)
        return self._pass(zero).certificate(0.0)["max_dual_norm"]

    def solve(self, beta: float, trace: list[list[float]]) -> dict[str, float]:
        """Solve at ``beta``; ``[seconds, relative gap]`` of the weights at every check is
        appended to ``trace``. Returns the last exact certificate with ``iterations``,
        ``passes`` (exact passes, not counting one shared with the previous solve),
        ``seconds``, ``curvature`` (the model's final curvature factor, 1 unless the
        model overshot) and ``model_images`` (the images of the model's matrix).

        Each round solves the model at the current weights, takes an exact pass at its
        solution and moves to the best point on the ray through the two (`line_search`):
        the objective never rises, and a model that is too stiff or too soft along its
        step costs no extra round."""
        began = time.perf_counter()
        system, passes = self.system, self.passes
        current = self._pass(self.stage.v.detach())
        iterations = 0
        curvature = 1.0
        # The exact pass at the last round's model solution.
        trial: ExactPass | None = None
        while True:
            cert = current.certificate(beta)
            seconds = time.perf_counter() - began
            trace.append([seconds, cert["relative_gap"]])
            stored = self._stored(current.weight)
            if (
                cert["relative_gap"] <= self.tol
                or self.passes - passes > MAX_ROUNDS
                or distributed.any_process(seconds > self.max_seconds)
            ):
                if torch.equal(stored, current.weight):
                    break
                # A point inside a line search: certify weights that the stage can store,
                # the round's own if they certify, else that point's rounded.
                if trial is not None and trial.certificate(beta)["relative_gap"] <= self.tol:
                    current = self._last = trial
                else:
                    current = self._pass(stored)
                continue
            if self.passes - passes >= MODEL_ROUNDS and not self._whole:
                self._grow()
                system, curvature = self.system, 1.0
            # The model with curvature c G, scaled by 1 / c: gradient, value and beta / c.
            v = self._flat(current.weight)
            v, inner = solve_gram(
                refinement_model(
                    system, v, self._flat(current.gradient) / curvature, current.ee / curvature
                ),
                beta / curvature,
                v,
                tol=self.tol / 4,
                max_iterations=self.max_iterations,
                metric=self.metric,
                lipschitz=self.lipschitz,
            )
            iterations += int(inner["iterations"])
            trial = self._pass(self._stored(v.reshape(current.weight.shape)))
            current, reach = line_search(current, trial, beta)
            self._last = current
            if reach < OVERSHOOT:
                curvature *= 2
        self._set(current.weight)
        return {
            **cert,
            "iterations": float(iterations),
            "passes": float(self.passes - passes),
            "seconds": time.perf_counter() - began,
            "curvature": curvature,
            "model_images": float(self.system.count),
        }


class UnrolledTrainer(Trainer):
    """Trains an `UnrolledNet` as configured (``config.arch == "unrolled"``), writing
    into ``out`` like `Trainer`: history, certificates, checkpoints (per epoch end-to-end,
    per iteration greedily; a greedy iteration interrupted midway restarts on resume).

    Training uses whole images (data consistency needs the whole field of view) with the
    run's fixed masks (greedy) or fresh masks per epoch (end-to-end, ``fixed_masks:
    false``); with ``dims`` 3, whole volumes (`cvxmri.training.data.VolumeData`), 3D
    regularisers (``KxKxK``) and the 3D per-volume validation metrics."""

    def __init__(self, config: Any, out: Path, progress: Any = None) -> None:
        super().__init__(config, out, progress)
        self.settings = config.unrolled
        self.ndim = config.dims
        self.val_samples = self.val_data.samples(self.val_data.evaluation_masks())
        self.fixed_samples = (
            self.train_data.samples(self.train_data.training_masks(config.seed, None))
            if config.fixed_masks
            else None
        )

    def _samples(self, epoch: int) -> Sample:
        if self.fixed_samples is not None:
            return self.fixed_samples
        return self.train_data.samples(self.train_data.training_masks(self.config.seed, epoch))

    def _metrics(self, pred: Tensor) -> dict[str, float]:
        val = self.val_samples
        assert val.target is not None
        return image_metrics(pred, val.target, val.support, val.scale, val.volume)

    @torch.no_grad()
    def _advance(
        self, block: torch.nn.Module, dc: DataConsistency, x: Tensor, samples: Sample
    ) -> Tensor:
        """``DC(block(x))`` for every image of ``samples`` (chunks on the device; CPU out)."""
        block.eval()
        out = []
        for start in range(0, len(x), IMAGE_CHUNK):
            part = slice(start, start + IMAGE_CHUNK)
            xs = x[part].to(self.device)
            op = recon_sense(
                samples.maps[part].to(self.device),
                samples.mask[part].to(self.device),
                tuple(xs.shape[2:]),
                self.ndim,
            )
            z = _complex(block(xs))
            out.append(_channels(dc(z, op, op.H(samples.y[part].to(self.device)))).cpu())
        return torch.cat(out)

    def _network_metrics(self, model: UnrolledNet) -> dict[str, float]:
        x = self.val_samples.x0
        for block in model.blocks:
            x = self._advance(block, model.dc, x, self.val_samples)
        return self._metrics(x)

    def fit(self, stop_after: int | None = None) -> UnrolledNet:  # type: ignore[override]
        """Train (resuming from ``checkpoints/last.pt`` if present) and return the network.

        Args:
            stop_after: stop after this many epochs (end-to-end) or iterations (greedy) in
                this call (to test resumption); the run is then resumable.
        """
        from torch.utils.tensorboard import SummaryWriter

        if distributed.is_main():
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        try:
            state = self._load()
            budget = [math.inf if stop_after is None else stop_after]
            if self.config.method == "end-to-end":
                return self._fit_unrolled_end_to_end(state, budget)
            return self._fit_greedy(state, budget)
        finally:
            if self.writer is not None:
                self.writer.close()

    # ------------------------------------------------------------------------ end-to-end

    def _fit_unrolled_end_to_end(
        self, state: dict[str, Any] | None, budget: list[float]
    ) -> UnrolledNet:
        cfg, settings = self.config, self.settings
        torch.manual_seed(derived_seed(cfg.seed, 1000))
        model = UnrolledNet.relu(
            settings.iterations,
            settings.channels,
            settings.kernel_size,
            settings.dc,
            settings.shared,
            ndim=self.ndim,
        ).to(self.device)
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
            samples = self._samples(epoch)
            assert samples.target is not None
            model.train()
            losses = []
            for index in epoch_batches(len(samples), cfg.optim.batch_size, cfg.seed, 0, epoch):
                index = distributed.batch_part(index)
                if len(index) == 0:
                    losses.append(distributed.idle_step(model.parameters(), optimizer))
                    continue
                batch = _take(samples, index, self.device)
                assert batch.target is not None
                losses.append(_step(optimizer, self._forward(model, batch), batch.target))
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row = {
                "method": cfg.method,
                "stage": 0,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": sum(losses) / len(losses),
                **self._network_metrics(model),
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
        self.depth_metrics = self._iteration_metrics(model)
        return model.cpu()

    def _forward(self, model: UnrolledNet, batch: Sample) -> Tensor:
        """The network's output, each iteration checkpointed when configured."""
        return unrolled_forward(
            model, batch.x0, batch.y, batch.mask, batch.maps, self.config.checkpointing
        )

    def _iteration_metrics(self, model: UnrolledNet) -> list[dict[str, Any]]:
        """Validation metrics after every iteration of ``model`` (``iterations`` 1..T)."""
        rows = []
        x = self.val_samples.x0
        for t, block in enumerate(model.blocks):
            x = self._advance(block, model.dc, x, self.val_samples)
            rows.append({"iterations": t + 1, **self._metrics(x)})
        return rows

    # ---------------------------------------------------------------------------- greedy

    def _fit_greedy(self, state: dict[str, Any] | None, budget: list[float]) -> UnrolledNet:
        cfg, settings = self.config, self.settings
        dc = settings.dc.build()
        train = self._samples(0)
        blocks: list[ReconCNN] = []
        if state is not None:
            specs = json.loads(state["architectures"])
            for t, spec in enumerate(specs):
                block = ReconCNN.from_architecture(spec)
                prefix = f"{t}."
                block.load_state_dict(
                    {
                        k[len(prefix) :]: v
                        for k, v in state["blocks"].items()
                        if k.startswith(prefix)
                    }
                )
                blocks.append(block.to(self.device))
        x_train, x_val = train.x0, self.val_samples.x0
        for block in blocks:
            x_train = self._advance(block, dc, x_train, train)
            x_val = self._advance(block, dc, x_val, self.val_samples)
        for t in range(len(blocks), settings.iterations):
            if budget[0] <= 0:
                raise TrainingStopped
            began = time.perf_counter()
            if cfg.method == "layerwise-convex":
                block = self._convex_iteration(t, dc, x_train, x_val, train)
            else:
                block = self._nonconvex_iteration(t, dc, x_train, x_val, train)
            blocks.append(block)
            x_train = self._advance(block, dc, x_train, train)
            x_val = self._advance(block, dc, x_val, self.val_samples)
            metrics = self._metrics(x_val)
            self.depth_metrics.append({"iterations": t + 1, **metrics})
            log.info("iteration %d: val PSNR %.2f dB", t + 1, metrics["val_psnr"])
            self._save(
                {
                    "method": cfg.method,
                    "stage": t + 1,
                    "epoch": 0,
                    "architectures": json.dumps([b.architecture() for b in blocks]),
                    "blocks": {
                        f"{i}.{k}": v.detach().cpu()
                        for i, b in enumerate(blocks)
                        for k, v in b.state_dict().items()
                    },
                    "seconds": time.perf_counter() - began,
                }
            )
            budget[0] -= 1
        return UnrolledNet([b.cpu() for b in blocks], dc)

    def _residual(self, dc: DataConsistency, x: Tensor, samples: Sample) -> Tensor:
        """``x* - DC(x)`` for every image: what iteration t's regulariser must explain."""
        assert samples.target is not None
        return samples.target - self._advance(torch.nn.Identity(), dc, x, samples)

    def _nonconvex_iteration(
        self, t: int, dc: DataConsistency, x_train: Tensor, x_val: Tensor, train: Sample
    ) -> ReconCNN:
        """Iteration t by backpropagation on the fixed previous iterate (GLEAM-style)."""
        cfg, settings = self.config, self.settings
        assert train.target is not None
        torch.manual_seed(derived_seed(cfg.seed, t, 8))
        block = ReconCNN.relu(2, settings.channels, settings.kernel_size, ndim=self.ndim)
        block = block.to(self.device)
        optimizer, scheduler = make_optimizer(block.parameters(), cfg.optim)
        for epoch in range(cfg.optim.epochs):
            began = time.perf_counter()
            block.train()
            losses = []
            for index in epoch_batches(len(train), cfg.optim.batch_size, cfg.seed, t + 1, epoch):
                index = distributed.batch_part(index)
                if len(index) == 0:
                    losses.append(distributed.idle_step(block.parameters(), optimizer))
                    continue
                batch = _take(train, index, self.device)
                assert batch.target is not None
                op = recon_sense(batch.maps, batch.mask, tuple(batch.x0.shape[2:]), self.ndim)
                z = _complex(block(x_train[index].to(self.device)))
                pred = _channels(dc(z, op, op.H(batch.y)))
                losses.append(_step(optimizer, pred, batch.target))
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row = {
                "method": cfg.method,
                "stage": t + 1,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": sum(losses) / len(losses),
                **self._metrics(self._advance(block, dc, x_val, self.val_samples)),
                "seconds": time.perf_counter() - began,
            }
            self._record(row, t * cfg.optim.epochs + epoch + 1)
        return block

    def _convex_iteration(
        self, t: int, dc: DataConsistency, x_train: Tensor, x_val: Tensor, train: Sample
    ) -> ReconCNN:
        """Iteration t as a certified convex program along the beta path, keeping the beta
        with the best validation PSNR (`CertifiedConfig`); every beta is recorded."""
        cfg, settings, certified = self.config, self.settings, self.config.certified
        stage_config = ConvexStageConfig(
            patterns=settings.channels // 2,
            kernel_size=settings.kernel_size,
            output_groups="frobenius",
            gate_seed=derived_seed(cfg.seed, t, 7),
            active_fraction=cfg.convex.active_fraction,
        )
        stage = ConvexStage(2, 2, stage_config, self.ndim).to(self.device)
        stage.init_gates(x_train[:16].to(self.device))
        residual = self._residual(dc, x_train, train)
        # Each process sums over its share of the images (`cvxmri.distributed.shard`).
        xs, rs, maps, masks = (
            distributed.shard(t) for t in (x_train, residual, train.maps, train.mask)
        )
        data = []
        for start in range(0, len(xs), IMAGE_CHUNK):
            part = slice(start, start + IMAGE_CHUNK)
            x = xs[part].to(self.device)
            data.append(
                IterationData(
                    x,
                    rs[part].to(self.device),
                    stage.pattern_gates(x),
                    maps[part].to(self.device),
                    masks[part].to(self.device),
                )
            )
        began = time.perf_counter()
        total = int(distributed.sum_floats(len(xs))[0])
        step = math.ceil(total / settings.gram_images) if settings.gram_images else 1
        solver = IterationSolver(
            stage,
            data,
            dc,
            tol=certified.tol,
            max_seconds=certified.seconds or math.inf,
            max_iterations=certified.max_iterations,
            model_step=step,
        )
        largest = solver.beta_max()
        log.info(
            "iteration %d: Gram of %d unknowns built on %d of %d images in %.1f s, beta_max %.4g",
            t + 1,
            solver.unknowns,
            solver.system.count,
            total,
            solver.setup_seconds,
            largest,
        )
        best: tuple[float, dict[str, Tensor], dict[str, Any]] | None = None
        # The whole path (not `CertifiedConfig.path_done`): its betas share one Gram
        # matrix and cost a second or two each, and small gains compound over iterations.
        worse = 0
        for position, fraction in enumerate(settings.betas):
            beta = fraction * largest
            trace: list[list[float]] = []
            cert = solver.solve(beta, trace)
            first, last = gated_layers(stage)
            block = ReconCNN([first], last).to(self.device)
            metrics = self._metrics(self._advance(block, dc, x_val, self.val_samples))
            seconds = time.perf_counter() - began
            began = time.perf_counter()
            record = {
                "stage": t + 1,
                "path_index": position + 1,
                "beta": beta,
                "beta_fraction": fraction,
                "route": "dc-gram",
                **cert,
                "val_psnr": metrics["val_psnr"],
                "certified": cert["relative_gap"] <= certified.tol,
                "trace": trace,
            }
            self.certificates.append(record)
            self._record(
                {
                    "method": cfg.method,
                    "stage": t + 1,
                    "epoch": position + 1,
                    "beta": beta,
                    **metrics,
                    **{f"cert_{k}": v for k, v in cert.items()},
                    "seconds": seconds,
                },
                t * len(settings.betas) + position + 1,
            )
            if best is None or metrics["val_psnr"] > best[0]:
                saved = {k: v.detach().clone() for k, v in stage.state_dict().items()}
                best, worse = (metrics["val_psnr"], saved, record), 0
            else:
                worse += 1
                if worse >= 2:
                    break
        assert best is not None
        _, saved, record = best
        stage.load_state_dict(saved)
        stage.config = replace(stage.config, beta=record["beta"])
        record["selected"] = True
        log.info(
            "iteration %d: beta %.4g selected, relative gap %.2e",
            t + 1,
            record["beta"],
            record["relative_gap"],
        )
        first, last = gated_layers(stage)
        return ReconCNN([first], last).to(self.device)


def unrolled_forward(
    model: UnrolledNet, x0: Tensor, y: Tensor, mask: Tensor, maps: Tensor, checkpointing: bool
) -> Tensor:
    """``model(x0, y, mask, maps)``, with each iteration checkpointed
    (``torch.utils.checkpoint``: only its input is kept, the iteration is recomputed in the
    backward pass) when ``checkpointing``; end-to-end training's forward pass."""
    if not checkpointing:
        return model(x0, y, mask, maps)
    op = model.operator(x0, mask, maps)
    aty = op.H(y)
    x = x0

    def iteration(block: ReconCNN, z: Tensor) -> Tensor:
        return _channels(model.dc(_complex(block(z)), op, aty))

    for block in model.blocks:
        x = checkpoint(iteration, block, x, use_reentrant=False)
    return x


def _step(optimizer: torch.optim.Optimizer, pred: Tensor, target: Tensor) -> float:
    """One optimiser step on ``0.5 ||pred - x*||^2 / B`` (the loss of `end_to_end_step`)
    for a prediction computed with autograd, gradients averaged across processes
    (`cvxmri.distributed.average_gradients`); the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.5 * (pred - target).pow(2).sum() / len(pred)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    result = distributed.average_gradients(params, len(pred), loss)
    optimizer.step()
    return result


def _take(samples: Sample, index: Tensor, device: torch.device) -> Sample:
    """The slices ``index`` of ``samples`` on ``device`` (tensors only; ids follow)."""
    picked = index.tolist()
    return Sample(
        y=samples.y[index].to(device),
        mask=samples.mask[index].to(device),
        maps=samples.maps[index].to(device),
        x0=samples.x0[index].to(device),
        target=None if samples.target is None else samples.target[index].to(device),
        reference=None,
        scale=samples.scale[index].to(device),
        support=samples.support[index].to(device),
        recon_shape=samples.recon_shape,
        volume=[samples.volume[i] for i in picked],
        slice_index=[samples.slice_index[i] for i in picked],
    )
