"""`cvxmri reproduce` on the tiny preset: every part, an interruption and its resumption,
the report's sections, and every number of the report traced to ``results.json``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import phantom_nifti

from cvxmri.benchmark import memory
from cvxmri.benchmark.measure import measure_here
from cvxmri.benchmark.workload import Workload
from cvxmri.cli import main
from cvxmri.config import from_dict, to_dict
from cvxmri.data.simulate import SimulationConfig
from cvxmri.errors import CvxmriError
from cvxmri.evaluate import EvaluateConfig, evaluate
from cvxmri.models.cnn import GatedConv, ReconCNN
from cvxmri.models.dc import DCConfig
from cvxmri.models.unrolled import load_network
from cvxmri.report import interpret
from cvxmri.reproduce import (
    UNROLLED_DC_BY_MASK,
    ReproduceConfig,
    collect,
    format_results,
    plan,
    reproduce,
    reproduce_preset,
    unrolled_run_name,
    unrolled_train_config,
)
from cvxmri.runs import certificate_traces
from cvxmri.training.trainer import Trainer, TrainingStopped

SECTIONS = [
    "Overview",
    "At a glance",
    "Metrics against the number of layers",
    "Results",
    "Representative test slices",
    "Unrolled networks with data consistency",
    "Wall time",
    "Optimality certificates of the convex stages",
    "Memory and speed",
    "What each layer learned",
    "Configuration, data and machine",
]
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def tiny_config(root: Path) -> ReproduceConfig:
    """The tiny preset on a dataset that does not exist yet (built from a phantom)."""
    return replace(
        reproduce_preset("tiny"),
        data=str(root / "data"),
        sources=[str(phantom_nifti(root / "head.nii.gz", depth=72))],
        simulation=SimulationConfig(matrix=24, coils=3, slab_slices=2),
    )


def _run(config: ReproduceConfig, out: Path, printed: list[str]) -> Path:
    """`reproduce`, with what it prints appended to ``printed`` (even when it fails)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            return reproduce(config, out)
    finally:
        printed.append(buffer.getvalue())


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A reproduction stopped in its first layer-wise convex training, then finished, then
    run once more (nothing left to do), with what each run printed."""
    root = tmp_path_factory.mktemp("reproduce")
    config = tiny_config(root)
    out = root / "out"
    fit = Trainer.fit

    def stop_in_first_stage(self: Trainer, stop_after: int | None = None) -> ReconCNN:
        return fit(self, stop_after=1 if self.config.method == "layerwise-convex" else None)

    def measure_in_process(
        w: Workload, steps: int, budget: int, timeout: float | None = None
    ) -> dict[str, Any]:
        return measure_here(w, steps, budget)

    printed: list[str] = []
    # The memory parts measure in this process: the orchestration is what is tested here
    # (tests/test_benchmark.py runs the fresh-process measurement), and a fresh process
    # per point would double this module's time.
    with pytest.MonkeyPatch.context() as measuring:
        measuring.setattr(memory, "run_trial", measure_in_process)
        with pytest.MonkeyPatch.context() as patch, pytest.raises(TrainingStopped):
            patch.setattr(Trainer, "fit", stop_in_first_stage)
            _run(config, out, printed)
        interrupted = out / "poisson-4x" / "layerwise-convex"
        state = {
            "checkpoint": (interrupted / "checkpoints" / "last.pt").is_file(),
            "depth2": (interrupted / "model_depth2.pt").is_file(),
            "finished": (interrupted / "metrics_val.json").is_file(),
        }
        reports = [_run(config, out, printed), _run(config, out, printed)]
    return {
        "config": config,
        "out": out,
        "reports": reports,
        "interrupted": state,
        "printed": printed,
    }


def _formats(value: float) -> set[str]:
    value = abs(value)
    texts = {f"{value:g}", str(value)}
    texts |= {f"{value:.{d}f}" for d in range(7)}
    texts |= {f"{value:.{d}e}" for d in range(5)}
    texts |= {f"{value:.{d}g}" for d in range(1, 7)}
    return texts


def json_numbers(data: object) -> set[str]:
    """Every number of a JSON document, in the ways the report may format it, and every
    number written inside its strings."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                found.update(NUMBER.findall(str(key)))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, bool) or node is None:
            return
        elif isinstance(node, int | float):
            found.update(_formats(float(node)))
        elif isinstance(node, str):
            found.update(NUMBER.findall(node))

    walk(data)
    return found


def test_interrupted_run_resumes_and_skips_finished_parts(reproduced: dict[str, Any]) -> None:
    out = reproduced["out"]
    assert reproduced["interrupted"] == {"checkpoint": True, "depth2": True, "finished": False}
    timings = json.loads((out / "parts.json").read_text())
    assert timings["poisson-4x/layerwise-convex"]["resumed"] is True
    assert timings["poisson-4x/baselines"]["resumed"] is False
    assert all(p.done(out) for p in plan(reproduced["config"]))
    first, second, third = reproduced["printed"]
    parts = plan(reproduced["config"])
    total = len(parts) + 1
    assert f"[1/{total}] dataset and coil maps (elapsed 0s, about " in first
    assert "skipped" not in first and "results and report" not in first
    # Second run: the parts finished before the interruption are skipped, the interrupted
    # training resumes, the rest runs.
    assert f"[1/{total}] dataset and coil maps: finished before, skipped" in second
    assert (
        f"[2/{total}] zero-filled, CS and CG-SENSE, poisson 4x (calib 6x6): finished before"
        in second
    )
    assert re.search(rf"\[3/{total}\] train layerwise-convex, 3 layers, .* left\)", second)
    assert f"[{total}/{total}] results and report" in second
    # Third run: every part skipped, only the report rebuilt.
    assert third.count("finished before, skipped") == len(parts)
    assert third.count("done in") == 1
    assert reproduced["reports"][0] == reproduced["reports"][1] == out / "report" / "report.html"


def test_results_come_from_the_runs_own_files(reproduced: dict[str, Any]) -> None:
    out, config = reproduced["out"], reproduced["config"]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["built_by_this_run"] is True
    assert (Path(config.data) / "manifest.json").is_file()
    summary = json.loads(
        (out / "poisson-4x" / "test-layerwise-convex" / "summary.json").read_text()
    )
    by_depth = {
        m["layers"]: m
        for m in results["metrics"]
        if m["mask"] == "poisson-4x" and m["method"] == "layerwise-convex"
    }
    assert sorted(by_depth) == list(range(2, config.layers + 1))
    for entry in summary["results"]:
        depth = int(entry["method"].rsplit("model_depth", 1)[1])
        assert by_depth[depth]["volume"] == entry["volume"]
    methods = {(m["mask"], m["method"]) for m in results["metrics"] if m["layers"] in (None, 3)}
    assert methods == {
        (mask, method)
        for mask in ("poisson-4x", "cartesian-4x")
        for method in (
            "zero-filled",
            "cs",
            "cg-sense",
            "layerwise-convex",
            "layerwise-nonconvex",
            "end-to-end",
        )
    }
    # The representative slice was reconstructed exactly as the evaluation did.
    example = results["examples"][0]
    with (out / "poisson-4x" / "test-layerwise-convex" / "per_slice.csv").open() as handle:
        row = next(
            r
            for r in csv.DictReader(handle)
            if r["method"].endswith(f"model_depth{config.layers}")
            and r["file"] == example["file"]
            and int(r["slice"]) == example["slice"]
        )
    convex = next(m for m in example["methods"] if m["method"] == "layerwise-convex")
    assert convex["psnr"] == pytest.approx(float(row["psnr"]), rel=1e-5)
    # One certificate per convex stage and mask, from certificates.json.
    assert [(c["mask"], c["stage"]) for c in results["certificates"]] == [
        (m, s) for m in ("poisson-4x", "cartesian-4x") for s in range(1, config.layers)
    ]
    assert all(0 <= c["relative_gap"] <= 1 + 1e-9 for c in results["certificates"])
    # The gap against time of every stage ends at the stage's final certificate.
    traces = {(t["mask"], t["stage"]): t for t in results["gap_traces"]}
    for c in results["certificates"]:
        trace = traces[(c["mask"], c["stage"])]
        assert trace["relative_gap"][-1] == pytest.approx(c["relative_gap"], rel=1e-9)
        assert trace["seconds"] == sorted(trace["seconds"]) and trace["seconds"][0] > 0
    inspected = results["inspect"][0]
    assert inspected["units"] == [len(n) for n in inspected["group_norms"]]
    assert len(inspected["pixels"]) == 3


def test_unrolled_comparison_results(reproduced: dict[str, Any]) -> None:
    """The unrolled networks: the greedy curves from the run's own per-iteration models,
    every convex iteration certified, end-to-end at T_max, memory against T."""
    out, config = reproduced["out"], reproduced["config"]
    unrolled = json.loads((out / "results.json").read_text())["unrolled"]
    t_max = config.unrolled.network.iterations
    curve = {
        m["iterations"]: m
        for m in unrolled["metrics"]
        if m["mask"] == "cartesian-4x" and m["method"] == "layerwise-convex"
    }
    assert sorted(curve) == list(range(1, t_max + 1))
    summary = json.loads(
        (out / "cartesian-4x" / "test-unrolled-layerwise-convex" / "summary.json").read_text()
    )
    for entry in summary["results"]:
        t = int(entry["method"].rsplit("model_iter", 1)[1])
        assert curve[t]["volume"] == entry["volume"]
    # model_iter{T_max}.pt is the whole network: the same reconstruction as model.pt.
    run = out / "cartesian-4x" / "unrolled-layerwise-convex"
    whole, last = load_network(run / "model.pt"), load_network(run / f"model_iter{t_max}.pt")
    for a, b in zip(whole.state_dict().values(), last.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [(c["mask"], c["iteration"]) for c in unrolled["certificates"]] == [
        (m, t) for m in ("poisson-4x", "cartesian-4x") for t in range(1, t_max + 1)
    ]
    assert all(c["certified"] and c["relative_gap"] <= 1e-3 for c in unrolled["certificates"])
    # Every iteration's gap against time, its whole beta path: one point per exact
    # certificate, each beta's solve after the previous ones.
    run_certificates = json.loads((run / "certificates.json").read_text())
    for trace in (t for t in unrolled["gap_traces"] if t["mask"] == "cartesian-4x"):
        path = [c for c in run_certificates if c["stage"] == trace["stage"]]
        assert len(trace["seconds"]) == sum(len(c["trace"]) for c in path)
        assert trace["relative_gap"][-1] == path[-1]["relative_gap"]
        assert trace["seconds"][-1] <= sum(c["seconds"] for c in path) + 1e-9
        assert trace["seconds"] == sorted(trace["seconds"])
    assert sorted({t["stage"] for t in unrolled["gap_traces"]}) == list(range(1, t_max + 1))
    # The results table says so: certified to the runs' tol, or the largest gap reached.
    results = json.loads((out / "results.json").read_text())
    table, convex = format_results(results).splitlines(), "layerwise-convex"
    for answer in unrolled["answers"]:
        assert answer["tol"] == 1e-3
        (line,) = [t for t in table if t.split()[:3] == [answer["mask"], "unrolled", convex]]
        assert line.endswith("  certified to 0.001")
    for answer in results["answers"]:
        (line,) = [t for t in table if t.split()[:2] == [answer["mask"], convex]]
        expected = (
            "certified to 0.001"
            if answer["largest_gap"] <= 1e-3
            else f"largest gap {answer['largest_gap']:.2e}"
        )
        assert answer["certified"] == (answer["largest_gap"] <= 1e-3)
        assert line.endswith(f"  {expected}")
    # ... and so does each mask's item of "At a glance" (in the answers' order).
    glance = (out / "report" / "report.md").read_text().split("## At a glance")[1]
    items = glance.split("\n- ")[1:]
    for answer, item in zip(results["answers"], items, strict=False):
        verdict = "every" if answer["certified"] else "not every"
        assert item.startswith(f"**{answer['label']}**")
        assert f"{verdict} convex stage certified to 0.001." in item
    end_to_end = [m for m in unrolled["metrics"] if m["method"] == "end-to-end"]
    assert {(m["mask"], m["iterations"]) for m in end_to_end} == {
        ("poisson-4x", t_max),
        ("cartesian-4x", t_max),
    }
    for answer in unrolled["answers"]:
        psnr = answer["psnr"]
        assert answer["convex_minus_cs"]["psnr"] == pytest.approx(
            psnr["layerwise-convex"] - psnr["cs"]
        )
        # Paired over the same volumes: the mean difference is the difference of means.
        paired = answer["convex_minus_end_to_end"]["paired"]
        assert paired["n"] >= 1
        assert paired["mean"] == pytest.approx(answer["convex_minus_end_to_end"]["psnr"])
    methods = {r["method"] for r in unrolled["memory"]["rows"]}
    assert methods == {*config.unrolled.methods, "end-to-end-checkpointing"}
    # Each mask's networks on its own data consistency, and the report says which.
    for key, kind in (("poisson-4x", "gradient"), ("cartesian-4x", "direct")):
        assert unrolled["dc_by_mask"][key]["kind"] == kind
        for method, t in (("layerwise-convex", t_max), ("end-to-end", t_max)):
            trained = load_network(out / key / unrolled_run_name(method, t) / "model.pt")
            assert trained.dc.config().kind == kind
    section = (out / "report" / "report.md").read_text().split("## Unrolled networks")[1]
    section = section.split("\n## ")[0]
    labels = {m["key"]: m["label"] for m in json.loads((out / "results.json").read_text())["masks"]}
    assert f"{labels['poisson-4x']}: a gradient step (eta 1.5)" in section
    assert (
        f"{labels['cartesian-4x']}: the CG-SENSE proximal step (solved exactly per readout "
        f"line, lambda {UNROLLED_DC_BY_MASK['cartesian-4x'].lamda:g})"
    ) in section
    example = json.loads((out / "poisson-4x" / "examples" / "examples.json").read_text())
    assert {"unrolled-layerwise-convex", "unrolled-end-to-end"} <= {
        m["method"] for m in example["methods"]
    }


def test_report_sections_and_numbers(reproduced: dict[str, Any]) -> None:
    out = reproduced["out"]
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "report" / "report.md").read_text()
    page = (out / "report" / "report.html").read_text()
    titles = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert [t for t in SECTIONS if not any(title.startswith(t) for title in titles)] == []
    for title in SECTIONS:
        assert f"<h2>{title}" in page
    # Self-contained HTML: every image inline; every PNG of the Markdown beside it.
    sources = re.findall(r'src="([^"]*)"', page)
    pngs = re.findall(r"\]\(([^)]+\.png)\)", markdown)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == len(pngs) >= 8
    assert all((out / "report" / name).is_file() for name in pngs)
    assert {"gaps.png", "gaps-unrolled.png"} <= set(pngs)
    # Every number of the report is a number of results.json (or written in its strings).
    known = json_numbers(results)
    unexplained = sorted({n for n in NUMBER.findall(markdown) if n not in known})
    assert unexplained == []
    # The results table shows each method's mean ± std as results.json holds them.
    for entry in results["metrics"]:
        if entry["layers"] in (None, results["config"]["layers"]):
            psnr = entry["volume"]["psnr"]
            assert f"{psnr['mean']:.2f} ± {psnr['std']:.2f}" in markdown
    assert "No memory benchmark in this folder" in markdown
    # The run's own memory measurement: every method, with a measured peak.
    rows = results["memory_run"]["rows"]
    assert {r["method"] for r in rows} == {"end-to-end", "layerwise-convex", "layerwise-nonconvex"}
    assert all(r["peak_mib"] > 0 for r in rows)
    for r in rows:
        assert f"| {r['method']} | {r['stage_inputs']} | fp32 | {r['peak_mib']:g} |" in markdown


def test_report_command_adds_the_memory_benchmark(
    reproduced: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = reproduced["out"]
    memory = {
        "device": "cpu",
        "results": [
            {"method": "end-to-end", "layers": 5, "peak_mib": 812.5, "max_batch_size": 6},
            {"method": "layerwise-convex", "layers": 5, "peak_mib": 97.25, "max_batch_size": 41},
        ],
        "depth": {"batch": 4, "rows": [{"method": "end-to-end", "layers": 3, "peak_bytes": 1234}]},
    }
    path = tmp_path / "memory.json"
    path.write_text(json.dumps(memory))
    speed = {"results": [{"method": "layerwise-convex", "hours": 2.5, "vs_end_to_end": 0.75}]}
    speed_path = tmp_path / "speed.json"
    speed_path.write_text(json.dumps(speed))
    args = ["report", str(out), "--memory-json", str(path), "--speed-json", str(speed_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report' / 'report.html'}" in printed
    markdown = (out / "report" / "report.md").read_text()
    assert "| end-to-end | 5 | 812.5 | 6 |" in markdown
    assert "| layerwise-convex | 5 | 97.25 | 41 |" in markdown
    assert "| end-to-end | 3 | 1234 |" in markdown
    assert "| layerwise-convex | 2.5 | 0.75 |" in markdown
    results = json.loads((out / "results.json").read_text())
    assert results["memory"] == memory and results["speed"] == speed
    (out / "benchmark_memory.json").unlink()
    (out / "benchmark_speed.json").unlink()


def test_user_errors(
    reproduced: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, config = reproduced["out"], reproduced["config"]
    with pytest.raises(CvxmriError, match="started with another configuration"):
        reproduce(replace(config, seed=1), out)
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [{"peak_mib": 3}]}')
    with pytest.raises(CvxmriError, match="needs a 'method'"):
        reproduce(config, out, benchmarks={"memory": bad})
    with pytest.raises(CvxmriError, match="not a reproduce folder"):
        collect(tmp_path)
    half = tmp_path / "half"
    (half / "data").mkdir(parents=True)
    (half / "config.yaml").write_text((out / "config.yaml").read_text())
    with pytest.raises(CvxmriError, match="not finished, first: dataset and coil maps"):
        collect(half)
    # The command line's defaults differ from the test's settings (no phantom source).
    arguments = ["reproduce", "--preset", "tiny", "--data", config.data, "--out", str(out)]
    assert main(arguments) == 2
    assert "started with another configuration" in capsys.readouterr().err


def test_unrolled_data_consistency_per_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unrolled.dc_by_mask`` gives each mask its data consistency, survives a YAML round
    trip and rejects a key that is not a mask's or a non-linear DC for greedy convex
    training; ``--dc`` on the command line applies to every mask."""
    config = replace(reproduce_preset("quick"), data=str(tmp_path / "data"))
    poisson, cartesian = config.masks
    tuned = UNROLLED_DC_BY_MASK["cartesian-4x"]
    assert tuned.kind == "direct"
    for method in ("layerwise-convex", "layerwise-nonconvex", "end-to-end"):
        assert unrolled_train_config(config, method, cartesian, 8).unrolled.dc == tuned
        assert unrolled_train_config(config, method, poisson, 8).unrolled.dc == DCConfig()
    # End-to-end trains its own (longer) schedule; each halves its rate every third.
    greedy = unrolled_train_config(config, "layerwise-nonconvex", poisson, 8).optim
    joint = unrolled_train_config(config, "end-to-end", poisson, 8).optim
    assert (greedy.epochs, greedy.step) == (config.unrolled.epochs, config.unrolled.epochs // 3)
    epochs = config.unrolled.end_to_end_epochs
    assert epochs > config.unrolled.epochs and (joint.epochs, joint.step) == (epochs, epochs // 3)
    same = replace(config, unrolled=replace(config.unrolled, end_to_end_epochs=0))
    assert unrolled_train_config(same, "end-to-end", poisson, 8).optim == greedy
    loaded = from_dict(ReproduceConfig, to_dict(config))
    assert loaded.unrolled.dc_by_mask == {"cartesian-4x": tuned}
    assert isinstance(loaded.unrolled.dc_by_mask["cartesian-4x"], DCConfig)
    for dc_by_mask, message in (
        ({"cartesain-4x": tuned}, "unrolled.dc_by_mask: 'cartesain-4x' is not a mask key"),
        ({"cartesian-4x": DCConfig(kind="cg")}, "needs a linear data consistency"),
        ({"cartesian-4x": DCConfig(kind="gradient", eta=3.0)}, "dc.eta=3.0"),
        ({"poisson-4x": DCConfig(kind="direct")}, "direct needs 2D images and a mask constant"),
    ):
        bad = replace(config, unrolled=replace(config.unrolled, dc_by_mask=dc_by_mask))
        with pytest.raises(CvxmriError, match=re.escape(message)):
            bad.validate()
    ran: list[ReproduceConfig] = []

    def record(run: ReproduceConfig, *args: Any, **kwargs: Any) -> Path:
        ran.append(run)
        raise CvxmriError("recorded")

    monkeypatch.setattr("cvxmri.reproduce.reproduce", record)
    arguments = ["reproduce", "--data", config.data, "--out", str(tmp_path / "out")]
    assert main([*arguments, "--dc", "gradient"]) == 2
    assert main(arguments) == 2
    given, default = ran
    assert given.unrolled.dc_by_mask == {} and given.unrolled.network.dc.kind == "gradient"
    assert default.unrolled.dc_by_mask == UNROLLED_DC_BY_MASK


def test_evaluate_accepts_a_run_folder(reproduced: dict[str, Any], tmp_path: Path) -> None:
    out, config = reproduced["out"], reproduced["config"]
    run = out / "poisson-4x" / "end-to-end-depth3"
    summaries = []
    for index, model in enumerate((run, run / "model.pt")):
        eval_config = EvaluateConfig(
            data=config.data, methods=[], models=[str(model)], masks=[config.masks[0]]
        )
        (tmp_path / str(index)).mkdir()
        summaries.append(evaluate(eval_config, tmp_path / str(index)))
    assert summaries[0]["results"][0]["method"] == "end-to-end-depth3"
    assert summaries[0]["results"][0]["volume"] == summaries[1]["results"][0]["volume"]


def test_effective_filter_is_the_local_linear_map() -> None:
    """With the patterns fixed the network is linear: a small change of the input inside
    the window changes the output pixel by the filter's response."""
    torch.manual_seed(0)
    relu = ReconCNN.relu(3, 6, 3)
    for layer in [*relu.hidden, relu.final]:
        for parameter in layer.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
    gated = GatedConv(2, 3, 2, 3)
    torch.nn.init.normal_(gated.value.weight, std=0.3)
    torch.nn.init.normal_(gated.gate_weight)
    networks = [relu, ReconCNN([gated, relu.hidden[1]], relu.final)]
    x0 = torch.randn(1, 2, 16, 16, dtype=torch.float32)
    for network in networks:
        network.double()
        radius = interpret.receptive_radius(network)
        assert radius == 2
        pixel = (7, 9)
        kernel = interpret.effective_filters(network, x0.double(), [pixel], radius)[0]
        delta = torch.zeros_like(x0, dtype=torch.float64)
        window = (slice(None), slice(None), slice(5, 10), slice(7, 12))
        delta[window] = 1e-7 * torch.randn(1, 2, 5, 5, dtype=torch.float64)
        with torch.no_grad():
            change = (network(x0.double() + delta) - (x0.double() + delta)) - (
                network(x0.double()) - x0.double()
            )
        predicted = np.einsum("oihw,ihw->o", kernel, delta[0, :, 5:10, 7:12].numpy())
        np.testing.assert_allclose(change[0, :, 7, 9].numpy(), predicted, rtol=1e-5, atol=1e-12)


def test_pattern_clusters_find_the_regions() -> None:
    pattern = torch.zeros(4, 8, 8)
    pattern[:2, :, :3] = 1  # left region: units 0, 1 on
    pattern[2:, :, 3:] = 1  # right region: units 2, 3 on
    labels = interpret.cluster_patterns(pattern, clusters=2, seed=0)
    assert (labels[:, 3:] == 0).all() and (labels[:, :3] == 1).all()  # larger region first
    assert interpret.distinct_patterns(pattern) == 2
    norms = np.array([2.0, 1.0, 0.01])
    assert interpret.surviving_units(norms) == 2


def test_certificate_traces_lay_a_beta_path_end_to_end(tmp_path: Path) -> None:
    """A certified stage's betas follow one another in time; an Adam stage's points are
    its certificate epochs at the summed epoch times; a run without either has none."""
    certified = tmp_path / "certified"
    certified.mkdir()
    path = [
        {"stage": 1, "seconds": 3.0, "relative_gap": 1e-4, "trace": [[1.0, 0.5], [2.5, 1e-4]]},
        {"stage": 1, "seconds": 2.0, "relative_gap": 2e-4, "trace": [[0.5, 0.3], [1.5, 2e-4]]},
        {"stage": 2, "seconds": 4.0, "relative_gap": 5e-4, "trace": [[4.0, 5e-4]]},
    ]
    (certified / "certificates.json").write_text(json.dumps(path))
    assert certificate_traces(certified) == [
        {"stage": 1, "seconds": [1.0, 2.5, 3.5, 4.5], "relative_gap": [0.5, 1e-4, 0.3, 2e-4]},
        {"stage": 2, "seconds": [4.0], "relative_gap": [5e-4]},
    ]
    adam = tmp_path / "adam"
    adam.mkdir()
    rows = [("1", "1", "2.0", ""), ("1", "2", "3.0", "0.9"), ("2", "1", "1.5", "0.99")]
    (adam / "history.csv").write_text(
        "stage,epoch,seconds,cert_relative_gap\n" + "".join(",".join(r) + "\n" for r in rows)
    )
    assert certificate_traces(adam) == [
        {"stage": 1, "seconds": [5.0], "relative_gap": [0.9]},
        {"stage": 2, "seconds": [1.5], "relative_gap": [0.99]},
    ]
    assert certificate_traces(tmp_path) == []
