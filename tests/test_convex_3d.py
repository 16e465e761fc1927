"""3D (``ndim=3``) models on tiny volumes: the convex stage's gates, objective, gradient and
certificate against an explicit matrix built column by column from shifted copies of the
volume (no convolution), packed patterns, and the CNN layers and exported stage layers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvxmri.errors import CvxmriError
from cvxmri.models import convex as convex_module
from cvxmri.models.cnn import GatedConv, ReconCNN, ReluConv, to_channels, to_complex
from cvxmri.models.conv import conv_ops
from cvxmri.models.convex import (
    ConvexStage,
    ConvexStageConfig,
    duality_gap,
    pack_gates,
    unpack_gates,
)
from cvxmri.models.stages import StageSpec, build_stage, gated_layers, relu_layers

F64 = torch.float64
K = 3
P = 3
OUT = 2


def volume_data(batch: int = 2, channels: int = 2, size: int = 5, seed: int = 0):
    """Smooth random volumes and a non-linear residual target of them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, size, generator=gen, dtype=F64)
    x = F.avg_pool3d(x, 3, 1, 1) * 3
    r = torch.stack([torch.tanh(2 * x[:, 0]) * x[:, 1], F.relu(x[:, 0] - x[:, 1])], dim=1)
    return x, r + 0.05 * torch.randn(r.shape, generator=gen, dtype=F64)


def make_stage(x: torch.Tensor, **settings: object) -> ConvexStage:
    config = ConvexStageConfig(patterns=P, kernel_size=K, **settings)  # type: ignore[arg-type]
    stage = ConvexStage(x.shape[1], OUT, config, ndim=3).to(F64)
    stage.init_gates(x)
    return stage


def shifted(x: torch.Tensor, offset: tuple[int, int, int]) -> torch.Tensor:
    """``x`` (B, C, D, H, W) read at ``voxel + offset - K // 2`` with zeros outside: the
    input under one tap of a 'same' KxKxK filter (cross-correlation, as torch convolves)."""
    pad = K // 2
    padded = F.pad(x, (pad,) * 6)
    d, h, w = x.shape[2:]
    a, b, c = offset
    return padded[:, :, a : a + d, b : b + h, c : c + w]


def explicit_gates(stage: ConvexStage, x: torch.Tensor) -> torch.Tensor:
    """``1[sum_{c,tap} u_p[c, tap] * normalised x at tap + b_p >= 0]``: (B, P, D, H, W)."""
    mean = stage.input_mean.view(1, -1, 1, 1, 1)
    std = stage.input_std.view(1, -1, 1, 1, 1)
    xn = (x - mean) / std
    pre = stage.gate_bias.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()
    for p, c, tap in itertools.product(
        range(P), range(x.shape[1]), itertools.product(range(K), repeat=3)
    ):
        pre[:, p] += stage.gate_weight[(p, c, *tap)] * shifted(xn, tap)[:, c]
    return (pre >= 0).to(F64)


def explicit_operator(stage: ConvexStage, x: torch.Tensor) -> torch.Tensor:
    """The matrix A, built one column at a time: column (p, o, c, tap) (the layout of v,
    ``(P, out, C_in, K, K, K)``) is the model's output for the unit weight at that entry,
    ``D_p * (x_c at tap)`` in output channel o, rows (b, o, voxel)."""
    d = explicit_gates(stage, x)
    batch, c_in = x.shape[:2]
    columns = []
    for p, o, c, tap in itertools.product(
        range(P), range(OUT), range(c_in), itertools.product(range(K), repeat=3)
    ):
        column = torch.zeros(batch, OUT, *x.shape[2:], dtype=F64)
        column[:, o] = d[:, p] * shifted(x, tap)[:, c]
        columns.append(column.reshape(-1))
    return torch.stack(columns, dim=1)


def test_conv_table() -> None:
    assert conv_ops(2).conv is F.conv2d and conv_ops(3).conv is F.conv3d
    assert conv_ops(3).conv_weight is torch.nn.grad.conv3d_weight
    assert conv_ops(3).module is torch.nn.Conv3d
    assert conv_ops(3).channels_last is torch.channels_last_3d
    for bad in (1, 4, True):
        with pytest.raises(CvxmriError, match="ndim"):
            conv_ops(bad)


def test_objective_and_gradient_match_the_explicit_matrix() -> None:
    x, r = volume_data()
    stage = make_stage(x, beta=0.07)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        stage.v.copy_(torch.randn(stage.v.shape, generator=gen, dtype=F64))
    assert stage.v.shape == (P, OUT, 2, K, K, K)
    d = stage.gates(x)
    assert d.shape == (2, P, 5, 5, 5)
    assert torch.equal(d, explicit_gates(stage, x))
    assert 0 < float(d.mean()) < 1  # informative patterns, not constant
    assert stage.pattern_gates(x, chunk=1).equal(d.bool())

    a = explicit_operator(stage, x)
    assert a.shape == (2 * OUT * 125, P * OUT * 2 * K**3)
    v = stage.v.detach().reshape(-1)
    model = (a @ v).reshape(r.shape)
    misfit = model - r
    torch.testing.assert_close(stage(x), model, rtol=0, atol=1e-12)
    data = 0.5 * misfit.square().sum() / 2
    torch.testing.assert_close(stage.data_term(x, r), data, rtol=1e-12, atol=0)
    norms = torch.linalg.vector_norm(stage.v.detach().flatten(2), dim=2)  # separate groups
    torch.testing.assert_close(stage.objective(x, r), data + 0.07 * norms.sum(), rtol=1e-12, atol=0)
    # The adjoint in the weight is A^T, and the autograd-free data term and gradient are
    # 0.5 ||A v - r||^2 / B and A^T (A v - r) / B, whole and pattern chunk by chunk.
    adjoint = stage.apply_adjoint(x, r)
    torch.testing.assert_close(
        adjoint, (a.T @ r.reshape(-1)).reshape(stage.v.shape), rtol=0, atol=1e-12
    )
    weight = torch.randn(stage.v.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(
        stage.apply_weight(x, weight), (a @ weight.reshape(-1)).reshape(r.shape), rtol=0, atol=1e-12
    )
    expected = (a.T @ misfit.reshape(-1) / 2).reshape(stage.v.shape)
    for chunk in (0, 1, 2):
        value, grad = stage.data_term_and_gradient(x, r, chunk)
        assert value.item() == pytest.approx(float(data), rel=1e-6)
        torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-6)
    gates = unpack_gates(pack_gates(stage.pattern_gates(x)), P)
    value, grad = stage.data_term_and_gradient(x, r, 0, gates=gates)
    torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_slabs_of_a_large_patch_give_the_exact_gradient(
    thickness: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A patch of more than `SLAB_POSITIONS` positions is worked through in slabs (with the
    K // 2 positions around each): the same data term and gradient, ``A^T (A v - r) / B``
    of the explicit matrix."""
    x, r = volume_data()
    stage = make_stage(x, beta=0.07)
    with torch.no_grad():
        stage.v.copy_(torch.randn(stage.v.shape, generator=torch.Generator().manual_seed(2)))
    a = explicit_operator(stage, x)
    misfit = (a @ stage.v.detach().reshape(-1)).reshape(r.shape) - r
    expected = (a.T @ misfit.reshape(-1) / 2).reshape(stage.v.shape)
    # 5x5 positions across the first axis: slabs of `thickness` positions.
    monkeypatch.setattr(convex_module, "SLAB_POSITIONS", 25 * thickness)
    for chunk in (1, 2):
        value, grad = stage.data_term_and_gradient(x, r, chunk)
        assert value.item() == pytest.approx(float(0.5 * misfit.square().sum() / 2), rel=1e-6)
        torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-6)


def test_certificate_matches_the_explicit_group_lasso() -> None:
    x, r = volume_data(batch=3, seed=2)
    stage = make_stage(x, beta=0.05)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        stage.v.copy_(0.1 * torch.randn(stage.v.shape, generator=gen, dtype=F64))
    a = explicit_operator(stage, x).numpy()
    v = stage.v.detach().reshape(-1).numpy()
    rv = r.reshape(-1).numpy()
    n = 3
    e = rv - a @ v
    grad = -a.T @ e / n
    group = 2 * K**3  # separate groups: one (pattern, output) filter over (C_in, K, K, K)
    slices = [slice(i, i + group) for i in range(0, v.size, group)]
    dual_norms = [np.linalg.norm(grad[s]) for s in slices]
    scale = min(1.0, 0.05 / max(dual_norms))
    primal = 0.5 * e @ e / n + 0.05 * sum(np.linalg.norm(v[s]) for s in slices)
    dual = (0.5 * rv @ rv - 0.5 * np.sum((rv - scale * e) ** 2)) / n
    cert = duality_gap(stage, [(x[:2], r[:2]), (x[2:], r[2:])])
    assert 0 < scale < 1  # the scaled branch of the dual point
    assert cert["primal"] == pytest.approx(primal, rel=1e-12)
    assert cert["dual"] == pytest.approx(dual, rel=1e-12)
    assert cert["max_dual_norm"] == pytest.approx(max(dual_norms), rel=1e-12)
    assert cert["gap"] == pytest.approx(primal - dual, rel=1e-10)


@pytest.mark.parametrize("patterns", [1, 8, 13])
def test_packed_gates_roundtrip_3d(patterns: int) -> None:
    gen = torch.Generator().manual_seed(patterns)
    gates = torch.rand(2, patterns, 3, 5, 4, generator=gen) > 0.5
    packed = pack_gates(gates)
    assert packed.dtype == torch.uint8 and packed.shape == (2, -(-patterns // 8), 3, 5, 4)
    assert unpack_gates(packed, patterns).equal(gates)
    assert unpack_gates(packed[:, :, 1:3, 1:4, :2], patterns).equal(gates[:, :, 1:3, 1:4, :2])


def test_cnn_layers_and_exported_stages_in_3d(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x0 = torch.randn(2, 2, 4, 6, 5)
    relu = ReluConv(2, 4, 3, ndim=3)
    assert relu(x0).shape == (2, 4, 4, 6, 5) and bool((relu(x0) >= 0).all())
    network = ReconCNN.relu(3, 4, 3, ndim=3)
    assert network.ndim == 3 and network(x0).shape == x0.shape
    assert torch.equal(network(x0), x0)  # the zero output layer: the identity at the start
    # A gated stage's exported layers give x0 + stage(x0), in 3D as in 2D.
    stage = ConvexStage(2, 2, ConvexStageConfig(patterns=5, kernel_size=3), ndim=3)
    stage.init_gates(x0)
    with torch.no_grad():
        stage.v.normal_()
    first, last = gated_layers(stage)
    assert isinstance(first, GatedConv) and first(x0).shape == (2, 10, 4, 6, 5)
    gated = ReconCNN([first], last)
    torch.testing.assert_close(gated(x0), x0 + stage(x0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        gated.last_hidden(x0), stage.hidden(x0, "gated"), rtol=1e-5, atol=1e-5
    )
    # The mapped ReLU layers of a stage are 3D convolutions too.
    relu_first, relu_last = relu_layers(stage)
    assert relu_first(x0).shape[2:] == x0.shape[2:] and relu_last.weight.dim() == 5
    for net in (network, gated):
        path = tmp_path / "net3d.pt"
        net.save(path)
        again = ReconCNN.load(path)
        assert again.ndim == 3
        torch.testing.assert_close(again(x0), net(x0))
    # Complex volumes <-> 2 channels on the axis before the 3 spatial ones.
    image = torch.randn(2, 4, 6, 5, dtype=torch.complex64)
    channels = to_channels(image, ndim=3)
    assert channels.shape == (2, 2, 4, 6, 5)
    assert torch.equal(to_complex(channels, ndim=3), image)


def test_stage_factory_in_3d() -> None:
    x0 = torch.randn(2, 2, 4, 6, 5)
    for method in ("layerwise-convex", "layerwise-nonconvex"):
        spec = StageSpec(method=method, channels=4, kernel_size=3, ndim=3)
        stage = build_stage(spec, 0, 2, x0, seed=1)
        optimizer = torch.optim.Adam(stage.module.parameters(), lr=1e-2)
        loss = stage.step(x0, torch.randn(2, 2, 4, 6, 5), optimizer)
        assert loss > 0
        first, last = stage.freeze()
        assert last(first(x0)).shape == x0.shape


def test_a_3d_stage_refuses_2d_inputs() -> None:
    stage = ConvexStage(2, 2, ConvexStageConfig(patterns=2, kernel_size=3), ndim=3)
    with pytest.raises(CvxmriError, match=r"\(B, 2, D, H, W\)"):
        stage.gates(torch.randn(1, 2, 5, 5))


def test_model_files_without_ndim_load_as_2d(tmp_path: Path) -> None:
    """Files written before 3D support have no ``ndim`` in their architecture."""
    import json

    network = ReconCNN.relu(3, 4, 3)
    path = tmp_path / "old.pt"
    network.save(path)
    payload = torch.load(path, weights_only=True)
    spec = json.loads(payload["architecture"])
    assert all(entry["ndim"] == 2 for entry in spec)
    payload["architecture"] = json.dumps(
        [{k: v for k, v in e.items() if k != "ndim"} for e in spec]
    )
    torch.save(payload, path)
    again = ReconCNN.load(path)
    x = torch.randn(1, 2, 8, 8)
    assert again.ndim == 2 and torch.equal(again(x), network(x))
