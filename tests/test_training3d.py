"""True 3D training (`cvxmri train --dims 3`): 3D networks trained by every method on cubic
patches of whole volumes (`cvxmri.training.data.VolumeData`), validated and evaluated on
whole volumes as `cvxmri evaluate --dims 3` scores them, resumed exactly; and its bad
inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_validation_equals_evaluate

from cvxmri.cli import main
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.models.cnn import ReconCNN
from cvxmri.training.config import CertifiedConfig, TrainConfig, preset
from cvxmri.training.data import VolumeData, crop_windows, take_crops
from cvxmri.training.trainer import Trainer, TrainingStopped, write_outputs

MASK = MaskSpec("poisson", 3.0, calib_size=(4, 4))
METHODS = ["layerwise-convex", "layerwise-nonconvex", "end-to-end"]


def tiny3d(data: Path, method: str, **changes: object) -> TrainConfig:
    """The tiny 3D preset on the 4x16x16 volumes: 3 layers of 8 channels, 3x3x3 kernels,
    patches of 4x4x4, 2 epochs (per stage)."""
    config = replace(preset("tiny", dims=3), method=method, data=str(data), mask=MASK)
    config = replace(config, **changes)
    return replace(config, optim=replace(config.optim, epochs=2))


def test_3d_preset_has_cubic_kernels_and_patches() -> None:
    config = preset("quick", dims=3)
    assert (config.dims, config.kernel_size, config.crop, config.pattern_chunk) == (3, 3, 12, 32)
    assert config.stage_spec().ndim == 3
    # The 3D comparison's Adam stages: no carry, gates as drawn.
    assert not config.carry and config.convex.gate_pool == 1
    assert preset("quick").dims == 2 and preset("quick").kernel_size == 7


def test_crop_windows_are_cubes_inside_the_volumes() -> None:
    volumes = torch.arange(2 * 3 * 5 * 6 * 7, dtype=torch.float32).view(2, 3, 5, 6, 7)
    corners = crop_windows(2, (5, 6, 7), 4, seed=0, stage=1, epoch=2)
    assert corners.shape == (2, 3)
    assert (corners >= 0).all() and (corners <= torch.tensor([1, 2, 3])).all()
    crops = take_crops(volumes, corners, 4)
    assert crops.shape == (2, 3, 4, 4, 4)
    for crop, volume, (a, b, c) in zip(crops, volumes, corners.tolist(), strict=True):
        assert torch.equal(crop, volume[:, a : a + 4, b : b + 4, c : c + 4])
    # 2D corners are the draws they always were: rows, then columns, of one generator.
    from cvxmri.training.data import derived_seed

    generator = torch.Generator().manual_seed(derived_seed(0, 1, 2, 1))
    top = torch.randint(0, 24 - 16 + 1, (3,), generator=generator)
    left = torch.randint(0, 20 - 16 + 1, (3,), generator=generator)
    expected = torch.stack([top, left], dim=1)
    assert torch.equal(crop_windows(3, (24, 20), 16, seed=0, stage=1, epoch=2), expected)


def test_volume_data_pairs_are_whole_volumes_under_3d_masks(tiny_data3d: Path) -> None:
    data = VolumeData(tiny_data3d, "val", MASK)
    masks = data.evaluation_masks()
    assert masks.shape == (2, 1, 1, 16, 16)
    pairs = data.pairs(masks)
    assert pairs.x0.shape == (2, 2, 4, 16, 16) and pairs.target.shape == (2, 2, 4, 16, 16)
    assert pairs.files == ["multicoil_val/a_slab02.h5", "multicoil_val/b_slab02.h5"]
    # Fresh training masks per epoch, fixed ones without an epoch.
    assert torch.equal(data.training_masks(0, None), data.training_masks(0, None))
    assert not torch.equal(data.training_masks(0, 1), data.training_masks(0, 2))


@pytest.mark.parametrize("method", [*METHODS, "certified"])
def test_every_method_trains_a_3d_network_on_patches(
    tiny_data3d: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = (
        tiny3d(
            tiny_data3d,
            "layerwise-convex",
            solver="certified",
            certified=CertifiedConfig(betas=(3e-2, 1e-2)),
        )
        if method == "certified"
        else tiny3d(tiny_data3d, method)
    )
    shapes: list[tuple[int, ...]] = []
    batches = Trainer._batches

    def spy(self: Trainer, *args: object, **kwargs: object) -> Iterator[tuple]:
        for x, r, gates in batches(self, *args, **kwargs):  # type: ignore[arg-type]
            shapes.append(tuple(x.shape[2:]))
            assert r.shape[2:] == x.shape[2:]
            assert gates is None or gates.shape[2:] == x.shape[2:]
            yield x, r, gates

    monkeypatch.setattr(Trainer, "_batches", spy)
    trainer = Trainer(config, tmp_path)
    model = trainer.fit()
    metrics = write_outputs(trainer, model)
    assert model.ndim == 3 and model.depth == 3
    hidden = [getattr(layer, "conv", None) or layer.value for layer in model.hidden]
    assert [conv.weight.shape[2:] for conv in hidden] == [(3, 3, 3)] * 2
    assert model.final.weight.shape[2:] == (1, 1, 1)
    # Steps on 4x4x4 patches (the certified solver works on whole volumes instead).
    assert shapes == [] if method == "certified" else set(shapes) == {(4, 4, 4)}
    assert [m["layers"] for m in metrics["by_depth"]] == ([3] if method == "end-to-end" else [2, 3])
    assert torch.isfinite(torch.tensor(metrics["final"]["val_psnr"]))
    certificates = json.loads((tmp_path / "certificates.json").read_text())
    gaps = [c for c in certificates if "relative_gap" in c]
    if method in ("layerwise-convex", "certified"):
        assert {c["stage"] for c in gaps} == {1, 2}
        for cert in gaps:
            assert cert["dual"] <= cert["primal"] + 1e-9
    else:
        assert gaps == []
    if method == "certified":
        selected = [c for c in gaps if c.get("selected")]
        assert len(selected) == 2 and all(c["certified"] for c in selected)


def test_3d_validation_equals_evaluate_on_whole_volumes(tiny_data3d: Path, tmp_path: Path) -> None:
    """What training reports on the validation volumes is what `evaluate --dims 3` gives
    for the exported network on the same volumes and masks."""
    config = tiny3d(tiny_data3d, "layerwise-convex")
    trainer = Trainer(config, tmp_path / "run")
    metrics = write_outputs(trainer, trainer.fit())
    assert_validation_equals_evaluate(tiny_data3d, tmp_path / "run", metrics, MASK)


@pytest.mark.parametrize("method", ["layerwise-convex", "end-to-end"])
def test_3d_resume_gives_identical_weights(tiny_data3d: Path, tmp_path: Path, method: str) -> None:
    config = tiny3d(tiny_data3d, method)
    if method == "end-to-end":
        config = replace(config, optim=replace(config.optim, epochs=3))
    whole = Trainer(config, tmp_path / "whole").fit()
    out = tmp_path / "parts"
    with pytest.raises(TrainingStopped):
        Trainer(config, out).fit(stop_after=1)
    model = Trainer(config, out).fit()
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_3d_training_refuses_bad_inputs(tiny_data: Path, tiny_data3d: Path, tmp_path: Path) -> None:
    with pytest.raises(CvxmriError, match=r"crop 5: a 5x5x5 patch does not fit in the 4x16x16"):
        Trainer(tiny3d(tiny_data3d, "end-to-end", crop=5), tmp_path / "a")
    with pytest.raises(CvxmriError, match="not a 3D volume file"):
        Trainer(tiny3d(tiny_data, "end-to-end"), tmp_path / "b")
    # The unrolled network trains in 3D (tests/test_unrolled3d.py); greedy convex training
    # still refuses CG data consistency, as in 2D.
    unrolled = replace(tiny3d(tiny_data3d, "layerwise-convex", arch="unrolled"), crop=0)
    unrolled.validate()
    with pytest.raises(CvxmriError, match="needs a linear data consistency"):
        bad = replace(unrolled.unrolled, dc=replace(unrolled.unrolled.dc, kind="cg"))
        replace(unrolled, unrolled=bad).validate()
    with pytest.raises(CvxmriError, match="3D masks are drawn over"):
        tiny3d(tiny_data3d, "end-to-end", mask=MaskSpec("cartesian", 4.0)).validate()


def test_cli_trains_and_evaluates_3d(
    tiny_data: Path, tiny_data3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    train = ["train", "--dims", "3", "--preset", "tiny", "--data", str(tiny_data3d)]
    mask = ["--mask", "poisson", "--accel", "3", "--calib-size", "4"]
    assert main([*train, *mask, "--method", "end-to-end", "--crop", "3", "--out", str(run)]) == 0
    assert "val PSNR" in capsys.readouterr().out
    saved = (run / "config.yaml").read_text()
    assert "dims: 3" in saved and "crop: 3" in saved and "kernel_size: 3" in saved
    assert ReconCNN.load(run).ndim == 3
    # Resuming a finished 3D run from its folder alone changes nothing.
    assert main(["train", "--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    evaluate_args = ["evaluate", "--model", str(run), *mask, "--method", "zero-filled"]
    out = tmp_path / "eval"
    assert main([*evaluate_args, "--data", str(tiny_data3d), "--out", str(out)]) == 0
    methods = {e["method"] for e in json.loads((out / "summary.json").read_text())["results"]}
    assert methods == {"zero-filled", "run"}
    assert main([*evaluate_args, "--data", str(tiny_data), "--out", str(tmp_path / "e2")]) == 2
    assert "a 3D network (trained with --dims 3) on 2D slices" in capsys.readouterr().err


def test_runs_from_before_3d_resume_as_2d(tmp_path: Path) -> None:
    from cvxmri.training.trainer import check_resumable

    saved = {"method": "end-to-end", "optim": {"epochs": 2}}
    check_resumable(saved, {**saved, "dims": 2}, tmp_path)
    with pytest.raises(CvxmriError, match="dims: 2 -> 3"):
        check_resumable(saved, {**saved, "dims": 3}, tmp_path)
