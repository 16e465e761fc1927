"""The library training functions on a user's own tensors through a DataLoader: they return
an ordinary ReconCNN that reconstructs better than the zero-filled input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import GatedConv, ReconCNN, ReluConv
from cvxmri.training.config import OptimConfig
from cvxmri.training.fit import fit_end_to_end, fit_layerwise

OPTIM = OptimConfig(lr=1e-2, step=10, gamma=0.5, epochs=10, batch_size=4)


def pairs(n: int = 16, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth 2-channel targets and degraded inputs: shrunk, blurred, with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    target = F.avg_pool2d(torch.randn(n, 2, size, size, generator=gen), 5, 1, 2) * 3
    x0 = 0.6 * F.avg_pool2d(target, 3, 1, 1) + 0.02 * torch.randn(target.shape, generator=gen)
    return x0, target


def loader(seed: int = 0) -> DataLoader:
    x0, target = pairs(seed=seed)
    return DataLoader(TensorDataset(x0, target), batch_size=4, shuffle=False)


def error(model: ReconCNN, x0: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x0) - target).square().mean())


@pytest.mark.parametrize(
    ("method", "layer"), [("layerwise-convex", GatedConv), ("layerwise-nonconvex", ReluConv)]
)
def test_fit_layerwise_improves_on_the_input(method: str, layer: type, tmp_path: Path) -> None:
    x0, target = pairs(seed=1)
    identity = float((x0 - target).square().mean())
    model = fit_layerwise(
        loader(), layers=3, channels=8, kernel_size=3, method=method, optim=OPTIM, seed=0
    )
    assert isinstance(model, ReconCNN) and model.depth == 3
    assert all(isinstance(h, layer) for h in model.hidden)
    assert all(not p.requires_grad for p in model.parameters())
    # Held-out images (another seed): the network beats the zero-filled input clearly.
    assert error(model, x0, target) < 0.75 * identity
    # An ordinary network: it saves and loads without the training code.
    model.save(tmp_path / "model.pt")
    torch.testing.assert_close(ReconCNN.load(tmp_path / "model.pt")(x0), model(x0))
    # The same seed and batches give the same network.
    again = fit_layerwise(
        loader(), layers=3, channels=8, kernel_size=3, method=method, optim=OPTIM, seed=0
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_deeper_layerwise_network_keeps_improving() -> None:
    x0, target = pairs(seed=1)
    errors = []
    for layers in (2, 3):
        model = fit_layerwise(loader(), layers=layers, channels=8, optim=OPTIM, carry=True)
        errors.append(error(model, x0, target))
    assert errors[1] < errors[0]


def test_fit_end_to_end_improves_on_the_input() -> None:
    x0, target = pairs(seed=1)
    identity = float((x0 - target).square().mean())
    model = fit_end_to_end(loader(), layers=3, channels=8, kernel_size=3, optim=OPTIM)
    assert isinstance(model, ReconCNN) and model.depth == 3
    assert error(model, x0, target) < 0.75 * identity


def test_fit_takes_a_list_of_pairs_and_checks_its_arguments() -> None:
    x0, target = pairs(n=4)
    one_epoch = OptimConfig(lr=1e-2, epochs=1)
    model = fit_layerwise([(x0, target)], layers=2, channels=4, optim=one_epoch)
    assert model(x0).shape == x0.shape
    with pytest.raises(CvxmriError, match="at least 2 layers"):
        fit_layerwise([(x0, target)], layers=1)
    with pytest.raises(CvxmriError, match="stage method"):
        fit_layerwise([(x0, target)], method="end-to-end")
    with pytest.raises(CvxmriError, match="at least one batch"):
        fit_end_to_end([], optim=one_epoch)
