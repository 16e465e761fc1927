"""The reconstruction network: a (k+1)-layer CNN with a skip from the zero-filled input.

    h_0 = x0,   h_i = g_i(h_{i-1}),   x_hat = x0 + f(h_k)

``g_i`` is a KxK convolution followed by its nonlinearity: a ReLU (`ReluConv`, the
ordinary network) or a fixed-gate multiplication (`GatedConv`, the gated-ReLU layers of a
convex stage). ``f`` is a 1x1 convolution back to 2 channels (real, imaginary). Every layer takes
``ndim``, the number of spatial dimensions: 2 for images ``(B, C, H, W)`` (the default), 3
for volumes ``(B, C, D, H, W)``; the convolutions come from `cvxmri.models.conv`.

`ReconCNN` is an ordinary ``torch.nn.Module``. `save` and `load` use a tensor-only file
read with ``torch.load(weights_only=True)``: no pickle payload can run code, and loading
needs nothing from the training code. `load` takes a model file or a run folder (its
``model.pt``) and keeps the file's metadata (method, mask, layers...) as ``model.metadata``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvxmri.errors import CvxmriError
from cvxmri.models.conv import conv_ops, fast_layout

FORMAT = "cvxmri.ReconCNN/1"


def to_channels(image: Tensor, ndim: int = 2) -> Tensor:
    """Complex (..., h, w) -> real (..., 2, h, w); 3D: (..., d, h, w) -> (..., 2, d, h, w)."""
    return torch.stack([image.real, image.imag], dim=-(ndim + 1))


def to_complex(channels: Tensor, ndim: int = 2) -> Tensor:
    """Real (..., 2, h, w) -> complex (..., h, w); 3D: (..., 2, d, h, w) -> (..., d, h, w)."""
    parts = channels.unbind(dim=-(ndim + 1))
    return torch.complex(parts[0].float(), parts[1].float())


class ReluConv(nn.Module):
    """``relu(conv(x))``: one hidden layer of the ordinary CNN (``ndim`` 2 or 3)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, ndim: int = 2
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.conv = conv_ops(ndim).module(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer."""
        return F.relu(self.conv(x))


class GatedConv(nn.Module):
    """``D(x) * conv(x, v)``, the hidden layer of a gated-ReLU convex stage.

    The gates ``D_p(x) = 1[conv((x - mean) / std, u_p) + b_p >= 0]`` are fixed; output
    channel ``p * groups + c`` is gated by pattern ``p``. ``ndim``: 2 or 3 spatial dimensions.
    """

    def __init__(
        self,
        in_channels: int,
        patterns: int,
        outputs_per_pattern: int,
        kernel_size: int,
        ndim: int = 2,
    ) -> None:
        super().__init__()
        self.patterns = patterns
        self.outputs_per_pattern = outputs_per_pattern
        self.ndim = ndim
        self.ops = conv_ops(ndim)
        self.value = self.ops.module(
            in_channels,
            patterns * outputs_per_pattern,
            kernel_size,
            padding=kernel_size // 2,
            bias=False,
        )
        shape = (patterns, in_channels, *(kernel_size,) * ndim)
        self.register_buffer("gate_weight", torch.zeros(shape))
        self.register_buffer("gate_bias", torch.zeros(patterns))
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))

    def gates(self, x: Tensor) -> Tensor:
        """(B, P, *spatial) 0/1 sign patterns, computed in at least float32 even under autocast
        (as the convex stage computed them in training: bf16 could flip patterns), so they
        depend on the input's values only, not on its dtype."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        per_channel = (-1, *([1] * self.ndim))
        with torch.autocast(x.device.type, enabled=False):
            normalised = x.to(dtype, copy=True)
            normalised.sub_(self.input_mean.to(dtype).view(per_channel))
            normalised.div_(self.input_std.to(dtype).view(per_channel))
            response = self.ops.conv(
                normalised,
                self.gate_weight.to(dtype),
                self.gate_bias.to(dtype),
                padding=self.gate_weight.shape[-1] // 2,
            )
        return (response >= 0).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer. The gates multiply the responses in place (a frozen layer runs
        without autograd; with autograd the product's gradient needs the gates only)."""
        gates = self.gates(x)
        out = self.value(x)
        grouped = out.view(out.shape[0], self.patterns, self.outputs_per_pattern, *out.shape[2:])
        grouped.mul_(gates.to(out.dtype).unsqueeze(2))
        return out


def zero_conv1x1(in_channels: int, out_channels: int, ndim: int = 2) -> nn.Module:
    """A 1x1 output layer initialised to zero, so a network starts as the identity
    ``x_hat = x0``, like a convex stage (whose weights start at zero). Without it, the random
    output layer of a fresh network adds noise many times the size of the residual, and
    training spends its first few hundred steps removing it."""
    conv = conv_ops(ndim).module(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ReconCNN(nn.Module):
    """Hidden layers ``g_1..g_k``, a final 1x1 convolution ``f`` and the skip from ``x0``.

    Args:
        hidden: the hidden layers, applied in order.
        final: the 1x1 convolution to 2 channels (its number of spatial dimensions is the
            network's ``ndim``).

    Attributes:
        metadata: what is known of how the network was made (a plain JSON-able dict):
            empty for a new network; after `load`, the metadata `save` was given (a
            training run saves ``method``, ``layers`` and ``mask``, the description of its
            training mask), plus ``path``, the file it was loaded from. `save` writes it
            when given no other.
    """

    def __init__(self, hidden: list[nn.Module], final: nn.Module) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(hidden)
        self.final = final
        self.metadata: dict[str, object] = {}

    @classmethod
    def relu(
        cls, layers: int, channels: int, kernel_size: int, in_channels: int = 2, ndim: int = 2
    ) -> ReconCNN:
        """The ordinary network: ``layers - 1`` ReLU conv layers of ``channels``, then 1x1."""
        if layers < 2:
            raise CvxmriError(f"the network needs at least 2 layers, got {layers}")
        hidden: list[nn.Module] = []
        width = in_channels
        for _ in range(layers - 1):
            hidden.append(ReluConv(width, channels, kernel_size, ndim))
            width = channels
        return cls(hidden, zero_conv1x1(width, in_channels, ndim))

    @property
    def ndim(self) -> int:
        """Spatial dimensions of the network's convolutions (2 or 3)."""
        return self.final.weight.dim() - 2

    @property
    def depth(self) -> int:
        """Number of layers (hidden layers plus the final one)."""
        return len(self.hidden) + 1

    def last_hidden(self, x0: Tensor) -> Tensor:
        """``h_k``: the output of the last hidden layer."""
        h = fast_layout(x0)
        for layer in self.hidden:
            h = layer(h)
        return h

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 + f(h_k)`` for a (B, 2, H, W) (3D: (B, 2, D, H, W)) zero-filled input."""
        # The sum takes ``x0``'s layout: the standard one, whatever `fast_layout` chose for
        # the layers (FFTs and the data consistency run slower on a channels-last image).
        return x0 + self.final(self.last_hidden(x0))

    def architecture(self) -> list[dict[str, object]]:
        """What `load` needs to rebuild the modules: one entry per layer, each with its
        ``ndim`` (files written before 3D support have none: they are 2D)."""
        spec: list[dict[str, object]] = []
        for layer in self.hidden:
            if isinstance(layer, ReluConv):
                out_c, in_c, k = layer.conv.weight.shape[:3]
                spec.append(
                    {"kind": "relu", "in": in_c, "out": out_c, "kernel": k, "ndim": layer.ndim}
                )
            elif isinstance(layer, GatedConv):
                _, in_c, k = layer.value.weight.shape[:3]
                spec.append(
                    {
                        "kind": "gated",
                        "in": in_c,
                        "patterns": layer.patterns,
                        "outputs_per_pattern": layer.outputs_per_pattern,
                        "kernel": k,
                        "ndim": layer.ndim,
                    }
                )
            else:
                raise TypeError(f"cannot describe layer {type(layer).__name__}")
        out_c, in_c = self.final.weight.shape[:2]
        spec.append({"kind": "final", "in": in_c, "out": out_c, "ndim": self.ndim})
        return spec

    def save(self, path: str | Path, metadata: dict[str, object] | None = None) -> None:
        """Write weights and architecture atomically; tensors and JSON text only.

        ``metadata`` (JSON-able) is stored beside them; by default the network's own
        ``metadata`` (without the ``path`` that `load` adds)."""
        if metadata is None:
            metadata = {k: v for k, v in self.metadata.items() if k != "path"}
        save_payload(Path(path), FORMAT, self.architecture(), metadata, self.state_dict())

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ReconCNN:
        """Read a network written by `save`, without executing any pickled code.

        Args:
            path: a model file, or a run folder (``cvxmri train --out``): its ``model.pt``,
                the network at full depth.
            map_location: the device the network goes to.

        Returns:
            The network in training mode, with ``metadata`` the dict saved with it (a
            training run's: ``method``, ``layers``, ``mask``) and ``metadata["path"]`` the
            file read. ``ReconCNN.load("runs/x").metadata["method"]`` is the method of run
            ``runs/x``. An unrolled network's file is refused (read it with
            `cvxmri.models.unrolled.load_network`, which reads both kinds).
        """
        from cvxmri.models.unrolled import load_network

        model = load_network(path, map_location)
        if not isinstance(model, cls):
            raise CvxmriError(
                f"{model.metadata['path']}: an unrolled network, not a CNN (load it with "
                "load_network)"
            )
        return model

    @classmethod
    def from_architecture(cls, spec: list[dict[str, object]]) -> ReconCNN:
        """An untrained network of the layers `architecture` describes."""
        hidden: list[nn.Module] = []
        for entry in spec[:-1]:
            ndim = int(entry.get("ndim", 2))
            if entry["kind"] == "relu":
                hidden.append(
                    ReluConv(int(entry["in"]), int(entry["out"]), int(entry["kernel"]), ndim)
                )
            elif entry["kind"] == "gated":
                hidden.append(
                    GatedConv(
                        int(entry["in"]),
                        int(entry["patterns"]),
                        int(entry["outputs_per_pattern"]),
                        int(entry["kernel"]),
                        ndim,
                    )
                )
            else:
                raise ValueError(f"unknown layer kind {entry['kind']!r}")
        final = spec[-1]
        if final["kind"] != "final":
            raise ValueError("the last layer must be the final 1x1 convolution")
        module = conv_ops(int(final.get("ndim", 2))).module
        return cls(hidden, module(int(final["in"]), int(final["out"]), 1))


def save_payload(
    path: Path,
    format_name: str,
    architecture: object,
    metadata: dict[str, object],
    state_dict: dict[str, Tensor],
) -> None:
    """Write a network file atomically: its format name, architecture and metadata as JSON
    text, and its tensors on the CPU (nothing ``torch.load(weights_only=True)`` refuses)."""
    payload = {
        "format": format_name,
        "architecture": json.dumps(architecture),
        "metadata": json.dumps(metadata),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
