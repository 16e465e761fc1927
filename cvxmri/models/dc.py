"""Data consistency: pull an image estimate back towards the measured k-space.

With ``A`` the SENSE operator of the reconstruction matrix (`cvxmri.physics.recon_sense`)
and ``y`` the measured k-space, two steps are offered, both affine in the estimate ``z``:

- `GradientDC`: one gradient step on ``1/2 ||A z - y||^2``,
  ``DC(z) = z - eta A^H (A z - y)``;
- `ProximalDC` (CG-SENSE): the proximal step
  ``DC(z) = (A^H A + lamda I)^{-1} (A^H y + lamda z)``, solved by a fixed number of
  conjugate-gradient iterations from zero (MoDL's data-consistency layer);
- `ChebyshevDC`: the same proximal step, solved by a fixed Chebyshev polynomial of
  ``A^H A`` on its known spectrum ``[0, 1]``;
- `DirectDC`: the same proximal step solved exactly, where the mask is constant along the
  readout (2D, 1D Cartesian undersampling): ``A^H A`` is then one small matrix per readout
  line, inverted once per image and kept.

Being affine, ``DC(z) = DC(0) + L z`` with a linear part ``L`` (`DataConsistency.linear`):
``L = I - eta A^H A`` or ``L = lamda (A^H A + lamda I)^{-1}``. CG is affine only up to its
residual (its step lengths depend on the image); the gradient step, the Chebyshev
polynomial and the direct solve are exactly affine with a self-adjoint ``L``, which greedy
convex training needs. A greedy iteration of an
unrolled network, ``DC(x + R(x))`` with a fixed ``x``, is then the fixed image
``DC(x)`` plus ``L`` applied to the regulariser's output, which keeps a convex program
convex. Images are complex (B, *grid); every step runs on any device and under autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from cvxmri.errors import check_settings
from cvxmri.physics import (
    LinearOperator,
    apply_lines,
    chebyshev,
    conjugate_gradient,
    line_inverse,
)

DC_KINDS = ("gradient", "cg", "chebyshev", "direct")
# Kinds whose step is exactly affine (greedy convex training needs it).
LINEAR_DC_KINDS = ("gradient", "chebyshev", "direct")
# Mask kinds constant along the readout (`DirectDC` needs one).
LINE_MASK_KINDS = ("cartesian", "equispaced")


@dataclass(frozen=True)
class DCConfig:
    """The data-consistency step of an unrolled network.

    Attributes:
        kind: ``gradient`` (`GradientDC`), ``cg`` (`ProximalDC`), ``chebyshev``
            (`ChebyshevDC`) or ``direct`` (`DirectDC`: 2D, masks constant along the
            readout).
        eta: the gradient step length; ``A^H A`` has norm at most 1 for coil maps of unit
            root-sum-of-squares, so any ``0 < eta < 2`` is a contraction on the data term.
        lamda: the proximal weight of ``cg``, ``chebyshev`` and ``direct`` (smaller
            trusts the data more).
        cg_iterations: iterations of the proximal solve: CG steps of ``cg``, the degree of
            ``chebyshev``'s polynomial.
    """

    kind: str = "gradient"
    eta: float = 1.5
    lamda: float = 0.05
    cg_iterations: int = 10

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first invalid setting."""
        check_settings(
            "data-consistency",
            self,
            {
                "kind": (self.kind in DC_KINDS, " or ".join(DC_KINDS)),
                "eta": (0 < self.eta < 2, "in (0, 2) (a step that contracts)"),
                "lamda": (0 < self.lamda < float("inf"), "> 0 and finite"),
                "cg_iterations": (self.cg_iterations >= 1, ">= 1"),
            },
            "dc.",
        )

    def build(self) -> DataConsistency:
        """The module of this setting."""
        self.validate()
        if self.kind == "gradient":
            return GradientDC(self.eta)
        if self.kind == "chebyshev":
            return ChebyshevDC(self.lamda, self.cg_iterations)
        if self.kind == "direct":
            return DirectDC(self.lamda)
        return ProximalDC(self.lamda, self.cg_iterations)


class DataConsistency(nn.Module):
    """An affine data-consistency step ``z -> DC(z) = DC(0) + L z`` (see the module
    docstring). Subclasses define `linear` and `offset`, and say whether ``L`` is
    self-adjoint (``self_adjoint``), which lets a Gram matrix ``(L u)^H (L v)`` be computed
    as ``u^H (L^2 v)``."""

    self_adjoint = False

    def forward(self, z: Tensor, op: LinearOperator, aty: Tensor) -> Tensor:
        """``DC(z)`` for complex images ``z`` (B, *grid), the operator ``A`` and ``A^H y``."""
        return self.offset(op, aty) + self.linear(z, op)

    def linear(self, z: Tensor, op: LinearOperator) -> Tensor:
        """The linear part ``L z``."""
        raise NotImplementedError

    def offset(self, op: LinearOperator, aty: Tensor) -> Tensor:
        """``DC(0)``: where the step takes the zero image."""
        raise NotImplementedError

    def config(self) -> DCConfig:
        """The setting that builds this module."""
        raise NotImplementedError


class GradientDC(DataConsistency):
    """``DC(z) = z - eta A^H (A z - y)``: ``L = I - eta A^H A`` (self-adjoint),
    ``DC(0) = eta A^H y``."""

    self_adjoint = True

    def __init__(self, eta: float) -> None:
        super().__init__()
        self.eta = eta

    def forward(self, z: Tensor, op: LinearOperator, aty: Tensor) -> Tensor:
        """``z - eta (A^H A z - A^H y)`` (one normal-operator product)."""
        return z - self.eta * (op.N(z) - aty)

    def linear(self, z: Tensor, op: LinearOperator) -> Tensor:
        """``z - eta A^H A z``."""
        return z - self.eta * op.N(z)

    def offset(self, op: LinearOperator, aty: Tensor) -> Tensor:
        """``eta A^H y``."""
        return self.eta * aty

    def config(self) -> DCConfig:
        """``DCConfig(kind="gradient", eta=eta)``."""
        return DCConfig(kind="gradient", eta=self.eta)


class ProximalDC(DataConsistency):
    """``DC(z) = (A^H A + lamda I)^{-1} (A^H y + lamda z)`` by ``iterations`` conjugate
    gradient steps from zero (affine up to the solver's residual)."""

    def __init__(self, lamda: float, iterations: int) -> None:
        super().__init__()
        self.lamda = lamda
        self.iterations = iterations

    def _solve(self, rhs: Tensor, op: LinearOperator) -> Tensor:
        return conjugate_gradient(lambda v: op.N(v) + self.lamda * v, rhs, self.iterations)

    def forward(self, z: Tensor, op: LinearOperator, aty: Tensor) -> Tensor:
        """One solve with right-hand side ``A^H y + lamda z``."""
        return self._solve(aty + self.lamda * z, op)

    def linear(self, z: Tensor, op: LinearOperator) -> Tensor:
        """``lamda (A^H A + lamda I)^{-1} z``."""
        return self._solve(self.lamda * z, op)

    def offset(self, op: LinearOperator, aty: Tensor) -> Tensor:
        """``(A^H A + lamda I)^{-1} A^H y``."""
        return self._solve(aty, op)

    def config(self) -> DCConfig:
        """``DCConfig(kind="cg", lamda=lamda, cg_iterations=iterations)``."""
        return DCConfig(kind="cg", lamda=self.lamda, cg_iterations=self.iterations)


class ChebyshevDC(ProximalDC):
    """`ProximalDC`'s step ``(A^H A + lamda I)^{-1} (A^H y + lamda z)`` by a fixed
    Chebyshev polynomial (`cvxmri.physics.chebyshev`) on the spectrum bound
    ``[lamda, 1 + lamda]`` of ``A^H A + lamda I`` (``A^H A`` has norm at most 1 for coil
    maps of unit root-sum-of-squares): exactly affine, ``L`` self-adjoint. Its error after
    ``k`` steps is at most ``2 q^k`` of the solution's, ``q = (sqrt(c) - 1) / (sqrt(c) +
    1)``, ``c = (1 + lamda) / lamda`` (0.012 at ``lamda`` 0.05 and 10 steps); CG, which
    adapts to the image, is usually closer."""

    self_adjoint = True

    def _solve(self, rhs: Tensor, op: LinearOperator) -> Tensor:
        return chebyshev(
            lambda v: op.N(v) + self.lamda * v, rhs, self.iterations, self.lamda, 1 + self.lamda
        )

    def config(self) -> DCConfig:
        """``DCConfig(kind="chebyshev", lamda=lamda, cg_iterations=iterations)``."""
        return DCConfig(kind="chebyshev", lamda=self.lamda, cg_iterations=self.iterations)


class DirectDC(ProximalDC):
    """`ProximalDC`'s step ``(A^H A + lamda I)^{-1} (A^H y + lamda z)`` solved exactly, for
    2D images and a mask constant along the readout (1D Cartesian undersampling): there
    ``A^H A`` is one ``w x w`` matrix per readout line (`cvxmri.physics.line_normals`),
    whose regularised inverses are computed once per image by Cholesky and kept
    (`cvxmri.physics.line_inverse`); every step is then one small matrix product per line.
    Exactly affine, ``L`` self-adjoint. Other operators are refused with `CvxmriError`."""

    self_adjoint = True

    def __init__(self, lamda: float) -> None:
        super().__init__(lamda, 0)

    def _solve(self, rhs: Tensor, op: LinearOperator) -> Tensor:
        return apply_lines(line_inverse(op, self.lamda), rhs)

    def config(self) -> DCConfig:
        """``DCConfig(kind="direct", lamda=lamda)``."""
        return DCConfig(kind="direct", lamda=self.lamda)
