"""Classical baselines on normalised, undersampled multi-coil k-space.

Both take a batch: masked k-space (B, C, H, W), coil maps (B, C, H, W), mask broadcastable
to the k-space, and return complex images (B, H, W) on the full k-space grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvxmri.physics import Sense


def zero_filled_sense(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The zero-filled SENSE-combined image ``A^H y``."""
    return Sense(maps, mask).H(kspace)


@dataclass(frozen=True)
class CSConfig:
    """L1-wavelet compressed sensing (sigpy `L1WaveletRecon`, FISTA).

    Attributes:
        lamda: weight of the l1 norm of the Daubechies-4 wavelet coefficients, for data
            normalised as in `cvxmri.data.prepare` (chosen on the validation split; see
            docs/benchmarks.md).
        iterations: FISTA iterations.
    """

    lamda: float = 3e-3
    iterations: int = 100


def cs_l1_wavelet(
    kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, config: CSConfig
) -> torch.Tensor:
    """Compressed sensing: ``argmin_x 1/2 ||M F S x - y||^2 + lamda ||W x||_1`` per slice."""
    import sigpy.mri

    weights = np.broadcast_to(mask.cpu().numpy(), kspace.shape).astype(np.float32)
    images = []
    for index in range(kspace.shape[0]):
        app = sigpy.mri.app.L1WaveletRecon(
            kspace[index].cpu().numpy(),
            maps[index].cpu().numpy(),
            config.lamda,
            weights=weights[index],
            max_iter=config.iterations,
            show_pbar=False,
        )
        images.append(torch.from_numpy(np.asarray(app.run(), dtype=np.complex64)))
    return torch.stack(images).to(kspace.device)


CLASSICAL_METHODS = ("zero-filled", "cs")
