"""The memory and speed benchmarks: measurement, search logic, FLOP counts, command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cvxmri.benchmark.measure import run_trial, tensor_peak_bytes
from cvxmri.benchmark.memory import linear_fit, max_batch_size
from cvxmri.benchmark.memory_unrolled import UnrolledMemoryConfig
from cvxmri.benchmark.memory_unrolled import targets as unrolled_targets
from cvxmri.benchmark.unrolled import random_batch
from cvxmri.benchmark.workload import (
    LAYERWISE,
    METHODS,
    Workload,
    prepare,
    stage_pass_flops,
    step_flops,
)
from cvxmri.cli import main
from cvxmri.errors import CvxmriError
from cvxmri.models.dc import DCConfig
from cvxmri.models.unrolled import UnrolledNet
from cvxmri.training.unrolled import unrolled_forward


def test_bigger_batch_measures_bigger_peak() -> None:
    w = Workload("end-to-end", layers=3, channels=16, kernel_size=3, size=64)
    small = run_trial(w, steps=1, budget_bytes=2**30)
    large = run_trial(Workload(**{**w.__dict__, "batch": 16}), steps=1, budget_bytes=2**30)
    assert not small["oom"] and not large["oom"]
    # 16 images of 3 stored 16-channel 64x64 float32 maps each: at least 12 MiB more.
    assert large["peak_bytes"] > small["peak_bytes"] + 12 * 2**20
    assert 0 < large["state_bytes"] <= large["peak_bytes"] and large["seconds"] > 0


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 7, 8, 9, 100, 999, 1000])
@pytest.mark.parametrize("guess", [1, 5, 64, 5000])
def test_search_finds_the_exact_threshold(threshold: int, guess: int) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        assert batch not in tried, "a batch size was tried twice"
        tried.append(batch)
        return batch <= threshold

    best, capped = max_batch_size(fits, limit=1000, guess=guess)
    assert best == threshold
    assert capped == (threshold == 1000)
    # Doubling and bisection: logarithmically many trials.
    assert len(tried) <= 2 * 11 + 2


def test_doubling_from_one() -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 37

    assert max_batch_size(fits, limit=4096) == (37, False)
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]


def test_linear_fit_and_crossing() -> None:
    points = [{"batch": b, "peak_bytes": 100 + 30 * b} for b in (1, 2, 4)]
    points.append({"batch": 8, "oom": True})
    slope, fixed = linear_fit(points)  # type: ignore[misc]
    assert slope == pytest.approx(30) and fixed == pytest.approx(100)


def test_flops_match_a_hand_count() -> None:
    # 3 layers, 4 channels, 3x3, 16x16, batch 2: hidden 2->4 (forward, weight gradient),
    # hidden 4->4 (forward, weight and input gradients), final 1x1 4->2 (all three).
    layer1 = 2 * 2 * 4 * 9 * 256
    layer2 = 2 * 4 * 4 * 9 * 256
    final = 2 * 4 * 2 * 1 * 256
    w = Workload("end-to-end", batch=2, layers=3, channels=4, kernel_size=3, size=16)
    assert step_flops(w) == 2 * (2 * layer1 + 3 * layer2 + 3 * final)
    checkpointed = Workload(**{**w.__dict__, "method": "end-to-end-checkpointing"})
    assert step_flops(checkpointed) == step_flops(w) + 2 * (layer1 + layer2)
    # Convex stage 2 (input 4 channels, 2 patterns x 2 outputs): responses 4->4 forward
    # and weight gradient; recomputed: plus the gated prefix layer (2->4 values and 2->2
    # gates). Its stage pass: the prefix and the gates 4->2.
    convex = Workload(
        "layerwise-convex", batch=1, layers=3, stage=2, channels=4, kernel_size=3, size=16
    )
    gates, responses = 2 * 4 * 2 * 9 * 256, 2 * 4 * 4 * 9 * 256
    prefix = layer1 + 2 * 2 * 2 * 9 * 256
    assert step_flops(convex) == 2 * responses
    recomputed = Workload(**{**convex.__dict__, "stage_inputs": "recomputed"})
    assert step_flops(recomputed) == 2 * responses + prefix
    assert stage_pass_flops(convex) == stage_pass_flops(recomputed) == prefix + gates
    # Non-convex stage 2: KxK 4->4 forward and weight gradient, 1x1 4->2 all three.
    layerwise = Workload(**{**convex.__dict__, "method": "layerwise-nonconvex"})
    assert step_flops(layerwise) == 2 * layer2 + 3 * final


@pytest.mark.parametrize(
    "method,stage,inputs",
    [
        ("end-to-end", 0, "cached"),
        ("end-to-end-checkpointing", 0, "cached"),
        ("layerwise-convex", 1, "cached"),
        ("layerwise-convex", 3, "recomputed"),
        ("layerwise-nonconvex", 2, "recomputed"),
        ("layerwise-nonconvex", 3, "cached"),
    ],
)
def test_every_workload_steps(method: str, stage: int, inputs: str) -> None:
    w = Workload(
        method,
        batch=2,
        layers=4,
        stage=stage,
        stage_inputs=inputs,
        channels=4,
        kernel_size=3,
        size=12,
        pattern_chunk=1,
    )
    prepared = prepare(w)
    prepared.warmup()
    assert prepared.step() > 0
    if method == "layerwise-convex":
        # The stage pass gives the convex stage's sign patterns (2 patterns of 4 channels).
        assert prepared.stage_pass is not None
        gates = prepared.stage_pass()
        assert gates.dtype == torch.bool and gates.shape == (2, 2, 12, 12)
    elif w.layerwise and stage >= 2:
        assert prepared.stage_pass is not None
        assert prepared.stage_pass().shape == (2, 4, 12, 12)
    else:
        assert prepared.stage_pass is None


@pytest.mark.parametrize(("stage", "amp"), [(1, False), (2, False), (2, True)])
def test_certified_solve_workload_certifies_a_stage(stage: int, amp: bool) -> None:
    """The certified solve of a convex stage (``part="solve"``) on its training set of
    ``batch`` images (bf16 under autocast, as the trainer's cache): the stage's program
    (``P C_in K^2`` unknowns per output: 2 patterns, 2 or 4 input channels, 3x3), solved
    at the first beta of the default path to the default gap."""
    w = Workload(
        "layerwise-convex",
        batch=3,
        layers=3,
        stage=stage,
        channels=4,
        kernel_size=3,
        size=12,
        part="solve",
        amp=amp,
    )
    prepared = prepare(w)
    prepared.warmup()
    cert = prepared.part("solve")()
    assert cert["unknowns"] == 2 * (2 if stage == 1 else 4) * 9
    assert cert["passes"] >= 1 and 0 <= cert["relative_gap"] <= 1e-3
    assert cert["primal"] >= cert["dual"] > 0 and cert["setup_seconds"] > 0
    assert w.describe().endswith("certified solve")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "layerwise-nonconvex"}, "layerwise-nonconvex has no convex solve"),
        ({"stage_inputs": "recomputed"}, "the certified solve runs on cached stage inputs"),
    ],
)
def test_certified_solve_workload_refusals(changes: dict[str, object], message: str) -> None:
    w = Workload("layerwise-convex", layers=3, stage=2, channels=4, kernel_size=3, size=12)
    with pytest.raises(CvxmriError, match=message):
        replace(w, part="solve", **changes).validate()


TINY = ["--layers", "3", "--channels", "4", "--kernel", "3", "--size", "16"]


def test_memory_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "memory"
    args = ["benchmark", "memory", *TINY, "--budget-gb", "0.5", "--search", "fit"]
    args += ["--fit-batches", "1,2"]
    args += ["--method", "end-to-end", "--method", "layerwise-convex", "--precision", "fp32"]
    args += ["--stage-inputs", "cached", "--depths", "2,3", "--chunks", "", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layerwise-convex" in printed and "extrap." in printed
    result = json.loads((out / "memory.json").read_text())
    assert result["schema"] == "cvxmri.benchmark.memory/1"
    methods = {row["method"] for row in result["results"]}
    assert methods == {"end-to-end", "layerwise-convex"}
    assert all(row["max_batch_kind"] == "extrapolated" for row in result["results"])
    assert {r["layers"] for r in result["depth"]["rows"]} == {2, 3}
    # A layer-wise depth's peak covers its stages' steps and their once-per-stage passes.
    for row in result["depth"]["rows"]:
        if row["method"] == "layerwise-convex":
            assert row["stage_pass_bytes"] > 0
            assert row["peak_bytes"] == max(row["step_bytes"], row["stage_pass_bytes"])
    # The certified solver: stage 1, and stage 2 for every later one, at 2 and 4 images;
    # its largest training set is the smaller of the two stages' line crossings.
    certified = result["certified"]
    assert [(row["stage"], row["precision"]) for row in certified["rows"]] == [
        (1, "fp32"),
        (2, "fp32"),
    ]
    assert certified["rows"][1]["stands_for"] == [2]
    # P C_in K^2 unknowns per output: 2 patterns, 2 or 4 input channels, 3x3.
    assert [row["program_unknowns"] for row in certified["rows"]] == [36, 72]
    for row in certified["rows"]:
        assert [p["batch"] for p in row["points"]] == [2, 4]  # the default
        assert all(p["details"]["relative_gap"] <= 1e-3 for p in row["points"])
    (total,) = certified["totals"]
    assert total["max_images"] == min(row["max_images"] for row in certified["rows"])
    # (On the CPU its trials ran with the fixed mmap threshold, and say so.)
    assert "MALLOC_MMAP_THRESHOLD_=65536" in certified["measurement"]
    assert total["end_to_end_max_batch"] == next(
        r["max_batch"] for r in result["results"] if r["method"] == "end-to-end"
    )
    assert "Certified solver of the convex stages" in printed
    names = [t["name"] for t in result["targets"]]
    assert any("largest training set of the certified solver" in n for n in names)
    for name in ("config.yaml", "log.txt", "memory.csv", "tables.md"):
        assert (out / name).is_file(), name
    for name in ("memory_max_batch.png", "memory_batch.png", "memory_depth.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_unrolled_speed_command_projects_training_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "speed-unrolled"
    args = ["benchmark", "speed", "--arch", "unrolled", "--iterations", "1", "3"]
    args += ["--channels", "4", "--kernel", "3", "--size", "16", "--coils", "2"]
    args += ["--repeats", "1", "--epochs", "2", "--images", "4", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "speed.json").read_text())
    assert result["schema"] == "cvxmri.benchmark.speed-unrolled/1"
    rows = {(r["method"], r["iterations"]): r for r in result["rows"]}
    assert set(rows) == {(m, t) for m in METHODS for t in (1, 3)}
    # The projection of the module docstring, from the measured rows.
    for total in result["totals"]:
        row = rows[(total["method"], total["iterations"])]
        step, t = row["seconds_per_step"], total["iterations"]
        expected = {
            "end-to-end": 2 * 4 * step,
            "end-to-end-checkpointing": 2 * 4 * step,
            "layerwise-nonconvex": t * 4 * (2 * step + row.get("pass_seconds", 0.0)),
            "layerwise-convex": t * 4 * (step + row.get("pass_seconds", 0.0)),
        }[total["method"]]
        assert total["seconds"] == pytest.approx(expected)
        if total["method"] == "end-to-end":
            assert total["vs_end_to_end"] == 1.0
    assert all("pass_seconds" in rows[(m, 3)] for m in LAYERWISE)
    assert "| layerwise-convex | 3 |" in capsys.readouterr().out
    for wrong, message in (
        (["--layers", "3"], "--layers does not apply to --arch unrolled"),
        (["--precision", "bf16"], "--precision fp32 only"),
    ):
        assert main([*args[:4], *wrong, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_speed_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "speed"
    args = ["benchmark", "speed", *TINY, "--precision", "fp32", "--repeats", "1"]
    args += ["--epochs", "2", "--images", "10", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "speed.json").read_text())
    assert result["conv_peak"]["fp32"]["gflops"] > 0
    kinds = {(r["method"], r["stage"], r["stage_inputs"]) for r in result["rows"]}
    assert ("layerwise-convex", 2, "recomputed") in kinds and ("end-to-end", None, "-") in kinds
    totals = {(t["method"], t["stage_inputs"]): t for t in result["totals"]}
    assert totals[("end-to-end", "-")]["vs_end_to_end"] == 1.0
    passes = [r for r in result["rows"] if r["method"] == "layerwise-convex" or r["stage"] != 1]
    assert all(r["stage_pass_images_per_second"] > 0 for r in passes if r["stage"])
    assert (out / "speed_throughput.png").is_file() and (out / "speed_total.png").is_file()
    # The certified solve, timed for stage 1 and stage 2 (which stands for stage 2 of 3
    # layers) on the default 2 images, each certified at the first beta.
    certified = result["certified"]
    assert [(r["stage"], r["stands_for"], r["images"]) for r in certified] == [
        (1, [1], 2),
        (2, [2], 2),
    ]
    assert all(r["seconds"] >= r["setup_seconds"] > 0 for r in certified)
    assert [r["program_unknowns"] for r in certified] == [36, 72]
    assert all(r["relative_gap"] <= 1e-3 and r["passes"] >= 1 for r in certified)
    printed = capsys.readouterr().out
    assert "images / s" in printed and "Certified solver of the convex stages" in printed


def test_speed_bad_certified_images(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark", "speed", *TINY, "--certified-images", "0"]) == 2
    assert "certified images must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--budget-gb", "0"], "budget must be a positive number"),
        (["--budget-gb", "-3"], "budget must be a positive number"),
        (["--size", "2"], "image size 2 is smaller than the kernel size 3"),
        (["--channels", "5"], "channels must be even"),
        (["--fit-batches", "2"], "fit batches must be at least two"),
        (["--depths", "1,5"], "depths must be >= 2"),
        (["--certified-images", "2"], "certified images must be at least two different"),
    ],
)
def test_bad_inputs_give_one_line_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["benchmark", "memory", *TINY, *extra, "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvxmri: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_speed_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark", "speed", *TINY, "--size", "1"]) == 2
    assert "smaller than the kernel size" in capsys.readouterr().err


# Unrolled networks (issue 13): tiny sizes, T in {1, 3}.
UNROLLED = {"arch": "unrolled", "channels": 4, "kernel_size": 3, "size": 16, "coils": 2}


@pytest.mark.parametrize(
    "method,part",
    [
        ("end-to-end", "step"),
        ("end-to-end-checkpointing", "step"),
        ("layerwise-nonconvex", "step"),
        ("layerwise-nonconvex", "stage_pass"),
        ("layerwise-convex", "step"),
        ("layerwise-convex", "stage_pass"),
    ],
)
@pytest.mark.parametrize("iterations", [1, 3])
def test_every_unrolled_workload_runs(method: str, part: str, iterations: int) -> None:
    w = Workload(method, batch=2, iterations=iterations, part=part, **UNROLLED)
    prepared = prepare(w)
    prepared.warmup()
    out = prepared.part(part)()
    if part == "stage_pass":
        # The images advanced through the iteration's block: (B, 2, H, W), finite.
        assert out.shape == (2, 2, 16, 16) and bool(out.isfinite().all())
    else:
        # A training loss, or the convex Gram system's mean squared residual norm.
        assert out > 0
    assert (prepared.stage_pass is not None) == w.layerwise
    assert (prepared.solve is not None) == (method == "layerwise-convex")


def test_unrolled_convex_solve_runs() -> None:
    w = Workload("layerwise-convex", iterations=2, part="solve", **UNROLLED)
    prepared = prepare(w)
    prepared.warmup()
    cert = prepared.part("solve")()
    assert cert["passes"] >= 1 and cert["relative_gap"] >= 0


@pytest.mark.parametrize(
    "method,part,grows",
    [
        ("end-to-end", "step", True),
        ("layerwise-nonconvex", "step", False),
        ("layerwise-nonconvex", "stage_pass", False),
        ("layerwise-convex", "step", False),
        ("layerwise-convex", "stage_pass", False),
    ],
)
def test_unrolled_memory_against_iterations(method: str, part: str, grows: bool) -> None:
    """Counted tensor bytes (`tensor_peak_bytes`: deterministic, unlike the resident size
    of so small a step) at T = 1 and T = 3."""

    def peak(iterations: int) -> int:
        prepared = prepare(Workload(method, iterations=iterations, part=part, **UNROLLED))
        prepared.warmup()
        run = prepared.part(part)
        run()  # the first full-size run makes one-time allocations of its own
        return tensor_peak_bytes(run)

    one, three = peak(1), peak(3)
    assert one > 0
    if grows:
        # Backpropagating through T iterations keeps every iteration's hidden activation
        # (4 channels of 16x16 float32: ReLU's backward needs it): 2 more at T = 3.
        hidden = 4 * 16 * 16 * 4
        assert three >= one + 2 * hidden
    else:
        # The same tensors at every T (the T - 1 frozen blocks and the previous iterate
        # exist before the step and are not counted); 5% allows for the order in which
        # reference cycles are freed, far below end-to-end's growth (+74% here).
        assert abs(three - one) <= 0.05 * one


def test_unrolled_targets_can_fail() -> None:
    cfg = UnrolledMemoryConfig(iterations=[5, 20])
    rows = [
        {"method": m, "iterations": t, "peak_bytes": peak}
        for m, t, peak in [
            ("end-to-end", 5, 100),
            ("end-to-end", 20, 90),
            ("layerwise-nonconvex", 5, 100),
            ("layerwise-nonconvex", 20, 105),
            ("layerwise-convex", 5, 100),
            ("layerwise-convex", 20, 120),
        ]
    ]
    verdicts = {t["name"].split(",")[-1].strip(): t["met"] for t in unrolled_targets(rows, cfg)}
    assert verdicts == {
        "layerwise-nonconvex": True,
        "layerwise-convex": False,
        "end-to-end grows with T: peak at T=20 over T=5": False,
    }
    rows[1]["peak_bytes"] = 400
    assert unrolled_targets(rows, cfg)[-1]["met"]


UNROLLED_TINY = ["--arch", "unrolled", "--channels", "4", "--kernel", "3", "--size", "16"]


def test_unrolled_memory_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "memory"
    args = ["benchmark", "memory", *UNROLLED_TINY, "--coils", "2", "--iterations", "1", "2"]
    args += ["--method", "end-to-end", "--budget-gb", "0.5", "--out", str(out)]
    assert main(args) == 0
    assert "| end-to-end |" in capsys.readouterr().out
    result = json.loads((out / "memory.json").read_text())
    assert result["schema"] == "cvxmri.benchmark.memory-unrolled/1"
    assert result["config"]["iterations"] == [1, 2] and result["config"]["coils"] == 2
    rows = {(r["method"], r["iterations"]): r for r in result["rows"]}
    assert set(rows) == {("end-to-end", 1), ("end-to-end", 2)}
    assert all(r["peak_bytes"] > 0 and not r["oom"] for r in rows.values())
    assert [t["name"].split(":")[0] for t in result["targets"]] == ["end-to-end grows with T"]
    for name in ("config.yaml", "log.txt", "memory.csv", "tables.md"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--arch", "unrolled", "--iterations", "0", "2"], "iterations must be >= 1"),
        (["--arch", "unrolled", "--coils", "0"], "coils must be >= 1"),
        (["--arch", "unrolled", "--channels", "5"], "channels must be even"),
        (["--arch", "unrolled", "--size", "3"], "image size 3 is smaller than the kernel size 5"),
        (["--arch", "unrolled", "--precision", "bf16"], "no bf16 autocast"),
        (["--arch", "unrolled", "--layers", "3"], "--layers does not apply to --arch unrolled"),
        (["--iterations", "2"], "--iterations does not apply to --arch cnn"),
        (["--dc", "cg"], "--dc does not apply to --arch cnn"),
        (["--arch", "unrolled", "--certified-images", "1,2"], "applies to the 2D CNN"),
    ],
)
def test_bad_unrolled_inputs_give_one_line_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["benchmark", "memory", *extra, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvxmri: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_checkpointed_unrolled_forward_is_the_plain_one() -> None:
    """`unrolled_forward`, which the trainer and the end-to-end workloads run: the same
    output and gradients with and without per-iteration checkpointing."""
    gen = torch.Generator().manual_seed(0)
    data = random_batch(2, 2, 16, gen, torch.device("cpu"))
    torch.manual_seed(0)
    net = UnrolledNet.relu(3, 4, 3, DCConfig(kind="cg", cg_iterations=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    results = []
    for checkpointing in (False, True):
        net.zero_grad()
        out = unrolled_forward(net, data.x0, data.y, data.mask, data.maps, checkpointing)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, checkpointed)
    assert results[0][1][-1].abs().sum() > 0
