"""The command line end to end on a tiny dataset, and its one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import phantom_nifti

from cvxmri import cli
from cvxmri.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    nifti = phantom_nifti(root / "head.nii.gz", depth=120)
    code = main(
        [
            "data",
            "simulate",
            "--nifti",
            str(nifti),
            "--out",
            str(root / "data"),
            "--matrix",
            "32",
            "--coils",
            "4",
        ]
    )
    assert code == 0
    return root


def test_simulate_then_info(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted((tiny / "data" / "multicoil_test").glob("*.h5"))
    assert files
    assert main(["data", "info", str(files[0])]) == 0
    out = capsys.readouterr().out
    assert "multi-coil" in out and "recon matrix: 32 x 32" in out


def test_prepare_caches_the_maps(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny / "data"
    assert main(["data", "prepare", "--data", str(data), "--split", "test"]) == 0
    files = list((data / "multicoil_test").glob("*.h5"))
    assert f"coil maps of {len(files)} files" in capsys.readouterr().out
    cached = sorted(p.name for p in (data / "cache").rglob("*.h5"))
    assert cached == sorted(p.name for p in files)
    assert main(["data", "prepare", "--data", str(data), "--split", "test"]) == 0
    assert f"(0 computed, {len(files)} already cached)" in capsys.readouterr().out


def test_evaluate_the_classical_methods(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny / "run"
    code = main(
        [
            "evaluate",
            "--data",
            str(tiny / "data"),
            "--split",
            "test",
            "--method",
            "zero-filled",
            "--method",
            "cs",
            "--method",
            "cg-sense",
            "--cs-iterations",
            "30",
            "--cg-lambda",
            "0.01",
            "--cg-iterations",
            "8",
            "--calib-size",
            "8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "zero-filled" in printed and "poisson 4x" in printed and "cartesian 4x" in printed
    for name in ("config.yaml", "log.txt", "per_slice.csv", "per_volume.csv", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    results = {(r["method"], r["mask"].split()[0]): r for r in summary["results"]}
    methods = ("zero-filled", "cs", "cg-sense")
    assert set(results) == {(m, k) for m in methods for k in ("poisson", "cartesian")}
    for kind in ("poisson", "cartesian"):
        zf = results[("zero-filled", kind)]["volume"]["psnr"]["mean"]
        cs = results[("cs", kind)]["volume"]["psnr"]["mean"]
        assert cs > zf
    assert "cg-sense" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["cg_sense"] == {"lamda": 0.01, "iterations": 8}
    assert saved["cs"]["iterations"] == 30 and saved["cs"]["shifts"] is True
    n_slices = sum(
        len(h5py.File(p)["kspace"]) for p in (tiny / "data" / "multicoil_test").glob("*.h5")
    )
    assert results[("cs", "poisson")]["slice"]["psnr"]["n"] == n_slices


def test_evaluation_is_deterministic(tiny: Path) -> None:
    runs = []
    for name in ("a", "b"):
        args = [
            "evaluate",
            "--data",
            str(tiny / "data"),
            "--method",
            "zero-filled",
            "--out",
            str(tiny / name),
        ]
        assert main(args) == 0
        runs.append((tiny / name / "per_slice.csv").read_text())
    assert runs[0] == runs[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvxmri.cli", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--accel", "1"], "acceleration must be finite and > 1"),
        (["evaluate", "--accel", "0.5"], "acceleration must be finite and > 1"),
        (["evaluate", "--accel", "four"], "not a number"),
        (["evaluate", "--center-fraction", "1.5"], "center_fraction must be in (0, 1)"),
        (["evaluate", "--center-fraction", "0"], "center_fraction must be in (0, 1)"),
        (["evaluate", "--data", "/nonexistent"], "data folder does not exist"),
        (["evaluate", "--method", "magic"], "unknown method"),
        (["evaluate", "--config", "/nonexistent.yaml"], "no such config file"),
        (["data", "info", "/nonexistent.h5"], "no such file"),
        (["data", "simulate", "--nifti", "/nonexistent.nii"], "no such file"),
        (["data", "simulate", "--snr", "-3"], "invalid simulation setting snr=-3.0: must be > 0"),
        (["train", "--preset", "huge"], "unknown preset"),
        (["train", "--accel", "1"], "acceleration must be finite and > 1"),
        (["train", "--lr", "-1"], "invalid training setting optim.lr=-1.0: must be > 0"),
        (
            ["train", "--arch", "unrolled", "--kernel", "4"],
            "invalid training setting unrolled.kernel_size=4: must be odd",
        ),
        (["train", "--channels", "3"], "invalid training setting channels=3: must be even"),
        (["train", "--method", "magic"], "invalid choice"),
        (["train", "--data", "/nonexistent", "--preset", "tiny"], "data folder does not exist"),
        (["train", "--mask", "poisson", "--mask", "cartesian"], "one --mask"),
        (["data", "prepare", "--workers", "0"], "--workers"),
        (["data", "prepare", "--backend", "bart"], "unknown ESPIRiT backend 'bart'"),
    ],
)
def test_bad_input_one_line_error(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cvxmri: error:")
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_bad_file_errors_and_no_partial_output(tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "data" / "multicoil_test"
    data.mkdir(parents=True)
    source = next((tiny / "data" / "multicoil_test").glob("*.h5"))
    bad = data / source.name
    bad.write_bytes(source.read_bytes())
    with h5py.File(bad, "r+") as hf:
        kspace = hf["kspace"][()]
        kspace[0, 0, 0, 0] = np.nan
        hf["kspace"][...] = kspace
    out = tmp_path / "run"
    result = _run("evaluate", "--data", str(tmp_path / "data"), "--out", str(out))
    assert result.returncode == 2
    assert "NaN or Inf" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    bad.write_text("garbage")
    result = _run("data", "info", str(bad))
    assert result.returncode == 2 and "not a readable HDF5 file" in result.stderr


def test_train_cli_run_resume_and_force(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny / "train-run"
    args = [
        "train",
        "--method",
        "layerwise-convex",
        "--preset",
        "tiny",
        "--calib-size",
        "6",
        "--data",
        str(tiny / "data"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "val PSNR" in capsys.readouterr().out
    for name in (
        "config.yaml",
        "log.txt",
        "model.pt",
        "history.csv",
        "certificates.json",
        "metrics_val.json",
        "checkpoints",
    ):
        assert (out / name).exists(), name
    assert main(args) == 2  # the folder exists: neither --resume nor --force
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished run: resume is a no-op
    assert main([*args, "--resume", "--epochs", "3"]) == 2
    assert "only supported for end-to-end" in capsys.readouterr().err
    assert main([*args, "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration: optim.lr: 0.001 -> 0.01 " in err and "\n" not in err
    assert main([*args, "--force", "--epochs", "1"]) == 0


def _stop_after_one_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next training stop (resumably) after its first epoch."""
    from cvxmri.training.trainer import Trainer

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, stop_after=None: fit(self, stop_after=1))


def test_resume_with_no_options_uses_the_runs_config(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train --out RUN --resume`` alone continues a stopped run with its own config.yaml
    (method, preset, mask and data of the first call); history.csv had the finished
    epoch's row while the run was stopped."""
    out = tmp_path / "run"
    args = ["train", "--method", "end-to-end", "--preset", "tiny", "--calib-size", "6"]
    args += ["--epochs", "3", "--data", str(tiny / "data"), "--out", str(out)]
    with monkeypatch.context() as patch:
        _stop_after_one_epoch(patch)
        assert main(args) == 1  # TrainingStopped: an internal error for the command line
    capsys.readouterr()
    assert not (out / "model.pt").exists()
    assert len((out / "history.csv").read_text().splitlines()) == 2  # header, epoch 1
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "end-to-end" in capsys.readouterr().out
    assert (out / "model.pt").exists()
    rows = (out / "history.csv").read_text().splitlines()
    assert [row.split(",")[2] for row in rows[1:]] == ["1", "2", "3"]


def test_resume_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_epoch_progress_only_on_a_terminal(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line per epoch on stderr when it is a terminal; nothing when it is not (or with
    -v, which logs every row already)."""
    args = ["train", "--method", "end-to-end", "--preset", "tiny", "--calib-size", "6"]
    args += ["--epochs", "2", "--data", str(tiny / "data")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "epoch" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "val PSNR" in line]
    assert len(lines) == 2 and lines[0].startswith("end-to-end epoch 1, loss ")


def test_train_with_yaml_config(tiny: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("method: end-to-end\noptim:\n  epochs: 1\n")
    out = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "tiny",
        "--config",
        str(config),
        "--calib-size",
        "6",
        "--method",
        "end-to-end",
        "--data",
        str(tiny / "data"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "epochs: 1" in (out / "config.yaml").read_text()


def test_train_bad_yaml(tmp_path: Path) -> None:
    for text, message in (
        ("optim:\n  epoks: 3\n", "unknown key"),
        ("layers: five\n", "expected an integer"),
        ("[1, 2", "not valid YAML"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        result = _run("train", "--config", str(path))
        assert result.returncode == 2
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_evaluate_with_the_files_own_mask(tiny: Path, tmp_path: Path) -> None:
    """``--mask file`` uses each file's ``mask`` dataset: storing the Cartesian evaluation
    mask in the files gives the Cartesian results exactly."""
    from cvxmri.data.fastmri_h5 import read_encoding
    from cvxmri.data.prepare import evaluation_mask
    from cvxmri.masks import MaskSpec

    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data, ignore=shutil.ignore_patterns("cache"))
    spec = MaskSpec("cartesian", 4.0, 0.04)
    for path in (data / "multicoil_test").glob("*.h5"):
        encoding, shape, _ = read_encoding(path)
        mask = evaluation_mask(spec, path.name, shape[-2:], encoding.padding)
        assert (mask == mask[:1]).all()
        with h5py.File(path, "a") as hf:
            hf.create_dataset("mask", data=mask[0].astype(np.float32))
    psnr = {}
    for kind in ("cartesian", "file"):
        out = tmp_path / kind
        args = ["evaluate", "--data", str(data), "--method", "zero-filled", "--mask", kind]
        assert main([*args, "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        psnr[kind] = summary["results"][0]["volume"]["psnr"]["mean"]
    assert summary["results"][0]["mask"] == "file mask"
    assert psnr["file"] == pytest.approx(psnr["cartesian"], rel=1e-6)


def test_train_on_flat_folders_equals_the_dataset_root(tiny: Path, tmp_path: Path) -> None:
    """fastMRI users pass split folders (``--data knee/multicoil_train``): the same files as
    flat folders give the same network, to the bit, as the dataset root."""
    import torch

    flat = {}
    for split in ("train", "val"):
        flat[split] = tmp_path / f"{split}-files"
        flat[split].mkdir()
        for path in sorted((tiny / "data" / f"multicoil_{split}").glob("*.h5")):
            (flat[split] / path.name).symlink_to(path)
    common = ["train", "--preset", "tiny", "--calib-size", "6", "--epochs", "1"]
    root_run, flat_run = tmp_path / "root-run", tmp_path / "flat-run"
    assert main([*common, "--data", str(tiny / "data"), "--out", str(root_run)]) == 0
    flat_args = ["--data", str(flat["train"]), "--val-data", str(flat["val"])]
    assert main([*common, *flat_args, "--out", str(flat_run)]) == 0
    expected = torch.load(root_run / "model.pt", weights_only=True)["state_dict"]
    got = torch.load(flat_run / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # Without validation data a flat folder is refused up front, leaving no run folder.
    lone = tmp_path / "lone-run"
    assert main([*common, "--data", str(flat["train"]), "--out", str(lone)]) == 2
    assert not lone.exists()


# ---------------------------------------------------------------- configuration precedence


@pytest.fixture(scope="module")
def end_to_end_run(tiny: Path) -> Path:
    """A finished one-epoch end-to-end run on the tiny dataset, its method set in YAML."""
    config = tiny / "e2e.yaml"
    config.write_text("method: end-to-end\noptim:\n  epochs: 1\n")
    out = tiny / "e2e-run"
    args = ["train", "--preset", "tiny", "--config", str(config)]
    assert main([*args, "--data", str(tiny / "data"), "--out", str(out)]) == 0
    return out


def _resolved(*argv: str) -> object:
    from cvxmri.cli import _train_config, build_parser

    return _train_config(build_parser().parse_args(["train", *argv]))


def test_train_options_override_the_config_file(tmp_path: Path) -> None:
    """Command line over the YAML file over the preset; only options given override."""
    carry = tmp_path / "carry.yaml"
    carry.write_text(
        "method: end-to-end\nmask:\n  kind: cartesian\n  acceleration: 6.0\n"
        "  center_fraction: 0.08\noptim:\n  epochs: 2\n"
    )
    config = _resolved("--preset", "tiny", "--config", str(carry), "--accel", "8")
    assert config.mask.acceleration == 8.0  # type: ignore[attr-defined]
    # What the option does not name comes from the file, not from argparse defaults.
    assert config.mask.kind == "cartesian"  # type: ignore[attr-defined]
    assert config.mask.center_fraction == 0.08  # type: ignore[attr-defined]
    assert config.method == "end-to-end"  # type: ignore[attr-defined]
    assert config.optim.epochs == 2  # type: ignore[attr-defined]
    # And what the file does not name comes from the preset.
    assert config.layers == 3 and config.channels == 8  # type: ignore[attr-defined]
    config = _resolved("--config", str(carry), "--method", "layerwise-nonconvex", "--epochs", "5")
    assert config.method == "layerwise-nonconvex"  # type: ignore[attr-defined]
    assert config.optim.epochs == 5 and config.mask.acceleration == 6.0  # type: ignore[attr-defined]
    # The unrolled data consistency: kind and weight, each only where given.
    carry.write_text("arch: unrolled\nunrolled:\n  dc:\n    kind: chebyshev\n    lamda: 0.1\n")
    dc = _resolved("--config", str(carry), "--mask", "cartesian", "--dc", "direct").unrolled.dc  # type: ignore[attr-defined]
    assert (dc.kind, dc.lamda) == ("direct", 0.1)
    dc = _resolved("--config", str(carry), "--dc-lamda", "0.02").unrolled.dc  # type: ignore[attr-defined]
    assert (dc.kind, dc.lamda) == ("chebyshev", 0.02)


def test_carry_follows_the_preset_unless_given() -> None:
    """``carry`` is the quick preset's (on) and the paper's (off) unless ``--carry`` or
    ``--no-carry`` says otherwise."""
    quick = _resolved("--preset", "quick")
    assert quick.carry is True  # type: ignore[attr-defined]
    assert _resolved("--preset", "quick", "--no-carry").carry is False  # type: ignore[attr-defined]
    assert _resolved("--preset", "paper").carry is False  # type: ignore[attr-defined]
    assert _resolved("--preset", "paper", "--carry").carry is True  # type: ignore[attr-defined]
    # Gate selection goes with the quick preset's certified stages; the paper draws its gates.
    assert quick.convex.gate_pool == 4  # type: ignore[attr-defined]
    assert _resolved("--preset", "paper").convex.gate_pool == 1  # type: ignore[attr-defined]


def test_tiny_preset_keeps_its_calibration() -> None:
    """``train --preset tiny`` trains on the preset's 6x6 calibration, as ``reproduce
    --preset tiny`` does; ``--calib-size`` still overrides it."""
    from cvxmri.reproduce import reproduce_preset, train_config

    config = _resolved("--preset", "tiny")
    reproduced = reproduce_preset("tiny")
    expected = train_config(reproduced, "layerwise-convex", reproduced.masks[0], 3).mask
    assert config.mask == expected  # type: ignore[attr-defined]
    assert config.mask.calib_size == (6, 6)  # type: ignore[attr-defined]
    assert _resolved("--preset", "tiny", "--calib-size", "4").mask.calib_size == (4, 4)  # type: ignore[attr-defined]
    # The quick preset trains what it always trained.
    assert _resolved().mask == reproduce_preset("quick").masks[0]  # type: ignore[attr-defined]


def test_recorded_config_is_what_runs() -> None:
    """The recorded convex program has the stages' pattern count and kernel size (tiny: 8
    channels are 4 gated patterns, 3x3 kernels), not the dataclass defaults 32 and 7."""
    from dataclasses import replace

    from cvxmri.reproduce import reproduce_preset, train_config

    config = _resolved("--preset", "tiny")
    assert config.convex.patterns == 4 and config.convex.kernel_size == 3  # type: ignore[attr-defined]
    assert config.stage_config() == config.convex  # type: ignore[attr-defined]
    # Nothing else changes: the same settings as the reproduction trains, convex aside.
    reproduced = reproduce_preset("quick")
    expected = train_config(reproduced, "layerwise-convex", reproduced.masks[0], 5)
    quick = _resolved()
    assert replace(quick, convex=expected.convex) == expected  # type: ignore[type-var]
    assert quick.stage_config() == expected.stage_config()  # type: ignore[attr-defined]


def test_a_runs_config_reproduces_the_run(end_to_end_run: Path, tmp_path: Path) -> None:
    """``train --config RUN/config.yaml`` of an end-to-end run is the same configuration: the
    default --method does not turn it into a layer-wise run."""
    import yaml

    config = _resolved("--config", str(end_to_end_run / "config.yaml"))
    assert config.method == "end-to-end"  # type: ignore[attr-defined]
    out = tmp_path / "again"
    assert main(["train", "--config", str(end_to_end_run / "config.yaml"), "--out", str(out)]) == 0
    saved = yaml.safe_load((end_to_end_run / "config.yaml").read_text())
    assert yaml.safe_load((out / "config.yaml").read_text()) == saved


def test_evaluate_keeps_the_config_files_data_and_split(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``evaluate --config ev.yaml`` evaluates the file's data and split, not the defaults;
    options given still override the file."""
    import yaml

    monkeypatch.chdir(tmp_path)  # no data/default here: a default would fail
    ev = tmp_path / "ev.yaml"
    ev.write_text(
        f"data: {tiny / 'data'}\nsplit: val\nmethods: [zero-filled]\n"
        "masks:\n- kind: cartesian\n  acceleration: 4.0\n  center_fraction: 0.08\n"
    )
    assert main(["evaluate", "--config", str(ev), "--out", "a"]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["data"] == str(tiny / "data") and saved["split"] == "val"
    assert saved["masks"] == [
        {"kind": "cartesian", "acceleration": 4.0, "center_fraction": 0.08, "calib_size": [16, 16]}
    ]
    assert main(["evaluate", "--config", str(ev), "--accel", "6", "--out", "b"]) == 0
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["masks"][0]["acceleration"] == 6.0
    assert saved["masks"][0]["center_fraction"] == 0.08 and saved["split"] == "val"
    # An evaluation's own config.yaml is a valid --config.
    assert main(["evaluate", "--config", "b/config.yaml", "--out", "c"]) == 0
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text()) == saved


# ------------------------------------------------------------- failed runs leave no folder


def test_failed_train_leaves_no_folder_and_can_be_rerun(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that is not there is refused before the folder is created, so the rerun is
    refused for the same reason, not because the folder exists; without --out no
    ``runs/<method>-<mask>-<time>/`` (nor ``runs/``) is left either."""
    monkeypatch.chdir(tmp_path)
    common = ["train", "--preset", "tiny", "--data", str(tiny / "data")]
    for _ in range(2):
        result = _run(*common, "--device", "cuda:99", "--out", "runs/gpu")
        assert result.returncode == 2, result.stderr
        assert "device cuda:99 requested but" in result.stderr
        assert not (tmp_path / "runs").exists()
    result = _run(*common, "--device", "cuda:99")
    assert result.returncode == 2 and not (tmp_path / "runs").exists()
    # A failure after the folder was created (the batch cannot fit) removes it again.
    result = _run(*common, "--batch-size", "100000000")
    assert result.returncode == 2 and "batch size 100000000" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failure_keeps_a_resumable_run(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails after its first checkpoint keeps its folder (it can be resumed); one
    that fails before is removed."""
    import cvxmri.training.run as run_module
    from cvxmri.errors import CvxmriError

    def fail(*_: object) -> None:
        raise CvxmriError("disk full")

    args = ["train", "--preset", "tiny", "--epochs", "1", "--data", str(tiny / "data")]
    monkeypatch.setattr(run_module, "write_outputs", fail)
    kept = tmp_path / "kept"
    assert main([*args, "--out", str(kept)]) == 2
    assert (kept / "checkpoints" / "last.pt").is_file() and (kept / "config.yaml").is_file()
    monkeypatch.setattr(run_module.Trainer, "fit", fail)
    removed = tmp_path / "deep" / "removed"
    assert main([*args, "--out", str(removed)]) == 2
    assert not (tmp_path / "deep").exists()
    # --resume of an existing folder never deletes it, even when it fails early.
    assert main([*args, "--out", str(kept), "--resume"]) == 2
    assert (kept / "checkpoints" / "last.pt").is_file()


# ---------------------------------------------------------------------- smaller surprises


def test_version_and_debug_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    import cvxmri

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cvxmri {cvxmri.__version__}"
    for argv in (["--debug", "data", "info"], ["data", "info", "--debug"]):
        result = _run(*argv, "/nonexistent.h5")
        assert result.returncode != 0 and "Traceback" in result.stderr, argv
    # -v after the sub-command too; given before it, the sub-command does not reset it.
    from cvxmri.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate", "-v"]).verbose
    assert parser.parse_args(["-v", "--debug", "evaluate"]).debug
    assert parser.parse_args(["-v", "evaluate"]).verbose
    assert not parser.parse_args(["evaluate"]).debug


def test_evaluate_model_keeps_the_classical_rows(
    tiny: Path, end_to_end_run: Path, tmp_path: Path
) -> None:
    """``evaluate --model RUN`` evaluates the network beside zero-filled and CS, as its help
    says; ``--method`` narrows the classical methods; ``--device`` picks the device."""
    out = tmp_path / "with-model"
    common = ["evaluate", "--data", str(tiny / "data"), "--mask", "cartesian"]
    args = [*common, "--model", str(end_to_end_run), "--cs-iterations", "5", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in summary["results"]} == {
        "zero-filled",
        "cs",
        "cg-sense",
        end_to_end_run.name,
    }
    only = tmp_path / "only-zf"
    narrowed = [*common, "--model", str(end_to_end_run), "--method", "zero-filled"]
    assert main([*narrowed, "--out", str(only)]) == 0
    summary = json.loads((only / "summary.json").read_text())
    assert {r["method"] for r in summary["results"]} == {"zero-filled", end_to_end_run.name}
    result = _run(*common, "--device", "cuda:99", "--out", str(tmp_path / "gpu"))
    assert result.returncode == 2 and "device cuda:99 requested but" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "gpu").exists()


def test_evaluate_says_when_a_network_meets_another_mask(
    tiny: Path, end_to_end_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A network evaluated on a mask other than its training mask (from its run folder's
    config.yaml) gets a note under the table and in summary.json; on its own mask, none."""
    out = tmp_path / "masks"
    args = ["evaluate", "--data", str(tiny / "data"), "--model", str(end_to_end_run)]
    args += ["--mask", "poisson", "--mask", "cartesian", "--calib-size", "6"]
    assert main([*args, "--method", "zero-filled", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    note = "trained on poisson 4x (calib 6x6), evaluated on cartesian 4x (centre 0.04)"
    assert f"note: {end_to_end_run.name} was {note}" in printed
    assert printed.count("note:") == 1
    results = json.loads((out / "summary.json").read_text())["results"]
    network = {r["mask"]: r for r in results if r["method"] == end_to_end_run.name}
    assert network["cartesian 4x (centre 0.04)"]["note"] == note
    assert "note" not in network["poisson 4x (calib 6x6)"]
    assert network["poisson 4x (calib 6x6)"]["trained_mask"] == "poisson 4x (calib 6x6)"
    assert all("note" not in r for r in results if r["method"] == "zero-filled")


def test_report_on_a_training_run_says_what_it_needs(end_to_end_run: Path) -> None:
    result = _run("report", str(end_to_end_run))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "a training run, not a reproduce folder" in lines[0]
    assert "unknown key" not in lines[0]


@pytest.mark.parametrize(
    ("argv", "every_depth"),
    [
        (["--preset", "quick"], False),  # the paper's comparison: end-to-end at full depth
        (["--preset", "quick", "--every-depth"], True),
        (["--preset", "paper"], True),
        (["--preset", "paper", "--no-every-depth"], False),
    ],
)
def test_reproduce_every_depth(
    argv: list[str], every_depth: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``reproduce --every-depth`` trains end-to-end networks of every depth; the quick
    preset trains the full depth only unless told, the paper preset every depth."""
    import cvxmri.reproduce

    seen = []
    monkeypatch.setattr(cvxmri.reproduce, "reproduce", lambda config, *_, **__: seen.append(config))
    monkeypatch.setattr(cli, "_print_report", lambda *_: None)
    assert main(["reproduce", *argv, "--data", str(tmp_path / "data"), "--out", str(tmp_path)]) == 0
    assert seen[0].end_to_end_every_depth is every_depth
