"""Training: exported layers equal the stage, frozen layers get no gradient, exact resume,
and networks that save and load without the training code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStage, ConvexStageConfig, unpack_gates
from cvxmri.models.stages import Stage, carry_prediction, gated_layers
from cvxmri.training.config import TrainConfig, preset
from cvxmri.training.trainer import StageInputs, Trainer, TrainingStopped, write_outputs


@pytest.fixture
def data(tiny_data: Path) -> Path:
    return tiny_data


def tiny(data: Path, method: str, **changes: object) -> TrainConfig:
    config = replace(preset("tiny"), method=method, data=str(data), **changes)
    return replace(config, optim=replace(config.optim, epochs=2))


def test_gated_export_equals_stage() -> None:
    torch.manual_seed(0)
    stage = ConvexStage(3, 2, ConvexStageConfig(patterns=5, kernel_size=3))
    x = torch.relu(torch.randn(4, 3, 10, 12))
    stage.init_gates(x)
    with torch.no_grad():
        stage.v.normal_()
    first, last = gated_layers(stage)
    network = ReconCNN([first], last)
    x0 = torch.randn(4, 2, 10, 12)
    # The network adds its input; with a 2-channel prefix it equals x0 + stage(x0).
    stage2 = ConvexStage(2, 2, ConvexStageConfig(patterns=5, kernel_size=3))
    stage2.init_gates(x0)
    with torch.no_grad():
        stage2.v.normal_()
    first, last = gated_layers(stage2)
    network = ReconCNN([first], last)
    torch.testing.assert_close(network(x0), x0 + stage2(x0), rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_and_rejects_foreign_files(tmp_path: Path) -> None:
    torch.manual_seed(1)
    stage = ConvexStage(2, 2, ConvexStageConfig(patterns=3, kernel_size=3))
    stage.init_gates(torch.randn(2, 2, 8, 8))
    first, last = gated_layers(stage)
    relu_net = ReconCNN.relu(3, 4, 3)
    mixed = ReconCNN([first, *relu_net.hidden[1:]], relu_net.final)
    for net in (relu_net, ReconCNN([first], last)):
        path = tmp_path / "net.pt"
        net.save(path, {"note": "x"})
        again = ReconCNN.load(path)
        x = torch.randn(2, 2, 8, 8)
        torch.testing.assert_close(again(x), net(x))
    assert mixed.depth == 3
    # A pickle that would run code is refused, and nothing runs.
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "cvxmri.ReconCNN/1", "x": Payload()}, evil)
    with pytest.raises(CvxmriError, match="not a cvxmri model file"):
        ReconCNN.load(evil)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(CvxmriError, match="not a cvxmri model file"):
        ReconCNN.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("method", ["layerwise-convex", "layerwise-nonconvex"])
def test_frozen_prefix_gets_no_gradient(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """While stage 2 trains, after every one of its steps, its resident prefix (stage_cache
    none: run on every batch) is what stage 1 exported, is not in the optimiser, needs no
    gradient, has none and has not changed."""
    steps = []
    train_stage = Trainer._train_stage

    def spy(
        self: Trainer,
        stage: Stage,
        optimizer: torch.optim.Optimizer,
        scheduler: object,
        inputs: StageInputs,
        index: int,
        *args: object,
    ) -> None:
        prefix = inputs.prefix
        assert (prefix is None) == (index == 0)
        if prefix is not None:
            exported = ReconCNN.load(self.out / f"model_depth{index + 1}.pt")
            before = {k: v.clone() for k, v in prefix.state_dict().items()}
            for key, value in exported.state_dict().items():
                assert torch.equal(value, before[key].cpu()), key
            trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
            assert not trained & {id(p) for p in prefix.parameters()}
            step = stage.step

            def checked_step(*step_args: object, **kwargs: object) -> float:
                loss = step(*step_args, **kwargs)  # type: ignore[arg-type]
                for name, parameter in prefix.named_parameters():
                    assert not parameter.requires_grad and parameter.grad is None, name
                for key, value in prefix.state_dict().items():
                    assert torch.equal(value, before[key]), key
                steps.append(index)
                return loss

            stage.step = checked_step  # type: ignore[method-assign]
        train_stage(self, stage, optimizer, scheduler, inputs, index, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "_train_stage", spy)
    config = tiny(data, method, layers=3, stage_cache="none")
    model = Trainer(config, tmp_path).fit()
    # 2 epochs of 4 images in batches of 4 for stage 2 (index 1).
    assert steps == [1, 1]
    # The network's first layer is what stage 1 exported.
    exported = ReconCNN.load(tmp_path / "model_depth2.pt")
    for key, value in exported.hidden[0].state_dict().items():
        assert torch.equal(value, model.hidden[0].state_dict()[key]), key


@pytest.mark.parametrize("method", ["layerwise-convex", "layerwise-nonconvex", "end-to-end"])
def test_resume_gives_identical_weights(data: Path, tmp_path: Path, method: str) -> None:
    config = tiny(data, method)
    if method == "end-to-end":
        config = replace(config, optim=replace(config.optim, epochs=4))
    whole = Trainer(config, tmp_path / "whole").fit()
    # Interrupt after 1, then after 2 more epochs (mid-stage and at a stage boundary).
    out = tmp_path / "parts"
    with pytest.raises(TrainingStopped):
        Trainer(config, out).fit(stop_after=1)
    with pytest.raises(TrainingStopped):
        Trainer(config, out).fit(stop_after=2)
    resumed = Trainer(config, out)
    model = resumed.fit()
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    metrics = write_outputs(resumed, model)
    assert len(resumed.history) == 4
    assert metrics["final"]["layers"] == config.layers


def test_stage_cache_options_agree(data: Path, tmp_path: Path) -> None:
    models = {}
    for cache in ("memory", "disk", "none"):
        config = tiny(data, "layerwise-convex", stage_cache=cache)
        models[cache] = Trainer(config, tmp_path / cache).fit()
    x = torch.randn(2, 2, 24, 24)
    reference = models["memory"](x)
    for cache in ("disk", "none"):
        torch.testing.assert_close(models[cache](x), reference, rtol=1e-4, atol=1e-5)


def test_convex_run_writes_certificates(data: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny(data, "layerwise-convex"), tmp_path)
    model = trainer.fit()
    write_outputs(trainer, model)
    certs = [c for c in trainer.certificates if "relative_gap" in c]
    assert {c["stage"] for c in certs} == {1, 2}
    for cert in certs:
        assert cert["gap"] >= -1e-6 * abs(cert["primal"])
        assert cert["dual"] <= cert["primal"] + 1e-9
    for name in (
        "model.pt",
        "history.csv",
        "certificates.json",
        "metrics_val.json",
        "model_depth2.pt",
        "model_depth3.pt",
    ):
        assert (tmp_path / name).exists(), name


def test_evaluate_model_matches_training_validation(data: Path, tmp_path: Path) -> None:
    from cvxmri.evaluate import EvaluateConfig, evaluate

    config = tiny(data, "end-to-end")
    trainer = Trainer(config, tmp_path / "run")
    metrics = write_outputs(trainer, trainer.fit())
    (tmp_path / "eval").mkdir()
    summary = evaluate(
        EvaluateConfig(
            data=str(data),
            split="val",
            methods=[],
            masks=[config.mask],
            models=[str(tmp_path / "run" / "model.pt")],
        ),
        tmp_path / "eval",
    )
    result = summary["results"][0]
    assert result["method"] == "run"
    assert result["volume"]["psnr"]["mean"] == pytest.approx(metrics["final"]["val_psnr"], abs=1e-4)
    assert result["volume"]["ssim"]["mean"] == pytest.approx(metrics["final"]["val_ssim"], abs=1e-5)


def test_fista_solver_reaches_small_gap(data: Path, tmp_path: Path) -> None:
    config = tiny(data, "layerwise-convex", solver="fista", fista_iterations=400, fista_tol=1e-3)
    config = replace(config, convex=replace(config.convex, beta=0.5))
    trainer = Trainer(config, tmp_path)
    trainer.fit()
    finals = {}
    for cert in trainer.certificates:
        if "relative_gap" in cert:
            finals[cert["stage"]] = cert["relative_gap"]
    assert set(finals) == {1, 2}
    assert all(gap <= 1e-3 for gap in finals.values()), finals
    assert "val_psnr" in trainer.history[-1]


def test_history_seconds_add_up_to_wall_time(data: Path, tmp_path: Path) -> None:
    import time

    for solver in ("adam", "fista"):
        config = tiny(data, "layerwise-convex", solver=solver, fista_iterations=40)
        start = time.perf_counter()
        trainer = Trainer(config, tmp_path / solver)
        trainer.fit()
        wall = time.perf_counter() - start
        logged = sum(float(row["seconds"]) for row in trainer.history)
        assert 0 < logged <= wall, (solver, logged, wall)


@pytest.mark.parametrize("method", ["layerwise-convex", "end-to-end"])
def test_same_seed_same_run(data: Path, tmp_path: Path, method: str) -> None:
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(tiny(data, method), tmp_path / name)
        model = trainer.fit()
        history = [r[k] for r in trainer.history for k in ("train_loss", "val_psnr", "val_ssim")]
        runs.append((model.state_dict(), history))
    (weights_a, history_a), (weights_b, history_b) = runs
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key
    assert history_a == history_b
    other = Trainer(tiny(data, method, seed=1), tmp_path / "c").fit()
    assert not all(torch.equal(weights_a[k], v) for k, v in other.state_dict().items())


def test_carried_stage_starts_at_previous_prediction() -> None:
    torch.manual_seed(3)
    first = ConvexStage(2, 2, ConvexStageConfig(patterns=4, kernel_size=3))
    x0 = torch.randn(3, 2, 12, 12)
    first.init_gates(x0)
    with torch.no_grad():
        first.v.normal_()
    layer, last = gated_layers(first)
    prefix = ReconCNN([layer], last)
    second = ConvexStage(8, 2, ConvexStageConfig(patterns=4, kernel_size=3))
    h = prefix.last_hidden(x0)
    second.init_gates(h)
    carry_prediction(second, prefix.final)
    layer, last = gated_layers(second)
    deeper = ReconCNN([*prefix.hidden, layer], last)
    torch.testing.assert_close(deeper(x0), prefix(x0), rtol=1e-5, atol=1e-5)
    assert torch.all(second.gates(h)[:, 0] == 1)


def test_refuses_a_stage_cache_that_cannot_fit(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvxmri.training import data as data_module
    from cvxmri.training import trainer as trainer_module

    # 64 channels: the cached inputs need 4 x 64 x 24 x 24 x 4 B = 590 kB, the data 110 kB.
    monkeypatch.setattr(data_module, "available_memory", lambda: 300_000)
    # The batch guard (tested below) would refuse too: test the cache guard alone.
    monkeypatch.setattr(trainer_module, "check_step_fits", lambda *args: None)
    with pytest.raises(CvxmriError, match=r"cached stage inputs need .* GiB of available memory"):
        Trainer(tiny(data, "layerwise-convex", channels=64), tmp_path / "a")
    # Recomputing the prefix needs no cache; end-to-end has none.
    Trainer(tiny(data, "layerwise-convex", channels=64, stage_cache="none"), tmp_path / "b")
    Trainer(tiny(data, "end-to-end"), tmp_path / "c")
    monkeypatch.setattr(
        trainer_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})()
    )
    with pytest.raises(CvxmriError, match="free disk"):
        Trainer(tiny(data, "layerwise-convex", channels=64, stage_cache="disk"), tmp_path / "d")
    monkeypatch.setattr(data_module, "available_memory", lambda: 1000)
    with pytest.raises(CvxmriError, match=r"the split needs .* GiB in memory"):
        Trainer(tiny(data, "end-to-end"), tmp_path / "e")


def test_refuses_a_batch_that_cannot_fit(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvxmri.training import data as data_module
    from cvxmri.training.trainer import step_memory

    config = tiny(data, "end-to-end", channels=64)
    per_image, validation = step_memory(config, (24, 24))
    # One no-grad pass: 8 x 128 x 128 pixels' worth of whole images, three maps each.
    assert validation == (8 * 128 * 128 // (24 * 24)) * 24 * 24 * 3 * 64 * 4
    # 16x16 crops, 2 hidden layers: (2 x 2 + 2) x 64 + 8 maps of 4 bytes per pixel.
    assert per_image == 16 * 16 * (6 * 64 + 8) * 4
    monkeypatch.setattr(data_module, "available_memory", lambda: 10**9)
    big = replace(config, optim=replace(config.optim, batch_size=100_000))
    with pytest.raises(
        CvxmriError,
        match=r"batch size 100000 needs about .* GiB .* use optim.batch_size \d+ or less",
    ):
        Trainer(big, tmp_path / "a")
    Trainer(config, tmp_path / "b")
    # Checkpointing keeps one map per hidden layer: a smaller estimate.
    assert step_memory(replace(config, checkpointing=True), (24, 24))[0] < per_image


def test_convex_stages_use_the_networks_kernel_size(data: Path, tmp_path: Path) -> None:
    config = tiny(data, "layerwise-convex", kernel_size=5)
    assert config.stage_config().kernel_size == 5
    model = Trainer(replace(config, optim=replace(config.optim, epochs=1)), tmp_path).fit()
    assert {layer.value.kernel_size for layer in model.hidden} == {(5, 5)}


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_cached_stages_train_without_the_prefix(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    """With cached stage inputs the prefix is not resident while a stage trains (its memory
    does not grow with depth); the validation on cached features equals that of the whole
    exported network, and convex stages get their sign patterns from the per-stage cache."""
    seen = []
    train_stage = Trainer._train_stage

    def spy(self: Trainer, stage: Stage, *args: object) -> None:
        inputs = args[2]
        assert isinstance(inputs, StageInputs)
        seen.append((inputs.prefix is None, inputs.cached is not None, inputs.val is not None))
        assert inputs.gates is not None
        sample = self._inputs_sample(inputs, 2).to(self.device)
        packed = self._gate_cache(stage, inputs)[:2]
        assert stage.convex_program is not None
        expected = stage.convex_program.pattern_gates(sample)
        assert unpack_gates(packed, stage.patterns).equal(expected)
        train_stage(self, stage, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "_train_stage", spy)
    trainer = Trainer(tiny(data, "layerwise-convex", layers=4, stage_cache=cache), tmp_path)
    trainer.fit()
    cached = cache != "none"
    assert seen == [(True, False, False)] + [(cached, cached, cached)] * 2
    for depth in trainer.depth_metrics:
        exported = ReconCNN.load(tmp_path / f"model_depth{depth['layers']}.pt")
        whole = trainer.validation_metrics(exported)
        assert whole["val_psnr"] == pytest.approx(depth["val_psnr"], abs=1e-3)
    # Each stage's inputs came from the previous stage's through one layer, and the
    # previous stage's cache files are gone.
    assert not list(tmp_path.glob("cache/stage2_*"))


def test_extending_end_to_end_epochs_matches_a_longer_run(data: Path, tmp_path: Path) -> None:
    """A finished end-to-end run given more epochs continues from its last checkpoint and
    ends with the weights of a run started with that many epochs: the step schedule
    (StepLR) and every random choice depend on the epoch index only, not on the total."""
    short = tiny(data, "end-to-end")
    longer = replace(short, optim=replace(short.optim, epochs=4))
    whole = Trainer(longer, tmp_path / "whole").fit()
    out = tmp_path / "extended"
    Trainer(short, out).fit()
    extended = Trainer(longer, out)
    model = extended.fit()
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [row["epoch"] for row in extended.history] == [1, 2, 3, 4]


def test_resume_refuses_other_settings_naming_them(data: Path, tmp_path: Path) -> None:
    config = tiny(data, "layerwise-convex")
    Trainer(config, tmp_path).fit()
    more = replace(config, optim=replace(config.optim, epochs=3))
    with pytest.raises(CvxmriError, match="only supported for end-to-end"):
        Trainer(more, tmp_path).fit()
    other = replace(config, seed=7, optim=replace(config.optim, lr=0.01))
    with pytest.raises(CvxmriError, match=r"optim\.lr: 0\.001 -> 0\.01; seed: 0 -> 7"):
        Trainer(other, tmp_path).fit()
    e2e = tiny(data, "end-to-end")
    Trainer(e2e, tmp_path / "e2e").fit()
    fewer = replace(e2e, optim=replace(e2e.optim, epochs=1))
    with pytest.raises(CvxmriError, match="can only add epochs"):
        Trainer(fewer, tmp_path / "e2e").fit()


@pytest.mark.parametrize("method", ["layerwise-convex", "end-to-end"])
def test_history_is_written_every_epoch(data: Path, tmp_path: Path, method: str) -> None:
    """An interrupted run has history.csv with one row per finished epoch."""
    config = tiny(data, method)
    config = replace(config, optim=replace(config.optim, epochs=3))
    with pytest.raises(TrainingStopped):
        Trainer(config, tmp_path).fit(stop_after=1)
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("method,stage,epoch,lr,train_loss")
    with pytest.raises(TrainingStopped):
        Trainer(config, tmp_path).fit(stop_after=1)
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 3


def test_check_resumable_names_keys_and_refuses_what_is_not_a_config(tmp_path: Path) -> None:
    from cvxmri.training.trainer import check_resumable, config_differences

    saved = {"method": "end-to-end", "optim": {"lr": 0.001, "epochs": 2}}
    new = {"method": "end-to-end", "optim": {"lr": 0.01, "epochs": 2}, "seed": 1}
    assert config_differences(saved, new) == ["optim.lr: 0.001 -> 0.01", "seed: (none) -> 1"]
    check_resumable(saved, {**saved, "optim": {"lr": 0.001, "epochs": 5}}, tmp_path)
    with pytest.raises(CvxmriError, match="not a mapping"):
        check_resumable(None, new, tmp_path)
