"""Classical baselines on normalised, undersampled multi-coil k-space.

`zero_filled` and `compressed_sensing` take a `Sample` and return complex images (B, h, w)
on its reconstruction matrix, restricted to its coil support, in the sample's normalised
units (multiply by ``sample.scale`` for the data's own). `cs_l1_wavelet` is the full-grid
solver underneath: masked k-space (B, C, H, W), coil maps (B, C, H, W), mask broadcastable
to the k-space -> complex images (B, H, W) on the k-space grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvxmri.data.sample import Sample
from cvxmri.models.cnn import to_complex
from cvxmri.physics import center_crop


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
    """Compressed sensing: ``argmin_x 1/2 ||M F S x - y||^2 + lamda ||W x||_1`` per slice.

    sigpy picks the FISTA step from a power iteration started at a random vector drawn from
    numpy's global generator, which is seeded from the OS in every process: unseeded, CS
    differs from run to run (up to about 2e-3 dB per slice). The global generator is
    therefore seeded with 0 for each slice, and its state restored afterwards, so that CS
    is repeatable and the caller's random stream is untouched.
    """
    import sigpy.mri

    weights = np.broadcast_to(mask.cpu().numpy(), kspace.shape).astype(np.float32)
    images = []
    state = np.random.get_state()  # noqa: NPY002 (sigpy draws from the legacy global generator)
    try:
        for index in range(kspace.shape[0]):
            np.random.seed(0)  # noqa: NPY002 (sigpy draws from the legacy global generator)
            app = sigpy.mri.app.L1WaveletRecon(
                kspace[index].cpu().numpy(),
                maps[index].cpu().numpy(),
                config.lamda,
                weights=weights[index],
                max_iter=config.iterations,
                show_pbar=False,
            )
            images.append(torch.from_numpy(np.asarray(app.run(), dtype=np.complex64)))
    finally:
        np.random.set_state(state)  # noqa: NPY002 (sigpy draws from the legacy global generator)
    return torch.stack(images).to(kspace.device)


def zero_filled(sample: Sample) -> torch.Tensor:
    """The zero-filled SENSE image ``x0 = crop(A^H (M k)) / scale`` of the sample,
    restricted to the coil support."""
    return to_complex(sample.x0) * sample.support[:, 0]


def compressed_sensing(sample: Sample, config: CSConfig) -> torch.Tensor:
    """L1-wavelet CS (`cs_l1_wavelet`) of the sample's normalised k-space ``y``, solved on
    the full k-space grid, then cropped to the recon matrix and restricted to the coil
    support."""
    image = cs_l1_wavelet(sample.y, sample.maps, sample.mask, config)
    return center_crop(image, sample.recon_shape) * sample.support[:, 0]


CLASSICAL_METHODS = ("zero-filled", "cs")
