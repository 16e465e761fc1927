"""The torch ESPIRiT (`cvxmri.data.espirit`) against sigpy's ``EspiritCalib``.

Agreement is measured as in `projection_difference`: the part of the torch maps outside
the span of sigpy's map, pixel by pixel, relative to the torch maps (Frobenius norms over
all coils and pixels); it is blind to a per-pixel phase, which maps are only defined up
to. The support (pixels where a map is non-zero: ESPIRiT's crop) is compared separately.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from cvxmri.data.espirit import espirit
from cvxmri.data.prepare import EspiritConfig, espirit_maps
from cvxmri.data.simulate import SimulationConfig, birdcage_maps, simulate_slice
from cvxmri.errors import CvxmriError

MATRIX, COILS = 64, 6


def projection_difference(maps: np.ndarray, reference: np.ndarray) -> float:
    """``||(I - P) m||_F / ||m||_F`` of maps ``m`` (C, H, W), with ``P`` at each pixel the
    orthogonal projection onto the reference map there (zero where it is zero, so maps
    outside the reference's support count in full)."""
    norm = np.linalg.norm(reference, axis=0, keepdims=True)
    unit = np.divide(reference, norm, out=np.zeros_like(reference), where=norm > 0)
    projected = unit * (unit.conj() * maps).sum(axis=0, keepdims=True)
    return float(np.linalg.norm(maps - projected) / np.linalg.norm(maps))


def support(maps: np.ndarray) -> np.ndarray:
    """Where the maps are non-zero (H, W)."""
    return np.abs(maps).sum(axis=0) > 0


def slices(count: int) -> np.ndarray:
    """Multi-coil k-space (count, C, H, W) of ellipses of different sizes and phases."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:MATRIX, :MATRIX] - MATRIX / 2
    coils = birdcage_maps(COILS, (MATRIX, MATRIX))
    config = SimulationConfig(matrix=MATRIX, coils=COILS)
    out = []
    for i in range(count):
        radius = (yy / (0.38 - 0.04 * i) / MATRIX) ** 2 + (xx / (0.3 + 0.03 * i) / MATRIX) ** 2
        image = ((radius < 1) * (0.6 + 0.4 * np.cos(xx / 4.0) ** 2)).astype(np.float32)
        out.append(simulate_slice(image, coils, config, rng))
    return np.stack(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one torch thread spares OpenMP's overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kspace() -> np.ndarray:
    return slices(2)


@pytest.fixture(scope="module")
def reference(kspace: np.ndarray) -> np.ndarray:
    return espirit_maps(kspace, EspiritConfig(backend="sigpy"))


def test_torch_maps_agree_with_sigpy(kspace: np.ndarray, reference: np.ndarray) -> None:
    maps = espirit_maps(kspace, EspiritConfig())
    assert maps.shape == kspace.shape and maps.dtype == np.complex64
    for ours, theirs in zip(maps, reference, strict=True):
        assert projection_difference(ours, theirs) < 0.01
        # Same phase convention (coil 0 real and non-negative): the maps agree as they are.
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 0.01
        # Same crop: the support is a proper part of the image, the same one.
        assert 0.2 < support(theirs).mean() < 0.9
        assert np.mean(support(ours) != support(theirs)) < 0.002
    # The measure sees a wrong map: coils swapped.
    assert projection_difference(maps[0][::-1], reference[0]) > 0.1


@pytest.mark.parametrize("calib_width", [24, 16])  # more, fewer patches than columns
def test_batched_equals_per_slice(kspace: np.ndarray, calib_width: int) -> None:
    batched = espirit(torch.from_numpy(kspace), calib_width)
    for i, k in enumerate(kspace):
        single = espirit(torch.from_numpy(k[None]), calib_width)[0]
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-5)
    # Slices of a batch are independent: different inputs, different maps.
    assert (batched[0] - batched[1]).abs().max() > 0.01
    # Small chunks of pixels give the same maps as one chunk.
    torch.testing.assert_close(
        espirit(torch.from_numpy(kspace), calib_width, chunk_pixels=1000),
        batched,
        rtol=0,
        atol=1e-5,
    )


def test_odd_grid_and_small_calibration(kspace: np.ndarray) -> None:
    k = kspace[0, :, 1:, :-2]  # 63 x 62
    config = EspiritConfig(calib_width=16)
    ours = espirit_maps(k, config)
    theirs = espirit_maps(k, EspiritConfig(calib_width=16, backend="sigpy"))
    assert projection_difference(ours, theirs) < 0.01
    assert np.mean(support(ours) != support(theirs)) < 0.002


def test_backend_is_in_the_cache_tag() -> None:
    assert EspiritConfig().tag() != EspiritConfig(backend="sigpy").tag()
    assert "torch" in EspiritConfig().tag()
    with pytest.raises(CvxmriError, match="unknown ESPIRiT backend 'bart'"):
        EspiritConfig(backend="bart")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(kspace: np.ndarray) -> None:
    cpu = espirit_maps(kspace, EspiritConfig())
    cuda = espirit_maps(kspace, EspiritConfig(), device="cuda")
    for ours, theirs in zip(cuda, cpu, strict=True):
        assert projection_difference(ours, theirs) < 1e-3


def test_no_signal_gives_zero_maps() -> None:
    maps = espirit(torch.zeros(1, 4, 32, 32, dtype=torch.complex64), calib_width=16)
    assert torch.equal(maps, torch.zeros_like(maps))  # not NaN, as 0 / 0 would give
