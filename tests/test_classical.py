"""The classical baselines: CS with random wavelet shifts, the earlier CS solver, CG-SENSE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cvxmri.data.sample import make_sample
from cvxmri.errors import CvxmriError
from cvxmri.evaluate import EvaluateConfig, classical_reconstructor
from cvxmri.physics import Sense, fft2c
from cvxmri.recon import (
    CLASSICAL_METHODS,
    CGSenseConfig,
    CSConfig,
    cg_sense,
    compressed_sensing,
    cs_l1_wavelet,
    cs_l1_wavelet_shifted,
)
from cvxmri.recon.classical import wavelet_levels, wavelet_soft_threshold


def crandn(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(*shape, generator=generator)
    imag = torch.randn(*shape, generator=generator)
    return torch.complex(real, imag)


def smooth_image(size: int, seed: int) -> torch.Tensor:
    """A (1, size, size) complex image: a smooth blob with a sharp-edged square in it."""
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    blob = torch.exp(-(xx**2 + yy**2) * 3) + 0.5 * ((xx.abs() < 0.3) & (yy.abs() < 0.3))
    phase = torch.exp(1j * (0.5 * xx + 0.2 * yy + seed))
    return (blob * phase).to(torch.complex64)[None]


def normalised_maps(coils: int, size: int, seed: int) -> torch.Tensor:
    """(1, coils, size, size) random coil maps with ``sum_c |S_c|^2 = 1`` everywhere."""
    maps = crandn(1, coils, size, size, seed=seed)
    return maps / (maps.abs() ** 2).sum(dim=1, keepdim=True).sqrt()


def undersampled(size: int = 32, coils: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(kspace, maps, mask, image) of a multi-coil problem, every other line and the centre
    sampled."""
    image = smooth_image(size, seed)
    maps = normalised_maps(coils, size, seed)
    mask = torch.zeros(1, 1, size, size)
    mask[..., ::2] = 1
    mask[..., size // 2 - 3 : size // 2 + 3] = 1
    kspace = fft2c(maps * image[:, None]) * mask
    return kspace, maps, mask, image


# ------------------------------------------------------------------ CS with random shifts


def test_shifted_cs_with_lamda_zero_and_full_sampling_returns_the_image() -> None:
    image = smooth_image(32, 0)
    maps = torch.ones(1, 1, 32, 32, dtype=torch.complex64)
    mask = torch.ones(1, 1, 32, 32)
    kspace = fft2c(image[:, None])
    for iterations in (1, 5):
        result = cs_l1_wavelet_shifted(
            kspace, maps, mask, CSConfig(lamda=0.0, iterations=iterations)
        )
        torch.testing.assert_close(result, image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
def test_shifted_cs_soft_thresholds_a_constant_image(wavelet: str) -> None:
    """A constant image has one non-zero wavelet band, the coarse one, at ``c 2**levels``
    whatever the shift; with ``A^H A = I`` and step 1, every FISTA iteration returns the
    soft threshold of the image, so CS gives ``c (1 - lamda / (2**levels |c|))``."""
    size, value = 16, 2.0 + 1.0j
    levels = wavelet_levels((size, size), wavelet)
    assert levels == (4 if wavelet == "haar" else 1)
    image = torch.full((1, size, size), value, dtype=torch.complex64)
    kspace = fft2c(image[:, None])
    maps = torch.ones(1, 1, size, size, dtype=torch.complex64)
    mask = torch.ones(1, 1, size, size)
    coarse = abs(value) * 2**levels
    for lamda in (0.1 * coarse, 0.7 * coarse):
        config = CSConfig(lamda=lamda, iterations=7, wavelet=wavelet)
        result = cs_l1_wavelet_shifted(kspace, maps, mask, config)
        expected = image * (1 - lamda / coarse)
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    killed = cs_l1_wavelet_shifted(kspace, maps, mask, CSConfig(lamda=1.5 * coarse, iterations=3))
    assert float(killed.abs().max()) == 0.0


def test_the_wavelet_threshold_varies_with_the_shift_up_to_the_coarsest_block() -> None:
    """Shifting a decimated wavelet changes the threshold's result (hence cycle spinning),
    except by a multiple of the coarsest block ``2**levels``, which is why the shifts are
    drawn below it."""
    image = smooth_image(32, 1)
    threshold = torch.tensor([0.05])
    levels = wavelet_levels((32, 32), "db4")
    block = 2**levels
    plain = wavelet_soft_threshold(image, threshold, "db4", levels)
    assert not torch.allclose(
        wavelet_soft_threshold(image, threshold, "db4", levels, (1, 0)), plain
    )
    assert not torch.allclose(
        wavelet_soft_threshold(image, threshold, "db4", levels, (0, 3)), plain
    )
    wrapped = wavelet_soft_threshold(image, threshold, "db4", levels, (block, 2 * block))
    torch.testing.assert_close(wrapped, plain, atol=1e-6, rtol=0)
    # Threshold 0: the orthonormal transform and its inverse give the image back.
    zero = torch.zeros(1)
    torch.testing.assert_close(
        wavelet_soft_threshold(image, zero, "db4", levels, (5, 2)), image, atol=1e-5, rtol=0
    )


def test_shifted_cs_reconstructs_an_undersampled_image() -> None:
    """Small lamda: data consistent to the noise-free measurements, and far closer to the
    image than the zero-filled one."""
    kspace, maps, mask, image = undersampled()
    result = cs_l1_wavelet_shifted(kspace, maps, mask, CSConfig(lamda=1e-4, iterations=200))
    sense = Sense(maps, mask)
    residual = float((sense(result) - kspace).norm() / kspace.norm())
    assert residual < 0.02
    error = float((result - image).norm() / image.norm())
    zero_filled = float((sense.adjoint(kspace) - image).norm() / image.norm())
    assert error < 0.5 * zero_filled


def test_shifted_cs_is_repeatable_and_leaves_the_global_generators_alone() -> None:
    kspace, maps, mask, _ = undersampled()
    config = CSConfig(lamda=1e-2, iterations=20)
    np.random.seed(123)  # noqa: NPY002 (the legacy global generator is what must stay put)
    torch.manual_seed(123)
    numpy_state, torch_state = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    first = cs_l1_wavelet_shifted(kspace, maps, mask, config)
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(a, b) for a, b in zip(numpy_state, after, strict=True))
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.random.seed(7)  # noqa: NPY002 (another global state: the same result)
    torch.manual_seed(7)
    second = cs_l1_wavelet_shifted(kspace, maps, mask, config)
    assert torch.equal(first, second)
    other_seed = cs_l1_wavelet_shifted(
        kspace, maps, mask, CSConfig(lamda=1e-2, iterations=20, seed=1)
    )
    assert not torch.equal(first, other_seed)


def test_a_slice_gets_the_same_shifted_cs_alone_and_in_a_batch() -> None:
    parts = [undersampled(seed=seed) for seed in (0, 1)]
    kspace, maps, mask = (torch.cat([p[i] for p in parts]) for i in range(3))
    maps[1] *= 0.8  # another step size in the batch
    kspace[1] *= 0.8
    config = CSConfig(lamda=1e-2, iterations=15)
    batch = cs_l1_wavelet_shifted(kspace, maps, mask, config)
    for index in range(2):
        alone = cs_l1_wavelet_shifted(
            kspace[index : index + 1], maps[index : index + 1], mask[index : index + 1], config
        )
        torch.testing.assert_close(batch[index : index + 1], alone, atol=1e-6, rtol=1e-5)


def test_compressed_sensing_picks_the_solver_by_shifts() -> None:
    """``shifts=False`` is the earlier solver, sigpy's `L1WaveletRecon` seeded with 0, as
    before; the default is the shifted solver, which differs from it."""
    import sigpy.mri

    kspace, maps, mask, image = undersampled()
    sample = make_sample(kspace, mask, maps, (32, 32), target=image)
    config = CSConfig(lamda=1e-2, iterations=20)
    old = compressed_sensing(sample, CSConfig(lamda=1e-2, iterations=20, shifts=False))
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(0)  # noqa: NPY002 (sigpy draws its power iteration from it)
    app = sigpy.mri.app.L1WaveletRecon(
        sample.y[0].numpy(),
        maps[0].numpy(),
        1e-2,
        weights=np.broadcast_to(mask[0].numpy(), kspace[0].shape).astype(np.float32),
        max_iter=20,
        show_pbar=False,
    )
    direct = torch.from_numpy(np.asarray(app.run(), dtype=np.complex64))[None]
    np.random.set_state(state)  # noqa: NPY002
    torch.testing.assert_close(old, direct * sample.support[:, 0], atol=1e-6, rtol=0)
    new = compressed_sensing(sample, config)
    torch.testing.assert_close(new, cs_l1_wavelet_shifted(sample.y, maps, mask, config))
    assert not torch.allclose(new, old, atol=1e-3)
    assert torch.equal(
        cs_l1_wavelet(sample.y, maps, mask, CSConfig(lamda=1e-2, iterations=20)),
        cs_l1_wavelet(sample.y, maps, mask, CSConfig(lamda=1e-2, iterations=20)),
    )


# ------------------------------------------------------------------------------ CG-SENSE


def test_cg_sense_with_full_sampling_returns_the_image() -> None:
    image = smooth_image(32, 2)
    maps = normalised_maps(4, 32, 2)
    mask = torch.ones(1, 1, 32, 32)
    sample = make_sample(fft2c(maps * image[:, None]), mask, maps, (32, 32), target=image)
    result = cg_sense(sample, CGSenseConfig(lamda=0.0, iterations=3))
    torch.testing.assert_close(result * sample.scale, image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lamda", [0.0, 0.05])
def test_cg_sense_solves_the_normal_equations(lamda: float) -> None:
    kspace, maps, mask, image = undersampled(size=16, coils=3)
    sample = make_sample(kspace, mask, maps, (16, 16), target=image)
    x = cg_sense(sample, CGSenseConfig(lamda=lamda, iterations=30))
    sense = Sense(maps, mask)
    rhs = sense.adjoint(sample.y)
    residual = sense.adjoint(sense(x)) + lamda * x - rhs
    assert float(residual.norm() / rhs.norm()) < 1e-4
    few = cg_sense(sample, CGSenseConfig(lamda=lamda, iterations=2))
    assert float((sense.adjoint(sense(few)) + lamda * few - rhs).norm() / rhs.norm()) > 1e-3


def test_cg_sense_crops_to_the_recon_matrix() -> None:
    """On a larger k-space grid the image is solved on the recon matrix (`recon_sense`)."""
    kspace, maps, mask, _ = undersampled(size=32, coils=3)
    sample = make_sample(kspace, mask, maps, (16, 24))
    result = cg_sense(sample, CGSenseConfig(iterations=4))
    assert result.shape == (1, 16, 24)


# ------------------------------------------------------------------------ wiring


def test_classical_methods_and_their_settings() -> None:
    assert CLASSICAL_METHODS == ("zero-filled", "cs", "cg-sense")
    assert CSConfig().shifts is True
    kspace, maps, mask, image = undersampled(size=16, coils=2)
    sample = make_sample(kspace, mask, maps, (16, 16), target=image)
    cg = CGSenseConfig(lamda=0.01, iterations=3)
    torch.testing.assert_close(
        classical_reconstructor("cg-sense", CSConfig(), cg)(sample), cg_sense(sample, cg)
    )
    with pytest.raises(CvxmriError, match="unknown method 'sense'"):
        classical_reconstructor("sense", CSConfig())
    for bad, message in (
        (EvaluateConfig(methods=["cg"]), "unknown method 'cg'"),
        (EvaluateConfig(cg_sense=CGSenseConfig(lamda=-1.0)), "CG-SENSE lambda must be"),
        (EvaluateConfig(cg_sense=CGSenseConfig(iterations=0)), "CG-SENSE iterations must be"),
        (EvaluateConfig(cs=CSConfig(wavelet="bior2.2")), "unknown CS wavelet 'bior2.2'"),
    ):
        with pytest.raises(CvxmriError, match=message):
            bad.validate()


def test_reproduce_takes_the_classical_weights_per_mask(tmp_path: Path) -> None:
    """``classical_by_mask`` replaces the weights for its masks only, survives a YAML round
    trip, and a key that is not a mask key is a one-line error."""
    from cvxmri.config import from_dict, to_dict
    from cvxmri.masks import MaskSpec
    from cvxmri.reproduce import (
        CLASSICAL_BY_MASK,
        MaskClassical,
        ReproduceConfig,
        classical_settings,
    )

    config = ReproduceConfig(data=str(tmp_path / "data"))
    poisson, cartesian = config.masks
    cs, cg = classical_settings(config, cartesian)
    tuned = CLASSICAL_BY_MASK["cartesian-4x"]
    assert (cs.lamda, cg.lamda, cg.iterations) == (
        tuned.cs_lamda,
        tuned.cg_lamda,
        tuned.cg_iterations,
    )
    assert cs.iterations == config.cs.iterations and cs.shifts
    assert classical_settings(config, poisson)[0].lamda == CLASSICAL_BY_MASK["poisson-4x"].cs_lamda
    other = MaskSpec("poisson", 8.0)
    assert classical_settings(config, other) == (config.cs, config.cg_sense)
    loaded = from_dict(ReproduceConfig, to_dict(config))
    assert loaded.classical_by_mask == config.classical_by_mask
    assert isinstance(loaded.classical_by_mask["poisson-4x"], MaskClassical)
    none = ReproduceConfig(data=str(tmp_path / "data"), classical_by_mask={})
    assert classical_settings(none, cartesian) == (none.cs, none.cg_sense)
    bad = ReproduceConfig(
        data=str(tmp_path / "data"),
        classical_by_mask={"posson-4x": CLASSICAL_BY_MASK["poisson-4x"]},
    )
    with pytest.raises(CvxmriError, match="'posson-4x' is not a mask key"):
        bad.validate()
    negative = ReproduceConfig(
        data=str(tmp_path / "data"),
        classical_by_mask={
            "cartesian-4x": MaskClassical(cs_lamda=-1.0, cg_lamda=0.0, cg_iterations=3)
        },
    )
    with pytest.raises(CvxmriError, match="CS lambda must be a positive number"):
        negative.validate()
    with pytest.raises(CvxmriError, match="expected an integer"):
        from_dict(
            ReproduceConfig,
            {
                "classical_by_mask": {
                    "poisson-4x": {"cs_lamda": 1e-3, "cg_lamda": 0, "cg_iterations": 2.5}
                }
            },
        )
