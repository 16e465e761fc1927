"""Image-quality metrics (NMSE, PSNR, SSIM) with the fastMRI evaluation conventions.

The volume metrics reproduce ``fastmri/evaluate.py`` (facebookresearch/fastMRI), which wraps
scikit-image:

* ``nmse``: ``||gt - pred||² / ||gt||²`` over the whole volume.
* ``psnr``: ``peak_signal_noise_ratio(gt, pred, data_range=gt.max())`` over the whole volume.
* ``ssim``: the mean over slices of
  ``structural_similarity(gt[s], pred[s], data_range=gt.max())`` with scikit-image's
  defaults: 7x7 uniform window, ``K1=0.01``, ``K2=0.03``, sample covariances (scaled by
  ``N / (N - 1)`` with ``N = 49``) and the SSIM map averaged without its 3-pixel border.

A volume is a 3D array: the (slices, H, W) stack of a 2D multi-slice acquisition, or the
(D, H, W) image of a 3D acquisition. NMSE and PSNR do not depend on how it is cut; SSIM is
the mean of the 2D SSIM over the slices along ``axis`` (0 by default, the fastMRI slice
axis; any axis of a 3D volume, e.g. to score a 3D reconstruction in its acquisition plane).

Everything is computed in PyTorch in float64 on the inputs' device, batched over slices, so the
same code serves offline evaluation on CPU and monitoring on GPU during training. The per-slice
functions return float64 tensors and are differentiable; the volume functions return floats.

Inputs are real magnitude images: torch tensors, NumPy arrays or anything ``numpy.asarray``
accepts. A NumPy input paired with a tensor is moved to that tensor's device. An exact
reconstruction has PSNR ``math.inf`` (``inf`` entries in per-slice tensors), as in
scikit-image. Bad input (shape mismatch, wrong ndim, complex values, NaN/Inf, images smaller
than 7x7, a data range that is not positive, an all-zero ``gt`` for NMSE) raises
:class:`~cvxmri.errors.CvxmriError`.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cvxmri.errors import CvxmriError

__all__ = [
    "nmse",
    "nmse_per_slice",
    "psnr",
    "psnr_per_slice",
    "slice_metrics",
    "ssim",
    "ssim_per_slice",
    "volume_metrics",
]

ImageLike: TypeAlias = Tensor | np.ndarray
RangeLike: TypeAlias = Tensor | np.ndarray | float

WIN_SIZE = 7
K1 = 0.01
K2 = 0.03
# scikit-image's use_sample_covariance=True: unbiased (co)variances over the window.
_COV_NORM = WIN_SIZE**2 / (WIN_SIZE**2 - 1)


def _as_float64(x: object, name: str, device: torch.device) -> Tensor:
    if x.is_complex() if isinstance(x, Tensor) else np.iscomplexobj(x):
        raise CvxmriError(f"{name} is complex; the metrics need real magnitudes (take abs first)")
    if not isinstance(x, Tensor):
        try:
            # np.array copies: torch.from_numpy rejects negative strides and warns on
            # read-only arrays, both common for arrays coming from files or slicing.
            x = torch.from_numpy(np.array(x, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise CvxmriError(f"{name} is not a numeric array: {err}") from err
    return x.to(device=device, dtype=torch.float64)


def _check_axis(axis: object) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -3 <= axis < 3:
        raise CvxmriError(f"axis must be an integer in [-3, 2] (an axis of a volume), got {axis!r}")
    return axis


def _check_pair(
    gt: object, pred: object, *, allow_2d: bool, axis: int = 0
) -> tuple[Tensor, Tensor]:
    """Convert to float64 tensors of shape (B, H, W) on a common device and validate.

    A volume's slice axis ``axis`` is moved first (``movedim(0, 0)`` is the tensor itself).
    """
    axis = _check_axis(axis)
    devices = {x.device for x in (gt, pred) if isinstance(x, Tensor)}
    if len(devices) > 1:
        raise CvxmriError(f"gt and pred are on different devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    g = _as_float64(gt, "gt", device)
    p = _as_float64(pred, "pred", device)
    if g.shape != p.shape:
        raise CvxmriError(f"gt and pred shapes differ: {tuple(g.shape)} vs {tuple(p.shape)}")
    if allow_2d and g.ndim == 2:
        g, p = g.unsqueeze(0), p.unsqueeze(0)
    if g.ndim != 3:
        expected = "(H, W) or (B, H, W)" if allow_2d else "(slices, H, W)"
        raise CvxmriError(f"expected images of shape {expected}, got {tuple(g.shape)}")
    g, p = g.movedim(axis, 0), p.movedim(axis, 0)
    if g.shape[0] == 0:
        raise CvxmriError("got zero slices")
    if min(g.shape[-2:]) < WIN_SIZE:
        raise CvxmriError(
            f"images must be at least {WIN_SIZE}x{WIN_SIZE} (the SSIM window), "
            f"got {g.shape[-2]}x{g.shape[-1]}"
        )
    for name, t in (("gt", g), ("pred", p)):
        if not bool(torch.isfinite(t).all()):
            raise CvxmriError(f"{name} contains NaN or Inf")
    return g, p


def _check_range(data_range: object, batch: int | None, device: torch.device) -> Tensor:
    """Validate a data range: 0-d when ``batch`` is None, else broadcast to shape (batch,)."""
    r = _as_float64(data_range, "data_range", device)
    if batch is None and r.ndim != 0:
        raise CvxmriError(f"data_range must be a scalar, got shape {tuple(r.shape)}")
    if batch is not None:
        if r.ndim == 0:
            r = r.expand(batch)
        elif r.shape != (batch,):
            raise CvxmriError(
                f"data_range must be a scalar or have shape ({batch},), got {tuple(r.shape)}"
            )
    if not bool((torch.isfinite(r) & (r > 0)).all()):
        raise CvxmriError(f"data_range must be finite and positive, got {r.tolist()}")
    return r


def _slice_max(g: Tensor) -> Tensor:
    r = g.amax(dim=(-2, -1))
    bad = torch.nonzero(r <= 0).flatten().tolist()
    if bad:
        raise CvxmriError(f"gt slices {bad} have max <= 0, so their data range is not positive")
    return r


def _volume_max(g: Tensor) -> Tensor:
    r = g.amax()
    if not bool(r > 0):
        raise CvxmriError(f"gt.max() is {r.item():g}; the data range must be positive")
    return r


def _ssim(g: Tensor, p: Tensor, r: Tensor) -> Tensor:
    # One pooling call for all five local statistics; stride 1 without padding keeps only
    # full windows, which is exactly scikit-image's map with its (7-1)//2 border cropped.
    stats = torch.stack((g, p, g * g, p * p, g * p), dim=1)
    ux, uy, uxx, uyy, uxy = F.avg_pool2d(stats, kernel_size=WIN_SIZE, stride=1).unbind(dim=1)
    vx = _COV_NORM * (uxx - ux * ux)
    vy = _COV_NORM * (uyy - uy * uy)
    vxy = _COV_NORM * (uxy - ux * uy)
    c1 = ((K1 * r) ** 2).view(-1, 1, 1)
    c2 = ((K2 * r) ** 2).view(-1, 1, 1)
    a1 = 2 * ux * uy + c1
    a2 = 2 * vxy + c2
    b1 = ux**2 + uy**2 + c1
    b2 = vx + vy + c2
    return ((a1 * a2) / (b1 * b2)).mean(dim=(-2, -1))


def _psnr(mse: Tensor, r: Tensor) -> Tensor:
    # mse == 0 gives inf without a warning, matching scikit-image's value.
    return 10 * torch.log10(r**2 / mse)


def _nmse(err: Tensor, energy: Tensor) -> Tensor:
    if energy.ndim == 0 and not bool(energy > 0):
        raise CvxmriError("gt is all zeros, so NMSE is undefined")
    bad = torch.nonzero(energy.reshape(-1) == 0).flatten().tolist()
    if bad:
        raise CvxmriError(f"gt slices {bad} are all zeros, so their NMSE is undefined")
    return err / energy


def ssim_per_slice(gt: ImageLike, pred: ImageLike, data_range: RangeLike) -> Tensor:
    """SSIM of each slice, as scikit-image's ``structural_similarity`` with its defaults.

    Args:
        gt: Reference images, shape (B, H, W); a single (H, W) image is treated as B = 1.
            H and W must be at least 7.
        pred: Images to score, same shape as ``gt``.
        data_range: Positive scalar, or one value per slice with shape (B,).

    Returns:
        Float64 tensor of shape (B,) on the inputs' device.
    """
    g, p = _check_pair(gt, pred, allow_2d=True)
    return _ssim(g, p, _check_range(data_range, g.shape[0], g.device))


def psnr_per_slice(gt: ImageLike, pred: ImageLike, data_range: RangeLike) -> Tensor:
    """PSNR of each slice in dB, ``10 log10(data_range² / mean((gt - pred)²))``.

    Args:
        gt: Reference images, shape (B, H, W); a single (H, W) image is treated as B = 1.
        pred: Images to score, same shape as ``gt``.
        data_range: Positive scalar, or one value per slice with shape (B,).

    Returns:
        Float64 tensor of shape (B,); ``inf`` where a slice is reconstructed exactly.
    """
    g, p = _check_pair(gt, pred, allow_2d=True)
    r = _check_range(data_range, g.shape[0], g.device)
    return _psnr((g - p).square().mean(dim=(-2, -1)), r)


def nmse_per_slice(gt: ImageLike, pred: ImageLike) -> Tensor:
    """NMSE of each slice, ``||gt - pred||² / ||gt||²``.

    Args:
        gt: Reference images, shape (B, H, W); a single (H, W) image is treated as B = 1.
            No slice may be all zeros.
        pred: Images to score, same shape as ``gt``.

    Returns:
        Float64 tensor of shape (B,).
    """
    g, p = _check_pair(gt, pred, allow_2d=True)
    return _nmse((g - p).square().sum(dim=(-2, -1)), g.square().sum(dim=(-2, -1)))


def nmse(gt: ImageLike, pred: ImageLike) -> float:
    """fastMRI volume NMSE, ``||gt - pred||² / ||gt||²`` over the whole (slices, H, W) volume."""
    g, p = _check_pair(gt, pred, allow_2d=False)
    return _nmse((g - p).square().sum(), g.square().sum()).item()


def psnr(gt: ImageLike, pred: ImageLike, data_range: float | None = None) -> float:
    """fastMRI volume PSNR in dB over the whole (slices, H, W) volume.

    Args:
        gt: Reference volume, shape (slices, H, W).
        pred: Reconstructed volume, same shape.
        data_range: Peak value; ``gt.max()`` of the volume when None (the fastMRI convention).

    Returns:
        ``10 log10(data_range² / mse)`` with the MSE over all voxels; ``math.inf`` if exact.
    """
    g, p = _check_pair(gt, pred, allow_2d=False)
    r = _volume_max(g) if data_range is None else _check_range(data_range, None, g.device)
    return _psnr((g - p).square().mean(), r).item()


def ssim(gt: ImageLike, pred: ImageLike, data_range: float | None = None, axis: int = 0) -> float:
    """fastMRI volume SSIM: the mean over slices of the 2D SSIM with one volume-wide range.

    ``mean_s SSIM(gt_s, pred_s; L)`` over the 2D slices ``s`` of the volume along ``axis``,
    with ``L = data_range`` (``gt.max()`` of the whole volume by default).

    Args:
        gt: Reference volume, shape (slices, H, W); the two axes other than ``axis`` at
            least 7.
        pred: Reconstructed volume, same shape.
        data_range: Range used for every slice; ``gt.max()`` of the volume when None.
        axis: the axis along which the volume is cut into 2D slices; 0 is fastMRI's.

    Returns:
        The mean of :func:`ssim_per_slice` over the slices.
    """
    g, p = _check_pair(gt, pred, allow_2d=False, axis=axis)
    r = _volume_max(g) if data_range is None else _check_range(data_range, None, g.device)
    return _ssim(g, p, r.expand(g.shape[0])).mean().item()


def volume_metrics(gt: ImageLike, pred: ImageLike, axis: int = 0) -> dict[str, float]:
    """NMSE, PSNR and SSIM of a 3D volume with the fastMRI volume conventions.

    Args:
        gt: Reference volume, (slices, H, W) or a 3D image (D, H, W).
        pred: Reconstructed volume, same shape.
        axis: the axis along which SSIM cuts the volume into 2D slices; 0 is fastMRI's.

    Returns:
        ``{"nmse": ..., "psnr": ..., "ssim": ...}``, equal to :func:`nmse`, :func:`psnr` and
        :func:`ssim` (along ``axis``) with ``data_range = gt.max()`` of the whole volume.
    """
    g, p = _check_pair(gt, pred, allow_2d=False, axis=axis)
    r = _volume_max(g)
    sq_err = (g - p).square()
    return {
        "nmse": _nmse(sq_err.sum(), g.square().sum()).item(),
        "psnr": _psnr(sq_err.mean(), r).item(),
        "ssim": _ssim(g, p, r.expand(g.shape[0])).mean().item(),
    }


def slice_metrics(gt: ImageLike, pred: ImageLike, axis: int = 0) -> dict[str, list[float]]:
    """Per-slice NMSE, PSNR and SSIM of a 3D volume ("slice-based" metrics).

    Unlike :func:`volume_metrics`, PSNR and SSIM use each slice's own ``gt`` maximum as its
    data range, so every slice of ``gt`` must have a positive maximum.

    Args:
        gt: Reference volume, (slices, H, W) or a 3D image (D, H, W).
        pred: Reconstructed volume, same shape.
        axis: the axis along which the volume is cut into the scored 2D slices.

    Returns:
        ``{"nmse": [...], "psnr": [...], "ssim": [...]}``, one value per slice along ``axis``.
    """
    g, p = _check_pair(gt, pred, allow_2d=False, axis=axis)
    r = _slice_max(g)
    sq_err = (g - p).square()
    values = {
        "nmse": _nmse(sq_err.sum(dim=(-2, -1)), g.square().sum(dim=(-2, -1))),
        "psnr": _psnr(sq_err.mean(dim=(-2, -1)), r),
        "ssim": _ssim(g, p, r),
    }
    return {name: v.tolist() for name, v in values.items()}
