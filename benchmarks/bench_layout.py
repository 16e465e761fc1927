"""Time a regulariser block's training step in the contiguous and the channels-last
layout on the CPU (`cvxmri.models.conv.fast_layout`); print a table and write JSON.

Usage: .venv/bin/python benchmarks/bench_layout.py [--repeats 5]

The block is the unrolled networks' regulariser (`ReconCNN.relu(2, C, K)`: a 2->C KxK ReLU
convolution and a C->2 1x1 output) on a batch of 8 images of 320x320, forward and backward;
each number is the median of ``repeats`` steps after one warm-up step, both layouts in one
process, so their ratio is comparable.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_data import write_results

from cvxmri.models.cnn import ReconCNN

RESULTS = Path(__file__).resolve().parent / "results" / "layout.json"
BLOCKS = ((16, 5), (64, 3))


def step_seconds(net: ReconCNN, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of a forward and backward step of ``net`` on ``x``."""
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        net(x).square().sum().backward()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def main() -> None:
    """Run, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(8, 2, 320, 320)
    rows = []
    for channels, kernel in BLOCKS:
        net = ReconCNN.relu(2, channels, kernel)
        torch.nn.init.normal_(net.final.weight)
        # `ReconCNN` converts its input with `fast_layout`; `_Contiguous` runs its layers
        # on the input as it is.
        contiguous = step_seconds(_Contiguous(net), x, args.repeats)
        channels_last = step_seconds(net, x, args.repeats)
        rows.append(
            {
                "block": f"2->{channels} {kernel}x{kernel}, {channels}->2 1x1",
                "contiguous_s": contiguous,
                "channels_last_s": channels_last,
            }
        )
    print("| block | contiguous s | channels-last s | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        ratio = row["contiguous_s"] / row["channels_last_s"]
        print(
            f"| {row['block']} | {row['contiguous_s']:.3f} | {row['channels_last_s']:.3f} "
            f"| {ratio:.2f} |"
        )
    write_results(RESULTS, rows=rows)
    print(f"wrote {RESULTS}")


class _Contiguous(torch.nn.Module):
    """``net`` run on the contiguous layout: its hidden layers and output directly."""

    def __init__(self, net: ReconCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        h = x0
        for layer in self.net.hidden:
            h = layer(h)
        return x0 + self.net.final(h)


if __name__ == "__main__":
    main()
