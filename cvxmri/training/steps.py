"""One optimiser step of each training method, shared by the trainer and the benchmarks.

Each function takes a batch already on the module's device, zeroes the gradients, computes
the loss and its gradient, steps the optimiser and returns the loss as a float. The memory
benchmark measures exactly these calls, so its numbers are those of real training.

- `convex_stage_step` and `two_layer_stage_step`: the steps of a layer-wise stage, defined
  with the stages in `cvxmri.models.stages` (each `Stage.step` calls one of them).
- `end_to_end_step`: the whole network by backpropagation, optionally with gradient
  checkpointing (each hidden layer's activations recomputed in the backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cvxmri.models.cnn import ReconCNN
from cvxmri.models.stages import convex_stage_step, two_layer_stage_step

__all__ = ["convex_stage_step", "end_to_end_step", "two_layer_stage_step"]


def end_to_end_step(
    model: ReconCNN,
    x0: Tensor,
    target: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool = False,
    checkpointing: bool = False,
) -> float:
    """One backpropagation step of the whole network on ``0.5 ||model(x0) - x*||^2 / B``.

    ``checkpointing`` keeps only each hidden layer's input and recomputes the layer in the
    backward pass (`torch.utils.checkpoint`): less memory for one more forward pass.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        if checkpointing:
            h = x0
            for layer in model.hidden:
                h = checkpoint(layer, h, use_reentrant=False)
            pred = x0 + model.final(h)
        else:
            pred = model(x0)
    loss = 0.5 * (pred.float() - target).pow(2).sum() / x0.shape[0]
    loss.backward()
    optimizer.step()
    return float(loss.detach())
