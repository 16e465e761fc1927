"""The optimiser steps shared by training and benchmarks equal plain autograd steps."""

from __future__ import annotations

import copy

import pytest
import torch

from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStage, ConvexStageConfig
from cvxmri.models.stages import convex_stage_step
from cvxmri.training.steps import end_to_end_step


def _batch(channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, 12, 10, generator=gen)
    r = torch.randn(3, 2, 12, 10, generator=gen)
    return x, r


@pytest.mark.parametrize("chunk", [0, 2])
def test_convex_step_equals_autograd_step(chunk: int) -> None:
    x, r = _batch(4, 0)
    stage = ConvexStage(4, 2, ConvexStageConfig(patterns=5, kernel_size=3, beta=0.3))
    stage.init_gates(x)
    with torch.no_grad():
        stage.v.normal_(generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(stage)
    area_ratio = 2.5
    optimizer = torch.optim.SGD(stage.parameters(), lr=1e-3)
    loss = convex_stage_step(stage, x, r, optimizer, area_ratio=area_ratio, pattern_chunk=chunk)

    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=1e-3)
    ref_loss = area_ratio * reference.data_term(x, r) + reference.penalty()
    ref_loss.backward()
    ref_optimizer.step()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    torch.testing.assert_close(stage.v, reference.v, rtol=1e-5, atol=1e-6)


def test_convex_step_in_bf16_is_close() -> None:
    x, r = _batch(4, 2)
    stage = ConvexStage(4, 2, ConvexStageConfig(patterns=4, kernel_size=3))
    stage.init_gates(x)
    reference = copy.deepcopy(stage)
    for module, amp in ((stage, True), (reference, False)):
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        for _ in range(3):
            convex_stage_step(module, x, r, optimizer, amp=amp)
    # Adam's first steps are sign-like; bf16 gradients change the update by a few percent.
    assert not torch.equal(stage.v, reference.v)
    torch.testing.assert_close(stage.v, reference.v, rtol=0.1, atol=2e-3)


def test_checkpointing_gives_the_same_step() -> None:
    torch.manual_seed(0)
    model = ReconCNN.relu(4, 6, 3)
    with torch.no_grad():
        model.final.weight.normal_()
    other = copy.deepcopy(model)
    x0, target = _batch(2, 3)
    losses = []
    for module, checkpointing in ((model, False), (other, True)):
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
        losses.append(end_to_end_step(module, x0, target, optimizer, checkpointing=checkpointing))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
