"""Full-batch FISTA for the gated-ReLU group lasso of one stage (docs/method.md).

``min_v L(v) + beta sum_g ||v_g||`` with the mean-scaled data term
``L(v) = 1/(2N) sum_n ||A_n v - r_n||^2`` and ``A_n v = sum_p D_p(X_n) * conv(X_n, v_p)``.
The model is linear in ``v``, so each iteration costs one forward convolution (``A x``)
and one weight-gradient convolution (``A^T e``); the prediction at the extrapolated point
follows from linearity, ``A y = A x_k + m (A x_k - A x_{k-1})``, and the certificate reuses
the predictions at the iterate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cvxmri import distributed
from cvxmri.errors import CvxmriError
from cvxmri.models.convex import (
    ConvexStage,
    _certificate,
    group_norms_of,
    group_soft_threshold,
)

# Power iteration under-estimates the largest eigenvalue; the step uses a slight
# over-estimate so that 1/L stays a valid FISTA step.
LIPSCHITZ_MARGIN = 1.05
# Step halvings (see fista) before giving up: 2^-60 of the estimated step is no step at all.
MAX_STEP_HALVINGS = 60

_Batch = tuple[Tensor, Tensor, Tensor | None]


def _prepare(
    stage: ConvexStage, batches: Sequence[tuple[Tensor, Tensor]], cache_gates: bool
) -> list[_Batch]:
    if len(batches) == 0:
        raise CvxmriError("the training set is empty: no (x, r) batches")
    # Cached as bool (1 byte per pixel and pattern): the gate convolution would otherwise be
    # repeated at every iteration for the same, fixed patterns.
    return [(x, r, stage.gates(x).bool() if cache_gates else None) for x, r in batches]


def _count(data: list[_Batch]) -> int:
    """The number of images in ``data``, on every process together."""
    return int(distributed.sum_floats(sum(x.shape[0] for x, _, _ in data))[0])


def _lipschitz(stage: ConvexStage, data: list[_Batch], iterations: int) -> float:
    weight = stage.effective_weight().detach()
    count = _count(data)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(weight.shape, generator=gen, dtype=torch.float64).to(weight)
    u /= torch.linalg.vector_norm(u)
    estimate = 0.0
    with torch.no_grad():
        for _ in range(max(1, iterations)):
            # H u = (1/N) A^T A u = grad L(u) - grad L(0): the Hessian of the data term.
            hu = sum(stage.apply_adjoint(x, stage.apply_weight(x, u, d), d) for x, _, d in data)
            hu = distributed.all_reduce_(hu) / count
            estimate = float((u * hu).sum())  # Rayleigh quotient, ||u|| = 1
            norm = torch.linalg.vector_norm(hu)
            if float(norm) == 0:
                return 0.0
            u = hu / norm
    return LIPSCHITZ_MARGIN * estimate


def lipschitz_constant(
    stage: ConvexStage,
    batches: Sequence[tuple[Tensor, Tensor]],
    iterations: int = 30,
    *,
    cache_gates: bool = True,
) -> float:
    """A slight over-estimate (x1.05) of the Lipschitz constant of ``grad L`` of the gated model.

    Power iteration on the Hessian ``(1/N) A^T A`` of the mean-scaled data term (it does not
    depend on ``v`` or ``r``), from a seeded random start. ``cache_gates`` keeps the 0/1
    patterns of every batch (bool) instead of recomputing them at each iteration.
    """
    return _lipschitz(stage, _prepare(stage, batches, cache_gates), iterations)


def fista(
    stage: ConvexStage,
    batches: Sequence[tuple[Tensor, Tensor]],
    iterations: int,
    tol: float = 0.0,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    check_every: int = 10,
    *,
    cache_gates: bool = True,
) -> dict[str, float]:
    """Solve the stage's gated program on the fixed training set ``batches`` with FISTA.

    Accelerated proximal gradient from the current ``stage.v`` (warm start): a gradient step
    on ``L`` with step ``1/L_c`` (`lipschitz_constant`), then group soft-thresholding
    ``v_g <- v_g * max(0, 1 - beta / (L_c ||v_g||))`` over the stage's groups. Momentum is
    reset when the step and the momentum disagree (gradient restart, O'Donoghue & Candes
    2015); if a momentum-free step increases the objective the step is halved (the power
    iteration under-estimated ``L_c`` by more than a factor 2). Every ``check_every``
    iterations `duality_gap` is evaluated, passed to ``callback(iteration, certificate)``, and
    the run stops once ``relative_gap <= tol``. The result is written to ``stage.v``.

    Under torchrun each process passes its share of the training set
    (`cvxmri.distributed.shard`); the gradients, objective values and certificate are sums
    over all processes, so every process takes the same steps.

    Returns the last certificate plus ``iterations`` (iterations run), ``lipschitz`` (the
    constant used) and ``restarts``.
    """
    if stage.config.program != "gated":
        raise CvxmriError(
            f"fista solves the gated program only, got program={stage.config.program!r}"
        )
    if iterations < 0:
        raise CvxmriError(f"iterations must be >= 0, got {iterations}")
    if check_every < 1:
        raise CvxmriError(f"check_every must be >= 1, got {check_every}")
    if not math.isfinite(tol) or tol < 0:
        raise CvxmriError(f"tol must be a finite number >= 0, got {tol}")
    data = _prepare(stage, batches, cache_gates)
    count = _count(data)
    beta = stage.config.beta
    groups = stage.config.output_groups
    lipschitz = _lipschitz(stage, data, 30)
    if lipschitz <= 0:
        # A = 0: L is constant, any step is exact.
        lipschitz = 1.0

    def predict(weight: Tensor) -> list[Tensor]:
        return [stage.apply_weight(x, weight, d) for x, _, d in data]

    def certificate(weight: Tensor, preds: list[Tensor]) -> dict[str, float]:
        with torch.no_grad():
            stage.v.copy_(weight)
        return _certificate(stage, ((x, r, d, p) for (x, r, d), p in zip(data, preds, strict=True)))

    with torch.no_grad():
        current = stage.v.detach().clone()
        preds = predict(current)
        value = _objective(stage, current, preds, data, count)
        extrapolated, extrapolated_preds = current, preds
        momentum_t = 1.0
        plain_step = True  # the extrapolated point equals the current iterate
        restarts = halvings = 0
        done = 0
        cert: dict[str, float] | None = None
        while done < iterations:
            grad = sum(
                stage.apply_adjoint(x, p - r, d)
                for (x, r, d), p in zip(data, extrapolated_preds, strict=True)
            )
            grad = distributed.all_reduce_(grad) / count
            candidate = group_soft_threshold(
                extrapolated - grad / lipschitz, beta / lipschitz, groups
            )
            candidate_preds = predict(candidate)
            candidate_value = _objective(stage, candidate, candidate_preds, data, count)
            if plain_step and candidate_value > value + 1e-6 * abs(value):
                # A prox-gradient step with step < 2/L never increases the objective.
                lipschitz *= 2
                halvings += 1
                if halvings > MAX_STEP_HALVINGS:
                    raise CvxmriError(
                        "fista: the objective keeps increasing however small the step; "
                        "the data or weights are not finite"
                    )
                continue
            done += 1
            # Gradient restart: <y - x_{k+1}, x_{k+1} - x_k> > 0 means the momentum points
            # uphill.
            if float(((extrapolated - candidate) * (candidate - current)).sum()) > 0:
                momentum_t = 1.0
                restarts += 1
            next_t = (1 + math.sqrt(1 + 4 * momentum_t * momentum_t)) / 2
            factor = (momentum_t - 1) / next_t
            momentum_t = next_t
            plain_step = factor == 0
            extrapolated = candidate + factor * (candidate - current)
            extrapolated_preds = [
                c + factor * (c - o) for c, o in zip(candidate_preds, preds, strict=True)
            ]
            current, preds, value = candidate, candidate_preds, candidate_value
            cert = None
            if done % check_every == 0 or done == iterations:
                cert = certificate(current, preds)
                if callback is not None:
                    callback(done, cert)
                if cert["relative_gap"] <= tol:
                    break
        if cert is None:
            cert = certificate(current, preds)
            if callback is not None:
                callback(done, cert)
    return {**cert, "iterations": float(done), "lipschitz": lipschitz, "restarts": float(restarts)}


def _objective(
    stage: ConvexStage, weight: Tensor, preds: list[Tensor], data: list[_Batch], count: int
) -> float:
    """``L(weight) + beta * sum of group norms`` from the predictions ``A weight``."""
    (misfit,) = distributed.sum_floats(
        sum(
            float((p - r).double().square().sum()) for p, (_, r, _) in zip(preds, data, strict=True)
        )
    )
    norms = group_norms_of(weight, stage.config.output_groups)
    return 0.5 * misfit / count + stage.config.beta * float(norms.double().sum())
