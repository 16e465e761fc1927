"""The end-to-end training step, shared by the trainer, `fit_end_to_end` and the benchmarks.

`end_to_end_step` takes a batch already on the model's device, zeroes the gradients,
computes the loss and its gradient, steps the optimiser and returns the loss as a float; the
memory benchmark measures exactly this call, so its numbers are those of real training. The
steps of layer-wise stages (`convex_stage_step`, `two_layer_stage_step`) live with the
stages in `cvxmri.models.stages`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cvxmri import distributed
from cvxmri.models.cnn import ReconCNN


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
    Under torchrun the gradients are averaged across processes before the step
    (`cvxmri.distributed.average_gradients`; an empty part of the batch takes an idle step).
    """
    if x0.shape[0] == 0:
        return distributed.idle_step(model.parameters(), optimizer)
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
    result = distributed.average_gradients(model.parameters(), x0.shape[0], loss)
    optimizer.step()
    return result
