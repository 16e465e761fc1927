"""The unrolled network in true 3D (`cvxmri train --dims 3 --arch unrolled`): every method
trains a 3D network on whole volumes, greedy convex iterations certified; a resumed run
ends with the same weights; `evaluate --dims 3` gives the run's validation numbers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_validation_equals_evaluate

from cvxmri.cli import main
from cvxmri.masks import MaskSpec
from cvxmri.models.unrolled import UnrolledNet, load_network
from cvxmri.training.config import CertifiedConfig, TrainConfig, UnrolledConfig, preset
from cvxmri.training.trainer import TrainingStopped, write_outputs
from cvxmri.training.unrolled import UnrolledTrainer

MASK = MaskSpec("poisson", 3.0, calib_size=(4, 4))
METHODS = ["layerwise-convex", "layerwise-nonconvex", "end-to-end"]


def unrolled3d(data: Path, method: str, **changes: object) -> TrainConfig:
    """The tiny 3D preset's unrolled network on the 4x16x16 volumes: 2 iterations of 4
    channels, 3x3x3 kernels, 2 epochs (per non-convex iteration), two betas."""
    config = replace(
        preset("tiny", dims=3),
        method=method,
        arch="unrolled",
        data=str(data),
        mask=MASK,
        crop=0,
        unrolled=UnrolledConfig(iterations=2, channels=4, kernel_size=3, betas=(0.1, 0.01)),
        certified=CertifiedConfig(tol=1e-3),
    )
    config = replace(config, optim=replace(config.optim, epochs=2))
    return replace(config, **changes)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_a_3d_unrolled_network(
    tiny_data3d: Path, tmp_path: Path, method: str
) -> None:
    trainer = UnrolledTrainer(unrolled3d(tiny_data3d, method), tmp_path)
    model = trainer.fit()
    assert isinstance(model, UnrolledNet) and model.iterations == 2 and model.ndim == 3
    assert all(b.architecture()[0]["kernel"] == 3 for b in model.blocks)  # type: ignore[operator]
    assert [row["iterations"] for row in trainer.depth_metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["val_psnr"])) for row in trainer.depth_metrics)
    # The network's own output on whole volumes gives the last row's metrics.
    val = trainer.val_samples
    assert val.x0.dim() == 5
    with torch.no_grad():
        pred = model(val.x0, val.y, val.mask, val.maps)
    assert trainer._metrics(pred)["val_psnr"] == pytest.approx(
        trainer.depth_metrics[-1]["val_psnr"], abs=1e-4
    )
    if method == "layerwise-convex":
        certificates = trainer.certificates
        assert certificates and all(c["relative_gap"] <= 1e-3 for c in certificates)
        assert all(c["certified"] and c["route"] == "dc-gram" for c in certificates)
        selected = [c for c in certificates if c.get("selected")]
        assert [c["stage"] for c in selected] == [1, 2]
        # The iteration's selected beta is the best of its path on validation.
        first = [c["val_psnr"] for c in certificates if c["stage"] == 1]
        assert selected[0]["val_psnr"] == max(first)
        # and above zero-filled (by about 3 dB on these volumes).
        assert selected[0]["val_psnr"] >= trainer._metrics(val.x0)["val_psnr"]
    else:
        assert not trainer.certificates


@pytest.mark.parametrize("method", ["layerwise-convex", "end-to-end"])
def test_3d_unrolled_resume_gives_identical_weights(
    tiny_data3d: Path, tmp_path: Path, method: str
) -> None:
    config = unrolled3d(tiny_data3d, method)
    whole = UnrolledTrainer(config, tmp_path / "whole").fit()
    out = tmp_path / "parts"
    with pytest.raises(TrainingStopped):
        UnrolledTrainer(config, out).fit(stop_after=1)
    model = UnrolledTrainer(config, out).fit()
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_3d_unrolled_validation_equals_evaluate(tiny_data3d: Path, tmp_path: Path) -> None:
    """What training reports on the validation volumes is what `evaluate --dims 3` gives
    for the exported network on the same volumes and masks."""
    trainer = UnrolledTrainer(unrolled3d(tiny_data3d, "end-to-end"), tmp_path / "run")
    metrics = write_outputs(trainer, trainer.fit())
    assert_validation_equals_evaluate(tiny_data3d, tmp_path / "run", metrics, MASK)


def test_cli_trains_and_evaluates_a_3d_unrolled_network(
    tiny_data3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    train = ["train", "--dims", "3", "--preset", "tiny", "--arch", "unrolled"]
    mask = ["--mask", "poisson", "--accel", "3", "--calib-size", "4"]
    options = ["--method", "end-to-end", "--iterations", "2", "--channels", "4", "--dc", "cg"]
    data = ["--data", str(tiny_data3d)]
    assert main([*train, *mask, *options, *data, "--out", str(run)]) == 0
    assert "unrolled, 2 iterations: val PSNR" in capsys.readouterr().out
    saved = (run / "config.yaml").read_text()
    assert "dims: 3" in saved and "crop: 0" in saved
    model = load_network(run)
    assert isinstance(model, UnrolledNet) and model.ndim == 3
    assert model.architecture()["blocks"][0][0]["kernel"] == 3  # type: ignore[index]
    # Resuming a finished run from its folder alone changes nothing.
    assert main(["train", "--resume", "--out", str(run)]) == 0
    out = tmp_path / "eval"
    evaluate_args = ["evaluate", "--model", str(run), *mask, "--method", "zero-filled"]
    assert main([*evaluate_args, *data, "--out", str(out)]) == 0
    methods = {e["method"] for e in json.loads((out / "summary.json").read_text())["results"]}
    assert methods == {"zero-filled", "run"}
