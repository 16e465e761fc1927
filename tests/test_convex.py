"""The convex stage against explicit matrices, an independent solver (cvxpy) and the
analytic optimality condition at zero; FISTA's certificate; the mapping to a ReLU net."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import devices

import cvxmri.models.convex as convex_module
from cvxmri.errors import CvxmriError
from cvxmri.models.convex import (
    ConvexStage,
    ConvexStageConfig,
    duality_gap,
    exact_products,
    pack_gates,
    unpack_gates,
)
from cvxmri.training.fista import fista, lipschitz_constant

F64 = torch.float64


def smooth_data(
    batch: int, channels: int, size: int, seed: int, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images and a non-linear residual target of them (plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=F64)
    x = F.avg_pool2d(x, 3, 1, 1) * 3
    r = torch.stack([torch.tanh(2 * x[:, 0]) * x[:, 1], F.relu(x[:, 0] - x[:, 1])], dim=1)
    r = r + 0.05 * torch.randn(r.shape, generator=gen, dtype=F64)
    return x.to(dtype), r.to(dtype)


def make_stage(
    x: torch.Tensor, out: int = 2, **settings: object
) -> tuple[ConvexStage, ConvexStageConfig]:
    config = ConvexStageConfig(**settings)  # type: ignore[arg-type]
    stage = ConvexStage(x.shape[1], out, config).to(x.dtype)
    stage.init_gates(x)
    return stage, config


def with_beta(stage: ConvexStage, beta: float) -> ConvexStage:
    """The same stage (gates, weights) with another beta."""
    config = dataclasses.replace(stage.config, beta=beta)
    other = ConvexStage(stage.in_channels, stage.out_channels, config).to(stage.gate_weight.dtype)
    other.load_state_dict(stage.state_dict())
    return other


def explicit_operator(stage: ConvexStage, x: torch.Tensor) -> torch.Tensor:
    """The matrix A: rows (b, c, pixel) of the output, columns the entries of v in the
    layout (P, out, C_in, K, K); A[(b,c,i), (p,c,j)] = D_p(b, i) * patch_j(b, i)."""
    k = stage.config.kernel_size
    batch, _, height, width = x.shape
    p, out = stage.config.patterns, stage.out_channels
    patches = F.unfold(x, k, padding=k // 2)  # (B, C_in K K, H W)
    d = stage.gates(x).reshape(batch, p, height * width)
    size = patches.shape[1]
    a = torch.zeros(batch, out, height * width, p, out, size, dtype=x.dtype)
    for b, c, q in itertools.product(range(batch), range(out), range(p)):
        a[b, c, :, q, c, :] = d[b, q][:, None] * patches[b].T
    return a.reshape(batch * out * height * width, p * out * size)


def explicit_responses(stage: ConvexStage, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv(x, weight_p[c]) through patches: (B, P, out, H W)."""
    k = stage.config.kernel_size
    patches = F.unfold(x, k, padding=k // 2)
    return torch.einsum("bjn,pcj->bpcn", patches, weight.flatten(2))


def group_slices(stage: ConvexStage) -> list[slice]:
    """The groups as contiguous slices of v.reshape(-1)."""
    size = stage.in_channels * stage.config.kernel_size**2
    p, out = stage.config.patterns, stage.out_channels
    if stage.config.output_groups == "separate":
        return [slice(g * size, (g + 1) * size) for g in range(p * out)]
    return [slice(g * out * size, (g + 1) * out * size) for g in range(p)]


# ------------------------------------------------------------------ 1. explicit formulas


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
@pytest.mark.parametrize("program", ["gated", "cone"])
def test_objective_and_gradient_match_explicit_matrices(program: str, groups: str) -> None:
    x, r = smooth_data(2, 2, 6, seed=1)
    stage, _ = make_stage(
        x,
        patterns=3,
        kernel_size=3,
        beta=0.07,
        program=program,
        output_groups=groups,
        cone_penalty=0.3,
    )
    gen = torch.Generator().manual_seed(2)
    names = ["v"] if program == "gated" else ["w", "z"]
    for name in names:
        with torch.no_grad():
            getattr(stage, name).copy_(torch.randn(getattr(stage, name).shape, generator=gen))
    batch = x.shape[0]
    a = explicit_operator(stage, x)
    v = stage.effective_weight().detach()
    model = (a @ v.reshape(-1)).reshape(r.shape)
    misfit = model - r
    data = 0.5 * misfit.square().sum() / batch
    slices = group_slices(stage)
    weights = [getattr(stage, n).detach().reshape(-1) for n in names]
    penalty = 0.07 * sum(torch.linalg.vector_norm(w[s]) for w in weights for s in slices)

    # Cone constraints explicitly: sign s = 2D - 1 of each (b, p, pixel).
    sign = (2 * stage.gates(x) - 1).flatten(2).unsqueeze(2)  # (B, P, 1, HW)
    violation = torch.zeros((), dtype=F64)
    grads = {}
    for name, w in zip(names, weights, strict=True):
        weight = w.reshape(v.shape)
        responses = explicit_responses(stage, x, weight)
        violation = violation + F.relu(-sign * responses).sum() / batch
        # d/dw of sum relu(-s * <patch, w>) = -s * patch where violated.
        active = (-sign * responses > 0).to(F64) * -sign
        k = stage.config.kernel_size
        patches = F.unfold(x, k, padding=k // 2)
        grad_violation = torch.einsum("bpcn,bjn->pcj", active, patches) / batch
        grad_data = (a.T @ misfit.reshape(-1) / batch).reshape(v.shape)
        grad_penalty = torch.zeros_like(w)
        for s in slices:
            grad_penalty[s] = 0.07 * w[s] / torch.linalg.vector_norm(w[s])
        sign_data = -1.0 if name == "z" else 1.0
        grads[name] = (
            sign_data * grad_data
            + grad_penalty.reshape(v.shape)
            + 0.3 * grad_violation.reshape(v.shape) * (program == "cone")
        )
    objective = data + penalty + (0.3 * violation if program == "cone" else 0.0)

    torch.testing.assert_close(stage(x), model, rtol=0, atol=1e-12)
    torch.testing.assert_close(stage.data_term(x, r), data, rtol=1e-12, atol=0)
    torch.testing.assert_close(stage.penalty(), penalty, rtol=1e-12, atol=0)
    expected_violation = violation if program == "cone" else torch.zeros((), dtype=F64)
    torch.testing.assert_close(stage.cone_violation(x), expected_violation, rtol=1e-12, atol=0)
    value = stage.objective(x, r)
    torch.testing.assert_close(value, objective, rtol=1e-12, atol=0)
    value.backward()
    for name in names:
        torch.testing.assert_close(getattr(stage, name).grad, grads[name], rtol=1e-10, atol=1e-12)
    # The solvers' adjoint (no autograd graph) is A^T.
    torch.testing.assert_close(
        stage.apply_adjoint(x, r), (a.T @ r.reshape(-1)).reshape(v.shape), rtol=0, atol=1e-12
    )
    # Gated features: per (p, c) the term D_p * conv(x, v_p[c]); summed over p, the model.
    feats = stage.hidden(x, "gated")
    assert feats.shape == (2, 3 * 2, 6, 6)
    torch.testing.assert_close(feats.view(2, 3, 2, 6, 6).sum(1), model, rtol=0, atol=1e-12)
    responses = explicit_responses(stage, x, v).reshape(2, 3, 2, 6, 6)
    torch.testing.assert_close(
        feats.view(2, 3, 2, 6, 6), responses * stage.gates(x)[:, :, None], rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_direct_gradient_matches_explicit_matrices(chunk: int) -> None:
    """The autograd-free data term and gradient, pattern chunk by chunk, are the least
    squares value 0.5 ||A v - r||^2 / B and A^T (A v - r) / B of the explicit matrix."""
    x, r = smooth_data(2, 3, 6, seed=4)
    stage, _ = make_stage(x, patterns=5, kernel_size=3, gate_seed=2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        stage.v.copy_(torch.randn(stage.v.shape, generator=gen, dtype=F64))
    a = explicit_operator(stage, x)
    residual = a @ stage.v.detach().reshape(-1) - r.reshape(-1)
    value, grad = stage.data_term_and_gradient(x, r, chunk)
    assert value.item() == pytest.approx(0.5 * float(residual @ residual) / 2, rel=1e-6)
    expected = (a.T @ residual / 2).reshape(stage.v.shape)
    # float32 sums: rounding is relative to the largest entries, not to each one.
    scale = float(expected.abs().max())
    torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-6 * scale)
    assert stage.pattern_gates(x, chunk).equal(stage.gates(x).bool())
    # Precomputed gates (as a trainer's per-stage gate cache) give the same result.
    gates = unpack_gates(pack_gates(stage.pattern_gates(x)), 5)
    value2, grad2 = stage.data_term_and_gradient(x, r, chunk, gates=gates)
    assert value2.item() == value.item() and torch.equal(grad2, grad)


@pytest.mark.parametrize("patterns", [1, 8, 13])
def test_packed_gates_roundtrip(patterns: int) -> None:
    gates = torch.rand(3, patterns, 5, 4, generator=torch.Generator().manual_seed(patterns)) > 0.5
    packed = pack_gates(gates)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-patterns // 8), 5, 4)
    assert unpack_gates(packed, patterns).equal(gates)
    # Crops of the packed gates are the packed gates of the crops.
    assert unpack_gates(packed[:, :, 1:4, 1:3], patterns).equal(gates[:, :, 1:4, 1:3])


def test_gates_of_bf16_inputs_are_computed_in_float32() -> None:
    x, _ = smooth_data(2, 3, 6, seed=4)
    stage, _ = make_stage(x.float(), patterns=5, kernel_size=3, gate_seed=2)
    stage = stage.float()
    rounded = x.float().bfloat16()
    assert stage.pattern_gates(rounded).equal(stage.pattern_gates(rounded.float()))


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
def test_certificate_and_lipschitz_match_explicit_matrices(groups: str) -> None:
    x, r = smooth_data(3, 2, 5, seed=3)
    stage, _ = make_stage(x, patterns=4, kernel_size=3, beta=0.05, output_groups=groups)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        stage.v.copy_(0.1 * torch.randn(stage.v.shape, generator=gen, dtype=F64))
    a = explicit_operator(stage, x).numpy()
    v = stage.v.detach().reshape(-1).numpy()
    rv = r.reshape(-1).numpy()
    n = x.shape[0]
    e = rv - a @ v
    grad = -a.T @ e / n
    slices = group_slices(stage)
    dual_norms = [np.linalg.norm(grad[s]) for s in slices]
    scale = max(0.0, min(rv @ e / (e @ e), 0.05 / max(dual_norms)))
    primal = 0.5 * e @ e / n + 0.05 * sum(np.linalg.norm(v[s]) for s in slices)
    dual = (0.5 * rv @ rv - 0.5 * np.sum((rv - scale * e) ** 2)) / n
    # Split into two batches: the mean-scaled certificate does not depend on the split.
    cert = duality_gap(stage, [(x[:2], r[:2]), (x[2:], r[2:])])
    assert cert["n"] == 3
    assert cert["primal"] == pytest.approx(primal, rel=1e-12)
    assert cert["dual"] == pytest.approx(dual, rel=1e-12)
    assert cert["dual_scale"] == pytest.approx(scale, rel=1e-12)
    assert cert["max_dual_norm"] == pytest.approx(max(dual_norms), rel=1e-12)
    assert cert["gap"] == pytest.approx(primal - dual, rel=1e-10)
    assert cert["relative_gap"] == pytest.approx((primal - dual) / primal, rel=1e-10)
    assert 0 < scale < 1  # the instance exercises the scaled branch
    # Mini-batch objectives average to the full-batch one.
    full = stage.objective(x, r)
    parts = (2 * stage.data_term(x[:2], r[:2]) + stage.data_term(x[2:], r[2:])) / 3
    torch.testing.assert_close(parts + stage.penalty(), full, rtol=1e-12, atol=0)

    top = np.linalg.eigvalsh(a.T @ a / n)[-1]
    lipschitz = lipschitz_constant(stage, [(x[:2], r[:2]), (x[2:], r[2:])], iterations=200)
    assert top <= lipschitz <= 1.06 * top
    assert lipschitz == pytest.approx(1.05 * top, rel=1e-6)


# -------------------------------------------------------- 2. an independent solution


def solve_cvxpy(stage: ConvexStage, x: torch.Tensor, r: torch.Tensor) -> tuple[float, np.ndarray]:
    """The gated group lasso of the stage, solved by Clarabel to tight tolerances."""
    cp = pytest.importorskip("cvxpy")
    a = explicit_operator(stage, x).numpy()
    n = x.shape[0]
    v = cp.Variable(a.shape[1])
    penalty = sum(cp.norm(v[s], 2) for s in group_slices(stage))
    problem = cp.Problem(
        cp.Minimize(
            cp.sum_squares(a @ v - r.reshape(-1).numpy()) / (2 * n) + stage.config.beta * penalty
        )
    )
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
    assert problem.status == "optimal"
    return float(problem.value), np.asarray(v.value)


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
def test_duality_gap_brackets_an_independent_optimum(groups: str) -> None:
    pytest.importorskip("cvxpy")
    x, r = smooth_data(2, 2, 6, seed=5)
    stage, _ = make_stage(x, patterns=4, kernel_size=3, beta=0.0, output_groups=groups)
    beta = 0.2 * duality_gap(stage, [(x, r)])["max_dual_norm"]
    stage = with_beta(stage, beta)
    optimum, solution = solve_cvxpy(stage, x, r)
    tolerance = 1e-9 * optimum

    def bracket(label: str) -> dict[str, float]:
        cert = duality_gap(stage, [(x, r)])
        assert cert["dual"] <= optimum + tolerance, label
        assert optimum <= cert["primal"] + tolerance, label
        # The gap bounds the suboptimality.
        assert cert["primal"] - optimum <= cert["gap"] + tolerance, label
        return cert

    assert bracket("zero")["gap"] > 0.1 * optimum
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        stage.v.copy_(0.05 * torch.randn(stage.v.shape, generator=gen, dtype=F64))
    bracket("random")
    with torch.no_grad():
        stage.v.zero_()
    fista(stage, [(x, r)], iterations=3)
    early = bracket("3 FISTA iterations")
    assert early["primal"] - optimum > 1e-6 * optimum  # not yet optimal
    result = fista(stage, [(x, r)], iterations=20000, tol=1e-11, check_every=20)
    final = bracket("FISTA solution")
    assert result["relative_gap"] <= 1e-11
    # At the solution the certificate and the true suboptimality agree closely (both ~0).
    assert final["gap"] == pytest.approx(final["primal"] - optimum, abs=1e-8 * optimum)
    assert final["primal"] == pytest.approx(optimum, rel=1e-9)
    np.testing.assert_allclose(stage.v.detach().reshape(-1).numpy(), solution, atol=1e-5)
    # The cvxpy solution itself has a (near-)zero certificate.
    with torch.no_grad():
        stage.v.copy_(torch.from_numpy(solution).reshape(stage.v.shape))
    assert bracket("cvxpy solution")["relative_gap"] < 1e-7


def test_cone_gap_bounds_the_cone_programs_suboptimality() -> None:
    """For program="cone" the dual point is feasible for the gated relaxation, so
    dual <= gated optimum <= cone optimum <= primal."""
    cp = pytest.importorskip("cvxpy")
    x, r = smooth_data(2, 2, 5, seed=7)
    stage, _ = make_stage(x, patterns=3, kernel_size=3, beta=0.02, program="cone", cone_penalty=0.5)
    a = explicit_operator(stage, x).numpy()
    n, size = x.shape[0], a.shape[1]
    k = stage.config.kernel_size
    patches = F.unfold(x, k, padding=k // 2).numpy()  # (B, J, HW)
    sign = (2 * stage.gates(x) - 1).flatten(2).numpy()  # (B, P, HW)
    p, out = 3, 2
    # U maps w (P, out, J) to the signed responses s * <patch, w_{p,c}> of every (b,p,c,pixel).
    rows = []
    for b, q, c in itertools.product(range(n), range(p), range(out)):
        block = np.zeros((patches.shape[2], p, out, patches.shape[1]))
        block[:, q, c, :] = sign[b, q][:, None] * patches[b].T
        rows.append(block.reshape(patches.shape[2], size))
    u = np.concatenate(rows)
    w, z = cp.Variable(size), cp.Variable(size)
    slices = group_slices(stage)
    norms = sum(cp.norm(w[s], 2) + cp.norm(z[s], 2) for s in slices)
    violation = cp.sum(cp.pos(-(u @ w))) + cp.sum(cp.pos(-(u @ z)))
    rv = r.reshape(-1).numpy()
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(a @ (w - z) - rv) / (2 * n) + 0.02 * norms + 0.5 * violation / n)
    )
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
    cone_optimum = float(problem.value)
    gated, _ = make_stage(x, patterns=3, kernel_size=3, beta=0.02)  # the same gates
    gated_optimum, _ = solve_cvxpy(gated, x, r)
    assert gated_optimum <= cone_optimum + 1e-9
    with torch.no_grad():
        stage.w.copy_(torch.from_numpy(w.value).reshape(stage.w.shape))
        stage.z.copy_(torch.from_numpy(z.value).reshape(stage.z.shape))
    cert = duality_gap(stage, [(x, r)])
    assert cert["primal"] == pytest.approx(cone_optimum, rel=1e-7)
    assert cert["dual"] <= gated_optimum + 1e-9
    assert cert["gap"] >= cert["primal"] - cone_optimum - 1e-9


# ------------------------------------------------------------------------- 3. FISTA


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
def test_fista_reaches_relative_gap_1e_4(groups: str) -> None:
    x, r = smooth_data(4, 2, 16, seed=8, dtype=torch.float32)
    stage, _ = make_stage(x, patterns=8, kernel_size=3, beta=0.0, output_groups=groups)
    beta = 0.2 * duality_gap(stage, [(x, r)])["max_dual_norm"]
    stage = with_beta(stage, beta)
    seen: list[tuple[int, float]] = []
    result = fista(
        stage,
        [(x[:2], r[:2]), (x[2:], r[2:])],
        iterations=3000,
        tol=1e-4,
        check_every=5,
        callback=lambda i, c: seen.append((i, c["relative_gap"])),
    )
    print(
        f"FISTA {groups}: relative gap {result['relative_gap']:.2e} after "
        f"{result['iterations']:.0f} iterations, {result['restarts']:.0f} restarts"
    )
    assert result["relative_gap"] <= 1e-4
    assert result["iterations"] < 3000
    assert seen[-1] == (int(result["iterations"]), result["relative_gap"])
    assert seen[0][1] > 1e-4  # it did have work to do
    # The weights written back are the certified ones; some groups are zero, some not.
    again = duality_gap(stage, [(x, r)])["relative_gap"]  # float32: equal to ~1e-7 * primal
    assert again == pytest.approx(result["relative_gap"], abs=1e-6)
    norms = stage.group_norms()
    assert (norms == 0).any() and (norms > 0).any()


def test_fista_rejects_the_cone_program() -> None:
    x, r = smooth_data(1, 2, 6, seed=9)
    stage, _ = make_stage(x, patterns=2, kernel_size=3, program="cone")
    with pytest.raises(CvxmriError, match="gated"):
        fista(stage, [(x, r)], iterations=5)


# ------------------------------------------------------------- 4. mapping to ReLU


def cone_stage_on_origin_gates(x: torch.Tensor) -> ConvexStage:
    """A cone stage whose gates are hyperplanes through the origin of the raw input, so that
    multiples of the gate filters satisfy the cone constraints exactly."""
    stage, _ = make_stage(x, patterns=4, kernel_size=3, program="cone")
    with torch.no_grad():
        stage.gate_bias.zero_()
        stage.input_mean.zero_()
        stage.input_std.fill_(1)
    return stage


def test_relu_mapping_is_exact_where_cone_constraints_hold() -> None:
    x, _ = smooth_data(2, 2, 8, seed=10)
    stage = cone_stage_on_origin_gates(x)
    gen = torch.Generator().manual_seed(11)
    u = stage.gate_weight.detach()
    with torch.no_grad():
        # Positive multiples of u_p agree in sign with D_p; a few groups are zero.
        stage.w.copy_(torch.rand(4, 2, 1, 1, 1, generator=gen, dtype=F64) * u[:, None])
        stage.z.copy_(torch.rand(4, 2, 1, 1, 1, generator=gen, dtype=F64) * u[:, None])
        stage.w[1, 0] = 0
        stage.z[2] = 0
    assert float(stage.cone_violation(x).detach()) == 0
    report = stage.mapping_report(x)
    assert report["hidden_units"] == (8 - 1) + (8 - 2)
    assert report["violation_fraction"] == 0
    assert report["relative_output_difference"] < 1e-12
    first, last = stage.to_relu()
    assert first.weight.shape == (13, 2, 3, 3) and last.weight.shape == (2, 13, 1, 1)
    assert stage.hidden(x, "relu").shape == (2, 13, 8, 8)
    torch.testing.assert_close(last(F.relu(first(x))), stage(x), rtol=0, atol=1e-12)

    # Filters whose sign disagrees with the gates: the mapped network is a different model.
    with torch.no_grad():
        stage.w.copy_(torch.randn(stage.w.shape, generator=gen, dtype=F64))
    assert float(stage.cone_violation(x).detach()) > 0
    report = stage.mapping_report(x)
    assert report["violation_fraction"] > 0.1
    assert report["relative_output_difference"] > 0.1


def test_relu_mapping_of_zero_and_gated_solutions() -> None:
    x, r = smooth_data(2, 2, 8, seed=12)
    stage, _ = make_stage(x, patterns=4, kernel_size=3, beta=0.01)
    first, _ = stage.to_relu()
    assert first.weight.shape == (1, 2, 3, 3) and float(first.weight.detach().abs().sum()) == 0
    assert stage.mapping_report(x) == {
        "violation_fraction": 0.0,
        "relative_output_difference": 0.0,
        "hidden_units": 0.0,
    }
    fista(stage, [(x, r)], iterations=100)
    report = stage.mapping_report(x)
    assert report["hidden_units"] == int((stage.group_norms() > 0).sum())
    # A gated solution is not constrained to agree with its gates.
    assert 0 < report["violation_fraction"] < 1
    assert report["relative_output_difference"] > 0
    with pytest.raises(CvxmriError, match="kind"):
        stage.hidden(x, "linear")


# --------------------------------------------------------------------------- 5. gates


def pattern_statistics(stage: ConvexStage, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    d = stage.gates(x).transpose(0, 1).reshape(stage.config.patterns, -1)
    signs = 2 * d - 1
    agreement = (signs @ signs.T / d.shape[1] + 1) / 2
    off_diagonal = agreement[~torch.eye(d.shape[0], dtype=torch.bool)]
    return d.mean(dim=1), float(off_diagonal.max())


@pytest.mark.parametrize("kind", ["non-negative", "zero-channel"])
def test_gates_are_informative_and_deterministic(kind: str) -> None:
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 4, 12, 12, generator=gen)
    if kind == "non-negative":
        # Post-ReLU features with a zero background: bias-free Gaussian gates are constant.
        x = F.relu(F.avg_pool2d(x, 3, 1, 1) - 0.2)
        x[..., :3] = 0
    else:
        x[:, 2] = 0
    stage, _ = make_stage(x, patterns=16, kernel_size=3, gate_seed=5)
    gates = stage.gates(x)
    assert gates.shape == (3, 16, 12, 12) and gates.dtype == x.dtype
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    fractions, agreement = pattern_statistics(stage, x)
    assert fractions.min() >= 0.01 and fractions.max() <= 0.99
    assert agreement <= 0.99
    if kind == "zero-channel":
        assert float(stage.input_std[2]) == pytest.approx(1e-6) and float(stage.input_mean[2]) == 0

    again, _ = make_stage(x, patterns=16, kernel_size=3, gate_seed=5)
    for name in ["gate_weight", "gate_bias", "input_mean", "input_std"]:
        assert torch.equal(getattr(stage, name), getattr(again, name))
    other, _ = make_stage(x, patterns=16, kernel_size=3, gate_seed=6)
    assert not torch.equal(stage.gate_weight, other.gate_weight)


def test_gates_on_a_sample_without_variation_warn() -> None:
    stage = ConvexStage(2, 2, ConvexStageConfig(patterns=3, kernel_size=3))
    with pytest.warns(RuntimeWarning, match="constant or duplicate"):
        stage.init_gates(torch.zeros(1, 2, 6, 6))
    assert torch.isfinite(stage.gate_weight).all() and torch.isfinite(stage.gate_bias).all()


def test_a_pool_of_one_draws_the_gates_as_before() -> None:
    # gate_pool 1, or no residual: the gates are the first draws of the seed, whatever
    # `reserved` says (selection is what it changes).
    x, r = smooth_data(3, 2, 10, seed=21, dtype=torch.float32)
    plain, _ = make_stage(x, patterns=6, kernel_size=3, gate_seed=4)
    pooled = ConvexStage(
        2, 2, ConvexStageConfig(patterns=6, kernel_size=3, gate_seed=4, gate_pool=3)
    )
    pooled.init_gates(x, None, reserved=1)
    single = ConvexStage(2, 2, plain.config)
    single.init_gates(x, r, reserved=1)
    for stage in (pooled, single):
        assert torch.equal(stage.gate_weight, plain.gate_weight)
        assert torch.equal(stage.gate_bias, plain.gate_bias)


def autograd_scores(
    x: torch.Tensor, r: torch.Tensor, gates: torch.Tensor, groups: str
) -> torch.Tensor:
    """Each candidate's groups' gradient norms at v = 0 from autograd on the explicit
    model ``sum_c ||D_m * conv(x, v_c) - r_c||^2 / 2`` of that pattern alone."""
    scores = []
    for m in range(gates.shape[1]):
        v = torch.zeros(r.shape[1], x.shape[1], 3, 3, dtype=x.dtype, requires_grad=True)
        model = gates[:, m : m + 1] * F.conv2d(x, v, padding=1)
        (0.5 * (model - r).square().sum()).backward()
        assert v.grad is not None
        norms = v.grad.flatten(1).norm(dim=1) if groups == "separate" else v.grad.norm()
        scores.append(norms.sum())
    return torch.stack(scores)


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
@pytest.mark.parametrize("reserved", [0, 1])
def test_gates_selected_from_a_pool_are_the_best_scored(groups: str, reserved: int) -> None:
    x, r = smooth_data(3, 2, 10, seed=22)
    settings = ConvexStageConfig(patterns=5, kernel_size=3, gate_seed=9, output_groups=groups)
    pooled = ConvexStage(2, 2, dataclasses.replace(settings, gate_pool=3)).to(F64)
    pooled.init_gates(x, r, reserved=reserved)
    # The candidates, drawn again from the seed: (5 - reserved) x 3 of them.
    free = 5 - reserved
    reference = ConvexStage(2, 2, dataclasses.replace(settings, patterns=3 * free)).to(F64)
    reference.init_gates(x)
    scores = pooled.pattern_scores(
        x, r, reference.gate_weight.double(), reference.gate_bias.double()
    )
    expected = autograd_scores(x, r, reference.gates(x), groups)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=0)
    best = expected.argsort(descending=True)[:free].sort().values
    torch.testing.assert_close(pooled.gate_weight[reserved:], reference.gate_weight[best])
    torch.testing.assert_close(pooled.gate_bias[reserved:], reference.gate_bias[best])
    if reserved:
        assert not pooled.gate_weight[0].any() and float(pooled.gate_bias[0]) == 0
    # Selection helps where it is meant to: the kept patterns' scores are the pool's best,
    # above those of the first `free` draws (what gate_pool 1 would have kept).
    assert expected[best].sum() > expected[:free].sum()


def test_gate_selection_checks_its_arguments() -> None:
    x, r = smooth_data(2, 2, 8, seed=23, dtype=torch.float32)
    stage = ConvexStage(2, 2, ConvexStageConfig(patterns=3, kernel_size=3, gate_pool=2))
    with pytest.raises(CvxmriError, match="residual of shape"):
        stage.init_gates(x, r[:, :1])
    with pytest.raises(CvxmriError, match="reserved"):
        stage.init_gates(x, r, reserved=3)


# ------------------------------------------------------------------ 6. gap at zero


@pytest.mark.parametrize("groups", ["separate", "frobenius"])
def test_gap_at_zero_is_exact(groups: str) -> None:
    x, r = smooth_data(3, 2, 8, seed=14)
    stage, _ = make_stage(x, patterns=5, kernel_size=3, beta=0.0, output_groups=groups)
    largest = duality_gap(stage, [(x, r)])["max_dual_norm"]
    # beta >= the largest dual norm at 0: v = 0 is optimal and the gap closes exactly.
    optimal = with_beta(stage, largest)
    cert = duality_gap(optimal, [(x[:1], r[:1]), (x[1:], r[1:])])
    # (To the rounding of the batches' sums, in another order than the first pass's.)
    assert cert["dual_scale"] == pytest.approx(1, rel=1e-14)
    assert cert["primal"] == pytest.approx(0.5 * float(r.square().sum()) / 3, rel=1e-14)
    assert abs(cert["gap"]) <= 1e-14 * cert["primal"]
    # (With a margin: fista's gradient is summed in another order than the certificate's.)
    result = fista(with_beta(stage, largest * (1 + 1e-9)), [(x, r)], iterations=50)
    assert result["iterations"] == 10 and result["gap"] == 0 and result["primal"] > 0
    # beta = largest / 2: s = 1/2, dual = (s - s^2/2) ||r||^2 / N, relative gap 1/4.
    cert = duality_gap(with_beta(stage, largest / 2), [(x, r)])
    assert cert["dual_scale"] == pytest.approx(0.5, rel=1e-14)
    assert cert["relative_gap"] == pytest.approx(0.25, rel=1e-12)


# ----------------------------------------------------------------- 7. invalid settings


@pytest.mark.parametrize(
    "settings",
    [
        {"patterns": 0},
        {"patterns": 2.5},
        {"kernel_size": 4},
        {"kernel_size": 0},
        {"beta": -1e-3},
        {"beta": math.inf},
        {"beta": math.nan},
        {"program": "relu"},
        {"output_groups": "nuclear"},
        {"cone_penalty": -1.0},
        {"gate_pool": 0},
        {"gate_pool": 1.5},
    ],
)
def test_invalid_configs_raise(settings: dict[str, object]) -> None:
    config = ConvexStageConfig(**settings)  # type: ignore[arg-type]
    with pytest.raises(CvxmriError) as error:
        config.validate()
    assert "\n" not in str(error.value)
    with pytest.raises(CvxmriError):
        ConvexStage(2, 2, config)


def test_invalid_arguments_raise() -> None:
    config = ConvexStageConfig(patterns=2, kernel_size=3)
    with pytest.raises(CvxmriError, match="in_channels"):
        ConvexStage(0, 2, config)
    stage = ConvexStage(2, 2, config)
    with pytest.raises(CvxmriError, match="shape"):
        stage(torch.zeros(1, 3, 4, 4))
    with pytest.raises(CvxmriError, match="empty"):
        fista(stage, [], iterations=1)
    with pytest.raises(CvxmriError, match="at least one"):
        duality_gap(stage, [])


@pytest.mark.parametrize(
    ("ndim", "shape", "kernel"),
    [(2, (3, 5, 12, 10), 5), (2, (1, 3, 9, 9), 7), (3, (2, 4, 6, 7, 5), 3)],
)
@pytest.mark.parametrize("slab_bytes", [64 * 2**20, 1])
def test_exact_products_equal_float64_convolutions(
    monkeypatch: pytest.MonkeyPatch,
    ndim: int,
    shape: tuple[int, ...],
    kernel: int,
    slab_bytes: int,
) -> None:
    """The certificate's matrix-product pass equals float64 convolutions (`apply_weight`,
    `apply_adjoint`), in one slab and in slabs of one output row, with and without a
    given prediction."""
    monkeypatch.setattr(convex_module, "EXACT_SLAB_BYTES", slab_bytes)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    r = torch.randn(shape[0], 2, *shape[2:], generator=gen)
    stage = ConvexStage(shape[1], 2, ConvexStageConfig(patterns=4, kernel_size=kernel), ndim)
    stage.init_gates(x)
    with torch.no_grad():
        stage.v.copy_(torch.randn(stage.v.shape, generator=gen))
    d = stage.pattern_gates(x)
    x64, r64 = x.double(), r.double()
    prediction = stage.apply_weight(x64, stage.v.detach().double(), d)
    e = r64 - prediction
    expected = stage.apply_adjoint(x64, e, d)
    for given in (None, prediction):
        products, re, ee = exact_products(stage, x, r, d, given)
        torch.testing.assert_close(products, expected, rtol=1e-12, atol=1e-12)
        assert re == pytest.approx(float((r64 * e).sum()), rel=1e-12)
        assert ee == pytest.approx(float((e * e).sum()), rel=1e-12)


# ------------------------------------------------------------------------- 8. devices


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_devices_and_dtypes_agree(device: str, dtype: torch.dtype) -> None:
    x64, r64 = smooth_data(2, 2, 10, seed=15)
    reference, _ = make_stage(x64, patterns=6, kernel_size=3, beta=0.01)
    fista(reference, [(x64, r64)], iterations=30)
    stage = ConvexStage(2, 2, reference.config).to(device=device, dtype=dtype)
    stage.load_state_dict(reference.state_dict())
    x, r = x64.to(device, dtype), r64.to(device, dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-12
    assert stage(x).device.type == device and stage(x).dtype == dtype
    torch.testing.assert_close(stage(x).cpu().double(), reference(x64), rtol=0, atol=tolerance)
    expected = duality_gap(reference, [(x64, r64)])
    cert = duality_gap(stage, [(x, r)])
    for key in ["primal", "dual", "gap"]:
        assert cert[key] == pytest.approx(expected[key], rel=tolerance * 10, abs=tolerance)
    first, _ = stage.to_relu()
    assert first.weight.device.type == device and first.weight.dtype == dtype
    assert stage.mapping_report(x)["hidden_units"] > 0
    result = fista(stage, [(x, r)], iterations=20)
    assert math.isfinite(result["primal"])
    fresh = ConvexStage(2, 2, reference.config).to(device=device, dtype=dtype)
    fresh.init_gates(x)
    assert fresh.gates(x).device.type == device
    if dtype == torch.float64:  # float32 responses may flip a pixel at a tie
        assert torch.equal(fresh.gates(x).cpu(), reference.gates(x64))
