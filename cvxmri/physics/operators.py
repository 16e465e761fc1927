"""Linear operators of the multi-coil forward model, on batched complex torch tensors.

They read like sigpy's: ``A(x)`` applies, ``A.H`` is the adjoint, ``A.N`` the normal operator
``A.H A``, and ``A @ B`` composes. Every operator is a ``torch.nn.Module``: the tensors it
holds (coil maps, masks) are buffers, so ``A.to(device)`` moves them and an operator can live
inside a network; ``A.H``, ``A.N`` and ``A @ B`` hold their operands as submodules.

The SENSE model of one batch is

    A = M F S          (mask, centred FFT per coil, coil sensitivities)

over ``ndim`` spatial axes (2 for slices, 3 for volumes): image ``x`` of shape (B, *grid)
and k-space of shape (B, C, *grid), the coil axis being ``-(ndim + 1)``. Every operator here
is checked by an adjointness test (``<A x, y> == <x, A^H y>``) in 2D and 3D.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cvxmri.errors import CvxmriError
from cvxmri.physics.fft import fftnc, ifftnc, spatial_dims

TensorMap = Callable[[torch.Tensor], torch.Tensor]


class LinearOperator(torch.nn.Module):
    """A linear map with an explicit adjoint, as a ``torch.nn.Module``.

    Either give the two maps as callables, ``LinearOperator(forward, adjoint, name)``, or
    subclass and define the methods ``forward(x) = A x`` and ``adjoint(y) = A^H y``.

    Args:
        forward: the map ``x -> A x``; None in a subclass that defines ``forward``.
        adjoint: the map ``y -> A^H y``; None in a subclass that defines ``adjoint``.
        name: shown in ``repr``; the class name when None.

    >>> import torch
    >>> double = LinearOperator(lambda x: 2 * x, lambda y: 2 * y, "Double")
    >>> (double @ double.H)(torch.ones(2)), double.N
    (tensor([4., 4.]), <Double.N>)
    """

    def __init__(
        self,
        forward: TensorMap | None = None,
        adjoint: TensorMap | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if (forward is None) != (adjoint is None):
            raise TypeError("give both forward and adjoint, or neither (in a subclass)")
        self._forward_map = forward
        self._adjoint_map = adjoint
        self.name = type(self).__name__ if name is None else name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""
        if self._forward_map is None:
            raise NotImplementedError(f"{self.name} defines no forward map")
        return self._forward_map(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^H y``."""
        if self._adjoint_map is None:
            raise NotImplementedError(f"{self.name} defines no adjoint map")
        return self._adjoint_map(y)

    @property
    def H(self) -> LinearOperator:
        """The adjoint operator ``A^H``; ``A.H.H`` is ``A``."""
        return Adjoint(self)

    @property
    def N(self) -> LinearOperator:
        """The normal operator ``A^H A`` (self-adjoint, positive semi-definite)."""
        return Normal(self)

    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        """Composition ``(self @ other)(x) == self(other(x))``, adjoint ``other.H(self.H(y))``."""
        return Composition(self, other)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Adjoint(LinearOperator):
    """``A^H`` of an operator ``A``: forward is ``A``'s adjoint and adjoint ``A``'s forward."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(name=f"{op.name}.H")
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H x``."""
        return self.op.adjoint(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A y``."""
        return self.op.forward(y)

    @property
    def H(self) -> LinearOperator:
        """``(A^H)^H = A``, the operator itself."""
        return self.op


class Normal(LinearOperator):
    """The normal operator ``A^H A`` of an operator ``A`` (its own adjoint)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(name=f"{op.name}.N")
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H (A x)``."""
        return self.op.adjoint(self.op.forward(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(A^H A)^H y = A^H (A y)``."""
        return self.forward(y)


class Composition(LinearOperator):
    """``outer @ inner``: ``x -> outer(inner(x))``, adjoint ``y -> inner.H(outer.H(y))``."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator) -> None:
        super().__init__(name=f"{outer.name} @ {inner.name}")
        self.outer = outer
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``outer(inner(x))``."""
        return self.outer.forward(self.inner.forward(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``inner^H (outer^H y)``."""
        return self.inner.adjoint(self.outer.adjoint(y))


class FFT(LinearOperator):
    """The centred orthonormal FFT over the last ``ndim`` axes (unitary: ``F.H F = I``).

    Args:
        ndim: number of spatial axes, 2 for (..., H, W), 3 for (..., D, H, W).
    """

    def __init__(self, ndim: int = 2) -> None:
        spatial_dims(ndim)
        super().__init__(name=f"FFT{ndim}")
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fftnc(x, ndim)``."""
        return fftnc(x, self.ndim)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``ifftnc(y, ndim)``, the inverse (the FFT is unitary)."""
        return ifftnc(y, self.ndim)


class FFT2(FFT):
    """The centred orthonormal 2D FFT over the last two axes: ``FFT(ndim=2)``."""

    def __init__(self) -> None:
        super().__init__(ndim=2)


class Mask(LinearOperator):
    """Pointwise multiplication by a real 0/1 sampling mask (self-adjoint, idempotent).

    Being pointwise it needs no number of spatial axes: the mask only has to broadcast to
    the k-space, e.g. (H, W) or (B, 1, H, W) in 2D, (D, H, W) or (B, 1, 1, H, W) in 3D.

    Args:
        mask: the mask, a buffer of the module.
    """

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``M x``, on the device of ``x``."""
        return x * self.mask.to(x.device)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``M^H y = M y`` (a real mask)."""
        return self.forward(y)


class Sense(LinearOperator):
    """The SENSE operator ``A = M F S`` for a batch of images over ``ndim`` spatial axes.

    ``(A x)_c = M F (S_c x)`` per coil ``c``; the adjoint is the zero-filled SENSE
    combination ``A^H y = sum_c conj(S_c) F^H (M y_c)`` and the normal operator
    ``A^H A x = sum_c conj(S_c) F^H M F (S_c x)`` (``M^2 = M``).

    Args:
        maps: coil sensitivities, complex (B, C, *grid) or (C, *grid) (shared by the batch),
            ``grid`` being the last ``ndim`` axes: (H, W) in 2D, (D, H, W) in 3D.
        mask: sampling mask broadcastable to (B, C, *grid), e.g. (H, W), (B, 1, H, W) or
            (B, 1, 1, W) in 2D, (D, H, W) or (B, 1, 1, H, W) in 3D. ``None`` means fully
            sampled.
        ndim: number of spatial axes (2 or 3); the coil axis is ``-(ndim + 1)``.

    The image is (B, *grid), the k-space (B, C, *grid). ``maps`` and ``mask`` are buffers
    (``state_dict`` entries that ``.to(device)`` moves).

    >>> import torch
    >>> maps = torch.ones(1, 2, 4, 4, 4, dtype=torch.complex64) / 2**0.5
    >>> A = Sense(maps, ndim=3)
    >>> x = torch.randn(1, 4, 4, 4, dtype=torch.complex64)
    >>> A(x).shape, torch.allclose(A.N(x), x, atol=1e-6)
    (torch.Size([1, 2, 4, 4, 4]), True)
    """

    maps: torch.Tensor
    mask: torch.Tensor | None

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor | None = None, ndim: int = 2) -> None:
        spatial_dims(ndim)
        if not maps.is_complex():
            raise TypeError("coil maps must be a complex tensor")
        if maps.ndim < ndim + 1:
            raise ValueError(
                f"coil maps must be (C, *grid) or (B, C, *grid) with {ndim} grid axes, "
                f"got shape {tuple(maps.shape)}"
            )
        super().__init__()
        self.ndim = ndim
        self.coil_dim = -(ndim + 1)
        self.register_buffer("maps", maps)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x = M F (S x)``: image (B, *grid) to k-space (B, C, *grid)."""
        kspace = fftnc(self.maps * x.unsqueeze(self.coil_dim), self.ndim)
        return kspace if self.mask is None else kspace * self.mask

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^H y = sum_c conj(S_c) F^H (M y_c)``: k-space (B, C, *grid) to image (B, *grid)."""
        if self.mask is not None:
            y = y * self.mask
        return (self.maps.conj() * ifftnc(y, self.ndim)).sum(dim=self.coil_dim)

    @property
    def N(self) -> LinearOperator:
        """``A^H A``, computed without centring every coil's k-space (`SenseNormal`).

        It is built once and kept (iterative solvers take it at every step); moving or
        casting the operator (``.to``) drops it."""
        normal = self.__dict__.get("_normal")
        if normal is None:
            normal = SenseNormal(self)
            # Kept outside the module tree: the normal operator holds this one.
            self.__dict__["_normal"] = normal
        return normal

    def _apply(self, fn: Any, recurse: bool = True) -> Sense:
        self.__dict__.pop("_normal", None)
        return super()._apply(fn, recurse)


class SenseNormal(LinearOperator):
    """The normal operator ``A^H A`` of a `Sense` operator, equal to ``A.H(A(x))`` up to
    the last bit of float rounding but about three times faster on the CPU.

    The centring shifts of the FFTs (``fftshift``/``ifftshift``, which copy the whole
    coil-by-grid tensor) cancel between ``F`` and ``F^H`` except at the two ends: with the
    maps and the mask shifted once, ``A^H A x = fftshift(sum_c conj(S'_c) F0^H (M'^2 F0
    (S'_c ifftshift(x))))``, ``F0`` the uncentred FFT and ``'`` the ``ifftshift`` of a
    tensor, so only the image is shifted; and along an axis where the mask is constant
    (the readout of a Cartesian mask, or any axis it broadcasts along) ``F^H M F = M``, so
    no FFT is taken along it (half the work for 1D Cartesian masks). Without a mask,
    ``A^H A x = sum_c |S_c|^2 x``. The result equals the centred formula up to float
    rounding.
    """

    shifted_maps: torch.Tensor
    weights: torch.Tensor

    def __init__(self, sense: Sense) -> None:
        super().__init__(name=f"{sense.name}.N")
        self.sense = sense
        self.dims = spatial_dims(sense.ndim)
        self.axes: tuple[int, ...] = ()
        if sense.mask is None:
            return
        # Prepared once: the shifted maps and squared mask (M^H M = M^2, M for a 0/1 mask),
        # and the axes that need an FFT. Along an axis where the mask is constant (the
        # readout of a Cartesian mask), F^H M F is M itself: no FFT along it.
        mask = sense.mask.view(*([1] * (sense.ndim - sense.mask.ndim)), *sense.mask.shape)
        self.axes = tuple(d for d in self.dims if not bool((mask == mask.narrow(d, 0, 1)).all()))
        self.register_buffer(
            "shifted_maps", torch.fft.ifftshift(sense.maps, dim=self.dims), persistent=False
        )
        self.register_buffer(
            "weights", torch.fft.ifftshift(mask * mask, dim=self.dims), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``: image (B, *grid) to image (B, *grid)."""
        sense = self.sense
        if sense.mask is None:
            return (sense.maps.conj() * sense.maps).sum(dim=sense.coil_dim) * x
        maps, dims = self.shifted_maps, self.dims
        coils = maps * torch.fft.ifftshift(x, dim=dims).unsqueeze(sense.coil_dim)
        if self.axes:
            kspace = torch.fft.fftn(coils, dim=self.axes, norm="ortho") * self.weights
            images = torch.fft.ifftn(kspace, dim=self.axes, norm="ortho")
        else:
            images = coils * self.weights
        return torch.fft.fftshift((maps.conj() * images).sum(dim=sense.coil_dim), dim=dims)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(A^H A)^H y = A^H A y``."""
        return self.forward(y)


def _crop_slices(full: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """fastMRI's centred window: start ``(size - target) // 2`` on each axis."""
    return tuple(
        slice((size - target) // 2, (size - target) // 2 + target)
        for size, target in zip(full, shape, strict=True)
    )


def _check_crop(full: Sequence[int], shape: Sequence[int]) -> None:
    if len(shape) < 1 or len(full) < len(shape):
        raise ValueError(f"cannot crop the last {len(shape)} axes of a shape {tuple(full)}")
    full = full[len(full) - len(shape) :]
    if not all(0 < target <= size for size, target in zip(full, shape, strict=True)):
        raise ValueError(
            f"cannot crop an image of {'x'.join(map(str, full))} to {'x'.join(map(str, shape))}"
        )


def center_crop(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the last ``len(shape)`` axes to ``shape`` about the centre, as fastMRI does.

    The start index is ``(size - target) // 2`` on each axis, fastMRI's choice, so the
    k-space centre pixel (``size // 2`` per axis) stays at the centre of the crop
    (``target // 2``). The result is a view of ``image``.

    >>> import torch
    >>> center_crop(torch.arange(5), (3,)), center_crop(torch.zeros(2, 6, 5, 4), (2, 3)).shape
    (tensor([1, 2, 3]), torch.Size([2, 6, 2, 3]))
    """
    shape = tuple(shape)
    _check_crop(image.shape, shape)
    return image[(..., *_crop_slices(image.shape[-len(shape) :], shape))]


class CenterCrop(LinearOperator):
    """Image-space centre crop of the last ``len(shape)`` axes from ``full`` to ``shape``.

    The forward map is `center_crop`; its adjoint zero-pads back to ``full``, putting the
    input in the same centred window. This is how readout oversampling (640 -> 320 in
    fastMRI knee) is removed: by cropping in image space, never by cutting k-space.

    Args:
        full: the grid before cropping, e.g. (H, W) or (D, H, W).
        shape: the cropped grid, as many axes as ``full``, each at most its size.
    """

    def __init__(self, full: Sequence[int], shape: Sequence[int]) -> None:
        full, shape = tuple(full), tuple(shape)
        if len(full) != len(shape):
            raise ValueError(f"full {full} and shape {shape} have different numbers of axes")
        _check_crop(full, shape)
        super().__init__()
        self.full = full
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The centre crop of the last ``len(shape)`` axes."""
        return center_crop(x, self.shape)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last ``len(shape)`` axes back to ``full``."""
        out = y.new_zeros((*y.shape[: y.ndim - len(self.full)], *self.full))
        out[(..., *_crop_slices(self.full, self.shape))] = y
        return out


def recon_sense(
    maps: torch.Tensor,
    mask: torch.Tensor | None,
    shape: Sequence[int],
    ndim: int = 2,
) -> LinearOperator:
    """The SENSE operator of images on the reconstruction matrix ``shape``:
    ``A = M F S P``, with ``P`` the zero-padding from ``shape`` to the k-space grid (the
    adjoint of `CenterCrop`); plain `Sense` when the two grids agree. ``A^H y`` is then the
    cropped zero-filled image, the input of a network, and data consistency can work on the
    images a network sees.

    Args:
        maps: coil sensitivities (B, C, *grid).
        mask: sampling mask broadcastable to (B, C, *grid), or None.
        shape: the reconstruction matrix, ``ndim`` axes, each at most the grid's.
        ndim: number of spatial axes.
    """
    sense = Sense(maps, mask, ndim)
    full = tuple(maps.shape[-ndim:])
    if tuple(shape) == full:
        return sense
    return CroppedSense(sense, CenterCrop(full, shape))


class CroppedSense(Composition):
    """``A P``: a `Sense` operator ``A`` on images zero-padded by ``P = crop^H`` (see
    `recon_sense`), whose normal operator ``crop A^H A P`` uses `SenseNormal`."""

    def __init__(self, sense: Sense, crop: CenterCrop) -> None:
        super().__init__(sense, crop.H)
        self.crop = crop

    @property
    def N(self) -> LinearOperator:
        """``crop (A^H A) P``."""
        return Composition(self.crop, Composition(self.outer.N, self.inner))


def _line_parts(op: LinearOperator) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]:
    """The coil maps (B or 1, C, H, W) and mask lines (B or 1, W) of a 2D SENSE operator
    (`Sense`, or `recon_sense`'s cropped one) and its reconstruction window on the grid;
    `CvxmriError` unless its mask is constant along the readout (the first image axis)
    and across coils."""
    cropped = isinstance(op, CroppedSense)
    sense = op.outer if cropped else op
    if not isinstance(sense, Sense) or sense.ndim != 2 or sense.mask is None:
        raise CvxmriError("per-line data consistency needs a 2D SENSE operator with a mask")
    mask = sense.mask.view(*([1] * (4 - sense.mask.ndim)), *sense.mask.shape)
    if mask.shape[1] != 1 or not bool((mask == mask[:, :, :1]).all()):
        raise CvxmriError(
            "per-line data consistency needs a mask constant along the readout "
            "(1D Cartesian undersampling), the same for every coil"
        )
    maps = sense.maps if sense.maps.ndim == 4 else sense.maps.unsqueeze(0)
    rows, cols = _crop_slices(op.crop.full, op.crop.shape) if cropped else (slice(None),) * 2
    return maps, mask[:, 0, 0, :], (rows, cols)


def _normals(maps: torch.Tensor, lines: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """`line_normals` of coil maps (B, C, H, W), mask lines (B or 1, W) and a window."""
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    dft = torch.fft.fftshift(
        torch.fft.fft(torch.fft.ifftshift(eye, dim=0), dim=0, norm="ortho"), dim=0
    )
    line = lines.to(maps.dtype)
    circulant = (dft.mH @ (line[:, :, None] * dft))[:, cols][:, :, cols]
    window = maps[:, :, rows, cols]
    coils = torch.einsum("bcxj,bcxk->bxjk", window.conj(), window)
    return circulant[:, None] * coils


def line_normals(op: LinearOperator) -> torch.Tensor:
    """``A^H A`` of a 2D SENSE operator (`Sense`, or `recon_sense`'s cropped one) whose
    mask is constant along the readout (the first image axis: 1D Cartesian undersampling),
    as one dense matrix per readout position: (B, h, w, w) on the reconstruction matrix
    ``(h, w)``.

    With the mask constant along the readout, ``F^H M F`` acts along the phase-encoding
    axis only, as the circulant ``K = F_y^H diag(m) F_y``, and ``A^H A`` splits over the
    readout: ``N[b, x, j, k] = K_b[j, k] sum_c conj(S_bc(x, j)) S_bc(x, k)``. Rows outside a
    crop window never meet the image; columns are the window's.

    Raises:
        CvxmriError: the operator is not a 2D SENSE operator with such a mask.
    """
    maps, lines, (rows, cols) = _line_parts(op)
    return _normals(maps, lines, rows, cols)


class _LineInverses:
    """The per-image inverses of `line_inverse`, kept across operators: a training loop
    builds a new operator for every batch of the same images. Keyed by a fingerprint of
    an image's maps and mask and checked against copies of both (a hit is exact), least
    recently used first out beyond `LINE_CACHE_BYTES`."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, ...]] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[Any, ...], maps: torch.Tensor, mask: torch.Tensor) -> Any:
        entry = self.entries.get(key)
        if entry is None or not (torch.equal(entry[0], maps) and torch.equal(entry[1], mask)):
            return None
        self.entries.move_to_end(key)
        return entry[2]

    def put(
        self, key: tuple[Any, ...], maps: torch.Tensor, mask: torch.Tensor, inverse: torch.Tensor
    ) -> None:
        size = sum(t.numel() * t.element_size() for t in (maps, mask, inverse))
        if size > LINE_CACHE_BYTES:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= sum(t.numel() * t.element_size() for t in old)
        self.entries[key] = (maps.clone(), mask.clone(), inverse)
        self.bytes += size
        while self.bytes > LINE_CACHE_BYTES:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in dropped)


# The per-image inverses of `line_inverse` kept across operators: 4 GiB holds about 250
# images of 128x128 in complex64 (16 MiB each), 16 of 320x320 (250 MiB each). Greedy
# convex unrolled training on the default data's 54 training slices holds 2.9 GiB of them
# (complex64 for its Gram model and the 18 validation slices, complex128 for its exact
# passes); with 2 GiB the least recently used one was always the next one needed, and
# every exact pass factorised again (2.5 s a pass instead of 0.5).
LINE_CACHE_BYTES = 4 * 2**30
_LINE_INVERSES = _LineInverses()
# The inverses `line_inverse` returned for an operator, by lamda, while the operator lives:
# an operator used again (a greedy convex iteration's exact passes) skips the cache's
# fingerprints, a sum over every image's maps (about 9% of a Cartesian exact pass).
_OPERATOR_INVERSES: weakref.WeakKeyDictionary[LinearOperator, dict[float, list[torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def line_inverse(op: LinearOperator, lamda: float) -> list[torch.Tensor]:
    """``(A^H A + lamda I)^{-1}`` of `line_normals`' operators, one (h, w, w) tensor per
    batch item (a (w, w) matrix per readout position), by Cholesky. Each image's is kept
    (`_LineInverses`, up to `LINE_CACHE_BYTES`) and found again by its maps and mask, so
    another operator of the same images does not factorise again; the same operator (whose
    maps and mask do not change once it is built) gets its list back at once."""
    known = _OPERATOR_INVERSES.setdefault(op, {})
    if lamda in known:
        return known[lamda]
    maps, lines, (rows, cols) = _line_parts(op)
    window = (rows.start, rows.stop, cols.start, cols.stop)
    inverses = []
    with torch.no_grad():
        for b in range(max(maps.shape[0], lines.shape[0])):
            item_maps = maps[min(b, maps.shape[0] - 1)]
            line = lines[min(b, lines.shape[0] - 1)]
            key = (
                lamda,
                window,
                tuple(item_maps.shape),
                item_maps.dtype,
                str(item_maps.device),
                float(item_maps.abs().sum()),
                float((item_maps.real[..., 0, :] * line).sum()),
                float(line.sum()),
            )
            found = _LINE_INVERSES.get(key, item_maps, line)
            if found is None:
                normal = _normals(item_maps[None], line[None], rows, cols)[0]
                eye = torch.eye(normal.shape[-1], dtype=normal.dtype, device=normal.device)
                found = torch.cholesky_inverse(torch.linalg.cholesky(normal + lamda * eye))
                _LINE_INVERSES.put(key, item_maps, line, found)
            inverses.append(found)
    known[lamda] = inverses
    return inverses


def apply_lines(matrices: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Each readout line of ``images`` (n, h, w) times its matrix of ``matrices`` (one
    (h, w, w) tensor per image, or one for all: one matrix product per line)."""
    if len(matrices) == 1:
        return (matrices[0] @ images.permute(1, 2, 0)).permute(2, 0, 1)
    return torch.stack(
        [(m @ z.unsqueeze(-1)).squeeze(-1) for m, z in zip(matrices, images, strict=True)]
    )
