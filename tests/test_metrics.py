"""Tests for cvxmri.metrics against scikit-image and the fastMRI evaluation conventions."""

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cvxmri import metrics
from cvxmri.errors import CvxmriError

# Both sides compute in float64; the remaining differences are summation-order rounding.
RTOL = 1e-9


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return data.shepp_logan_phantom()


def noisy_pair(
    phantom: np.ndarray, shape: tuple[int, int], scale: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A crop of the phantom (with a positive background) and a noisy copy of it."""
    h, w = shape
    gt = scale * (phantom[40 : 40 + h, 70 : 70 + w] + 0.05)
    rng = np.random.default_rng(seed)
    return gt, gt + rng.normal(0.0, 0.05 * scale, gt.shape)


def volume_pair(phantom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Three slices with maxima in ratio 1 : 0.4 : 0.05 and the same absolute noise level."""
    crops = [phantom[40 + 30 * s : 88 + 30 * s, 70:131] + 0.05 for s in range(3)]
    gt = np.stack([c * f / c.max() for c, f in zip(crops, (1.0, 0.4, 0.05), strict=True)])
    rng = np.random.default_rng(7)
    return gt, gt + rng.normal(0.0, 0.01, gt.shape)


# The reference: fastmri/evaluate.py, which calls scikit-image per volume / per slice.
def fastmri_nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def fastmri_psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    maxval = gt.max() if maxval is None else maxval
    return float(peak_signal_noise_ratio(gt, pred, data_range=maxval))


def fastmri_ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    maxval = gt.max() if maxval is None else maxval
    per_slice = [structural_similarity(gt[s], pred[s], data_range=maxval) for s in range(len(gt))]
    return float(np.mean(per_slice))


SHAPES = [(7, 7), (7, 12), (33, 33), (37, 53), (101, 80)]
SCALES = [1e-3, 1.0, 255.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_ssim_per_slice_matches_skimage(phantom, shape, scale):
    gt, pred = noisy_pair(phantom, shape, scale, seed=1)
    for data_range in (gt.max(), 2.0 * scale, 0.5 * gt.max()):
        expected = structural_similarity(gt, pred, data_range=data_range)
        got = metrics.ssim_per_slice(gt, pred, data_range)
        assert got.shape == (1,) and got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_psnr_and_nmse_per_slice_match_references(phantom, shape, scale):
    gt, pred = noisy_pair(phantom, shape, scale, seed=2)
    for data_range in (gt.max(), 2.0 * scale, 0.5 * gt.max()):
        expected = peak_signal_noise_ratio(gt, pred, data_range=data_range)
        got = metrics.psnr_per_slice(gt, pred, data_range).item()
        assert got == pytest.approx(expected, rel=RTOL)
    got_nmse = metrics.nmse_per_slice(gt, pred).item()
    assert got_nmse == pytest.approx(fastmri_nmse(gt, pred), rel=RTOL)


def test_uint8_inputs_match_skimage():
    # Products of uint8 pixels overflow unless the inputs are converted first.
    gt = data.camera()[100:201, 150:227]
    rng = np.random.default_rng(3)
    pred = np.clip(gt + rng.normal(0.0, 20.0, gt.shape), 0, 255).astype(np.uint8)
    for data_range in (255.0, float(gt.max())):
        got_ssim = metrics.ssim_per_slice(gt, pred, data_range).item()
        got_psnr = metrics.psnr_per_slice(gt, pred, data_range).item()
        assert got_ssim == pytest.approx(
            structural_similarity(gt, pred, data_range=data_range), rel=RTOL
        )
        assert got_psnr == pytest.approx(
            peak_signal_noise_ratio(gt, pred, data_range=data_range), rel=RTOL
        )


def test_float32_tensors_are_scored_in_float64(phantom):
    gt, pred = noisy_pair(phantom, (64, 64), 1.0, seed=4)
    gt32, pred32 = torch.from_numpy(gt).float(), torch.from_numpy(pred).float()
    got = metrics.ssim_per_slice(gt32, pred32, 1.0)
    expected = structural_similarity(gt32.double().numpy(), pred32.double().numpy(), data_range=1.0)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=RTOL)


def test_numpy_views_are_accepted(phantom):
    # Read-only and negatively strided arrays are what h5py reads and np.flip return.
    gt, pred = noisy_pair(phantom, (40, 50), 1.0, seed=5)
    flipped_gt, flipped_pred = np.flip(gt, axis=1), np.flip(pred, axis=1)
    flipped_gt.setflags(write=False)
    got = metrics.ssim_per_slice(flipped_gt, flipped_pred, 1.0).item()
    expected = structural_similarity(flipped_gt, flipped_pred, data_range=1.0)
    assert got == pytest.approx(expected, rel=RTOL)


def test_volume_metrics_match_fastmri(phantom):
    gt, pred = volume_pair(phantom)
    expected = {
        "nmse": fastmri_nmse(gt, pred),
        "psnr": fastmri_psnr(gt, pred),
        "ssim": fastmri_ssim(gt, pred),
    }
    assert metrics.nmse(gt, pred) == pytest.approx(expected["nmse"], rel=RTOL)
    assert metrics.psnr(gt, pred) == pytest.approx(expected["psnr"], rel=RTOL)
    assert metrics.ssim(gt, pred) == pytest.approx(expected["ssim"], rel=RTOL)
    assert metrics.volume_metrics(gt, pred) == pytest.approx(expected, rel=RTOL)
    assert metrics.psnr(gt, pred, data_range=2.0) == pytest.approx(
        fastmri_psnr(gt, pred, 2.0), rel=RTOL
    )
    assert metrics.ssim(gt, pred, data_range=2.0) == pytest.approx(
        fastmri_ssim(gt, pred, 2.0), rel=RTOL
    )


def test_slice_metrics_use_each_slice_max(phantom):
    gt, pred = volume_pair(phantom)
    got = metrics.slice_metrics(gt, pred)
    assert set(got) == {"nmse", "psnr", "ssim"}
    for s in range(gt.shape[0]):
        slice_max = gt[s].max()
        assert got["nmse"][s] == pytest.approx(fastmri_nmse(gt[s], pred[s]), rel=RTOL)
        assert got["psnr"][s] == pytest.approx(
            peak_signal_noise_ratio(gt[s], pred[s], data_range=slice_max), rel=RTOL
        )
        assert got["ssim"][s] == pytest.approx(
            structural_similarity(gt[s], pred[s], data_range=slice_max), rel=RTOL
        )

    # The volume convention scores every slice against the volume max instead.
    with_volume_max = metrics.psnr_per_slice(gt, pred, gt.max()).numpy()
    shift = 20 * np.log10(gt.max(axis=(1, 2)) / gt.max())
    np.testing.assert_allclose(np.array(got["psnr"]) - with_volume_max, shift, atol=1e-9)
    assert shift[2] < -20  # the dim slice loses ~26 dB under the slice convention

    ssim_volume_max = metrics.ssim_per_slice(gt, pred, gt.max())
    assert metrics.ssim(gt, pred) == pytest.approx(ssim_volume_max.mean().item(), rel=1e-12)
    assert abs(metrics.ssim(gt, pred) - float(np.mean(got["ssim"]))) > 1e-2


def tiny_volume(shape: tuple[int, int, int] = (9, 10, 11)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 3D blob on a positive background and a noisy copy of it."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    gt = np.exp(-2 * sum(g**2 for g in grids)) + 0.05 * (1 + grids[0])
    rng = np.random.default_rng(3)
    return gt, gt + rng.normal(0.0, 0.03, gt.shape)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_3d_volume_metrics_match_skimage_slice_by_slice(axis):
    gt, pred = tiny_volume()
    maxval = gt.max()
    slices = np.moveaxis(gt, axis, 0), np.moveaxis(pred, axis, 0)
    expected_ssim = np.mean(
        [structural_similarity(g, p, data_range=maxval) for g, p in zip(*slices, strict=True)]
    )
    expected = {
        "nmse": fastmri_nmse(gt, pred),
        "psnr": float(peak_signal_noise_ratio(gt, pred, data_range=maxval)),
        "ssim": float(expected_ssim),
    }
    assert metrics.volume_metrics(gt, pred, axis=axis) == pytest.approx(expected, rel=RTOL)
    assert metrics.ssim(gt, pred, axis=axis) == pytest.approx(expected["ssim"], rel=RTOL)
    assert metrics.ssim(gt, pred, 2.0, axis) == pytest.approx(
        np.mean(
            [structural_similarity(g, p, data_range=2.0) for g, p in zip(*slices, strict=True)]
        ),
        rel=RTOL,
    )
    per_slice = metrics.slice_metrics(gt, pred, axis=axis)
    assert len(per_slice["ssim"]) == gt.shape[axis]
    for index, (g, p) in enumerate(zip(*slices, strict=True)):
        assert per_slice["ssim"][index] == pytest.approx(
            structural_similarity(g, p, data_range=g.max()), rel=RTOL
        )
        assert per_slice["psnr"][index] == pytest.approx(
            peak_signal_noise_ratio(g, p, data_range=g.max()), rel=RTOL
        )


def test_3d_ssim_depends_on_the_slice_axis():
    # The blob is anisotropic along axis 0, so slicing another way gives another mean SSIM;
    # PSNR and NMSE are whole-volume numbers and do not change.
    gt, pred = tiny_volume()
    by_axis = [metrics.volume_metrics(gt, pred, axis=axis) for axis in range(3)]
    assert len({round(m["ssim"], 9) for m in by_axis}) == 3
    assert all(m["psnr"] == by_axis[0]["psnr"] and m["nmse"] == by_axis[0]["nmse"] for m in by_axis)


def test_default_axis_is_the_fastmri_slice_axis(phantom):
    gt, pred = volume_pair(phantom)
    for axis in (0, -3):
        assert metrics.volume_metrics(gt, pred, axis=axis) == metrics.volume_metrics(gt, pred)
        assert metrics.ssim(gt, pred, axis=axis) == metrics.ssim(gt, pred)
        assert metrics.slice_metrics(gt, pred, axis=axis) == metrics.slice_metrics(gt, pred)


def test_3d_slices_smaller_than_the_window_are_refused():
    gt = np.ones((8, 8, 5))
    # Along axis 2 the slices are 8x8; along axis 0 they are 8x5, too small for 7x7.
    assert metrics.ssim(gt, gt, axis=2) == pytest.approx(1.0)
    with pytest.raises(CvxmriError, match=r"at least 7x7.*got 8x5"):
        metrics.ssim(gt, gt, axis=0)


def test_identical_images():
    gt = torch.rand(3, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gt += 0.1
    assert metrics.ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert metrics.nmse(gt, gt) == 0.0
    assert metrics.psnr(gt, gt) == math.inf
    expected = {"nmse": 0.0, "psnr": math.inf, "ssim": 1.0}
    assert metrics.volume_metrics(gt, gt) == pytest.approx(expected, abs=1e-12)
    assert torch.isinf(metrics.psnr_per_slice(gt, gt, 1.0)).all()
    torch.testing.assert_close(
        metrics.ssim_per_slice(gt, gt, 1.0), torch.ones(3, dtype=torch.float64)
    )
    assert metrics.slice_metrics(gt, gt)["psnr"] == [math.inf] * 3


@pytest.mark.parametrize("offset", [0.1, -0.25, 3.0])
def test_constant_offset_psnr(offset):
    gt = torch.rand(2, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pred = gt + offset
    got = metrics.psnr_per_slice(gt, pred, 2.5)
    expected = 20 * math.log10(2.5 / abs(offset))
    torch.testing.assert_close(got, torch.full((2,), expected, dtype=torch.float64))
    expected_volume = 20 * math.log10(gt.max().item() / abs(offset))
    assert metrics.psnr(gt, pred) == pytest.approx(expected_volume, rel=1e-12)


def test_nmse_of_zero_prediction_is_one(phantom):
    gt, _ = volume_pair(phantom)
    assert metrics.nmse(gt, np.zeros_like(gt)) == pytest.approx(1.0, rel=1e-14)
    np.testing.assert_allclose(metrics.nmse_per_slice(gt, np.zeros_like(gt)).numpy(), 1.0)


def test_ssim_is_symmetric(phantom):
    gt, pred = noisy_pair(phantom, (37, 53), 1.0, seed=6)
    forward = metrics.ssim_per_slice(gt, pred, 1.3).item()
    assert forward < 0.9
    assert metrics.ssim_per_slice(pred, gt, 1.3).item() == pytest.approx(forward, rel=1e-13)


def test_ssim_of_constant_images():
    # Zero variances leave SSIM = (2ab + C1) / (a² + b² + C1), with C1 = (0.01 R)².
    a, b, r = 0.3, 0.7, 1.0
    got = metrics.ssim_per_slice(np.full((8, 10), a), np.full((8, 10), b), r).item()
    c1 = (0.01 * r) ** 2
    assert got == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-12)


def test_batch_matches_one_image_at_a_time(phantom):
    pairs = [noisy_pair(phantom, (30, 41), scale, seed=10 + i) for i, scale in enumerate(SCALES)]
    gt = torch.from_numpy(np.stack([g for g, _ in pairs]))
    pred = torch.from_numpy(np.stack([p for _, p in pairs]))
    ranges = gt.amax(dim=(1, 2))
    batched = {
        "ssim": metrics.ssim_per_slice(gt, pred, ranges),
        "psnr": metrics.psnr_per_slice(gt, pred, ranges),
        "nmse": metrics.nmse_per_slice(gt, pred),
    }
    for i in range(len(pairs)):
        single = {
            "ssim": metrics.ssim_per_slice(gt[i], pred[i], ranges[i]),
            "psnr": metrics.psnr_per_slice(gt[i], pred[i], ranges[i].item()),
            "nmse": metrics.nmse_per_slice(gt[i], pred[i]),
        }
        for name, value in single.items():
            assert value.shape == (1,)
            assert batched[name][i].item() == pytest.approx(value.item(), rel=1e-13), name


def test_ssim_per_slice_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    gt = torch.rand(2, 8, 9, dtype=torch.float64, generator=gen)
    pred = torch.rand(2, 8, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: metrics.ssim_per_slice(gt, p, 1.0), (pred,))


def _ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.float64)


def _with(value: float, *shape: int) -> torch.Tensor:
    x = _ones(*shape)
    x[0, 3, 3] = value
    return x


BAD_CALLS = {
    "shape mismatch": lambda: metrics.ssim_per_slice(_ones(2, 8, 8), _ones(2, 8, 9), 1.0),
    "nan in gt": lambda: metrics.ssim_per_slice(_with(math.nan, 1, 8, 8), _ones(1, 8, 8), 1.0),
    "inf in pred": lambda: metrics.psnr(_ones(1, 8, 8), _with(math.inf, 1, 8, 8)),
    "2x2 image": lambda: metrics.ssim_per_slice(_ones(2, 2), _ones(2, 2), 1.0),
    "2x2 volume": lambda: metrics.nmse(_ones(3, 2, 2), _ones(3, 2, 2)),
    "zero data range": lambda: metrics.ssim_per_slice(_ones(8, 8), _ones(8, 8), 0.0),
    "negative data range": lambda: metrics.psnr_per_slice(_ones(8, 8), _ones(8, 8), -1.0),
    "nan data range": lambda: metrics.ssim(_ones(1, 8, 8), _ones(1, 8, 8), math.nan),
    "zero volume max": lambda: metrics.psnr(torch.zeros(2, 8, 8), _ones(2, 8, 8)),
    "zero slice max": lambda: metrics.slice_metrics(
        torch.stack((_ones(8, 8), 0 * _ones(8, 8))), _ones(2, 8, 8)
    ),
    "all-zero gt nmse": lambda: metrics.nmse(torch.zeros(1, 8, 8), _ones(1, 8, 8)),
    "wrong range shape": lambda: metrics.ssim_per_slice(_ones(2, 8, 8), _ones(2, 8, 8), _ones(3)),
    "volume range not scalar": lambda: metrics.psnr(_ones(2, 8, 8), _ones(2, 8, 8), _ones(2)),
    "2D volume": lambda: metrics.ssim(_ones(8, 8), _ones(8, 8)),
    "4D slices": lambda: metrics.ssim_per_slice(_ones(1, 1, 8, 8), _ones(1, 1, 8, 8), 1.0),
    "no slices": lambda: metrics.nmse_per_slice(_ones(0, 8, 8), _ones(0, 8, 8)),
    "complex": lambda: metrics.volume_metrics(np.ones((1, 8, 8), complex), np.ones((1, 8, 8))),
    "axis out of range": lambda: metrics.ssim(_ones(8, 8, 8), _ones(8, 8, 8), axis=3),
    "axis not an int": lambda: metrics.volume_metrics(_ones(8, 8, 8), _ones(8, 8, 8), axis=1.0),
    "axis a bool": lambda: metrics.slice_metrics(_ones(8, 8, 8), _ones(8, 8, 8), axis=True),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises(call):
    with pytest.raises(CvxmriError):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(phantom):
    gt, pred = volume_pair(phantom)
    gt_cpu, pred_cpu = torch.from_numpy(gt), torch.from_numpy(pred)
    gt_gpu, pred_gpu = gt_cpu.cuda().float(), pred_cpu.cuda().float()
    gt_cpu, pred_cpu = gt_gpu.cpu(), pred_gpu.cpu()
    ranges = gt_cpu.amax(dim=(1, 2))
    for fn in (metrics.ssim_per_slice, metrics.psnr_per_slice):
        on_gpu = fn(gt_gpu, pred_gpu, ranges.cuda())
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float64
        torch.testing.assert_close(on_gpu.cpu(), fn(gt_cpu, pred_cpu, ranges), rtol=RTOL, atol=0)
    # A NumPy prediction follows the ground truth onto the GPU.
    pred_np = pred_cpu.numpy()
    assert metrics.volume_metrics(gt_gpu, pred_np) == pytest.approx(
        metrics.volume_metrics(gt_cpu, pred_cpu), rel=RTOL
    )
    on_gpu = metrics.slice_metrics(gt_gpu, pred_gpu)
    on_cpu = metrics.slice_metrics(gt_cpu, pred_cpu)
    for name, values in on_cpu.items():
        assert on_gpu[name] == pytest.approx(values, rel=RTOL), name
