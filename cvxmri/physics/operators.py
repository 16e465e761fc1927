"""Linear operators of the multi-coil forward model, on batched complex torch tensors.

They read like sigpy's: ``A(x)`` applies, ``A.H`` is the adjoint, ``A.N`` the normal operator
``A.H A``, and ``A @ B`` composes. The SENSE model of one batch of slices is

    A = M F S          (mask, centred FFT per coil, coil sensitivities)

with image ``x`` of shape (B, H, W) and k-space of shape (B, C, H, W). Every operator here
is checked by an adjointness test (``<A x, y> == <x, A^H y>``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cvxmri.physics.fft import fft2c, ifft2c


class LinearOperator:
    """A linear map with an explicit adjoint.

    Args:
        forward: the map ``x -> A x``.
        adjoint: the map ``y -> A^H y``.
        name: shown in ``repr``.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        adjoint: Callable[[torch.Tensor], torch.Tensor],
        name: str = "LinearOperator",
    ) -> None:
        self._forward = forward
        self._adjoint = adjoint
        self.name = name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    @property
    def H(self) -> LinearOperator:
        """The adjoint operator."""
        return LinearOperator(self._adjoint, self._forward, f"{self.name}.H")

    @property
    def N(self) -> LinearOperator:
        """The normal operator ``A^H A`` (self-adjoint)."""

        def normal(x: torch.Tensor) -> torch.Tensor:
            return self._adjoint(self._forward(x))

        return LinearOperator(normal, normal, f"{self.name}.N")

    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        """Composition ``(self @ other)(x) == self(other(x))``."""
        return LinearOperator(
            lambda x: self._forward(other._forward(x)),
            lambda y: other._adjoint(self._adjoint(y)),
            f"{self.name} @ {other.name}",
        )

    def __repr__(self) -> str:
        return f"<{self.name}>"


class FFT2(LinearOperator):
    """The centred orthonormal 2D FFT over the last two axes (unitary: ``F.H F = I``)."""

    def __init__(self) -> None:
        super().__init__(fft2c, ifft2c, "FFT2")


class Mask(LinearOperator):
    """Pointwise multiplication by a real 0/1 sampling mask (self-adjoint, idempotent).

    Args:
        mask: broadcastable to the k-space shape, e.g. (H, W), (B, 1, H, W).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

        def apply(y: torch.Tensor) -> torch.Tensor:
            return y * self.mask.to(y.device)

        super().__init__(apply, apply, "Mask")


class Sense(LinearOperator):
    """The SENSE operator ``A = M F S`` for a batch of slices.

    Args:
        maps: coil sensitivities, complex (B, C, H, W) (or (C, H, W), shared by the batch).
        mask: sampling mask broadcastable to (B, C, H, W): (H, W), (B, 1, H, W) or
            (B, 1, 1, W). ``None`` means fully sampled.

    The image is (B, H, W), the k-space (B, C, H, W). The adjoint is the zero-filled
    SENSE combination ``sum_c conj(S_c) F^H (M y_c)``.
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not maps.is_complex():
            raise TypeError("coil maps must be a complex tensor")
        self.maps = maps
        self.mask = mask

        def forward(x: torch.Tensor) -> torch.Tensor:
            kspace = fft2c(self.maps * x.unsqueeze(-3))
            return kspace if self.mask is None else kspace * self.mask

        def adjoint(y: torch.Tensor) -> torch.Tensor:
            if self.mask is not None:
                y = y * self.mask
            return (self.maps.conj() * ifft2c(y)).sum(dim=-3)

        super().__init__(forward, adjoint, "Sense")


def center_crop(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Crop the last two axes to ``shape`` about the centre, as fastMRI does.

    The start index is ``(size - target) // 2`` on each axis, fastMRI's choice, so the
    k-space centre pixel (H // 2, W // 2) stays at the centre of the crop.
    """
    height, width = image.shape[-2:]
    crop_h, crop_w = shape
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(f"cannot crop an image of {height}x{width} to {crop_h}x{crop_w}")
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    return image[..., top : top + crop_h, left : left + crop_w]


class CenterCrop(LinearOperator):
    """Image-space centre crop from ``full`` to ``shape``; its adjoint zero-pads back.

    This is how readout oversampling (640 -> 320 in fastMRI knee) is removed: by cropping
    in image space, never by cutting k-space.
    """

    def __init__(self, full: tuple[int, int], shape: tuple[int, int]) -> None:
        self.full = full
        self.shape = shape

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros((*x.shape[:-2], *self.full))
            top = (self.full[0] - self.shape[0]) // 2
            left = (self.full[1] - self.shape[1]) // 2
            out[..., top : top + self.shape[0], left : left + self.shape[1]] = x
            return out

        super().__init__(lambda x: center_crop(x, self.shape), pad, "CenterCrop")
