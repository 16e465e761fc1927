"""What each layer learned: group norms, effective linear filters, sign-pattern clusters.

The networks are piecewise linear: with the ReLU (or gate) patterns at an input fixed, the
map from the zero-filled image to the output is affine, so each output pixel has an
*effective filter*, the row of the network's Jacobian at that pixel. The pattern vector of
a pixel (which units of a layer are on there) selects the linear piece; clustering those
vectors over an image shows which regions a layer treats alike.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, sobel
from torch import Tensor

from cvxmri.models.cnn import GatedConv, ReconCNN, ReluConv

# A unit of a convex stage "survives" when its group norm exceeds this fraction of the
# stage's largest; the group lasso drives the others towards zero.
SURVIVING_RELATIVE = 1e-2


def receptive_radius(model: ReconCNN) -> int:
    """How far (pixels) an output pixel sees: the sum of the hidden kernels' half-widths."""
    return sum(int(entry["kernel"]) // 2 for entry in model.architecture()[:-1])  # type: ignore[call-overload]


def group_norms(model: ReconCNN) -> list[np.ndarray]:
    """For each gated hidden layer (a convex stage), the norm of every hidden unit's filter
    ``v_p[c]``, largest first. With the default grouping (one group per pattern and output)
    these are the group-lasso norms of the stage's convex program."""
    norms = []
    for layer in model.hidden:
        if isinstance(layer, GatedConv):
            weight = layer.value.weight.detach().flatten(1)
            norms.append(np.sort(torch.linalg.vector_norm(weight, dim=1).numpy())[::-1].copy())
    return norms


def surviving_units(norms: np.ndarray, relative: float = SURVIVING_RELATIVE) -> int:
    """The number of units whose norm exceeds ``relative`` times the largest."""
    return int((norms > relative * norms.max()).sum()) if norms.size and norms.max() > 0 else 0


@torch.no_grad()
def activation_patterns(model: ReconCNN, x0: Tensor) -> list[Tensor]:
    """The 0/1 pattern of every hidden layer on one input ``x0`` (1, 2, H, W): the gates
    ``D_p`` of a gated layer, ``1[conv > 0]`` of a ReLU layer; each (units, H, W)."""
    patterns = []
    h = x0
    for layer in model.hidden:
        if isinstance(layer, GatedConv):
            patterns.append(layer.gates(h)[0])
        elif isinstance(layer, ReluConv):
            patterns.append((layer.conv(h) > 0).to(h.dtype)[0])
        else:
            raise TypeError(f"no activation pattern for layer {type(layer).__name__}")
        h = layer(h)
    return patterns


def distinct_patterns(pattern: Tensor) -> int:
    """How many different pattern vectors (linear pieces of the layer) occur over the image."""
    return int(torch.unique(pattern.flatten(1).T, dim=0).shape[0])


def cluster_patterns(
    pattern: Tensor, clusters: int, seed: int = 0, iterations: int = 50
) -> np.ndarray:
    """k-means of the per-pixel pattern vectors of a (units, H, W) 0/1 pattern.

    On 0/1 vectors the squared Euclidean distance is the Hamming distance (the number of
    units that differ). Initialisation is k-means++ from ``seed``. Returns (H, W) labels
    ordered by cluster size (0: largest).
    """
    points = pattern.flatten(1).T.double().numpy()
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, clusters):
        distance = ((points[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1).min(1)
        if distance.sum() == 0:
            break
        centres.append(points[rng.choice(len(points), p=distance / distance.sum())])
    centre = np.stack(centres)
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(iterations):
        labels = ((points[:, None, :] - centre[None]) ** 2).sum(-1).argmin(1)
        moved = np.stack(
            [
                points[labels == j].mean(0) if (labels == j).any() else centre[j]
                for j in range(len(centre))
            ]
        )
        if np.array_equal(moved, centre):
            break
        centre = moved
    order = np.argsort(-np.bincount(labels, minlength=len(centre)), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[labels].reshape(pattern.shape[1:])


def effective_filters(
    model: ReconCNN, x0: Tensor, pixels: list[tuple[int, int]], radius: int
) -> np.ndarray:
    """The effective linear filter of the learned correction ``model(x0) - x0`` at each pixel.

    With the patterns at ``x0`` (1, 2, H, W) fixed, output channel ``c`` at pixel (y, x) is
    ``sum_{c', pixels} filter[c, c'] * x0[c'] + offset``; the filter is the Jacobian row,
    computed by autograd (gates and ReLU masks pass no gradient of their own). Returns
    (pixels, 2 outputs, 2 inputs, 2r+1, 2r+1): the window of ``radius`` around each pixel
    (the whole receptive field when ``radius >= receptive_radius(model)``), zero outside
    the image.
    """
    model.eval()
    x = x0.detach().clone().requires_grad_(True)
    correction = model(x) - x
    height, width = x0.shape[-2:]
    size = 2 * radius + 1
    out = np.zeros((len(pixels), correction.shape[1], x0.shape[1], size, size), np.float32)
    for n, (row, col) in enumerate(pixels):
        for c in range(correction.shape[1]):
            (grad,) = torch.autograd.grad(correction[0, c, row, col], x, retain_graph=True)
            top, left = row - radius, col - radius
            rows = slice(max(top, 0), min(row + radius + 1, height))
            cols = slice(max(left, 0), min(col + radius + 1, width))
            window = grad[0, :, rows, cols].numpy()
            out[
                n, c, :, rows.start - top : rows.stop - top, cols.start - left : cols.stop - left
            ] = window
    return out


def choose_pixels(
    target: np.ndarray, zero_filled: np.ndarray, margin: int
) -> list[dict[str, object]]:
    """Three pixels worth looking at, at least ``margin`` from the border: where the
    zero-filled image is most wrong, the strongest edge, and the brightest flat region
    (all on images smoothed with a 2-pixel Gaussian)."""
    error = gaussian_filter(np.abs(zero_filled - target), 2)
    smooth = gaussian_filter(target, 2)
    edge = np.hypot(sobel(smooth, 0), sobel(smooth, 1))
    flat = smooth / max(smooth.max(), 1e-12) - edge / max(edge.max(), 1e-12)
    valid = np.zeros(target.shape, dtype=bool)
    valid[margin : target.shape[0] - margin, margin : target.shape[1] - margin] = True
    if not valid.any():
        valid[:] = True
    chosen = []
    for name, score in (
        ("largest zero-filled error", error),
        ("strongest edge", edge),
        ("bright flat region", flat),
    ):
        masked = np.where(valid, score, -np.inf)
        row, col = np.unravel_index(int(np.argmax(masked)), masked.shape)
        chosen.append({"name": name, "row": int(row), "col": int(col)})
    return chosen
