"""The stage interface and its factory: what `build_stage` builds from a `StageSpec`, and that
every stage steps, certifies and freezes through the same methods."""

from __future__ import annotations

import ast
import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cvxmri.models.cnn
from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import GatedConv, ReconCNN, ReluConv
from cvxmri.models.convex import ConvexStage, ConvexStageConfig, duality_gap
from cvxmri.models.stages import (
    ConvexTrainingStage,
    NonConvexTrainingStage,
    Stage,
    StageSpec,
    TwoLayerStage,
    build_stage,
    convex_stage_step,
    gated_layers,
)
from cvxmri.training.config import TrainConfig


def batch(channels: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, channels, 10, 10, generator=gen), torch.randn(4, 2, 10, 10, generator=gen)


def test_models_do_not_import_the_training_code() -> None:
    for path in Path(cvxmri.models.cnn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.startswith("cvxmri.training")], path.name


def test_the_spec_of_a_training_config() -> None:
    config = TrainConfig(channels=16, kernel_size=5, carry=True, amp=True, pattern_chunk=3)
    spec = config.stage_spec()
    assert (spec.method, spec.channels, spec.kernel_size, spec.carry) == (
        "layerwise-convex",
        16,
        5,
        True,
    )
    assert spec.amp and spec.pattern_chunk == 3 and spec.ndim == 2
    # Gated features: channels / 2 patterns of 2 outputs; relu: channels / 4 (w and z).
    assert spec.convex_config().patterns == 8 and spec.convex_config().kernel_size == 5
    assert replace(spec, hidden_layer="relu").convex_config().patterns == 4
    assert config.stage_config() == spec.convex_config()
    assert spec.convex_config(gate_seed=11).gate_seed == 11


def test_factory_builds_a_convex_stage() -> None:
    x, r = batch()
    spec = StageSpec(channels=6, kernel_size=3)
    stage = build_stage(spec, 0, 2, x, seed=5)
    assert isinstance(stage, ConvexTrainingStage)
    program = stage.convex_program
    assert isinstance(program, ConvexStage) and program.config.gate_seed == 5
    assert stage.patterns == program.config.patterns == 3
    # Its gates come from the sample (init_gates), the same as building it by hand.
    by_hand = ConvexStage(2, 2, spec.convex_config(gate_seed=5))
    by_hand.init_gates(x)
    assert torch.equal(program.gate_weight, by_hand.gate_weight)
    assert torch.equal(program.gate_bias, by_hand.gate_bias)
    # The step is convex_stage_step, the certificate the duality gap, the frozen layers the
    # gated layers.
    twin = copy.deepcopy(program)
    optimizer = torch.optim.Adam(program.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    loss = stage.step(x, r, optimizer, area_ratio=2.0, gates=stage.sign_patterns(x))
    assert loss == convex_stage_step(twin, x, r, twin_optimizer, area_ratio=2.0)
    assert torch.equal(program.v, twin.v)
    assert stage.certificate([(x, r)]) == duality_gap(twin, [(x, r)])
    first, last = stage.freeze()
    assert isinstance(first, GatedConv)
    torch.testing.assert_close(ReconCNN([first], last)(x), x + program(x), rtol=1e-5, atol=1e-5)


def test_relu_features_freeze_to_relu_layers() -> None:
    x, _ = batch()
    convex = ConvexStageConfig(program="cone")
    stage = build_stage(StageSpec(channels=8, convex=convex, hidden_layer="relu"), 0, 2, x)
    first, last = stage.freeze()
    assert isinstance(first, ReluConv) and last.weight.shape[0] == 2


def test_factory_builds_a_non_convex_stage() -> None:
    x, r = batch()
    spec = StageSpec(method="layerwise-nonconvex", channels=6, kernel_size=3)
    stage = build_stage(spec, 1, 2, x, seed=3)
    assert isinstance(stage, NonConvexTrainingStage) and isinstance(stage.module, TwoLayerStage)
    assert stage.patterns == 0 and stage.convex_program is None
    assert stage.sign_patterns(x) is None and stage.certificate([(x, r)]) is None
    # Seeded: the same seed gives the same initialisation, another seed another.
    again = build_stage(spec, 1, 2, x, seed=3)
    other = build_stage(spec, 1, 2, x, seed=4)
    weight = stage.module.first.conv.weight
    assert torch.equal(weight, again.module.first.conv.weight)
    assert not torch.equal(weight, other.module.first.conv.weight)
    optimizer = torch.optim.Adam(stage.module.parameters(), lr=1e-2)
    losses = [stage.step(x, r, optimizer) for _ in range(5)]
    assert losses[-1] < losses[0]
    first, last = stage.freeze()
    assert first is stage.module.first and last is stage.module.last


def trained_first_stage(x0: torch.Tensor) -> tuple[Stage, ReconCNN]:
    """A carried network's first stage with random weights, and the depth-2 network."""
    first_stage = build_stage(StageSpec(channels=8, carry=True), 0, 2, x0, seed=1)
    with torch.no_grad():
        first_stage.module.v.normal_()
    layer, last = first_stage.freeze()
    return first_stage, ReconCNN([layer], last)


def test_carry_starts_at_the_previous_prediction() -> None:
    x0, _ = batch(seed=1)
    first_stage, prefix = trained_first_stage(x0)
    layer = prefix.hidden[0]
    h = prefix.last_hidden(x0)
    spec = StageSpec(channels=8, carry=True)
    with pytest.raises(CvxmriError, match="previous network's output layer"):
        build_stage(spec, 1, h.shape[1], h)
    second = build_stage(spec, 1, h.shape[1], h, previous_final=prefix.final)
    layer2, last2 = second.freeze()
    deeper = ReconCNN([layer, layer2], last2)
    torch.testing.assert_close(deeper(x0), prefix(x0), rtol=1e-5, atol=1e-5)
    # The first stage has nothing to carry.
    assert not torch.equal(
        first_stage.module.gate_weight[0], torch.zeros_like(layer.gate_weight[0])
    )


def test_carried_stage_selects_its_gates_on_what_it_starts_from() -> None:
    x0, r = batch(seed=2)
    pooled = ConvexStageConfig(gate_pool=3)
    _, prefix = trained_first_stage(x0)
    last = prefix.final
    h = prefix.last_hidden(x0)
    spec = StageSpec(channels=8, carry=True, convex=pooled)
    second = build_stage(spec, 1, h.shape[1], h, residual=r, previous_final=last, seed=3)
    # The same selection by hand: the residual less the carried prediction, pattern 0 kept
    # for the carry.
    by_hand = ConvexStage(h.shape[1], 2, spec.convex_config(gate_seed=3))
    with torch.no_grad():
        by_hand.init_gates(h, r - last(h), reserved=1)
    module = second.module
    assert isinstance(module, ConvexStage)
    torch.testing.assert_close(module.gate_weight[1:], by_hand.gate_weight[1:], rtol=0, atol=0)
    torch.testing.assert_close(module.gate_bias[1:], by_hand.gate_bias[1:], rtol=0, atol=0)
    assert not module.gate_weight[0].any() and float(module.gate_bias[0]) == 1.0
    # Selecting on the bare residual picks other gates: the carry is taken off.
    on_residual = ConvexStage(h.shape[1], 2, spec.convex_config(gate_seed=3))
    on_residual.init_gates(h, r, reserved=1)
    assert not torch.equal(on_residual.gate_weight, by_hand.gate_weight)
    # Without a residual the pool is not used: the stage draws as with gate_pool 1.
    drawn = build_stage(spec, 1, h.shape[1], h, previous_final=last, seed=3)
    plain = build_stage(
        replace(spec, convex=ConvexStageConfig()), 1, h.shape[1], h, previous_final=last, seed=3
    )
    assert torch.equal(drawn.module.gate_weight, plain.module.gate_weight)


@pytest.mark.parametrize(
    "spec",
    [
        StageSpec(method="end-to-end"),
        StageSpec(hidden_layer="linear"),
        StageSpec(channels=5),
        StageSpec(ndim=4),
    ],
)
def test_invalid_specs_raise(spec: StageSpec) -> None:
    with pytest.raises(CvxmriError):
        build_stage(spec, 0, 2, torch.randn(1, 2, 8, 8))


def test_gated_layers_sum_the_patterns() -> None:
    stage = ConvexStage(2, 2, ConvexStageConfig(patterns=3, kernel_size=3))
    _, last = gated_layers(stage)
    # Output c sums hidden channels c, c + 2, c + 4 (pattern-major layout p * out + c).
    expected = torch.zeros(2, 6)
    expected[0, 0::2] = 1
    expected[1, 1::2] = 1
    assert torch.equal(last.weight[:, :, 0, 0], expected)
