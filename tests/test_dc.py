"""Data consistency and conjugate gradients: fixed points, affinity, a direct solve,
gradients against finite differences, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from cvxmri.errors import CvxmriError
from cvxmri.models.dc import ChebyshevDC, DCConfig, DirectDC, GradientDC, ProximalDC
from cvxmri.physics import (
    chebyshev,
    conjugate_gradient,
    line_inverse,
    line_normals,
    recon_sense,
)


def problem(ndim: int, dtype: torch.dtype = torch.complex128, crop: bool = True):
    """A random multi-coil problem: maps of unit root-sum-of-squares, a random mask, the
    operator on a (possibly cropped) reconstruction matrix and an image."""
    gen = torch.Generator().manual_seed(ndim)
    grid = (6, 8) if ndim == 2 else (4, 6, 5)
    shape = tuple(g - 2 for g in grid) if crop else grid
    maps = torch.randn(2, 3, *grid, dtype=dtype, generator=gen)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
    mask = (torch.rand(2, 1, *grid, generator=gen) < 0.4).to(dtype.to_real())
    op = recon_sense(maps, mask, shape, ndim)
    x = torch.randn(2, *shape, dtype=dtype, generator=gen)
    return op, x


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dc", [GradientDC(1.5), ProximalDC(0.05, 60), ChebyshevDC(0.05, 80)])
def test_consistent_image_is_a_fixed_point(ndim, dc):
    op, x = problem(ndim)
    aty = op.H(op(x))  # data measured from x itself, without noise
    assert torch.allclose(dc(x, op, aty), x, atol=1e-9)
    # An image that disagrees with the data moves.
    assert not torch.allclose(dc(2 * x, op, aty), 2 * x, atol=1e-3)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dc", [GradientDC(0.7), ProximalDC(0.1, 60), ChebyshevDC(0.1, 3)])
def test_dc_is_affine_with_its_linear_part(ndim, dc):
    op, x = problem(ndim)
    gen = torch.Generator().manual_seed(5)
    aty = op.H(torch.randn(op(x).shape, dtype=x.dtype, generator=gen))
    z1, z2 = torch.randn(2, *x.shape, dtype=x.dtype, generator=gen)
    a = 0.3
    mixed = dc(a * z1 + (1 - a) * z2, op, aty)
    assert torch.allclose(mixed, a * dc(z1, op, aty) + (1 - a) * dc(z2, op, aty), atol=1e-8)
    # DC(z) = DC(0) + L z, with L complex-linear.
    assert torch.allclose(dc(z1, op, aty), dc.offset(op, aty) + dc.linear(z1, op), atol=1e-8)
    assert torch.allclose(dc.linear(1j * z1, op), 1j * dc.linear(z1, op), atol=1e-8)


def explicit_normal(op, shape, dtype):
    """The matrix of ``A^H A`` of batch item 0, column by column."""
    n = int(torch.tensor(shape).prod())
    columns = []
    for j in range(n):
        e = torch.zeros(2, n, dtype=dtype)
        e[0, j] = 1
        columns.append(op.N(e.view(2, *shape))[0].flatten())
    return torch.stack(columns, dim=1)


def test_cg_matches_a_direct_solve():
    op, x = problem(2)
    lamda = 0.05
    normal = explicit_normal(op, x.shape[1:], x.dtype)
    rhs = x
    solved = conjugate_gradient(lambda v: op.N(v) + lamda * v, rhs, 100)
    direct = torch.linalg.solve(
        normal + lamda * torch.eye(len(normal), dtype=x.dtype), x[0].flatten()
    )
    assert torch.allclose(solved[0].flatten(), direct, atol=1e-10)
    # With too few iterations it is not there yet: the test can fail.
    short = conjugate_gradient(lambda v: op.N(v) + lamda * v, rhs, 2)
    assert not torch.allclose(short[0].flatten(), direct, atol=1e-3)


def test_chebyshev_is_within_its_bound_of_a_direct_solve():
    op, x = problem(2)
    lamda = 0.05
    h = explicit_normal(op, x.shape[1:], x.dtype) + lamda * torch.eye(x[0].numel(), dtype=x.dtype)
    direct = torch.linalg.solve(h, x[0].flatten())

    def h_norm(v):
        return float(torch.sqrt((v.conj() @ h @ v).real))

    q = (((1 + lamda) / lamda) ** 0.5 - 1) / (((1 + lamda) / lamda) ** 0.5 + 1)
    for steps in (3, 10, 40):
        solved = chebyshev(lambda v: op.N(v) + lamda * v, x, steps, lamda, 1 + lamda)
        error = h_norm(solved[0].flatten() - direct) / h_norm(direct)
        bound = 2 * q**steps / (1 + q ** (2 * steps))
        assert error <= bound * (1 + 1e-9)
        if steps == 3:  # not converged yet: the test can fail
            assert error > 1e-3
    assert h_norm(solved[0].flatten() - direct) / h_norm(direct) < 1e-6


@pytest.mark.parametrize("ndim", [2, 3])
def test_chebyshev_dc_is_linear_and_self_adjoint_where_cg_is_not(ndim):
    """Greedy convex training needs ``L`` exactly linear, and its lean Gram route
    self-adjoint: true of the Chebyshev polynomial at any degree, not of a few CG steps."""
    op, x = problem(ndim)
    gen = torch.Generator().manual_seed(7)
    u, v = torch.randn(2, *x.shape, dtype=x.dtype, generator=gen)
    cheb, cg = ChebyshevDC(0.05, 4), ProximalDC(0.05, 4)
    assert ChebyshevDC.self_adjoint and not ProximalDC.self_adjoint
    assert torch.allclose(cheb.linear(u + v, op), cheb.linear(u, op) + cheb.linear(v, op))
    assert not torch.allclose(cg.linear(u + v, op), cg.linear(u, op) + cg.linear(v, op), atol=1e-4)
    left = (cheb.linear(u, op).conj() * v).sum()
    right = (u.conj() * cheb.linear(v, op)).sum()
    assert torch.allclose(left, right, rtol=1e-12, atol=1e-12)


def cartesian_problem(crop: bool = True, dtype: torch.dtype = torch.complex128):
    """`problem` in 2D with a 1D Cartesian mask: random phase-encoding lines per item,
    constant along the readout (the first image axis)."""
    gen = torch.Generator().manual_seed(11)
    grid = (8, 10)
    shape = (6, 7) if crop else grid
    maps = torch.randn(2, 3, *grid, dtype=dtype, generator=gen)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
    lines = (torch.rand(2, 1, 1, grid[1], generator=gen) < 0.4).to(dtype.to_real())
    op = recon_sense(maps, lines.expand(2, 1, *grid), shape, 2)
    return op, torch.randn(2, *shape, dtype=dtype, generator=gen)


@pytest.mark.parametrize("crop", [False, True])
def test_direct_dc_is_the_exact_proximal_step(crop):
    """The per-line matrices are ``A^H A`` (against its explicit matrix), and `DirectDC`
    equals a dense solve of the proximal step, keeps a consistent image, is affine,
    self-adjoint, one operator's step for many images, and differentiable."""
    op, x = cartesian_problem(crop)
    lamda = 0.05
    normal = explicit_normal(op, x.shape[1:], x.dtype)
    lines = line_normals(op)[0]  # (h, w, w): block-diagonal over readout positions
    assert torch.allclose(torch.block_diag(*lines), normal, atol=1e-12)
    dc = DirectDC(lamda)
    gen = torch.Generator().manual_seed(3)
    aty = op.H(torch.randn(op(x).shape, dtype=x.dtype, generator=gen))
    h = normal + lamda * torch.eye(len(normal), dtype=x.dtype)
    dense = torch.linalg.solve(h, (aty[0] + lamda * x[0]).flatten())
    assert torch.allclose(dc(x, op, aty)[0].flatten(), dense, atol=1e-10)
    assert torch.allclose(dc(x, op, op.H(op(x))), x, atol=1e-10)
    u, v = torch.randn(2, *x.shape, dtype=x.dtype, generator=gen)
    assert torch.allclose(dc(u, op, aty), dc.offset(op, aty) + dc.linear(u, op), atol=1e-12)
    left, right = (dc.linear(u, op).conj() * v).sum(), (u.conj() * dc.linear(v, op)).sum()
    assert torch.allclose(left, right, rtol=1e-12, atol=1e-12)
    sense = op.outer if crop else op
    single = recon_sense(sense.maps[:1], sense.mask[:1], x.shape[1:])
    many = torch.randn(5, *x.shape[1:], dtype=x.dtype, generator=gen)
    assert torch.allclose(
        dc.linear(many, single), ProximalDC(lamda, 200).linear(many, single), atol=1e-9
    )
    z = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: dc(w, op, aty), (z,), eps=1e-6, atol=1e-6)


def test_line_inverses_are_kept_per_image_and_never_stale():
    """Another operator of the same images finds their inverses again; a changed mask or
    coil map, a new ``lamda`` or dtype computes its own (a hit must be exact)."""
    op, x = cartesian_problem(crop=False)
    first = line_inverse(op, 0.05)
    # The same operator gets its list back without looking the images up.
    assert line_inverse(op, 0.05) is first
    again = line_inverse(recon_sense(op.maps.clone(), op.mask.clone(), x.shape[1:]), 0.05)
    assert all(a is b for a, b in zip(first, again, strict=True))
    # Batch item 1 alone: its own inverse, found by content.
    alone = line_inverse(recon_sense(op.maps[1:], op.mask[1:], x.shape[1:]), 0.05)
    assert alone[0] is first[1]
    mask = op.mask.clone()
    mask[..., 0] = 1 - mask[..., 0]
    maps = op.maps.clone()
    maps[:, :, 0, 0] *= 2
    for other, lamda in (
        (recon_sense(op.maps, mask, x.shape[1:]), 0.05),
        (recon_sense(maps, op.mask, x.shape[1:]), 0.05),
        (op, 0.1),
    ):
        fresh = line_inverse(other, lamda)
        normal = explicit_normal(other, x.shape[1:], x.dtype)
        dense = torch.linalg.inv(normal + lamda * torch.eye(len(normal), dtype=x.dtype))
        assert torch.allclose(torch.block_diag(*fresh[0]), dense, atol=1e-10)
        assert fresh[0] is not first[0]
    single = line_inverse(
        recon_sense(op.maps.to(torch.complex64), op.mask.float(), x.shape[1:]), 0.05
    )
    assert single[0].dtype == torch.complex64


def test_direct_dc_refuses_masks_that_vary_along_the_readout():
    op, x = problem(2)
    with pytest.raises(CvxmriError, match="constant along the readout"):
        DirectDC(0.05).linear(x, op)
    volume, v = problem(3)
    with pytest.raises(CvxmriError, match="2D SENSE operator"):
        DirectDC(0.05).linear(v, volume)


def test_cg_items_are_independent_and_stop_at_tol():
    op, x = problem(2)
    apply = lambda v: op.N(v) + 0.1 * v  # noqa: E731
    both = conjugate_gradient(apply, x, 5)
    first = conjugate_gradient(lambda v: apply_one(op, v), x[:1], 5)
    assert torch.allclose(both[:1], first, atol=1e-12)
    early = conjugate_gradient(apply, x, 500, tol=1e-6)
    residual = torch.linalg.vector_norm((apply(early) - x).flatten(1), dim=1)
    assert bool((residual <= 1e-6 * torch.linalg.vector_norm(x.flatten(1), dim=1)).all())


def apply_one(op, v):
    """``(A^H A + 0.1) v`` for batch item 0 alone (its own operator)."""
    single = recon_sense(op.outer.maps[:1], op.outer.mask[:1], v.shape[1:])
    return single.N(v) + 0.1 * v


@pytest.mark.parametrize("dc", [GradientDC(1.2), ProximalDC(0.2, 4), ChebyshevDC(0.2, 4)])
def test_gradients_match_finite_differences(dc):
    op, x = problem(2, crop=False)
    aty = op.H(op(torch.randn_like(x)))
    z = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: dc(v, op, aty), (z,), eps=1e-6, atol=1e-6)


def test_dc_config_builds_and_refuses_bad_settings():
    assert isinstance(DCConfig().build(), GradientDC)
    built = DCConfig(kind="cg", lamda=0.2, cg_iterations=3).build()
    assert isinstance(built, ProximalDC) and built.config() == DCConfig("cg", 1.5, 0.2, 3)
    built = DCConfig(kind="chebyshev", lamda=0.1, cg_iterations=7).build()
    assert isinstance(built, ChebyshevDC)
    assert built.config() == DCConfig("chebyshev", 1.5, 0.1, 7)
    built = DCConfig(kind="direct", lamda=0.02).build()
    assert isinstance(built, DirectDC) and built.config().lamda == 0.02
    with pytest.raises(CvxmriError, match=r"dc\.eta=2\.5"):
        DCConfig(eta=2.5).validate()
    with pytest.raises(CvxmriError, match=r"dc\.kind='admm'"):
        DCConfig(kind="admm").validate()
