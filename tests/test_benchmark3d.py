"""`cvxmri benchmark memory --dims 3`: 3D workloads, the largest-patch search and its
summary against known lines, and the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cvxmri.benchmark.measure import run_trial
from cvxmri.benchmark.memory3d import (
    Memory3DConfig,
    measure_stage,
    side_within,
    summarise,
    targets,
)
from cvxmri.benchmark.workload import Workload, prepare, step_flops
from cvxmri.cli import main
from cvxmri.errors import CvxmriError


def test_side_within_inverts_the_line() -> None:
    line = (10.0, 1000.0)  # 10 bytes per voxel on top of 1000
    assert side_within(line, 1000 + 10 * 27**3, 10_000) == 27
    assert side_within(line, 1000 + 10 * 27**3 - 1, 10_000) == 26
    assert side_within(line, 1000 + 10 * 27**3, 20) == 20
    assert side_within(line, 999, 10_000) == 0


@pytest.mark.parametrize(
    "method,stage", [("end-to-end", 0), ("layerwise-convex", 2), ("layerwise-nonconvex", 1)]
)
def test_3d_workloads_step_on_cubic_patches(method: str, stage: int) -> None:
    w = Workload(method, layers=3, stage=stage, channels=4, kernel_size=3, size=6, ndim=3)
    prepared = prepare(w)
    prepared.warmup()
    assert prepared.step() > 0
    if method == "layerwise-convex":
        assert prepared.stage_pass is not None
        assert prepared.stage_pass().shape == (1, 2, 6, 6, 6)  # 2 patterns' gates


def test_3d_flops_count_cubic_kernels() -> None:
    # 3 layers, 4 channels, 3x3x3, 6^3 voxels: hidden 2->4 (forward, weight gradient),
    # hidden 4->4 (forward, weight and input gradients), final 1x1x1 4->2 (all three).
    voxels = 6**3
    layer1, layer2, final = (2 * 2 * 4 * 27 * voxels, 2 * 4 * 4 * 27 * voxels, 2 * 4 * 2 * voxels)
    w = Workload("end-to-end", layers=3, channels=4, kernel_size=3, size=6, ndim=3)
    assert step_flops(w) == 2 * layer1 + 3 * layer2 + 3 * final


def test_bigger_patch_measures_bigger_peak() -> None:
    w = Workload("end-to-end", layers=3, channels=16, kernel_size=3, size=8, ndim=3)
    small = run_trial(w, steps=1, budget_bytes=2**30)
    large = run_trial(replace(w, size=32), steps=1, budget_bytes=2**30)
    assert not small["oom"] and not large["oom"]
    # 3 stored 16-channel float32 maps of 32^3 - 8^3 more voxels: at least 5 MiB more.
    assert large["peak_bytes"] > small["peak_bytes"] + 5 * 2**20


class LineRunner:
    """Trials whose peak follows a known line per method: ``fixed + per_voxel * s^3``."""

    def __init__(self, cfg: Memory3DConfig, per_voxel: dict[str, float]) -> None:
        self.cfg = cfg
        self.per_voxel = per_voxel
        self.tried: list[tuple[str, int]] = []

    def trial(self, w: Workload) -> dict[str, Any]:
        self.tried.append((w.method, w.size))
        peak = 1_000_000 + self.per_voxel[w.method] * w.size**3
        return {"peak_bytes": peak, "seconds": 1e-3, "oom": False, "fits": peak <= self.budget}

    @property
    def budget(self) -> int:
        return self.cfg.budget_bytes


def test_direct_search_finds_each_methods_largest_patch() -> None:
    cfg = Memory3DConfig(layers=3, channels=4, budget_gb=1.0, fit_sides=[8, 16], search="direct")
    per_voxel = {"end-to-end": 1000.0, "layerwise-convex": 100.0, "layerwise-nonconvex": 500.0}
    runner = LineRunner(cfg, per_voxel)
    configurations = [
        measure_stage(runner, cfg, cfg.workload(method, stage))  # type: ignore[arg-type]
        for method, stage in (
            ("end-to-end", 0),
            ("layerwise-convex", 1),
            ("layerwise-convex", 2),
            ("layerwise-nonconvex", 1),
            ("layerwise-nonconvex", 2),
        )
    ]
    expected = {m: side_within((v, 1e6), 2**30, 10**6) for m, v in per_voxel.items()}
    assert expected == {"end-to-end": 102, "layerwise-convex": 220, "layerwise-nonconvex": 128}
    for c in configurations:
        assert c["max_side"] == expected[c["method"]] and c["max_side_kind"] == "measured"
        assert c["fit"]["bytes_per_voxel"] == pytest.approx(per_voxel[c["method"]])
        assert c["extrapolated"]["80.0"] == side_within(
            (per_voxel[c["method"]], 1e6), 80 * 2**30, 10**6
        )
    rows = {r["method"]: r for r in summarise(configurations, cfg)}
    assert rows["layerwise-convex"]["vs_end_to_end"] == round(220**3 / 102**3, 2)
    # Convex patches of end-to-end's side: 1e6 + 100 * b * 102^3 <= 2^30.
    assert rows["layerwise-convex"]["batch_at_end_to_end_side"] == 10
    assert rows["end-to-end"]["batch_at_end_to_end_side"] == 1
    found = {t["name"].split(", ")[-1]: t["met"] for t in targets(list(rows.values()), cfg)}
    assert found == {"1 GiB": True, "12 GiB": True, "80 GiB": True}
    worse = summarise(
        [c for c in configurations if c["method"] != "layerwise-convex"]
        + [{**configurations[1], "max_side": 150}],
        cfg,
    )
    assert not targets(worse, cfg)[0]["met"]


def test_auto_extrapolates_what_would_take_too_long() -> None:
    cfg = Memory3DConfig(layers=3, channels=4, budget_gb=1.0, fit_sides=[8, 16])
    cfg = replace(cfg, direct_seconds=0.0)
    runner = LineRunner(cfg, {"end-to-end": 1000.0})
    result = measure_stage(runner, cfg, cfg.workload("end-to-end", 0))  # type: ignore[arg-type]
    assert result["max_side_kind"] == "extrapolated" and result["max_side"] == 102
    assert runner.tried == [("end-to-end", 8), ("end-to-end", 16)]


def test_memory3d_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "memory3d"
    args = ["benchmark", "memory", "--dims", "3", "--layers", "3", "--channels", "4"]
    args += ["--budget-gb", "0.5", "--search", "fit", "--fit-sides", "4,8"]
    args += ["--method", "end-to-end", "--method", "layerwise-convex", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "largest cubic patch" in printed and "extrap." in printed
    result = json.loads((out / "memory.json").read_text())
    assert result["schema"] == "cvxmri.benchmark.memory-3d/1"
    assert [r["method"] for r in result["results"]] == ["end-to-end", "layerwise-convex"]
    assert [(c["method"], c["stage"]) for c in result["configurations"]] == [
        ("end-to-end", None),
        ("layerwise-convex", 1),
        ("layerwise-convex", 2),
    ]
    assert all(r["max_side_kind"] == "extrapolated" for r in result["results"])
    assert {t["note"].split(", ")[-1] for t in result["targets"]} == {"extrapolated"}
    assert (out / "tables.md").is_file() and (out / "config.yaml").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--size", "16"], "--size does not apply to --dims 3"),
        (["--precision", "bf16"], "measures the CNN in fp32"),
        (["--fit-sides", "8"], "fit sides must be at least two"),
        (["--budget-gb", "0"], "budget must be a positive number"),
    ],
)
def test_bad_3d_benchmark_inputs_give_one_line_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["benchmark", "memory", "--dims", "3", *extra, "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvxmri: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


UNROLLED3D = {"arch": "unrolled", "channels": 4, "kernel_size": 3, "coils": 2, "ndim": 3}


@pytest.mark.parametrize(
    "method,part",
    [
        ("end-to-end", "step"),
        ("end-to-end-checkpointing", "step"),
        ("layerwise-nonconvex", "stage_pass"),
        ("layerwise-convex", "step"),
        ("layerwise-convex", "solve"),
    ],
)
def test_unrolled_workloads_run_on_whole_volumes(method: str, part: str) -> None:
    w = Workload(method, iterations=2, part=part, volume=(6, 8, 8), **UNROLLED3D)
    w.validate()
    assert "3D 6x8x8" in w.describe()
    prepared = prepare(w)
    prepared.warmup()
    out = prepared.part(part)()
    if part == "stage_pass":
        assert out.shape == (1, 2, 6, 8, 8) and bool(out.isfinite().all())
    elif part == "solve":
        assert out["passes"] >= 1
    else:
        assert out > 0
    assert Workload.from_json(w.to_json()) == w


def test_3d_unrolled_workload_needs_a_volume() -> None:
    with pytest.raises(CvxmriError, match="needs a volume XxYxZ"):
        Workload("end-to-end", arch="unrolled", ndim=3, kernel_size=3, size=8).validate()
    with pytest.raises(CvxmriError, match="volume applies to a 3D unrolled workload"):
        Workload("end-to-end", arch="unrolled", kernel_size=3, size=8, volume=(4, 4, 4)).validate()


def test_unrolled_memory_command_on_volumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "memory"
    args = ["benchmark", "memory", "--dims", "3", "--arch", "unrolled", "--volume", "4x6x8"]
    # One trial (a fresh process): the sweep over T is the 2D command's, tested there.
    args += ["--channels", "4", "--coils", "2", "--iterations", "2", "--method", "end-to-end"]
    assert main([*args, "--budget-gb", "1", "--out", str(out)]) == 0
    assert "3x3x3, 4x6x8 volumes" in capsys.readouterr().out
    result = json.loads((out / "memory.json").read_text())
    assert result["config"]["dims"] == 3 and result["config"]["volume"] == [4, 6, 8]
    assert result["config"]["kernel_size"] == 3
    assert all(r["peak_bytes"] > 0 and not r["oom"] for r in result["rows"])
    assert [(r["method"], r["iterations"]) for r in result["rows"]] == [("end-to-end", 2)]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dims", "3", "--arch", "unrolled", "--size", "16"], "--size does not apply"),
        (["--arch", "unrolled", "--volume", "4x6x8"], "--volume applies to --dims 3 --arch"),
        (["--dims", "3", "--volume", "4x6x8"], "--volume applies to --dims 3 --arch"),
        (["--dims", "3", "--arch", "unrolled", "--volume", "2x6x8"], "each side at least"),
    ],
)
def test_bad_3d_unrolled_benchmark_inputs(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["benchmark", "memory", *extra, "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvxmri: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
