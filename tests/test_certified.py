"""The certified solver of convex stages (cvxmri.training.certified): its Gram system against
the explicit design matrix, its prox against the optimality conditions, its optimum against
an independent solver (cvxpy), and the trainer's beta path."""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_convex import explicit_operator, group_slices, make_stage, smooth_data, with_beta
from torch import Tensor

from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStage, ConvexStageConfig, duality_gap
from cvxmri.training import certified
from cvxmri.training.certified import BlockMetric, StageSolver, gram_system
from cvxmri.training.config import CertifiedConfig, TrainConfig, preset
from cvxmri.training.trainer import Trainer

F64 = torch.float64


@pytest.mark.parametrize(
    ("groups", "code_bytes"),
    [("separate", certified.CODE_BYTES), ("frobenius", 1), ("separate", 3 * 8 * 18 * 18 + 5)],
)
def test_gram_system_is_the_explicit_normal_matrix(
    groups: str, code_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G = A_c^T A_c / N and b = A_c^T r_c / N for every output c (the outputs share the
    design), ||r||^2 / N, whatever the batches, and whatever the number of gate codes summed
    at a time (one, with ``CODE_BYTES`` 1; three, so that codes of one pixel count are
    split between products)."""
    monkeypatch.setattr(certified, "CODE_BYTES", code_bytes)
    x, r = smooth_data(3, 2, 7, seed=21)
    stage, _ = make_stage(x, patterns=3, kernel_size=3, output_groups=groups)
    a = explicit_operator(stage, x)
    batch, out, pixels = 3, 2, 49
    size = a.shape[1] // (stage.config.patterns * out)
    a = a.reshape(batch, out, pixels, stage.config.patterns, out, size)
    d = stage.pattern_gates(x)
    system = gram_system(stage, [(x[:2], r[:2], d[:2]), (x[2:], r[2:], d[2:])])
    for c in range(out):
        ac = a[:, c, :, :, c, :].reshape(batch * pixels, -1)
        rc = r[:, c].reshape(-1)
        torch.testing.assert_close(system.gram, ac.T @ ac / batch, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(system.rhs[:, c], ac.T @ rc / batch, rtol=1e-12, atol=1e-12)
    assert system.rr == pytest.approx(float(r.square().sum()) / batch, rel=1e-12)
    assert system.count == 3


@pytest.mark.parametrize("rhs_pixels", [certified.RHS_PIXELS, 7])
def test_patch_store_predicts_as_the_convolutions(
    rhs_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PatchStore.predictions` of coordinates ``a`` in the basis's first columns is the
    gated model of the weights ``Q a`` (`ConvexStage.apply_weight`), batch by batch in the
    data's order, whatever the number of pixels taken at once; a screening pass given them
    is the one that convolves."""
    monkeypatch.setattr(certified, "RHS_PIXELS", rhs_pixels)
    x, r = smooth_data(3, 2, 7, seed=25)
    stage, _ = make_stage(x, patterns=3, kernel_size=3)
    data = [(x[:2], r[:2], stage.pattern_gates(x[:2])), (x[2:], r[2:], stage.pattern_gates(x[2:]))]
    generator = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(18, 18, dtype=F64, generator=generator))
    store = certified.PatchStore(stage, data, 18)
    store.system(basis[:, :12])
    coordinates = torch.randn(3, 2, 8, dtype=F64, generator=generator)
    weight = (coordinates @ basis[:, :8].T).reshape(stage.v.shape)
    predictions = store.predictions(coordinates)
    for (xb, _, d), predicted in zip(data, predictions, strict=True):
        expected = stage.apply_weight(xb.float(), weight.float(), d)
        torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stage.v.copy_(weight)
    given = certified._screened_statistics(stage, data, predictions)
    convolved = certified._screened_statistics(stage, data)
    scale = float(convolved.gradient.abs().max())
    torch.testing.assert_close(given.gradient, convolved.gradient, rtol=1e-5, atol=1e-6 * scale)
    assert given.ee == pytest.approx(convolved.ee, rel=1e-5)


def test_solve_gram_certifies_a_close_fit() -> None:
    """Near a close fit the objective's terms (``||r||^2 = 593``, ``b^T v``, ``v^T G v``)
    cancel to 8e-4, and their rounding is far above 1e-12 of the value: it must not count
    as an increase (which made the solver double its step constant until it gave up),
    and the solve reaches a relative gap of 1e-8."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 12, dtype=F64, generator=generator)
    r = a @ torch.randn(12, 1, dtype=F64, generator=generator)
    r += 1e-3 * torch.randn(400, 1, dtype=F64, generator=generator)
    n = 4
    system = certified.GramSystem(
        a.T @ a / n, a.T @ r / n, float(r.square().sum()) / n, n, 3, "separate"
    )
    beta = 1e-6 * float(system.group_norms(system.rhs).max())
    v, cert = certified.solve_gram(system, beta, tol=1e-8, max_iterations=10_000)
    assert cert["relative_gap"] <= 1e-8 and cert["primal"] < 1e-5 * system.rr
    exact = torch.linalg.lstsq(a, r).solution
    torch.testing.assert_close(v, exact, rtol=0, atol=1e-4)


def test_patch_store_takes_over_an_earlier_buffer() -> None:
    """A store given an earlier store's buffer of its shape works in it (the trainer's
    stages hand it on), whatever the buffer holds, and builds the system a fresh store
    builds; a buffer of another shape is not taken."""
    x, r = smooth_data(3, 2, 7, seed=21)
    stage, _ = make_stage(x, patterns=3, kernel_size=3)
    data = [(x[:2], r[:2], stage.pattern_gates(x[:2])), (x[2:], r[2:], stage.pattern_gates(x[2:]))]
    basis, _ = torch.linalg.qr(
        torch.randn(18, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    )
    fresh = certified.PatchStore(stage, data, 18)
    expected = fresh.system(basis)
    stale = torch.full_like(fresh.buffer, float("nan"))
    store = certified.PatchStore(stage, data, 18, stale)
    assert store.buffer is stale
    system = store.system(basis)
    torch.testing.assert_close(system.gram, expected.gram, rtol=0, atol=0)
    torch.testing.assert_close(system.rhs, expected.rhs, rtol=0, atol=0)
    narrow = certified.PatchStore(stage, data, 12, stale)
    assert narrow.buffer is not stale and narrow.buffer.shape == (stale.shape[0], 12)


@pytest.mark.parametrize(
    ("groups", "rhs_pixels"), [("separate", certified.RHS_PIXELS), ("frobenius", 7)]
)
def test_patch_store_grown_system_equals_one_built_whole(
    groups: str, rhs_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subspace route's system (`PatchStore`, pixels sorted by gate code over every
    batch) of a basis grown by columns: the kept blocks plus the new ones are the system
    of the whole basis built at once, and that is the unrestricted system (`gram_system`,
    streamed over batches) in the basis's coordinates, ``Q^T G Q`` and ``Q^T b``, whatever
    the number of pixels whose gated residuals are formed at once (7 of 147)."""
    monkeypatch.setattr(certified, "RHS_PIXELS", rhs_pixels)
    x, r = smooth_data(3, 2, 7, seed=21)
    stage, _ = make_stage(x, patterns=3, kernel_size=3, output_groups=groups)
    data = [(x[:2], r[:2], stage.pattern_gates(x[:2])), (x[2:], r[2:], stage.pattern_gates(x[2:]))]
    basis, _ = torch.linalg.qr(
        torch.randn(18, 18, dtype=F64, generator=torch.Generator().manual_seed(1))
    )
    store = certified.PatchStore(stage, data, 18)
    first = store.system(basis[:, :5])
    grown = store.system(basis[:, :12], first)
    whole = certified.PatchStore(stage, data, 18).system(basis[:, :12])
    # (float32 coordinates: equal to their rounding)
    torch.testing.assert_close(grown.gram, whole.gram, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grown.rhs, whole.rhs, rtol=1e-5, atol=1e-6)
    full = store.system(basis, grown)
    plain = gram_system(stage, data)
    blocks = torch.block_diag(*[basis] * 3)
    # Kept in float32 and packed: the 6 pattern-pair blocks of 3 patterns.
    assert full.gram.dtype == torch.float32 and full.gram.shape == (6, 18, 18)
    matrix = full.matrix().double()
    torch.testing.assert_close(matrix, blocks.T @ plain.gram @ blocks, rtol=1e-5, atol=1e-6)
    v = torch.randn(full.size, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    # Pattern-pair blocks two at a time, and all at once.
    for block_bytes in (8 * 18 * 18 * 2, certified.GRAM_BLOCK_BYTES):
        monkeypatch.setattr(certified, "GRAM_BLOCK_BYTES", block_bytes)
        torch.testing.assert_close(full.times(v), matrix @ v, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(full.rhs, blocks.T @ plain.rhs, rtol=1e-5, atol=1e-6)
    assert (full.rr, full.count) == (pytest.approx(plain.rr, rel=1e-12), plain.count)


@pytest.mark.parametrize("patterns", [5, 62, 63, 130])
def test_code_groups_group_pixels_by_their_gates(patterns: int) -> None:
    """Pixels sorted by gate code (packed into one integer up to 62 patterns, into several
    beyond): every pixel of a group has its code's gates, and there is one group per
    distinct row of gates."""
    gen = torch.Generator().manual_seed(patterns)
    d = torch.rand(3000, patterns, generator=gen) < 0.5
    d[:1500] &= torch.arange(patterns) < 3  # many pixels share a code
    groups = certified.code_groups(d)
    code_of = torch.repeat_interleave(torch.arange(groups.counts.numel()), groups.counts)
    assert torch.equal(d[groups.order], groups.codes[code_of])
    assert torch.equal(groups.starts, groups.counts.cumsum(0) - groups.counts)
    assert groups.codes.shape[0] == torch.unique(d, dim=0).shape[0]
    # In order of their pixel counts (`_code_sums` views each count's pixels as one block).
    assert bool((groups.counts[1:] >= groups.counts[:-1]).all())


def test_patches_of_slabs_are_the_rows_of_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slab's patches (`_patches` with ``rows``) are those rows' pixels of the whole
    image's patches, and the mean patch Gram summed over slabs of one row each equals the
    one built from whole images (to float32 rounding)."""
    x, r = smooth_data(2, 3, 7, seed=23)
    stage, _ = make_stage(x, patterns=2, kernel_size=3)
    whole = certified._patches(stage, x).reshape(2, 7, 7, -1)
    part = certified._patches(stage, x, range(2, 5)).reshape(2, 3, 7, -1)
    torch.testing.assert_close(part, whole[:, 2:5], rtol=0, atol=0)
    data = [(x, r, stage.pattern_gates(x))]
    reference = certified._mean_patch_gram(stage, data)
    monkeypatch.setattr(certified, "PATCH_SLAB_BYTES", 1)
    assert len(certified.patch_slabs(stage, x)) == 7
    # (float32 products summed in another order)
    torch.testing.assert_close(
        certified._mean_patch_gram(stage, data), reference, rtol=1e-5, atol=1e-6
    )


def test_randomized_directions_span_the_leading_eigenvectors() -> None:
    """`leading_directions` from products only: orthonormal, and with a spectral gap it
    spans the leading eigenvectors of a full decomposition (`patch_basis`)."""
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=F64))
    values = torch.cat([torch.linspace(10, 5, 6, dtype=F64), torch.full((54,), 0.1, dtype=F64)])
    gram = (q * values) @ q.T
    exact = certified.patch_basis(gram, 6)
    fast = certified.leading_directions(lambda v: gram @ v, 60, 6, torch.device("cpu"))
    torch.testing.assert_close(fast.T @ fast, torch.eye(6, dtype=F64), rtol=0, atol=1e-12)
    cosines = torch.linalg.svdvals(exact.T @ fast)
    torch.testing.assert_close(cosines, torch.ones(6, dtype=F64), rtol=0, atol=1e-10)


def test_wide_initial_basis_through_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond `EIGH_SIZE` the first basis comes from convolutions (no patch held): the
    products ``U^T U q`` it iterates are the mean patch Gram's, so its leading direction
    is the Gram's leading eigenvector (the eigendecomposition's Gram of every pixel, as
    the convolutions')."""
    x, r = smooth_data(3, 3, 9, seed=24)
    stage, _ = make_stage(x, patterns=2, kernel_size=3)
    subset = [(x, r, stage.pattern_gates(x))]
    monkeypatch.setattr(certified, "BASIS_PIXEL_STEP", 1)
    exact = certified.initial_basis(stage, subset, 4)
    gram = certified._mean_patch_gram(stage, subset)
    monkeypatch.setattr(certified, "EIGH_SIZE", 10)
    seen: list[Tensor] = []
    directions = certified.leading_directions

    def spy(gram_times, size, rank, device):  # type: ignore[no-untyped-def]
        probe = torch.randn(size, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
        seen.append(gram_times(probe) / 3 - gram @ probe)
        return directions(gram_times, size, rank, device)

    monkeypatch.setattr(certified, "leading_directions", spy)
    fast = certified.initial_basis(stage, subset, 4)
    # U^T U q summed over the 3 images: 3 times the mean Gram's product (float32 products).
    torch.testing.assert_close(seen[0], torch.zeros_like(seen[0]), rtol=0, atol=1e-4 * gram.norm())
    assert fast.shape == exact.shape == (27, 4)
    assert abs(float(exact[:, 0] @ fast[:, 0])) > 1 - 1e-6


def test_patch_store_holds_at_most_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's columns are cut to what `STORE_BYTES` holds (4 bytes a pixel a column),
    and a larger basis is refused with a one-line error."""
    x, r = smooth_data(3, 2, 7, seed=21)
    stage, _ = make_stage(x, patterns=3, kernel_size=3)
    data = [(x, r, stage.pattern_gates(x))]
    monkeypatch.setattr(certified, "STORE_BYTES", 4 * 3 * 49 * 6)
    store = certified.PatchStore(stage, data, 18)
    assert store.columns == 6
    basis = torch.eye(18, dtype=F64)
    store.system(basis[:, :6])
    with pytest.raises(CvxmriError, match="exceeds the store's 6"):
        store.system(basis[:, :7])


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
def test_metric_prox_satisfies_the_optimality_conditions(groups: str) -> None:
    """u = prox: L M (u - z) + beta u / ||u|| = 0 on a non-zero group, ||L M z|| <= beta on a
    zero group; both kinds occur in the instance."""
    gen = torch.Generator().manual_seed(3)
    p, out, m = 5, 2, 6
    factor = torch.randn(p, m, m, generator=gen, dtype=F64)
    blocks = factor @ factor.transpose(1, 2) + 0.1 * torch.eye(m, dtype=F64)
    metric = BlockMetric(blocks, groups)
    z = torch.randn(p, out, m, generator=gen, dtype=F64) * torch.linspace(0.02, 2, p).view(
        p, 1, 1
    ).to(F64)
    lipschitz, beta = 2.0, 1.5
    u = metric.prox(z, lipschitz, beta)
    moved = lipschitz * torch.einsum("pij,poj->poi", blocks, u - z)
    shape = (p * out, m) if groups == "separate" else (p, out * m)
    moved, u_g = moved.reshape(shape), u.reshape(shape)
    pushed = lipschitz * torch.einsum("pij,poj->poi", blocks, z).reshape(shape)
    norms = u_g.norm(dim=1)
    alive = norms > 0
    assert alive.any() and (~alive).any()
    residual = moved[alive] + beta * u_g[alive] / norms[alive, None]
    assert residual.abs().max() <= 1e-9 * beta
    assert (pushed[~alive].norm(dim=1) <= beta * (1 + 1e-12)).all()
    # The solve is the inverse of the metric.
    torch.testing.assert_close(
        torch.einsum("pij,poj->poi", blocks, metric.solve(z)), z, rtol=1e-9, atol=1e-12
    )


def solve_cvxpy(stage, x: torch.Tensor, r: torch.Tensor) -> float:
    cp = pytest.importorskip("cvxpy")
    a = explicit_operator(stage, x).numpy()
    v = cp.Variable(a.shape[1])
    penalty = sum(cp.norm(v[s], 2) for s in group_slices(stage))
    problem = cp.Problem(
        cp.Minimize(
            cp.sum_squares(a @ v - r.reshape(-1).numpy()) / (2 * x.shape[0])
            + stage.config.beta * penalty
        )
    )
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
    assert problem.status == "optimal"
    return float(problem.value)


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
@pytest.mark.parametrize("route", ["gram", "matrix-free"])
def test_certified_optimum_matches_cvxpy(route: str, groups: str) -> None:
    """Both routes reach the optimum of an independent solver to 1e-6 relative in objective,
    and every reported gap bounds the true suboptimality."""
    pytest.importorskip("cvxpy")
    x, r = smooth_data(3, 2, 8, seed=22)
    stage, _ = make_stage(x, patterns=4, kernel_size=3, output_groups=groups)
    # The Gram route accumulates its matrix in float32 (refinement removes the rounding);
    # the matrix-free route works in the data's dtype, float64 here.
    data = [(x, r, stage.pattern_gates(x))]
    solver = StageSolver(
        stage,
        data,
        tol=1e-9,
        gram_unknowns=10_000 if route == "gram" else 0,
        max_iterations=20_000,
        check_every=20,
    )
    assert solver.route == route
    beta = 0.05 * solver.beta_max()
    seen: list[dict[str, float]] = []
    cert = solver.solve(beta, callback=lambda _, c: seen.append(c))
    optimum = solve_cvxpy(with_beta(stage, beta), x, r)
    assert cert["relative_gap"] <= 1e-7, cert
    assert cert["primal"] == pytest.approx(optimum, rel=1e-6)
    for c in seen:
        assert c["primal"] - optimum <= c["gap"] + 1e-9 * optimum
        assert c["dual"] <= optimum * (1 + 1e-9)
    # The stage holds the solution, and the stage's own certificate agrees.
    again = duality_gap(with_beta(stage, beta), [(x, r)])
    assert again["primal"] == pytest.approx(cert["primal"], rel=1e-6)


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
def test_subspace_route_solves_the_restricted_program(groups: str) -> None:
    """With a patch subspace of rank 7 (of 18) and no growth, the solver reaches the
    optimum of the program restricted to filters ``Q a`` (cvxpy on the design ``A Q``) to
    1e-6, its gaps bound the restricted suboptimality, the filters stay in the span, and
    the whole program's gap (the span misses directions) is larger."""
    cp = pytest.importorskip("cvxpy")
    x, r = smooth_data(3, 2, 8, seed=22)
    stage, _ = make_stage(x, patterns=4, kernel_size=3, output_groups=groups)
    data = [(x, r, stage.pattern_gates(x))]
    rank, p, out = 7, 4, 2
    solver = StageSolver(stage, data, tol=1e-9, gram_unknowns=0, subspace=rank)
    assert solver.route == "subspace" and solver.unknowns == p * rank
    basis = solver.basis
    assert basis is not None
    torch.testing.assert_close(basis.T @ basis, torch.eye(rank, dtype=F64))
    beta = 0.05 * solver.beta_max()
    seen: list[dict[str, float]] = []
    cert = solver.solve(beta, callback=lambda _, c: seen.append(c))
    restricted = explicit_operator(stage, x) @ torch.block_diag(*[basis] * (p * out))
    a = cp.Variable(restricted.shape[1])
    size = rank if groups == "separate" else out * rank
    penalty = sum(cp.norm(a[g * size : (g + 1) * size], 2) for g in range(p * out * rank // size))
    misfit = cp.sum_squares(restricted.numpy() @ a - r.reshape(-1).numpy()) / (2 * x.shape[0])
    problem = cp.Problem(cp.Minimize(misfit + beta * penalty))
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
    optimum = float(problem.value)
    assert cert["subspace_relative_gap"] <= 1e-7, cert
    assert cert["primal"] == pytest.approx(optimum, rel=1e-6)
    for c in seen:  # the whole program's dual bounds the restricted optimum too
        assert c["primal"] - optimum <= c["gap"] + 1e-9 * optimum
    weight = stage.v.detach().reshape(p, out, -1).double()
    torch.testing.assert_close(weight @ basis @ basis.T, weight, rtol=0, atol=1e-10)
    assert cert["relative_gap"] > max(1e-4, cert["subspace_relative_gap"])


def test_growing_subspace_reaches_the_whole_programs_optimum() -> None:
    """From rank 3 (of 18), growing by the gradient's components outside the span until
    the whole program's gap is below tol: the whole program's optimum (cvxpy)."""
    pytest.importorskip("cvxpy")
    x, r = smooth_data(3, 2, 8, seed=22)
    stage, _ = make_stage(x, patterns=4, kernel_size=3)
    data = [(x, r, stage.pattern_gates(x))]
    solver = StageSolver(stage, data, tol=1e-8, gram_unknowns=0, subspace=3, subspace_rounds=10)
    beta = 0.05 * duality_gap(stage, [(x, r)])["max_dual_norm"]  # the whole program's
    cert = solver.solve(beta)
    assert cert["rounds"] >= 1 and 3 < cert["rank"] <= 18
    assert cert["relative_gap"] <= 1e-8, cert
    assert cert["primal"] == pytest.approx(solve_cvxpy(with_beta(stage, beta), x, r), rel=1e-6)


def test_screening_pass_is_close_to_the_exact_one() -> None:
    """A screening pass (float32 convolutions, float64 sums) agrees with the exact float64
    pass (`residual_statistics`) to float32 rounding: gradient, <r, e> and ||e||^2."""
    x, r = smooth_data(3, 4, 10, seed=23)
    stage, _ = make_stage(x, patterns=4, kernel_size=3)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(4)
        stage.v.copy_(0.1 * torch.randn(stage.v.shape, dtype=F64, generator=generator))
    data = [(x[:2], r[:2], stage.pattern_gates(x[:2])), (x[2:], r[2:], stage.pattern_gates(x[2:]))]
    screened = certified._screened_statistics(stage, data)
    exact = certified._exact_certificate(stage, data, 0.0)[1]
    # (Entries near zero carry the rounding of the largest: the tolerance is the scale's.)
    scale = float(exact.gradient.abs().max())
    torch.testing.assert_close(screened.gradient, exact.gradient, rtol=1e-5, atol=1e-6 * scale)
    assert screened.re == pytest.approx(exact.re, rel=1e-5)
    assert screened.ee == pytest.approx(exact.ee, rel=1e-5)
    assert screened.count == exact.count == 3
    assert not torch.equal(screened.gradient, exact.gradient)  # it is float32 arithmetic


@pytest.mark.parametrize("bounded", [False, True])
def test_screened_solves_report_exact_certificates(bounded: bool) -> None:
    """With screening on, the growth rounds run on screening passes, yet every reported
    certificate is the exact one of the returned weights (an independent float64 pass,
    `duality_gap`): when the path certifies, and when a bound stops it after a screening
    pass (no refinement round, no growth)."""
    x, r = smooth_data(3, 4, 10, seed=24)
    tol = 1e-3
    results = {}
    for screen in (True, False):
        stage, _ = make_stage(x, patterns=4, kernel_size=3)
        solver = StageSolver(
            stage,
            [(x, r, stage.pattern_gates(x))],
            tol=tol,
            gram_unknowns=0,
            subspace=3,
            subspace_rounds=0 if bounded else 10,
            max_rounds=0 if bounded else 20,
            screen=screen,
        )
        largest = solver.beta_max()
        for fraction in (0.1, 0.01):
            beta = fraction * largest
            cert = solver.solve(beta)
            exact = duality_gap(with_beta(stage, beta), [(x, r)])
            assert cert["relative_gap"] == pytest.approx(exact["relative_gap"], rel=1e-9)
            assert cert["primal"] == pytest.approx(exact["primal"], rel=1e-12)
            assert (cert["relative_gap"] <= tol) is not bounded
            results[screen, fraction] = cert
    assert sum(results[True, f]["screened"] for f in (0.1, 0.01)) >= 2
    assert all(results[False, f]["screened"] == 0 for f in (0.1, 0.01))
    if not bounded:
        # Fewer exact passes, the same rounds' growth to the same optimum.
        exact_passes = {s: sum(results[s, f]["passes"] for f in (0.1, 0.01)) for s in (True, False)}
        assert exact_passes[True] < exact_passes[False]
        assert results[True, 0.01]["primal"] == pytest.approx(
            results[False, 0.01]["primal"], rel=2 * tol
        )


def solve_on_route(
    stage: ConvexStage, data: list, gram_unknowns: int, subspace: int
) -> tuple[dict[str, float], Tensor]:
    """The certificate and weights of a solve to the gap 1e-6 at 0.05 beta_max on the route
    that ``gram_unknowns`` and ``subspace`` choose."""
    solver = StageSolver(
        stage,
        data,
        tol=1e-6,
        gram_unknowns=gram_unknowns,
        subspace=subspace,
        subspace_rounds=10,
        max_iterations=20000,
    )
    cert = solver.solve(0.05 * solver.beta_max())
    return cert, stage.v.detach().clone()


@pytest.mark.parametrize(
    ("gram_unknowns", "subspace"), [(4096, 0), (0, 3), (0, 0)], ids=["gram", "subspace", "free"]
)
def test_bf16_inputs_solve_the_program_of_their_values(gram_unknowns: int, subspace: int) -> None:
    """bf16 stage inputs (a cache under autocast) are solved as given, on every route: the
    weights and certificate are those of the same values in float32."""
    x, r = smooth_data(3, 2, 8, seed=25)
    x, r = x.to(torch.bfloat16), r.float()
    results = []
    for inputs in (x, x.float()):
        stage, _ = make_stage(x.float(), patterns=4, kernel_size=3)
        data = [(inputs, r, stage.pattern_gates(inputs))]
        results.append(solve_on_route(stage, data, gram_unknowns, subspace))
    (half, v_half), (full, v_full) = results
    assert half["relative_gap"] <= 1e-6 and full["relative_gap"] <= 1e-6
    assert half["primal"] == pytest.approx(full["primal"], rel=1e-12)
    torch.testing.assert_close(v_half, v_full, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("gram_unknowns", "subspace"), [(4096, 0), (0, 3), (0, 0)], ids=["gram", "subspace", "free"]
)
def test_inputs_loaded_a_chunk_at_a_time(gram_unknowns: int, subspace: int) -> None:
    """Stage inputs given as loaders (a cache on disk, say) are held a chunk at a time,
    on every route, and the solve is that of the same inputs held as tensors."""
    x, r = smooth_data(6, 2, 8, seed=26)
    results = []
    for lazy in (True, False):
        stage, _ = make_stage(x, patterns=4, kernel_size=3)
        live = [0]
        most = [0]

        def loader(chunk: torch.Tensor, live: list[int] = live, most: list[int] = most):
            def load() -> torch.Tensor:
                # Counts the chunks alive at once (freed: the tensor's finalizer).
                live[0] += 1
                most[0] = max(most[0], live[0])
                out = chunk.clone()
                weakref.finalize(out, lambda: live.__setitem__(0, live[0] - 1))
                return out

            return load

        chunks = [(x[i : i + 2], r[i : i + 2]) for i in (0, 2, 4)]
        data = [(loader(c) if lazy else c, rc, stage.pattern_gates(c)) for c, rc in chunks]
        results.append(solve_on_route(stage, data, gram_unknowns, subspace))
        if lazy:
            assert most[0] <= 2  # the chunk in use, and the next while it loads
    (loaded, v_loaded), (held, v_held) = results
    assert loaded["relative_gap"] <= 1e-6
    assert loaded["primal"] == pytest.approx(held["primal"], rel=1e-12)
    torch.testing.assert_close(v_loaded, v_held, rtol=0, atol=0)


def test_subspace_stops_growing_at_its_bound() -> None:
    """At most ``subspace_unknowns`` unknowns per output: the start and the growth are cut
    to that many directions per pattern (here 5), and the gap is the one reached."""
    x, r = smooth_data(3, 2, 8, seed=22)
    stage, _ = make_stage(x, patterns=4, kernel_size=3)
    data = [(x, r, stage.pattern_gates(x))]
    solver = StageSolver(
        stage,
        data,
        tol=1e-8,
        gram_unknowns=0,
        subspace=9,
        subspace_rounds=10,
        subspace_unknowns=20,
    )
    assert solver.basis is not None and solver.basis.shape[1] == 5
    cert = solver.solve(0.05 * duality_gap(stage, [(x, r)])["max_dual_norm"])
    assert cert["rank"] == 5 and cert["relative_gap"] > 1e-8


def test_growth_adds_only_directions_outside_the_basis() -> None:
    """A basis of every direction gains none (not the rounding left by the projection);
    one missing direction is the one added, however many groups' gradients have it."""
    gen = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=F64))
    gradient = torch.randn(4, 2, 12, generator=gen, dtype=F64)
    assert certified._grow_basis(q, gradient).shape == (12, 12)
    grown = certified._grow_basis(q[:, :11], gradient)
    assert grown.shape == (12, 12)
    assert abs(float(grown[:, 11] @ q[:, 11])) == pytest.approx(1.0, abs=1e-12)


def test_full_rank_subspace_is_the_whole_program() -> None:
    """A subspace of every direction restricts nothing: the same optimum as the Gram
    route, and the whole program's gap equals the restricted one."""
    x, r = smooth_data(3, 2, 8, seed=22)
    results = {}
    for route, subspace in (("gram", 0), ("subspace", 18)):
        stage, _ = make_stage(x, patterns=4, kernel_size=3)
        solver = StageSolver(
            stage,
            [(x, r, stage.pattern_gates(x))],
            tol=1e-9,
            gram_unknowns=10_000 if route == "gram" else 0,
            subspace=subspace,
        )
        assert solver.route == route
        cert = solver.solve(0.05 * solver.beta_max())
        results[route] = (cert, stage.v.detach().clone())
    (gram, v_gram), (sub, v_sub) = results["gram"], results["subspace"]
    assert sub["primal"] == pytest.approx(gram["primal"], rel=1e-7)
    assert sub["subspace_relative_gap"] == pytest.approx(sub["relative_gap"], rel=1e-6, abs=1e-12)
    torch.testing.assert_close(v_sub, v_gram, rtol=0, atol=1e-5)


def test_clipped_dual_point_beats_the_unit_scale() -> None:
    """Where <r, e> / ||e||^2 < beta / max dual norm, the dual point is scaled by the former
    and its value is above that of min(1, beta / max dual norm)."""
    x, r = smooth_data(2, 2, 6, seed=23)
    stage, _ = make_stage(x, patterns=3, kernel_size=3, beta=50.0)
    gen = torch.Generator().manual_seed(24)
    with torch.no_grad():
        stage.v.copy_(2.0 * torch.randn(stage.v.shape, generator=gen, dtype=F64))
    a = explicit_operator(stage, x).numpy()
    e = r.reshape(-1).numpy() - a @ stage.v.detach().reshape(-1).numpy()
    n = x.shape[0]
    ratio = float(r.reshape(-1).numpy() @ e / (e @ e))
    cert = duality_gap(stage, [(x, r)])
    assert ratio < min(1.0, 50.0 / cert["max_dual_norm"])
    assert cert["dual_scale"] == pytest.approx(ratio, rel=1e-10)
    unit = min(1.0, 50.0 / cert["max_dual_norm"])
    rr = float(r.square().sum())
    unit_dual = (0.5 * rr - 0.5 * float(np.sum((r.reshape(-1).numpy() - unit * e) ** 2))) / n
    assert cert["dual"] > unit_dual


def test_trainer_beta_path_certifies_and_selects_on_validation(
    tiny_data: Path, tmp_path: Path
) -> None:
    config: TrainConfig = replace(
        preset("tiny"),
        data=str(tiny_data),
        solver="certified",
        certified=CertifiedConfig(tol=1e-3, betas=(0.1, 0.01)),
    )
    trainer = Trainer(config, tmp_path)
    trainer.fit()
    path = [c for c in trainer.certificates if "path_index" in c]
    assert [(c["stage"], c["path_index"]) for c in path] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for stage in (1, 2):
        rows = [c for c in path if c["stage"] == stage]
        assert all(c["relative_gap"] <= 1e-3 and c["certified"] for c in rows)
        assert all(c["trace"] and c["trace"][-1][1] == c["relative_gap"] for c in rows)
        selected = [c for c in rows if c.get("selected")]
        assert len(selected) == 1
        assert selected[0]["val_psnr"] == max(c["val_psnr"] for c in rows)
        assert rows[0]["beta"] == pytest.approx(10 * rows[1]["beta"], rel=1e-12)
    # One history row per beta, with its beta and certificate.
    assert [row["beta"] for row in trainer.history] == [c["beta"] for c in path]
    assert all("cert_relative_gap" in row for row in trainer.history)


def test_trainer_hands_the_patch_buffer_from_stage_to_stage(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage on the subspace route works in the first one's patch buffer (its pages
    touched once per run), and the trainer lets it go when the network is done."""
    config: TrainConfig = replace(
        preset("tiny"),
        data=str(tiny_data),
        layers=4,
        solver="certified",
        certified=CertifiedConfig(betas=(0.1,), gram_unknowns=0, subspace=4, subspace_unknowns=96),
    )
    made: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    original = certified.PatchStore.__init__

    def recording(
        self: certified.PatchStore,
        stage: ConvexStage,
        data: list,
        columns: int,
        buffer: torch.Tensor | None = None,
    ) -> None:
        original(self, stage, data, columns, buffer)
        made.append((buffer, self.buffer))

    monkeypatch.setattr(certified.PatchStore, "__init__", recording)
    trainer = Trainer(config, tmp_path)
    trainer.fit()
    assert len(made) == 3 and made[0][0] is None
    assert all(given is made[0][1] and kept is made[0][1] for given, kept in made[1:])
    assert trainer._patch_buffer is None


def test_trainer_selects_gates_on_the_sample_residual(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a gate pool the trainer hands each stage the residual targets of its gate
    sample: ``x* - x0`` of the first training images at stage 1, less the carried
    prediction (the previous network's output layer on the sample) after it."""
    config: TrainConfig = replace(
        preset("tiny"),
        data=str(tiny_data),
        layers=3,
        carry=True,
        convex=ConvexStageConfig(gate_pool=3),
        solver="certified",
        certified=CertifiedConfig(betas=(0.1,)),
    )
    seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    original = ConvexStage.init_gates

    def recording(
        self: ConvexStage, x: torch.Tensor, residual: torch.Tensor | None = None, reserved: int = 0
    ) -> None:
        assert residual is not None
        seen.append((x.clone(), residual.clone(), reserved))
        original(self, x, residual, reserved)

    monkeypatch.setattr(ConvexStage, "init_gates", recording)
    trainer = Trainer(config, tmp_path)
    model = trainer.fit()
    pairs = trainer.fixed_pairs
    assert pairs is not None and len(seen) == 2
    (x1, r1, reserved1), (x2, r2, reserved2) = seen
    n = len(x1)
    torch.testing.assert_close(x1, pairs.x0[:n])
    torch.testing.assert_close(r1, pairs.target[:n] - pairs.x0[:n])
    depth2 = ReconCNN.load(tmp_path / "model_depth2.pt")
    with torch.no_grad():
        torch.testing.assert_close(x2, depth2.last_hidden(pairs.x0[:n]))
        torch.testing.assert_close(r2, r1 - depth2.final(x2), rtol=1e-5, atol=1e-6)
    assert (reserved1, reserved2) == (0, 1)
    # The network's gates are the selected ones: pattern 0 of stage 2 is the carry.
    assert float(model.hidden[1].gate_bias[0]) == 1.0 and not model.hidden[1].gate_weight[0].any()


def test_results_keep_the_selected_beta_of_a_path() -> None:
    """The report's certificate of a stage is the selected beta's, with that beta; without a
    path it is the last one, with the run's beta."""
    from cvxmri.reproduce import _final_certificates

    path = [
        {"stage": 1, "path_index": 1, "beta": 0.3, "relative_gap": 1e-4, "trace": [[1.0, 1e-4]]},
        {"stage": 1, "path_index": 2, "beta": 0.1, "relative_gap": 2e-4, "selected": True},
        {"stage": 1, "path_index": 3, "beta": 0.03, "relative_gap": 3e-4},
        {"stage": 1, "mapping": {"violation_fraction": 0.5}},
        {"stage": 2, "epoch": 1, "relative_gap": 0.9},
        {"stage": 2, "epoch": 2, "relative_gap": 0.8},
    ]
    rows = _final_certificates("poisson-4x", path, 1e-4)
    assert rows[0]["beta"] == 0.1 and rows[0]["relative_gap"] == 2e-4
    assert rows[0]["violation_fraction"] == 0.5 and "trace" not in rows[0]
    assert rows[1]["beta"] == 1e-4 and rows[1]["relative_gap"] == 0.8


def test_beta_path_stops_once_a_beta_gains_too_little() -> None:
    """The path stops once the last beta's validation PSNR is at most ``min_gain`` dB
    above the best before it (worse, equal or barely better); a negative one is refused."""
    settings = CertifiedConfig(min_gain=0.05)
    assert not settings.path_done([30.0])
    assert not settings.path_done([30.0, 30.2])
    assert not settings.path_done([30.0, 30.2, 30.26])
    assert settings.path_done([30.0, 30.2, 30.24])
    assert settings.path_done([30.0, 30.2, 30.1])
    assert settings.path_done([30.3, 30.2, 30.34])  # measured against the best, not the last
    assert CertifiedConfig(min_gain=0.0).path_done([30.0, 30.0])
    with pytest.raises(CvxmriError, match=r"certified\.min_gain"):
        CertifiedConfig(min_gain=-0.1).validate()
    with pytest.raises(CvxmriError, match=r"certified\.subspace_unknowns=0"):
        CertifiedConfig(subspace_unknowns=0).validate()


def test_held_bytes_count_the_subspace_routes_arrays() -> None:
    """``held_mib``: the Gram matrix's ``P (P + 1) / 2`` pattern-pair blocks ``r x r``
    float32, the right-hand side ``P r x out``
    float64, the metric's eigenvectors ``P r^2`` float64 and the store: its buffer of
    coordinates (every column it has room for) and ``out`` residuals per pixel, float32,
    and its code grouping (each pixel's place in code order and back, each code's first
    pixel, count and ``P`` gates)."""
    x, r = smooth_data(3, 2, 8, seed=22)
    stage, _ = make_stage(x, patterns=4, kernel_size=3)
    solver = StageSolver(stage, [(x, r, stage.pattern_gates(x))], gram_unknowns=0, subspace=5)
    cert = solver.solve(0.05 * solver.beta_max())
    p, out, rank = 4, 2, int(cert["rank"])
    store = solver.store
    assert store is not None
    pixels = 3 * 8 * 8
    codes = store.groups.counts.numel()
    grouping = 8 * (2 * pixels + 2 * codes) + codes * p
    expected = 4 * (p * (p + 1) // 2) * rank**2 + 8 * (p * rank * out + p * rank**2)
    expected += 4 * pixels * (store.columns + out) + grouping
    assert cert["held_mib"] * 2**20 == pytest.approx(expected, rel=1e-12)


def test_report_says_what_the_certified_solver_held() -> None:
    """The report's memory line (an Adam step) names the certified solver's largest held
    memory when the run's convex stages used it, and says nothing more otherwise."""
    from cvxmri.report.build import _certified_memory

    rows = [{"stage": 1, "held_mib": 12.0}, {"stage": 2, "held_mib": 2345.4}, {"stage": 3}]
    assert "held up to 2345 MiB" in _certified_memory({"certificates": rows})
    assert _certified_memory({"certificates": [{"stage": 1, "relative_gap": 0.9}]}) == ""
