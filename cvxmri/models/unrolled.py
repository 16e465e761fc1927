"""The unrolled network: T iterations of a learned regulariser and data consistency.

    x_0 = A^H y,    x_t = DC(x_{t-1} + R_t(x_{t-1})),    t = 1..T

``A`` is the SENSE operator of the reconstruction matrix (`cvxmri.physics.recon_sense`),
``DC`` an affine data-consistency step (`cvxmri.models.dc`) and ``R_t`` a two-layer CNN on
the 2-channel image: a `ReconCNN` with one hidden layer, whose forward pass is already
``x + R_t(x)`` (its skip connection). The hidden layer is a `ReluConv` (end-to-end and
greedy non-convex training) or a `GatedConv` (a certified convex iteration). Weights are
separate per iteration (greedy training needs that) or shared (one module used T times).

`UnrolledNet` is an ordinary ``torch.nn.Module``. `save` writes a tensor-only file read
with ``torch.load(weights_only=True)``, like `ReconCNN.save`; `load_network` reads either
kind of file (or a run folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cvxmri.errors import CvxmriError, describe_load_error
from cvxmri.models.cnn import FORMAT as CNN_FORMAT
from cvxmri.models.cnn import ReconCNN, save_payload, to_channels, to_complex
from cvxmri.models.dc import DataConsistency, DCConfig
from cvxmri.physics import recon_sense

FORMAT = "cvxmri.UnrolledNet/1"


class UnrolledNet(nn.Module):
    """``x_t = DC(block_t(x_{t-1}))`` for t = 1..T, with ``block_t(x) = x + R_t(x)``.

    Args:
        blocks: the T regularisers, each a `ReconCNN` with one hidden layer; the same
            module repeated means shared weights.
        dc: the data-consistency step.

    Attributes:
        metadata: as `ReconCNN.metadata` (a training run's method, iterations, mask).
    """

    def __init__(self, blocks: list[ReconCNN], dc: DataConsistency) -> None:
        super().__init__()
        if not blocks:
            raise CvxmriError("an unrolled network needs at least one iteration")
        self.blocks = nn.ModuleList(blocks)
        self.dc = dc
        self.metadata: dict[str, object] = {}

    @classmethod
    def relu(
        cls,
        iterations: int,
        channels: int,
        kernel_size: int,
        dc: DCConfig,
        shared: bool = False,
        ndim: int = 2,
    ) -> UnrolledNet:
        """An untrained network of ReLU regularisers (each ``KxK conv -> ReLU -> 1x1``,
        the 1x1 layer zero so that it starts as T data-consistency steps)."""
        if iterations < 1:
            raise CvxmriError(f"iterations must be >= 1, got {iterations}")
        if shared:
            block = ReconCNN.relu(2, channels, kernel_size, ndim=ndim)
            blocks = [block] * iterations
        else:
            blocks = [ReconCNN.relu(2, channels, kernel_size, ndim=ndim) for _ in range(iterations)]
        return cls(blocks, dc.build())

    @property
    def iterations(self) -> int:
        """T, the number of iterations."""
        return len(self.blocks)

    @property
    def ndim(self) -> int:
        """Spatial dimensions (2 or 3)."""
        return self.blocks[0].ndim

    @property
    def shared(self) -> bool:
        """Whether every iteration uses the same regulariser."""
        return len(self.blocks) > 1 and all(b is self.blocks[0] for b in self.blocks)

    def operator(self, x0: Tensor, mask: Tensor, maps: Tensor) -> torch.nn.Module:
        """``A`` of a batch: SENSE of the recon matrix of ``x0`` (B, 2, *recon)."""
        return recon_sense(maps, mask, tuple(x0.shape[2:]), self.ndim)

    def iterates(
        self, x0: Tensor, y: Tensor, mask: Tensor, maps: Tensor, steps: int | None = None
    ) -> list[Tensor]:
        """``x_1 .. x_steps`` (default all T) as (B, 2, *recon) real tensors.

        Args:
            x0: the zero-filled images (B, 2, *recon), the network's input.
            y: the measured k-space (B, C, *grid).
            mask: the sampling mask, broadcastable to ``y``.
            maps: the coil maps (B, C, *grid).
        """
        op = self.operator(x0, mask, maps)
        aty = op.H(y)
        x = x0
        out = []
        for block in list(self.blocks)[: steps or self.iterations]:
            x = to_channels(self.dc(to_complex(block(x), self.ndim), op, aty), self.ndim)
            out.append(x)
        return out

    def forward(self, x0: Tensor, y: Tensor, mask: Tensor, maps: Tensor) -> Tensor:
        """``x_T`` (B, 2, *recon) for the zero-filled ``x0`` and the data ``(y, mask, maps)``."""
        return self.iterates(x0, y, mask, maps)[-1]

    def architecture(self) -> dict[str, object]:
        """What `load_network` needs to rebuild the modules."""
        blocks = [self.blocks[0]] if self.shared else list(self.blocks)
        return {
            "iterations": self.iterations,
            "shared": self.shared,
            "dc": vars(self.dc.config()),
            "blocks": [block.architecture() for block in blocks],
        }

    def save(self, path: str | Path, metadata: dict[str, object] | None = None) -> None:
        """Write weights and architecture atomically (see `ReconCNN.save`)."""
        if metadata is None:
            metadata = {k: v for k, v in self.metadata.items() if k != "path"}
        save_payload(Path(path), FORMAT, self.architecture(), metadata, self.state_dict())

    @classmethod
    def from_architecture(cls, spec: dict[str, object]) -> UnrolledNet:
        """An untrained network of the iterations `architecture` describes."""
        blocks = [ReconCNN.from_architecture(entry) for entry in spec["blocks"]]  # type: ignore[union-attr]
        iterations = int(spec["iterations"])  # type: ignore[arg-type]
        if spec["shared"]:
            blocks = blocks[:1] * iterations
        elif len(blocks) != iterations:
            raise ValueError(f"{len(blocks)} blocks for {iterations} iterations")
        return cls(blocks, DCConfig(**spec["dc"]).build())  # type: ignore[arg-type]


def load_network(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> ReconCNN | UnrolledNet:
    """Read a network written by `ReconCNN.save` or `UnrolledNet.save`, without executing
    any pickled code: a model file, or a run folder (its ``model.pt``). The network comes
    back with its ``metadata`` and ``metadata["path"]``, as `ReconCNN.load` describes."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise CvxmriError(
                f"{path}: a folder without model.pt (a run folder holds one once its "
                "training has finished)"
            )
        path = path / "model.pt"
    if not path.is_file():
        raise CvxmriError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        reason = describe_load_error(err)
        raise CvxmriError(f"{path}: not a cvxmri model file ({reason})") from None
    kinds = {CNN_FORMAT: ReconCNN, FORMAT: UnrolledNet}
    if not isinstance(payload, dict) or payload.get("format") not in kinds:
        raise CvxmriError(f"{path}: not a cvxmri model file (format {' or '.join(kinds)} expected)")
    try:
        spec = json.loads(payload["architecture"])
        model = kinds[payload["format"]].from_architecture(spec)
        model.load_state_dict(payload["state_dict"])
        metadata = json.loads(payload.get("metadata") or "{}")
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata is a {type(metadata).__name__}, not a mapping")
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0]
        raise CvxmriError(f"{path}: model file does not match its architecture ({first})") from None
    model.metadata = {**metadata, "path": str(path)}
    return model.to(map_location)
