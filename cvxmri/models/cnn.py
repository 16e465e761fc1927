"""The reconstruction network: a (k+1)-layer CNN with a skip from the zero-filled input.

    h_0 = x0,   h_i = g_i(h_{i-1}),   x_hat = x0 + f(h_k)

``g_i`` is a KxK convolution followed by its nonlinearity: a ReLU (`ReluConv`, the
ordinary network) or a fixed-gate multiplication (`GatedConv`, the gated-ReLU layers of a
convex stage). ``f`` is a 1x1 convolution back to 2 channels (real, imaginary).

`ReconCNN` is an ordinary ``torch.nn.Module``. `save` and `load` use a tensor-only file
read with ``torch.load(weights_only=True)``: no pickle payload can run code, and loading
needs nothing from the training code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvxmri.errors import CvxmriError, describe_load_error

FORMAT = "cvxmri.ReconCNN/1"


def to_channels(image: Tensor) -> Tensor:
    """Complex (..., h, w) -> real (..., 2, h, w)."""
    return torch.stack([image.real, image.imag], dim=-3)


def to_complex(channels: Tensor) -> Tensor:
    """Real (..., 2, h, w) -> complex (..., h, w)."""
    return torch.complex(channels[..., 0, :, :].float(), channels[..., 1, :, :].float())


class ReluConv(nn.Module):
    """``relu(conv(x))``: one hidden layer of the ordinary CNN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer."""
        return F.relu(self.conv(x))


class GatedConv(nn.Module):
    """``D(x) * conv(x, v)``, the hidden layer of a gated-ReLU convex stage.

    The gates ``D_p(x) = 1[conv((x - mean) / std, u_p) + b_p >= 0]`` are fixed; output
    channel ``p * groups + c`` is gated by pattern ``p``.
    """

    def __init__(
        self, in_channels: int, patterns: int, outputs_per_pattern: int, kernel_size: int
    ) -> None:
        super().__init__()
        self.patterns = patterns
        self.outputs_per_pattern = outputs_per_pattern
        self.value = nn.Conv2d(
            in_channels,
            patterns * outputs_per_pattern,
            kernel_size,
            padding=kernel_size // 2,
            bias=False,
        )
        shape = (patterns, in_channels, kernel_size, kernel_size)
        self.register_buffer("gate_weight", torch.zeros(shape))
        self.register_buffer("gate_bias", torch.zeros(patterns))
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))

    def gates(self, x: Tensor) -> Tensor:
        """(B, P, H, W) 0/1 sign patterns, computed in at least float32 even under autocast
        (as the convex stage computed them in training: bf16 could flip patterns), so they
        depend on the input's values only, not on its dtype."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            normalised = x.to(dtype, copy=True)
            normalised.sub_(self.input_mean.to(dtype)[:, None, None])
            normalised.div_(self.input_std.to(dtype)[:, None, None])
            response = F.conv2d(
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
        b, _, h, w = out.shape
        grouped = out.view(b, self.patterns, self.outputs_per_pattern, h, w)
        grouped.mul_(gates.to(out.dtype).unsqueeze(2))
        return out


def zero_conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 output layer initialised to zero, so a network starts as the identity
    ``x_hat = x0``, like a convex stage (whose weights start at zero). Without it, the random
    output layer of a fresh network adds noise many times the size of the residual, and
    training spends its first few hundred steps removing it."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ReconCNN(nn.Module):
    """Hidden layers ``g_1..g_k``, a final 1x1 convolution ``f`` and the skip from ``x0``.

    Args:
        hidden: the hidden layers, applied in order.
        final: the 1x1 convolution to 2 channels.
    """

    def __init__(self, hidden: list[nn.Module], final: nn.Conv2d) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(hidden)
        self.final = final

    @classmethod
    def relu(cls, layers: int, channels: int, kernel_size: int, in_channels: int = 2) -> ReconCNN:
        """The ordinary network: ``layers - 1`` ReLU conv layers of ``channels``, then 1x1."""
        if layers < 2:
            raise CvxmriError(f"the network needs at least 2 layers, got {layers}")
        hidden: list[nn.Module] = []
        width = in_channels
        for _ in range(layers - 1):
            hidden.append(ReluConv(width, channels, kernel_size))
            width = channels
        return cls(hidden, zero_conv1x1(width, in_channels))

    @property
    def depth(self) -> int:
        """Number of layers (hidden layers plus the final one)."""
        return len(self.hidden) + 1

    def features(self, x0: Tensor) -> Tensor:
        """``h_k``: the output of the last hidden layer."""
        h = x0
        for layer in self.hidden:
            h = layer(h)
        return h

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 + f(h_k)`` for a (B, 2, H, W) zero-filled input."""
        return x0 + self.final(self.features(x0))

    def architecture(self) -> list[dict[str, object]]:
        """What `load` needs to rebuild the modules: one entry per layer."""
        spec: list[dict[str, object]] = []
        for layer in self.hidden:
            if isinstance(layer, ReluConv):
                out_c, in_c, k, _ = layer.conv.weight.shape
                spec.append({"kind": "relu", "in": in_c, "out": out_c, "kernel": k})
            elif isinstance(layer, GatedConv):
                _, in_c, k, _ = layer.value.weight.shape
                spec.append(
                    {
                        "kind": "gated",
                        "in": in_c,
                        "patterns": layer.patterns,
                        "outputs_per_pattern": layer.outputs_per_pattern,
                        "kernel": k,
                    }
                )
            else:
                raise TypeError(f"cannot describe layer {type(layer).__name__}")
        out_c, in_c = self.final.weight.shape[:2]
        spec.append({"kind": "final", "in": in_c, "out": out_c})
        return spec

    def save(self, path: str | Path, metadata: dict[str, object] | None = None) -> None:
        """Write weights and architecture atomically; tensors and JSON text only."""
        path = Path(path)
        payload = {
            "format": FORMAT,
            "architecture": json.dumps(self.architecture()),
            "metadata": json.dumps(metadata or {}),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
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

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ReconCNN:
        """Read a network written by `save`, without executing any pickled code."""
        path = Path(path)
        if not path.is_file():
            raise CvxmriError(f"{path}: no such model file")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises several types for foreign or damaged files
            reason = describe_load_error(err)
            raise CvxmriError(f"{path}: not a cvxmri model file ({reason})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CvxmriError(f"{path}: not a cvxmri model file (format {FORMAT} expected)")
        try:
            spec = json.loads(payload["architecture"])
            model = cls._build(spec)
            model.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = str(err).splitlines()[0]
            raise CvxmriError(
                f"{path}: model file does not match its architecture ({first})"
            ) from None
        return model.to(map_location)

    @classmethod
    def _build(cls, spec: list[dict[str, object]]) -> ReconCNN:
        hidden: list[nn.Module] = []
        for entry in spec[:-1]:
            if entry["kind"] == "relu":
                hidden.append(ReluConv(int(entry["in"]), int(entry["out"]), int(entry["kernel"])))
            elif entry["kind"] == "gated":
                hidden.append(
                    GatedConv(
                        int(entry["in"]),
                        int(entry["patterns"]),
                        int(entry["outputs_per_pattern"]),
                        int(entry["kernel"]),
                    )
                )
            else:
                raise ValueError(f"unknown layer kind {entry['kind']!r}")
        final = spec[-1]
        if final["kind"] != "final":
            raise ValueError("the last layer must be the final 1x1 convolution")
        return cls(hidden, nn.Conv2d(int(final["in"]), int(final["out"]), 1))
