"""Unrolled networks: the model (start, files), a greedy convex iteration's Gram system
against the explicit design, its optimum against cvxpy, and the three ways to train it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN, to_channels, to_complex
from cvxmri.models.convex import ConvexStage, ConvexStageConfig
from cvxmri.models.dc import ChebyshevDC, DCConfig
from cvxmri.models.unrolled import UnrolledNet, load_network
from cvxmri.physics import recon_sense
from cvxmri.training import unrolled as unrolled_training
from cvxmri.training.config import CertifiedConfig, TrainConfig, UnrolledConfig, preset
from cvxmri.training.trainer import TrainingStopped
from cvxmri.training.unrolled import (
    IterationData,
    IterationSolver,
    UnrolledTrainer,
    dc_gram_system,
    exact_pass,
    line_search,
    split_images,
)

F64 = torch.float64


def batch(seed: int = 0, size: int = 3, grid: tuple[int, ...] = (10, 12), recon=(8, 8)):
    """A random multi-coil batch: (x0, y, mask, maps) with x0 = crop(A^H y); volumes when
    ``grid`` and ``recon`` have three axes (the mask then a (ky, kz) pattern)."""
    ndim = len(grid)
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(size, 3, *grid, dtype=torch.complex64, generator=gen)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
    mask_grid = (*[1] * (ndim - 2), *grid[-2:])
    mask = (torch.rand(size, 1, *mask_grid, generator=gen) < 0.4).float()
    image = torch.randn(size, *recon, dtype=torch.complex64, generator=gen)
    op = recon_sense(maps, mask, recon, ndim)
    y = op(image)
    return to_channels(op.H(y), ndim), y, mask, maps


@pytest.mark.parametrize("kind", ["gradient", "cg"])
def test_a_new_network_is_t_data_consistency_steps(kind: str) -> None:
    """The regularisers' output layers start at zero: the network is DC applied T times."""
    x0, y, mask, maps = batch()
    net = UnrolledNet.relu(3, 4, 3, DCConfig(kind=kind, cg_iterations=5))
    op = recon_sense(maps, mask, (8, 8))
    expected = to_complex(x0)
    for _ in range(3):
        expected = net.dc(expected, op, op.H(y))
    torch.testing.assert_close(to_complex(net(x0, y, mask, maps)), expected)
    assert len(net.iterates(x0, y, mask, maps)) == 3


def test_a_regulariser_computes_the_same_in_channels_last_and_returns_the_standard_layout():
    """`ReconCNN` runs its layers channels-last on the CPU (`fast_layout`): the same output
    and input gradient as its layers on the contiguous input, in the standard layout."""
    torch.manual_seed(0)
    net = ReconCNN.relu(2, 8, 3)
    torch.nn.init.normal_(net.final.weight)
    x = torch.randn(2, 2, 12, 10, requires_grad=True)
    out = net(x)
    assert out.is_contiguous()
    h = x
    for layer in net.hidden:
        h = layer(h)
    plain = x + net.final(h)
    torch.testing.assert_close(out, plain)
    (got,) = torch.autograd.grad(out.square().sum(), x)
    (want,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shared", [False, True])
def test_saved_network_reloads_with_the_same_output(tmp_path: Path, shared: bool) -> None:
    x0, y, mask, maps = batch(1)
    torch.manual_seed(0)
    net = UnrolledNet.relu(2, 4, 3, DCConfig(kind="cg", lamda=0.1, cg_iterations=4), shared)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.save(tmp_path / "model.pt", {"method": "end-to-end"})
    back = load_network(tmp_path)
    assert isinstance(back, UnrolledNet) and back.shared == shared
    assert back.metadata["method"] == "end-to-end"
    assert back.dc.config() == net.dc.config()
    torch.testing.assert_close(back(x0, y, mask, maps), net(x0, y, mask, maps))
    # A CNN file loads through the same function; ReconCNN.load refuses the unrolled one.
    ReconCNN.relu(2, 4, 3).save(tmp_path / "cnn.pt")
    assert isinstance(load_network(tmp_path / "cnn.pt"), ReconCNN)
    with pytest.raises(CvxmriError, match="an unrolled network, not a CNN"):
        ReconCNN.load(tmp_path / "model.pt")


def iteration_problem(kind: str, seed: int = 3, ndim: int = 2, size: int = 2, side: int = 8):
    """A small greedy convex iteration of ``size`` images of ``side`` x ``side`` pixels: its
    stage (3 patterns, 3x3; 3x3x3 on 4x5x6 volumes with ``ndim`` 3), data and DC."""
    grid, recon = ((side + 2, side + 4), (side, side)) if ndim == 2 else ((6, 6, 8), (4, 5, 6))
    x0, y, mask, maps = batch(seed, size=size, grid=grid, recon=recon)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(x0.shape, generator=gen)
    dc = DCConfig(kind=kind, eta=1.2, lamda=0.2, cg_iterations=40).build()
    op = recon_sense(maps, mask, recon, ndim)
    offset = to_channels(dc(to_complex(x0, ndim), op, op.H(y)), ndim)
    stage = ConvexStage(
        2, 2, ConvexStageConfig(patterns=3, kernel_size=3, output_groups="frobenius"), ndim
    )
    stage.init_gates(x0)
    data = [IterationData(x0, target - offset, stage.pattern_gates(x0), maps, mask)]
    return stage, data, dc


def explicit_design(stage: ConvexStage, data, dc) -> torch.Tensor:
    """The real design matrix (voxels * 2 * N, unknowns): the iteration's output
    ``L Phi e_j`` for every unit weight ``e_j`` (column j; all columns in one batch)
    through the real operators in float64."""
    chunk = data[0]
    n, count = chunk.x.shape[0], stage.v.numel()
    shape = tuple(chunk.x.shape[2:])
    units = torch.eye(count, dtype=F64).view(count, *stage.v.shape)
    x, gates = chunk.x.double(), chunk.gates.double()
    preds = torch.stack([stage.apply_weight(x, w, gates) for w in units])  # (q, N, 2, *shape)
    op = recon_sense(
        chunk.maps.to(torch.complex128).repeat(count, *[1] * (chunk.maps.dim() - 1)),
        chunk.mask.double().repeat(count, *[1] * (chunk.mask.dim() - 1)),
        shape,
        len(shape),
    )
    flat = preds.reshape(count * n, *preds.shape[2:])
    mapped = dc.linear(torch.complex(flat[:, 0], flat[:, 1]), op)
    return torch.stack([mapped.real, mapped.imag], dim=1).reshape(count, -1).T


@pytest.mark.parametrize(
    ("kind", "ndim", "lean"),
    [
        ("gradient", 2, False),
        ("cg", 2, False),
        ("chebyshev", 2, False),
        ("chebyshev", 2, True),
        ("gradient", 3, False),
        ("gradient", 2, True),
        ("gradient", 3, True),
    ],
)
def test_dc_gram_system_is_the_explicit_normal_matrix(
    kind: str, ndim: int, lean: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In 2D and on volumes (3x3x3 filters), by either route (the lean one through L^2,
    forced by a zero byte bound), against the design built column by column."""
    stage, data, dc = iteration_problem(kind, ndim=ndim)
    if lean:
        monkeypatch.setattr(unrolled_training, "MAPPED_BYTES", 0)
        monkeypatch.setattr(unrolled_training, "_mapped_products", None)
    system = dc_gram_system(stage, data, dc)
    a = explicit_design(stage, data, dc)
    r = data[0].r.double().reshape(-1)
    n = data[0].x.shape[0]
    gram, rhs = a.T @ a / n, a.T @ r / n
    torch.testing.assert_close(system.gram, gram, rtol=0, atol=1e-6 * float(gram.abs().max()))
    torch.testing.assert_close(system.rhs[:, 0], rhs, rtol=0, atol=1e-6 * float(rhs.abs().max()))
    assert system.rr == pytest.approx(float(r.square().sum()) / n, rel=1e-6)
    assert system.patterns == 3 and system.block == 2 * 2 * 3**ndim


@pytest.mark.parametrize("kind", ["gradient", "chebyshev"])
def test_convex_iteration_optimum_matches_cvxpy(kind: str) -> None:
    """The solver's optimum matches an independent solver to 1e-6 relative, and every
    certificate's gap bounds the true suboptimality, for either linear DC."""
    cp = pytest.importorskip("cvxpy")
    stage, data, dc = iteration_problem(kind, seed=5)
    solver = IterationSolver(stage, data, dc, tol=1e-7, max_seconds=60, max_iterations=20_000)
    beta = 0.05 * solver.beta_max()
    trace: list[list[float]] = []
    cert = solver.solve(beta, trace)
    a = explicit_design(stage, data, dc).numpy()
    r = data[0].r.double().reshape(-1).numpy()
    v = cp.Variable(a.shape[1])
    block = a.shape[1] // 3
    penalty = sum(cp.norm(v[p * block : (p + 1) * block], 2) for p in range(3))
    n = data[0].x.shape[0]
    problem = cp.Problem(cp.Minimize(cp.sum_squares(a @ v - r) / (2 * n) + beta * penalty))
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8)
    optimum = float(problem.value)
    assert cert["relative_gap"] <= 1e-7, cert
    assert cert["primal"] == pytest.approx(optimum, rel=1e-6)
    assert cert["dual"] <= optimum * (1 + 1e-8)
    # The zero weight's certificate (the first exact pass of a cold start) bounds too.
    zero = exact_pass(stage, torch.zeros_like(stage.v), data, dc).certificate(beta)
    assert zero["primal"] - optimum <= zero["gap"] + 1e-9 * optimum
    assert zero["gap"] > 1e-3 * zero["primal"]


def test_line_search_point_is_the_exact_pass_there_and_the_lowest_on_its_ray() -> None:
    """The line search's point equals a fresh exact pass at its weight (residuals,
    gradient and <r, e> are affine along the ray, ||e||^2 quadratic), and no point of
    the ray is lower, including ones beyond the new pass (a model too stiff)."""
    stage, data, dc = iteration_problem("gradient", seed=5, size=6, side=24)
    beta = (
        0.05
        * IterationSolver(stage, data, dc, tol=1e-6, max_seconds=60, max_iterations=100).beta_max()
    )
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(stage.v.shape, generator=gen, dtype=F64)
    old = exact_pass(stage, 0.01 * start, data, dc)
    # A short step towards the optimum's side: the best multiple of it lies beyond 1.
    new = exact_pass(stage, 0.01 * start - 0.03 * old.gradient, data, dc)
    point, reach = line_search(old, new, beta)
    assert 1 < reach < 16
    fresh = exact_pass(stage, point.weight, data, dc)
    assert point.ee == pytest.approx(fresh.ee, rel=1e-10)
    assert point.re == pytest.approx(fresh.re, rel=1e-10)
    torch.testing.assert_close(point.gradient, fresh.gradient, rtol=1e-9, atol=1e-12)
    lowest = point.certificate(beta)["primal"]
    for a in torch.linspace(0, 16, 161).tolist():
        along = exact_pass(stage, old.weight + a * (new.weight - old.weight), data, dc)
        assert lowest <= along.certificate(beta)["primal"] * (1 + 1e-12)


def test_a_path_reuses_the_pass_where_the_previous_beta_ended() -> None:
    """beta_max's pass at zero starts the first beta, each beta's last pass the next
    one's: the solver's passes are the betas' passes plus that one."""
    stage, data, dc = iteration_problem("gradient", seed=5, size=6, side=24)
    with torch.no_grad():
        stage.v.zero_()
    solver = IterationSolver(stage, data, dc, tol=1e-6, max_seconds=60, max_iterations=20_000)
    largest = solver.beta_max()
    results = [solver.solve(f * largest, []) for f in (0.3, 0.1, 0.03)]
    assert all(r["relative_gap"] <= 1e-6 for r in results)
    assert solver.passes == 1 + sum(r["passes"] for r in results)


def test_split_images_counts_across_chunks() -> None:
    images = torch.arange(5.0).view(5, 1, 1, 1)
    chunks = [
        IterationData(images[a:b], images[a:b], images[a:b], images[a:b], images[a:b])
        for a, b in [(0, 2), (2, 3), (3, 5)]
    ]
    chosen, others = split_images(chunks, 2)
    assert torch.cat([c.x for c in chosen]).flatten().tolist() == [0, 2, 4]
    assert torch.cat([c.mask for c in others]).flatten().tolist() == [1, 3]
    assert [c.x.shape[0] for c in chosen] == [1, 1, 1]
    chosen, others = split_images(chunks, 1)
    assert torch.cat([c.maps for c in chosen]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert others == []


@pytest.mark.parametrize("kind", ["gradient", "chebyshev"])
def test_a_model_from_fewer_images_reaches_the_whole_sets_optimum(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Gram model of every other image of six: the same certified optimum as the
    whole set's model (rounds with the whole set's exact gradients), in more passes; and
    a model that grows to the whole set after two passes."""
    stage, data, dc = iteration_problem(kind, seed=5, size=6, side=24)
    start = stage.v.detach().clone()
    results = {}
    for name, step, rounds in [("whole", 1, 6), ("half", 2, 100), ("grown", 2, 2)]:
        monkeypatch.setattr(unrolled_training, "MODEL_ROUNDS", rounds)
        with torch.no_grad():
            stage.v.copy_(start)
        solver = IterationSolver(
            stage, data, dc, tol=1e-6, max_seconds=60, max_iterations=20_000, model_step=step
        )
        beta = 0.05 * solver.beta_max()
        results[name] = (solver.solve(beta, []), stage.v.detach().clone())
    whole, whole_v = results["whole"]
    assert whole["model_images"] == 6 and whole["relative_gap"] <= 1e-6
    for name, images in [("half", 3), ("grown", 6)]:
        cert, v = results[name]
        assert cert["model_images"] == images
        assert cert["relative_gap"] <= 1e-6
        assert cert["primal"] == pytest.approx(whole["primal"], rel=1e-6)
        assert cert["passes"] > whole["passes"]
        torch.testing.assert_close(v, whole_v, rtol=0, atol=1e-3 * float(whole_v.abs().max()))
    assert results["grown"][0]["passes"] < results["half"][0]["passes"]


def test_a_model_with_too_little_curvature_is_stiffened(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose matrix is a third of the true one overshoots: its line searches cut
    its steps, its curvature is doubled, and it still reaches the optimum that the true
    model reaches."""
    stage, data, dc = iteration_problem("gradient", seed=5, size=6, side=24)
    start = stage.v.detach().clone()
    results = []
    for scale in [1.0, 1 / 3]:

        def scaled(stage, images, dc, scale=scale):
            system = dc_gram_system(stage, images, dc)
            return replace(system, gram=system.gram * scale)

        monkeypatch.setattr(unrolled_training, "dc_gram_system", scaled)
        with torch.no_grad():
            stage.v.copy_(start)
        solver = IterationSolver(stage, data, dc, tol=1e-6, max_seconds=60, max_iterations=20_000)
        results.append(solver.solve(0.05 * solver.beta_max(), []))
    true, soft = results
    assert true["curvature"] == 1.0
    assert soft["curvature"] >= 2.0
    assert soft["relative_gap"] <= 1e-6
    assert soft["primal"] == pytest.approx(true["primal"], rel=1e-6)


def unrolled_config(tiny_data: Path, method: str, **changes) -> TrainConfig:
    return replace(
        preset("tiny"),
        data=str(tiny_data),
        method=method,
        arch="unrolled",
        crop=0,
        unrolled=UnrolledConfig(iterations=2, channels=4, kernel_size=3, betas=(0.1, 0.01)),
        certified=CertifiedConfig(tol=1e-3),
        **changes,
    )


@pytest.mark.parametrize("method", ["layerwise-convex", "layerwise-nonconvex", "end-to-end"])
def test_each_method_trains_an_unrolled_network(
    tiny_data: Path, tmp_path: Path, method: str
) -> None:
    config = unrolled_config(tiny_data, method)
    trainer = UnrolledTrainer(config, tmp_path)
    model = trainer.fit()
    assert isinstance(model, UnrolledNet) and model.iterations == 2
    assert [row["iterations"] for row in trainer.depth_metrics] == [1, 2]
    # The network's own output gives the last row's metrics.
    val = trainer.val_samples
    with torch.no_grad():
        pred = model(val.x0, val.y, val.mask, val.maps)
    assert trainer._metrics(pred)["val_psnr"] == pytest.approx(
        trainer.depth_metrics[-1]["val_psnr"], abs=1e-4
    )
    if method == "layerwise-convex":
        assert trainer.certificates and all(c["certified"] for c in trainer.certificates)
        assert sum(1 for c in trainer.certificates if c.get("selected")) == 2
    else:
        assert not trainer.certificates


def test_greedy_convex_training_certifies_with_the_chebyshev_dc(
    tiny_data: Path, tmp_path: Path
) -> None:
    unrolled = UnrolledConfig(
        iterations=2, channels=4, kernel_size=3, dc=DCConfig(kind="chebyshev", cg_iterations=6)
    )
    config = replace(unrolled_config(tiny_data, "layerwise-convex"), unrolled=unrolled)
    trainer = UnrolledTrainer(config, tmp_path)
    model = trainer.fit()
    assert isinstance(model.dc, ChebyshevDC)
    assert trainer.certificates and all(c["certified"] for c in trainer.certificates)
    with pytest.raises(CvxmriError, match="--dc chebyshev"):
        replace(config, unrolled=replace(unrolled, dc=DCConfig(kind="cg"))).validate()


def test_greedy_convex_training_certifies_with_a_model_of_fewer_images(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = unrolled_config(tiny_data, "layerwise-convex")
    unrolled = replace(config.unrolled, gram_images=2)
    trainer = UnrolledTrainer(replace(config, unrolled=unrolled), tmp_path)
    with caplog.at_level("INFO", logger="cvxmri.training.unrolled"):
        trainer.fit()
    assert "built on 2 of 4 images" in caplog.text
    assert trainer.certificates and all(c["certified"] for c in trainer.certificates)


def test_greedy_training_resumes_to_the_same_network(tiny_data: Path, tmp_path: Path) -> None:
    config = unrolled_config(tiny_data, "layerwise-nonconvex")
    for name in ("whole", "parts"):
        (tmp_path / name).mkdir()
    whole = UnrolledTrainer(config, tmp_path / "whole").fit()
    interrupted = UnrolledTrainer(config, tmp_path / "parts")
    with pytest.raises(TrainingStopped):
        interrupted.fit(stop_after=1)
    resumed = UnrolledTrainer(config, tmp_path / "parts").fit()
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unrolled_settings_are_checked() -> None:
    with pytest.raises(CvxmriError, match="shared weights need method end-to-end"):
        replace(preset("tiny"), arch="unrolled", unrolled=UnrolledConfig(shared=True)).validate()
    with pytest.raises(CvxmriError, match="unknown arch 'rnn'"):
        replace(preset("tiny"), arch="rnn").validate()
    with pytest.raises(CvxmriError, match=r"unrolled\.iterations=0"):
        replace(preset("tiny"), arch="unrolled", unrolled=UnrolledConfig(iterations=0)).validate()
    with pytest.raises(CvxmriError, match=r"unrolled\.gram_images=-1"):
        bad = UnrolledConfig(gram_images=-1)
        replace(preset("tiny"), arch="unrolled", unrolled=bad).validate()
    for betas in [(), (0.0, 0.1), (float("nan"),), (1.5,)]:
        with pytest.raises(CvxmriError, match=r"unrolled\.betas=.*fractions in \(0, 1\]"):
            bad = UnrolledConfig(betas=betas)
            replace(preset("tiny"), arch="unrolled", unrolled=bad).validate()
    with pytest.raises(CvxmriError, match=r"certified\.betas=\(0\.0,\)"):
        replace(preset("tiny"), certified=CertifiedConfig(betas=(0.0,))).validate()


def test_cli_trains_an_unrolled_network_that_predict_and_evaluate_use(
    tiny_data: Path, tmp_path: Path
) -> None:
    """``train --arch unrolled`` records what ran; the run folder works as --model of
    predict and evaluate, which score its images alike."""
    import csv

    import h5py
    import numpy as np
    import yaml

    from cvxmri.cli import main
    from cvxmri.data.prepare import default_cache_dir, prepare_volume
    from cvxmri.metrics import volume_metrics

    run = tmp_path / "run"
    data = ["--data", str(tiny_data)]
    train = ["train", "--preset", "tiny", "--arch", "unrolled", "--method", "end-to-end"]
    options = ["--iterations", "2", "--channels", "4", "--kernel", "3", "--dc", "cg"]
    options += ["--epochs", "2"]
    assert main([*train, *options, *data, "--out", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["arch"] == "unrolled" and saved["crop"] == 0
    assert saved["unrolled"]["iterations"] == 2 and saved["unrolled"]["channels"] == 4
    assert saved["unrolled"]["kernel_size"] == 3
    assert saved["unrolled"]["dc"]["kind"] == "cg"
    model = load_network(run)
    assert isinstance(model, UnrolledNet) and model.metadata["iterations"] == 2
    out, scored = tmp_path / "recon", tmp_path / "scored"
    assert main(["predict", "--model", str(run), *data, "--out", str(out)]) == 0
    mask = ["--mask", "poisson", "--calib-size", "6"]  # the tiny preset's training mask
    assert main(["evaluate", "--model", str(run), *data, *mask, "--out", str(scored)]) == 0
    with (scored / "per_volume.csv").open() as handle:
        rows = {r["file"]: r for r in csv.DictReader(handle) if r["method"] == "run"}
    assert rows
    for volume, row in rows.items():
        path = tiny_data / volume
        with h5py.File(out / path.name, "r") as hf:
            recon = np.asarray(hf["reconstruction"])
        target = np.abs(prepare_volume(path, default_cache_dir(tiny_data)).target)
        assert volume_metrics(target, recon)["psnr"] == pytest.approx(float(row["psnr"]), rel=1e-9)
