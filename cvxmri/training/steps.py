"""One optimiser step of each training method, shared by the trainer and the benchmarks.

Each function takes a batch already on the module's device, zeroes the gradients, computes
the loss and its gradient, steps the optimiser and returns the loss as a float. The memory
benchmark measures exactly these calls, so its numbers are those of real training.

- `convex_stage_step`: a gated convex stage is linear in its weight, so its data-term
  gradient ``A^T (A v - r)`` is computed directly, a chunk of patterns at a time, without an
  autograd graph (`ConvexStage.data_term_and_gradient`); only the group-lasso penalty goes
  through autograd. The cone program (whose violation penalty is not linear) uses autograd.
- `two_layer_stage_step`: the non-convex stage by backpropagation.
- `end_to_end_step`: the whole network by backpropagation, optionally with gradient
  checkpointing (each hidden layer's activations recomputed in the backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cvxmri.models.cnn import ReconCNN
from cvxmri.models.convex import ConvexStage


def _autocast(x: Tensor, amp: bool) -> torch.autocast:
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)


def convex_stage_step(
    module: ConvexStage,
    x: Tensor,
    r: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    area: float = 1.0,
    amp: bool = False,
    pattern_chunk: int = 0,
    gates: Tensor | None = None,
) -> float:
    """One step on the convex objective of a batch of (cropped) stage inputs.

    The pixel sums (data term, cone violation) are scaled by ``area`` (whole image over crop
    area), so that the crop objective estimates the whole-image objective that the
    certificate measures, with the same group-lasso weight. The gates are always computed
    in full precision (bf16 could flip sign patterns); ``amp`` runs the other convolutions
    in bf16. ``pattern_chunk`` bounds the patterns processed at once (0: all). ``gates``:
    the batch's sign patterns (bool ``(B, P, H, W)``) when precomputed, which saves the gate
    convolution of every step.
    """
    optimizer.zero_grad(set_to_none=True)
    if module.config.program == "gated":
        dtype = torch.bfloat16 if amp else None
        value, grad = module.data_term_and_gradient(x, r, pattern_chunk, dtype, gates)
        penalty = module.penalty()
        penalty.backward()
        assert module.v.grad is not None
        module.v.grad.add_(grad, alpha=area)
        optimizer.step()
        return float(area * value + penalty.detach())
    gates = module.gates(x.float()) if gates is None else gates.float()
    with _autocast(x, amp):
        pixels = module.data_term(x, r, gates=gates).float()
        violation = module.cone_violation(x, gates=gates).float()
        pixels = pixels + module.config.cone_penalty * violation
    loss = area * pixels + module.penalty()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def two_layer_stage_step(
    module: nn.Module,
    x: Tensor,
    r: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool = False,
) -> float:
    """One backpropagation step of a non-convex stage on ``0.5 ||stage(x) - r||^2 / B``."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x, amp):
        pred = module(x)
    loss = 0.5 * (pred.float() - r).pow(2).sum() / x.shape[0]
    loss.backward()
    optimizer.step()
    return float(loss.detach())


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
    with _autocast(x0, amp):
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
