"""Batched conjugate gradients and Chebyshev iteration for Hermitian positive definite
systems ``H x = b``.

One system per batch item: the step lengths are computed per item (reductions over all
axes but the first), so the items of a batch do not interact, as if each were solved
alone. The iteration count is fixed (optionally stopping earlier once every item's
residual is below ``tol`` times its right-hand side), so the solver can sit inside a
network and be differentiated by autograd, as in MoDL and BART's ``reconet``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-item ``<a, b> = sum conj(a) b`` over every axis but the first, shaped to broadcast."""
    value = (a.conj() * b).flatten(1).sum(dim=1)
    return value.view(-1, *([1] * (a.ndim - 1)))


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    iterations: int,
    start: Tensor | None = None,
    tol: float = 0.0,
) -> Tensor:
    """Solve ``apply(x) = rhs`` for each batch item by conjugate gradients.

    Args:
        apply: the Hermitian positive definite operator, batched: (B, ...) -> (B, ...).
        rhs: the right-hand sides (B, ...), real or complex.
        iterations: the number of iterations (at most).
        start: the initial guess (zero when None).
        tol: stop once every item's residual norm is at most ``tol`` times its
            right-hand side's (0: always run ``iterations``).

    Returns:
        The approximate solutions (B, ...).

    >>> import torch
    >>> h = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> x = conjugate_gradient(lambda v: v @ h, torch.tensor([[1.0, 2.0]]), 2)
    >>> torch.allclose(x @ h, torch.tensor([[1.0, 2.0]]), atol=1e-6)
    True
    """
    x = torch.zeros_like(rhs) if start is None else start
    residual = rhs - apply(x) if start is not None else rhs
    direction = residual
    rs = _dot(residual, residual).real
    threshold = (tol**2) * _dot(rhs, rhs).real
    for _ in range(iterations):
        if tol > 0 and bool((rs <= threshold).all()):
            break
        hp = apply(direction)
        curvature = _dot(direction, hp).real
        # An item already solved exactly has a zero direction: keep it where it is.
        alpha = torch.where(curvature > 0, rs / curvature.clamp_min(1e-30), 0.0)
        x = x + alpha * direction
        residual = residual - alpha * hp
        rs_next = _dot(residual, residual).real
        direction = residual + torch.where(rs > 0, rs_next / rs.clamp_min(1e-30), 0.0) * direction
        rs = rs_next
    return x


def chebyshev(
    apply: Callable[[Tensor], Tensor], rhs: Tensor, iterations: int, low: float, high: float
) -> Tensor:
    """``p(H) rhs`` for the fixed polynomial ``p`` of ``iterations`` Chebyshev steps that
    approximates ``H^{-1}`` on the spectrum bound ``[low, high]`` (``0 < low < high``).

    Unlike conjugate gradients, whose step lengths depend on the right-hand side, every
    coefficient is fixed by the bounds: the result is exactly linear in ``rhs``, and
    self-adjoint for a Hermitian ``H``. The error in ``H``-norm is at most
    ``2 q^k / (1 + q^(2k))`` of the solution's, ``q = (sqrt(c) - 1) / (sqrt(c) + 1)``,
    ``c = high / low``, after ``k`` iterations (Saad, Iterative Methods for Sparse Linear
    Systems, 2nd ed., section 12.3); CG is never worse.

    >>> import torch
    >>> h = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> x = chebyshev(lambda v: v @ h, b, 30, 2.0, 5.0)
    >>> torch.allclose(x @ h, b)
    True
    """
    if not 0 < low < high:
        raise ValueError(f"chebyshev needs 0 < low < high, got low={low}, high={high}")
    centre, half_width = (high + low) / 2, (high - low) / 2
    sigma = centre / half_width
    rho = 1 / sigma
    direction = rhs / centre
    x = torch.zeros_like(rhs)
    residual = rhs
    for step in range(iterations):
        x = x + direction
        if step + 1 == iterations:
            break
        residual = residual - apply(direction)
        following = 1 / (2 * sigma - rho)
        direction = (following * rho) * direction + (2 * following / half_width) * residual
        rho = following
    return x
