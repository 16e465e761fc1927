"""One sample pipeline: (k-space, mask, coil maps) -> what every reconstructor takes.

The same for 2D slices (B, C, H, W) and 3D volumes (B, C, X, Y, Z): the number of spatial
axes is ``len(recon_shape)``.

`make_sample` is the only place that masks k-space, forms the zero-filled image, finds the
normalisation scale and crops to the reconstruction matrix; training
(`cvxmri.training.data`), evaluation (`cvxmri.evaluate`), reproduce and the lazy
`cvxmri.data.dataset.SliceDataset` all call it. With ``A = M F S`` the SENSE operator of
the sampling mask ``M``, coil maps ``S`` and centred FFT ``F``:

    y     = M k / s                       measured k-space, normalised
    x0    = crop(A^H (M k)) / s           zero-filled image on the recon matrix
    s     = 99th percentile of |crop(A^H (M k))|      (`normalisation_scale`)

so ``crop(A^H y) == x0`` up to float rounding (x0 is computed as written, the formula
training has always used, and ``A^H`` runs once). A sample keeps ``y``, the mask and the
maps so that a network can apply the SENSE operator itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from cvxmri.data.prepare import coil_support, normalisation_scale
from cvxmri.errors import CvxmriError
from cvxmri.models.cnn import to_channels
from cvxmri.physics import Sense, center_crop


@dataclass
class Sample:
    """A batch of B slices (or 3D volumes) ready for reconstruction (every tensor has a
    leading batch axis). Shapes are those of slices; a volume has three spatial axes where
    a slice has two: ``y`` (B, C, X, Y, Z), ``mask`` (B, 1, 1, ky, kz) or
    (B, 1, X, ky, kz), ``x0`` (B, 2, x, y, z), ``reference`` (B, x, y, z).

    Attributes:
        y: complex (B, C, H, W) measured k-space ``M k / scale`` on the full k-space grid.
        mask: real 0/1 (B, 1, H, W) sampling mask (broadcasts against ``y``).
        maps: complex (B, C, H, W) coil sensitivities (ones for single-coil data).
        x0: real (B, 2, h, w) zero-filled image ``crop(A^H (M k)) / scale`` on the recon
            matrix, as real and imaginary channels: the input of a network.
        target: real (B, 2, h, w) fully sampled SENSE image ``crop(S^H F^H k) / scale``,
            normalised like ``x0``: the training target. None when not given.
        reference: real (B, h, w) magnitude image the metrics compare against, in the
            data's own units (not normalised): the SENSE magnitude or fastMRI's RSS. None
            when not given.
        scale: (B,) normalisation scale of each slice.
        support: real 0/1 (B, 1, h, w): where any coil is sensitive. Reconstructions are
            restricted to it (outside it the SENSE model has no data).
        recon_shape: (h, w), the reconstruction matrix ((x, y, z) for volumes).
        volume: (B,) volume id of each slice (its path relative to the data root).
        slice_index: (B,) index of each slice in its volume.
    """

    y: Tensor
    mask: Tensor
    maps: Tensor
    x0: Tensor
    target: Tensor | None
    reference: Tensor | None
    scale: Tensor
    support: Tensor
    recon_shape: tuple[int, ...]
    volume: list[str]
    slice_index: list[int]

    def __len__(self) -> int:
        return self.x0.shape[0]

    @property
    def ndim(self) -> int:
        """Number of spatial axes: 2 for slices, 3 for volumes."""
        return len(self.recon_shape)

    def sense(self) -> Sense:
        """The SENSE operator ``A = M F S`` of this batch (``A^H y`` is on the full grid)."""
        return Sense(self.maps, self.mask, self.ndim)

    def to(self, device: torch.device | str) -> Sample:
        """The same sample with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)


def _batch_mask(mask: Tensor, batch: int, ndim: int = 2) -> Tensor:
    """A mask given as (H, W), (B, H, W) or (B, 1, H, W), as (B, 1, H, W); in 3D one given
    as (ky, kz) (shared by the batch and the readout), as (B, 1, 1, ky, kz), and one given
    as (B, 1, X or 1, ky, kz) as it is."""
    if ndim == 3:
        if mask.ndim == 2:
            return mask.expand(batch, *mask.shape)[:, None, None]
        if mask.ndim == 5 and mask.shape[1] == 1:
            return mask
        raise CvxmriError(
            f"3D mask must be (ky, kz) or (B, 1, X or 1, ky, kz), got {tuple(mask.shape)}"
        )
    if mask.ndim == 2:
        return mask.expand(batch, *mask.shape)[:, None]
    if mask.ndim == 3:
        return mask[:, None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask
    raise CvxmriError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")


def make_sample(
    kspace: Tensor,
    mask: Tensor,
    maps: Tensor,
    recon_shape: tuple[int, ...],
    target: Tensor | None = None,
    reference: Tensor | None = None,
    volume: str | Sequence[str] = "",
    slice_index: Sequence[int] | None = None,
) -> Sample:
    """Mask, combine, normalise and crop a batch of slices into a `Sample`.

    Args:
        kspace: complex (B, C, H, W) k-space (fully sampled, or zero where not measured);
            3D: (B, C, X, Y, Z).
        mask: real 0/1 sampling mask, (H, W) shared by the batch, (B, H, W) or
            (B, 1, H, W); 3D: (ky, kz) shared by the batch, or (B, 1, X or 1, ky, kz).
        maps: complex (B, C, H, W) coil sensitivities; 3D: (B, C, X, Y, Z).
        recon_shape: (h, w) reconstruction matrix (image-space centre crop); 3D: (x, y, z).
        target: complex (B, h, w) fully sampled SENSE image in the data's units; stored
            normalised as 2 channels.
        reference: real (B, h, w) magnitude reference for the metrics, kept as given.
        volume: volume id of the batch (one for all slices) or of each slice.
        slice_index: index of each slice in its volume (default 0..B-1).

    ``A^H (M k)`` is computed once; ``x0 = crop(A^H (M k)) / scale``, ``y = M k / scale``,
    ``target = crop(x*) / scale``, each in exactly the operation order training uses.
    """
    batch, ndim = kspace.shape[0], len(recon_shape)
    mask = _batch_mask(mask, batch, ndim)
    measured = kspace * mask
    zero_filled = Sense(maps, mask, ndim).H(measured)
    scale = normalisation_scale(zero_filled, recon_shape)
    per_image = scale.view(-1, *[1] * ndim)
    volumes = [volume] * batch if isinstance(volume, str) else list(volume)
    indices = list(range(batch)) if slice_index is None else list(slice_index)
    if len(volumes) != batch or len(indices) != batch:
        raise CvxmriError(f"{batch} slices but {len(volumes)} volume ids, {len(indices)} indices")
    return Sample(
        y=measured / per_image[:, None],
        mask=mask,
        maps=maps,
        x0=to_channels(center_crop(zero_filled, recon_shape) / per_image, ndim),
        target=None if target is None else to_channels(target / per_image, ndim),
        reference=reference,
        scale=scale,
        support=center_crop(coil_support(maps, ndim), recon_shape)[:, None],
        recon_shape=recon_shape,
        volume=volumes,
        slice_index=indices,
    )


def collate_samples(samples: Sequence[Sample]) -> Sample:
    """One `Sample` from several (the ``collate_fn`` of a ``DataLoader`` over a
    `SliceDataset`): tensors are concatenated along the batch axis. Their k-space grids
    and recon matrices must agree (fastMRI volumes can differ in width: batch such data
    by 1, or group it by shape)."""
    first = samples[0]
    for other in samples[1:]:
        if other.y.shape[1:] != first.y.shape[1:] or other.recon_shape != first.recon_shape:
            raise CvxmriError(
                f"cannot batch slices of different shapes: {other.volume[0]} has k-space "
                f"{tuple(other.y.shape[1:])} and recon {other.recon_shape}, {first.volume[0]} "
                f"{tuple(first.y.shape[1:])} and {first.recon_shape}"
            )
    joined: dict[str, object] = {}
    for f in fields(Sample):
        values = [getattr(s, f.name) for s in samples]
        if f.name == "recon_shape":
            joined[f.name] = first.recon_shape
        elif f.name in ("volume", "slice_index"):
            joined[f.name] = [v for value in values for v in value]
        elif any(v is None for v in values):
            joined[f.name] = None
        else:
            joined[f.name] = torch.cat(values)
    return Sample(**joined)  # type: ignore[arg-type]
