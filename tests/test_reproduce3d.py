"""`cvxmri reproduce --preset quick3d` (`cvxmri.reproduce3d`) at tiny sizes: every part, an
interruption and its resumption, the memory budget's choice, and the report's numbers
traced to the run's own files."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvxmri import reproduce3d as r3d
from cvxmri.benchmark.workload import Workload
from cvxmri.cli import main
from cvxmri.errors import CvxmriError
from cvxmri.masks import MaskSpec
from cvxmri.training.config import UnrolledConfig

SECTIONS = [
    "Overview",
    "At a glance",
    "Results",
    "Memory budget",
    "Example volume",
    "Configuration, data and machine",
]


def tiny_config(data: Path) -> r3d.Reproduce3DConfig:
    """The comparison at the tiny training preset on the 4x16x16 volumes."""
    return r3d.Reproduce3DConfig(
        training="tiny",
        data=str(data),
        mask=MaskSpec("poisson", 3.0, calib_size=(4, 4)),
        layers=3,
        channels=8,
        crops_per_image=2,
        widths=[8, 4, 2],
        unrolled=UnrolledConfig(iterations=2, channels=4, kernel_size=3),
        depths=[3, 1],
        device="cpu",
    )


def fake_peak(w: Workload) -> dict[str, Any]:
    """Peaks (MiB) with a known answer: convex CNN stages 5 and 10, end-to-end CNNs 1.5
    per channel (8, 4, 2 channels: 12, 6, 3); greedy convex unrolled 20 (Gram build) and
    25 (solve), end-to-end unrolled 10 per iteration."""
    if w.arch == "unrolled":
        peak = {"step": 20.0, "solve": 25.0}[w.part] if w.layerwise else 10.0 * w.iterations
    else:
        peak = 5.0 * w.stage if w.layerwise else 1.5 * w.channels
    return {"peak_mib": peak, "state_mib": 0.0, "seconds": 0.0}


def _quiet(run: Any) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return run()


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory, tiny_data3d: Path) -> dict[str, Any]:
    """A run stopped in its first 3D training part, then finished."""
    root = tmp_path_factory.mktemp("reproduce3d")
    data = root / "data"
    shutil.copytree(tiny_data3d, data)
    config, out = tiny_config(data), root / "out"
    original = r3d.RUNNERS["train"]

    def stop_in_3d(config: Any, root: Path, part: Any) -> None:
        if part.folder.startswith("3d-"):
            raise KeyboardInterrupt
        original(config, root, part)

    r3d.RUNNERS["train"] = stop_in_3d
    # Known peaks instead of fresh-process measurements (`cvxmri.benchmark.measure` has
    # its own tests; `test_peak_is_a_fresh_process_measurement` runs one): the budget
    # logic then has a known answer.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(r3d, "_peak", fake_peak)
    try:
        with pytest.raises(KeyboardInterrupt):
            _quiet(lambda: r3d.reproduce3d(config, out))
    finally:
        r3d.RUNNERS["train"] = original
    interrupted = json.loads((out / "parts.json").read_text())
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            report = r3d.reproduce3d(config, out)
    finally:
        monkeypatch.undo()
    results = json.loads((out / "results.json").read_text())
    return {
        "out": out,
        "config": config,
        "report": report,
        "results": results,
        "interrupted": interrupted,
        "printed": buffer.getvalue(),
    }


def test_resumed_run_skips_finished_parts(reproduced: dict[str, Any]) -> None:
    interrupted, printed = reproduced["interrupted"], reproduced["printed"]
    assert "decoupled-layerwise-convex" in interrupted
    assert not any(folder.startswith("3d-") for folder in interrupted)
    parts = r3d.plan(reproduced["config"])
    skipped = [p.title for p in parts if p.folder in interrupted]
    assert all(f"{title}: finished before, skipped" in printed for title in skipped)
    assert len(skipped) == len(interrupted)
    assert reproduced["report"].is_file()


def _per_volume(path: Path, method: str) -> dict[str, float]:
    with path.open() as handle:
        return {
            r["file"]: float(r["psnr"]) for r in csv.DictReader(handle) if r["method"] == method
        }


def test_results_come_from_the_runs_own_files(reproduced: dict[str, Any]) -> None:
    out, results = reproduced["out"], reproduced["results"]
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == [
        "zero-filled",
        "cs",
        "cg-sense",
        *(n.name for n in r3d.NETWORKS),
    ]
    for row in rows.values():
        psnr = _per_volume(out / row["folder"] / "per_volume.csv", row["label"])
        assert row["volume"]["psnr"]["mean"] == pytest.approx(statistics.fmean(psnr.values()))
    convex = _per_volume(out / "test-3d-layerwise-convex" / "per_volume.csv", "3d-layerwise-convex")
    budget = _per_volume(
        out / "test-3d-end-to-end-budget" / "per_volume.csv", "3d-end-to-end-budget"
    )
    differences = [convex[f] - budget[f] for f in convex]
    answer = results["answers"]["convex_minus_budget_end_to_end"]
    assert answer["mean"] == pytest.approx(statistics.fmean(differences))
    assert answer["n"] == len(differences) == 2
    assert results["answers"]["one_db"] == (answer["mean"] >= 1.0)
    # The networks were trained as configured: 3D at the run's width, decoupled in 2D.
    assert rows["3d-layerwise-convex"]["channels"] == 8
    assert rows["3d-end-to-end-budget"]["channels"] == results["memory"]["chosen_channels"]
    assert (
        rows["3d-unrolled-layerwise-convex"]["depth"],
        rows["3d-unrolled-end-to-end"]["channels"],
    ) == (2, 4)
    unrolled = results["answers"]["unrolled_convex_minus_end_to_end"]
    convex = _per_volume(
        out / "test-3d-unrolled-layerwise-convex" / "per_volume.csv", "3d-unrolled-layerwise-convex"
    )
    e2e = _per_volume(
        out / "test-3d-unrolled-end-to-end" / "per_volume.csv", "3d-unrolled-end-to-end"
    )
    assert unrolled["mean"] == pytest.approx(statistics.fmean(convex[f] - e2e[f] for f in convex))
    # Every greedy convex iteration's selected beta is certified.
    certificates = json.loads(
        (out / "3d-unrolled-layerwise-convex" / "certificates.json").read_text()
    )
    chosen = [c for c in certificates if c.get("selected")]
    assert len(chosen) == 2 and all(c["certified"] for c in chosen)


def test_budget_is_the_widest_end_to_end_within_the_convex_peak(
    reproduced: dict[str, Any],
) -> None:
    """With the known peaks of `fake_peak`: the CNN budget is stage 2's 10 MiB, in which
    end-to-end fits at 4 channels (6 MiB) but not 8 (12); the unrolled budget is the
    solve's 25 MiB, in which end-to-end fits at T = 1 (10) but not T = 3 (30)."""
    memory = reproduced["results"]["memory"]
    assert memory["budget_mib"] == 10.0
    assert [(w["channels"], w["fits"]) for w in memory["end_to_end"]] == [(8, False), (4, True)]
    assert memory["chosen_channels"] == 4
    unrolled = memory["unrolled"]
    assert unrolled["budget_mib"] == 25.0
    tried = [(r["iterations"], r["fits"]) for r in unrolled["end_to_end"]]
    assert tried == [(3, False), (2, True), (1, True)]  # T = 2: the greedy network's
    assert unrolled["chosen_iterations"] == 1
    out = reproduced["out"]
    assert "iterations: 1\n" in (out / "3d-unrolled-end-to-end-budget" / "config.yaml").read_text()
    assert "channels: 4\n" in (out / "3d-end-to-end-budget" / "config.yaml").read_text()
    assert reproduced["results"]["answers"]["unrolled_memory_ratio"] == 25.0 / 20.0


def test_peak_is_a_fresh_process_measurement() -> None:
    w = Workload(method="end-to-end", layers=2, channels=2, kernel_size=3, size=6, ndim=3)
    peak = r3d._peak(w)
    assert peak["peak_mib"] > 0 and peak["seconds"] > 0


def test_example_volume_matches_the_evaluation(reproduced: dict[str, Any]) -> None:
    out, results = reproduced["out"], reproduced["results"]
    record = results["examples"]
    metrics = {m["method"]: m["psnr"] for m in record["methods"]}
    baseline = _per_volume(out / "baselines" / "per_volume.csv", "cs")
    assert metrics["cs"] == pytest.approx(baseline[record["file"]], abs=1e-4)
    for network in r3d.NETWORKS:
        psnr = _per_volume(out / f"test-{network.name}" / "per_volume.csv", network.name)
        assert metrics[network.name] == pytest.approx(psnr[record["file"]], abs=1e-3)
    convex = _per_volume(out / "test-3d-layerwise-convex" / "per_volume.csv", "3d-layerwise-convex")
    assert record["median_psnr"] == pytest.approx(statistics.median(convex.values()))
    with np.load(out / "examples" / "volumes.npz") as volumes:
        assert volumes["target"].shape == (4, 16, 16)
        assert {f"recon_{n.name}" for n in r3d.NETWORKS} <= set(volumes.files)


def test_report_sections_and_numbers(reproduced: dict[str, Any]) -> None:
    out, results = reproduced["out"], reproduced["results"]
    markdown = (out / "report" / "report.md").read_text()
    titles = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert titles == SECTIONS
    assert (out / "report" / "volumes.png").is_file()
    for row in results["rows"]:
        psnr = row["volume"]["psnr"]
        assert f"{psnr['mean']:.2f} ± {psnr['std']:.2f}" in markdown
    answer = results["answers"]["convex_minus_budget_end_to_end"]
    assert f"{answer['mean']:+.2f} dB" in markdown
    assert f"{results['memory']['budget_mib']:.1f} MiB" in markdown


def test_report_command_and_user_errors(
    reproduced: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, config = reproduced["out"], reproduced["config"]
    (out / "report" / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.md").is_file()
    with pytest.raises(CvxmriError, match="started with another configuration"):
        r3d.reproduce3d(replace(config, seed=1), out)
    with pytest.raises(CvxmriError, match="not finished, first: 3D dataset"):
        half = tmp_path / "half"
        half.mkdir()
        (half / "config.yaml").write_text((out / "config.yaml").read_text())
        r3d.collect3d(half)
    a_file = tmp_path / "volume.h5"
    a_file.write_bytes(b"")
    with pytest.raises(CvxmriError, match="one file, not a 3D dataset root"):
        r3d.reproduce3d(replace(config, data=str(a_file)), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(CvxmriError, match="widths must be even"):
        replace(config, widths=[3]).validate()
    capsys.readouterr()
    assert main(["reproduce", "--preset", "quick3d", "--amp", "--out", str(tmp_path / "y")]) == 2
    assert "does not take --amp" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("mean", "se", "verdict"),
    [
        (0.9, 0.1, "missed"),
        (1.8, 1.24, "met by the mean, not resolved by these test volumes"),
        (1.5, 0.2, "met"),
        (1.2, None, "met"),
    ],
)
def test_verdict_says_whether_the_volumes_resolve_the_target(
    mean: float, se: float | None, verdict: str
) -> None:
    from cvxmri.report.build3d import _verdict

    assert _verdict({"mean": mean, "standard_error": se}) == f"target +1 dB: {verdict}"
