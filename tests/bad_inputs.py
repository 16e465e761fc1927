"""The bad-input corpus: every case runs the real command line and must end with one line
``cvxmri: error: ...`` naming the problem, exit status 2, no traceback, no output folder
left behind, and no pickle payload executed.

A case runs through `cvxmri.cli.main` in the test's own process (stderr, the logging
handlers, the working folder and the ``CVXMRI_`` environment as a fresh process has them),
which spares each case the second or two of starting Python and importing torch; the cases
of ``FRESH_PROCESS`` also run as ``python -m cvxmri.cli`` in a new process, so the real
entry point is covered for every command family.

`tests/test_bad_inputs.py` runs the cases; ``.venv/bin/python tests/bad_inputs.py`` runs
them too and writes the table of messages to docs/robustness.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HEADER = (
    b'<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    b"<encodedSpace><matrixSize><x>32</x><y>32</y><z>1</z></matrixSize></encodedSpace>"
    b"<reconSpace><matrixSize><x>32</x><y>32</y><z>1</z></matrixSize></reconSpace>"
    b"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>31</maximum>"
    b"<center>16</center></kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>"
)


class Payload:
    """A pickle that creates a marker file when loaded (it must never be loaded)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@dataclass(frozen=True)
class Case:
    """One bad input: ``setup(workdir, good_data)`` prepares files and returns the argv."""

    name: str
    description: str
    setup: Callable[[Path, Path], list[str]]
    expected: str


def _file_dataset(work: Path, **datasets: object) -> Path:
    """A dataset root whose test split holds one file with these datasets."""
    folder = work / "data" / "multicoil_test"
    folder.mkdir(parents=True)
    with h5py.File(folder / "bad.h5", "w") as hf:
        for key, value in datasets.items():
            hf.create_dataset(key, data=value)
    return work / "data"


def _kspace(value: complex | None = None, index: tuple[int, ...] = (0, 0, 3, 3)) -> np.ndarray:
    kspace = (np.random.default_rng(0).normal(size=(2, 3, 32, 32)) + 0j).astype(np.complex64)
    if value is not None:
        kspace[index] = value
    return kspace


def _evaluate(
    data: Path, work: Path, *extra: str, mask: tuple[str, ...] = ("--mask", "cartesian")
) -> list[str]:
    return [
        "evaluate",
        "--data",
        str(data),
        "--method",
        "zero-filled",
        *mask,
        "--out",
        str(work / "out"),
        *extra,
    ]


def _copy_good(work: Path, good: Path) -> Path:
    shutil.copytree(good, work / "data", ignore=shutil.ignore_patterns("cache"))
    return work / "data"


def _truncated(work: Path, good: Path) -> list[str]:
    data = _copy_good(work, good)
    target = next((data / "multicoil_test").glob("*.h5"))
    target.write_bytes(target.read_bytes()[:2000])
    return _evaluate(data, work)


def _not_hdf5(work: Path, good: Path) -> list[str]:
    data = _copy_good(work, good)
    next((data / "multicoil_test").glob("*.h5")).write_text("this is a text file")
    return _evaluate(data, work)


def _tiny_train(good: Path, out: Path) -> list[str]:
    return [
        "train",
        "--preset",
        "tiny",
        "--calib-size",
        "6",
        "--data",
        str(good),
        "--out",
        str(out),
    ]


def _batch_too_big(work: Path, good: Path) -> list[str]:
    return [*_tiny_train(good, work / "out"), "--batch-size", "100000000"]


def _batch_too_big_default_folder(work: Path, good: Path) -> list[str]:
    """Without --out the run would go to runs/<method>-<mask>-<time>/ under ``work``."""
    return ["train", "--preset", "tiny", "--data", str(good), "--batch-size", "100000000"]


def _report_of_training_run(work: Path, good: Path) -> list[str]:
    from cvxmri.config import save_yaml
    from cvxmri.training.config import preset

    (work / "run").mkdir()
    save_yaml(preset("tiny"), work / "run" / "config.yaml")
    return ["report", str(work / "run")]


def _checkpoint_with_payload(work: Path, good: Path) -> list[str]:
    out = work / "run"
    (out / "checkpoints").mkdir(parents=True)
    args = _tiny_train(good, out)
    from cvxmri.cli import _train_config, build_parser
    from cvxmri.config import save_yaml

    save_yaml(_train_config(build_parser().parse_args(args)), out / "config.yaml")
    torch.save(
        {"format": "cvxmri.checkpoint/1", "x": Payload(work / "PAYLOAD_RAN")},
        out / "checkpoints" / "last.pt",
    )
    return [*args, "--resume"]


def _model_with_payload(work: Path, good: Path) -> list[str]:
    path = work / "evil.pt"
    torch.save({"format": "cvxmri.ReconCNN/1", "x": Payload(work / "PAYLOAD_RAN")}, path)
    return ["evaluate", "--data", str(good), "--model", str(path), "--out", str(work / "out")]


def _other_configuration(work: Path, good: Path) -> list[str]:
    out = work / "run"
    out.mkdir()
    (out / "config.yaml").write_text("method: end-to-end\nlayers: 9\n")
    return [*_tiny_train(good, out), "--resume"]


def _saved_run(good: Path, out: Path, *options: str) -> list[str]:
    """A run folder holding the config.yaml of a tiny run (as `train` writes it, no
    checkpoint); the argv resuming it with ``options``."""
    from cvxmri.cli import _train_config, build_parser
    from cvxmri.config import save_yaml

    out.mkdir()
    save_yaml(_train_config(build_parser().parse_args(_tiny_train(good, out))), out / "config.yaml")
    return ["train", "--out", str(out), "--resume", *options]


def _resume_other_option(work: Path, good: Path) -> list[str]:
    return _saved_run(good, work / "run", "--lr", "0.01")


def _resume_more_layerwise_epochs(work: Path, good: Path) -> list[str]:
    return _saved_run(good, work / "run", "--epochs", "5")


def _yaml(text: str) -> Callable[[Path, Path], list[str]]:
    def setup(work: Path, good: Path) -> list[str]:
        (work / "c.yaml").write_text(text)
        return [
            "train",
            "--config",
            str(work / "c.yaml"),
            "--data",
            str(good),
            "--out",
            str(work / "out"),
        ]

    return setup


def _args(*argv: str) -> Callable[[Path, Path], list[str]]:
    def setup(work: Path, good: Path) -> list[str]:
        return [a.replace("{good}", str(good)).replace("{work}", str(work)) for a in argv]

    return setup


def _datasets(*extra: str, **datasets: object) -> Callable[[Path, Path], list[str]]:
    def setup(work: Path, good: Path) -> list[str]:
        return _evaluate(_file_dataset(work, **datasets), work, *extra)

    return setup


def _volume3d(folder: Path, **datasets: object) -> Path:
    """A 3D volume file (attribute dims=3) in ``folder`` with these datasets, or a valid
    small one when none are given."""
    from cvxmri.data.volume3d import Volume3D, rss_volume, write_volume3d

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad3d.h5"
    if not datasets:
        kspace = _kspace().reshape(3, 4, 16, 32)
        write_volume3d(path, Volume3D(kspace, rss_volume(kspace)))
        return path
    with h5py.File(path, "w") as hf:
        for key, value in datasets.items():
            hf.create_dataset(key, data=value)
        hf.attrs["dims"] = 3
    return path


def _evaluate3d(data: Path, work: Path, *extra: str) -> list[str]:
    return _evaluate(data, work, *extra, mask=("--mask", "poisson", "--calib-size", "4"))


def _datasets3d(**datasets: object) -> Callable[[Path, Path], list[str]]:
    def setup(work: Path, good: Path) -> list[str]:
        _volume3d(work / "data" / "multicoil_test", **datasets)
        return _evaluate3d(work / "data", work)

    return setup


def _kspace3d(value: complex | None = None) -> np.ndarray:
    kspace = _kspace().reshape(3, 4, 16, 32)
    if value is not None:
        kspace[0, 1, 2, 3] = value
    return kspace


def _2d_where_3d_expected(work: Path, good: Path) -> list[str]:
    return _evaluate3d(_copy_good(work, good), work, "--dims", "3")


def _3d_where_2d_expected(work: Path, good: Path) -> list[str]:
    for split in ("train", "val"):
        _volume3d(work / "data" / f"multicoil_{split}")
    return _tiny_train(work / "data", work / "out")


def _train3d(*extra: str) -> Callable[[Path, Path], list[str]]:
    """True 3D training on a dataset root of small valid 3D volumes (train and val)."""

    def setup(work: Path, good: Path) -> list[str]:
        for split in ("train", "val"):
            _volume3d(work / "data" / f"multicoil_{split}")
        data, mask = str(work / "data"), ["--mask", "poisson", "--calib-size", "4"]
        out = ["--out", str(work / "out")]
        return ["train", "--dims", "3", "--preset", "tiny", *mask, "--data", data, *out, *extra]

    return setup


def _3d_line_mask(work: Path, good: Path) -> list[str]:
    _volume3d(work / "data" / "multicoil_test")
    return _evaluate(work / "data", work)


def _mixed_2d_3d(work: Path, good: Path) -> list[str]:
    data = _copy_good(work, good)
    _volume3d(data / "multicoil_test")
    return _evaluate3d(data, work)


def _empty_folder(work: Path, good: Path) -> list[str]:
    (work / "data" / "multicoil_test").mkdir(parents=True)
    return _evaluate(work / "data", work)


def _junk_nifti(work: Path, good: Path) -> list[str]:
    (work / "junk.nii.gz").write_bytes(b"not a nifti")
    return ["data", "simulate", "--nifti", str(work / "junk.nii.gz"), "--out", str(work / "out")]


def _existing_dataset(work: Path, good: Path) -> list[str]:
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("keep")
    return ["data", "simulate", "--out", str(work / "out")]


def _predict(model: str, data: Path, work: Path, *extra: str) -> list[str]:
    return ["predict", "--model", model, "--data", str(data), "--out", str(work / "out"), *extra]


def _predict_fails_midway(work: Path, good: Path) -> list[str]:
    """A good volume first, then one with NaN k-space: the good one's file, written to a
    temporary name, must not be left behind either."""
    data = _copy_good(work, good)
    bad = data / "multicoil_test" / "zz_nan.h5"
    shutil.copy(next((data / "multicoil_test").glob("*.h5")), bad)
    with h5py.File(bad, "r+") as hf:
        kspace = hf["kspace"][()]
        kspace[0, 0, 0, 0] = np.nan
        hf["kspace"][...] = kspace
    return _predict("zero-filled", data, work, "--mask", "cartesian", "--nifti")


def _predict_run_without_model(work: Path, good: Path) -> list[str]:
    (work / "run").mkdir()
    (work / "run" / "config.yaml").write_text("method: end-to-end\n")
    return _predict(str(work / "run"), good, work)


def _predict_existing_outputs(work: Path, good: Path) -> list[str]:
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("keep")
    name = next((good / "multicoil_test").glob("*.h5")).name
    (work / "out" / name).write_text("an earlier reconstruction")
    return _predict("zero-filled", good, work, "--mask", "cartesian")


def _predict_same_names(work: Path, good: Path) -> list[str]:
    source = next((good / "multicoil_test").glob("*.h5"))
    for kind in ("multicoil_test", "singlecoil_test"):
        (work / "data" / kind).mkdir(parents=True)
        shutil.copy(source, work / "data" / kind / "same.h5")
    return _predict("zero-filled", work / "data", work)


def _one_test_file(good: Path) -> str:
    return str(next((good / "multicoil_test").glob("*.h5")))


def _reproduce_one_file(work: Path, good: Path) -> list[str]:
    return [
        "reproduce",
        "--preset",
        "tiny",
        "--data",
        _one_test_file(good),
        "--out",
        str(work / "out"),
    ]


def _train_one_file(work: Path, good: Path) -> list[str]:
    return ["train", "--preset", "tiny", "--data", _one_test_file(good), "--out", str(work / "out")]


def _nifti_as_data(work: Path, good: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import phantom_nifti

    nifti = phantom_nifti(work / "anatomical.nii.gz", depth=8)
    return ["train", "--preset", "tiny", "--data", str(nifti), "--out", str(work / "out")]


def _phantom(work: Path, depth: int) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import phantom_nifti

    return str(phantom_nifti(work / "head.nii.gz", depth=depth))


def _simulate_small(slab: str) -> Callable[[Path, Path], list[str]]:
    def setup(work: Path, good: Path) -> list[str]:
        nifti = _phantom(work, 24 if slab else 6)
        extra = ["--slab-slices", slab] if slab else []
        return [
            "data",
            "simulate",
            "--nifti",
            nifti,
            "--matrix",
            "24",
            "--coils",
            "3",
            *extra,
            "--out",
            str(work / "out"),
        ]

    return setup


def _four_d(*extra: str) -> Callable[[Path, Path], list[str]]:
    def setup(work: Path, good: Path) -> list[str]:
        import nibabel as nib

        data = nib.load(_phantom(work, 24)).get_fdata()
        frames = np.stack([data, data], axis=-1).astype(np.float32)
        nib.save(nib.Nifti1Image(frames, np.eye(4)), work / "fmri.nii.gz")
        nifti = str(work / "fmri.nii.gz")
        return [
            "data",
            "simulate",
            "--nifti",
            nifti,
            "--matrix",
            "24",
            *extra,
            "--out",
            str(work / "out"),
        ]

    return setup


def _simulate_without_out(work: Path, good: Path) -> list[str]:
    return ["data", "simulate", "--nifti", _phantom(work, 24)]


BROKEN_HEADER = HEADER.replace(b"<reconSpace><matrixSize><x>32</x>", b"<reconSpace><matrixSize>")
CASES = [
    Case(
        "missing-hdf5",
        "data info on a file that does not exist",
        _args("data", "info", "{work}/missing.h5"),
        "no such file",
    ),
    Case(
        "not-hdf5",
        "a text file where an HDF5 file should be",
        _not_hdf5,
        "not a readable HDF5 file",
    ),
    Case(
        "truncated-hdf5",
        "an HDF5 file cut after 2000 bytes",
        _truncated,
        "not a readable HDF5 file",
    ),
    Case(
        "no-kspace",
        "an HDF5 file without a kspace dataset",
        _datasets(reconstruction_rss=np.ones((2, 32, 32), np.float32)),
        "no 'kspace' dataset",
    ),
    Case(
        "kspace-ndim",
        "k-space with 2 dimensions",
        _datasets(kspace=np.ones((32, 32), np.complex64)),
        "kspace must be",
    ),
    Case(
        "kspace-real",
        "real-valued k-space",
        _datasets(kspace=np.ones((2, 3, 32, 32))),
        "kspace must be complex",
    ),
    Case(
        "kspace-nan",
        "NaN in k-space",
        _datasets(kspace=_kspace(np.nan), ismrmrd_header=HEADER),
        "NaN or Inf",
    ),
    Case(
        "kspace-inf",
        "Inf in k-space",
        _datasets(kspace=_kspace(np.inf), ismrmrd_header=HEADER),
        "NaN or Inf",
    ),
    Case(
        "mask-shape",
        "a 'mask' dataset of 30 columns beside k-space of 32",
        _datasets(kspace=_kspace(), ismrmrd_header=HEADER, mask=np.ones(30, bool)),
        "mask has shape (30,) but kspace is 32x32",
    ),
    Case(
        "mask-file-missing",
        "--mask file on a file without a 'mask' dataset",
        _datasets("--mask", "file", kspace=_kspace(), ismrmrd_header=HEADER),
        "the file has no 'mask' dataset",
    ),
    Case(
        "batch-too-big",
        "train with a batch whose step cannot fit in memory",
        _batch_too_big,
        "a training step at batch size 100000000 needs about",
    ),
    Case(
        "kspace-zero",
        "all-zero k-space",
        _datasets(kspace=np.zeros((2, 3, 32, 32), np.complex64), ismrmrd_header=HEADER),
        "all zeros",
    ),
    Case(
        "header-missing-field",
        "ISMRMRD header without the recon matrix x",
        _datasets(kspace=_kspace(), ismrmrd_header=BROKEN_HEADER),
        "ismrmrd_header has no",
    ),
    Case(
        "header-not-xml",
        "ISMRMRD header that is not XML",
        _datasets(kspace=_kspace(), ismrmrd_header=b"<ismrmrd"),
        "not valid XML",
    ),
    Case(
        "header-kspace-mismatch",
        "header matrix 32x32, k-space 32x24",
        _datasets(kspace=np.ones((2, 3, 32, 24), np.complex64), ismrmrd_header=HEADER),
        "does not match kspace",
    ),
    Case(
        "target-shape",
        "reconstruction_rss of another shape than the recon matrix",
        _datasets(
            kspace=_kspace(),
            ismrmrd_header=HEADER,
            reconstruction_rss=np.ones((2, 30, 30), np.float32),
        ),
        "expected (2, 32, 32)",
    ),
    Case("empty-data-folder", "a data folder with no HDF5 files", _empty_folder, "no .h5 files"),
    Case(
        "missing-data-folder",
        "a data folder that does not exist",
        _args("evaluate", "--data", "{work}/nothing", "--out", "{work}/out"),
        "data folder does not exist",
    ),
    Case(
        "accel-one",
        "acceleration 1",
        _args("evaluate", "--data", "{good}", "--accel", "1", "--out", "{work}/out"),
        "acceleration must be",
    ),
    Case(
        "accel-below-one",
        "acceleration 0.5",
        _args("train", "--accel", "0.5", "--out", "{work}/out"),
        "acceleration must be",
    ),
    Case(
        "accel-not-number",
        "acceleration 'four'",
        _args("evaluate", "--accel", "four", "--out", "{work}/out"),
        "not a number",
    ),
    Case(
        "centre-fraction-high",
        "centre fraction 1.5",
        _args("evaluate", "--center-fraction", "1.5", "--out", "{work}/out"),
        "center_fraction must be in (0, 1)",
    ),
    Case(
        "centre-fraction-zero",
        "centre fraction 0",
        _args("train", "--center-fraction", "0", "--out", "{work}/out"),
        "center_fraction must be in (0, 1)",
    ),
    Case(
        "poisson-unreachable",
        "Poisson disc 100x with a 16x16 calibration on a 24x24 grid",
        _args(
            "evaluate",
            "--data",
            "{good}",
            "--mask",
            "poisson",
            "--accel",
            "100",
            "--out",
            "{work}/out",
        ),
        "unreachable",
    ),
    Case(
        "train-device-missing",
        "train on a CUDA device that is not there (checked before the run folder is made)",
        _args(
            "train",
            "--preset",
            "tiny",
            "--data",
            "{good}",
            "--device",
            "cuda:99",
            "--out",
            "{work}/out",
        ),
        "device cuda:99 requested but",
    ),
    Case(
        "train-fails-default-folder",
        "a failing train run without --out (no runs/<method>-<mask>-<time>/ left)",
        _batch_too_big_default_folder,
        "a training step at batch size 100000000 needs about",
    ),
    Case(
        "reproduce-device-missing",
        "reproduce on a CUDA device that is not there",
        _args(
            "reproduce",
            "--preset",
            "tiny",
            "--data",
            "{good}",
            "--device",
            "cuda:99",
            "--out",
            "{work}/out",
        ),
        "device cuda:99 requested but",
    ),
    Case(
        "evaluate-cg-lambda-negative",
        "evaluate CG-SENSE with a negative Tikhonov weight",
        _args(
            "evaluate",
            "--data",
            "{good}",
            "--method",
            "cg-sense",
            "--cg-lambda",
            "-1",
            "--out",
            "{work}/out",
        ),
        "CG-SENSE lambda must be a non-negative number, got -1.0",
    ),
    Case(
        "evaluate-device-missing",
        "evaluate on a CUDA device that is not there",
        _args(
            "evaluate",
            "--data",
            "{good}",
            "--method",
            "zero-filled",
            "--device",
            "cuda:99",
            "--out",
            "{work}/out",
        ),
        "device cuda:99 requested but",
    ),
    Case(
        "report-training-run",
        "cvxmri report on a training run's folder",
        _report_of_training_run,
        "a training run, not a reproduce folder",
    ),
    Case("unknown-preset", "preset 'huge'", _args("train", "--preset", "huge"), "unknown preset"),
    Case(
        "yaml-unknown-key",
        "YAML config with a misspelt key",
        _yaml("optim:\n  epoks: 3\n"),
        "unknown key(s) epoks",
    ),
    Case(
        "yaml-wrong-type",
        "YAML config with layers: five",
        _yaml("layers: five\n"),
        "expected an integer",
    ),
    Case("yaml-syntax", "YAML that does not parse", _yaml("layers: [1, 2\n"), "not valid YAML"),
    Case(
        "yaml-gate-pool",
        "YAML config with convex.gate_pool: 0 (no candidate to keep)",
        _yaml("convex:\n  gate_pool: 0\n"),
        "gate_pool must be an integer >= 1, got 0",
    ),
    Case(
        "unrolled-shared-greedy",
        "shared regulariser weights with greedy (layer-wise) training of an unrolled network",
        _args("train", "--arch", "unrolled", "--shared-weights", "--data", "{good}"),
        "shared weights need method end-to-end",
    ),
    Case(
        "unrolled-convex-cg",
        "greedy convex training of an unrolled network with CG data consistency (not linear)",
        _args(
            "train",
            "--arch",
            "unrolled",
            "--dc",
            "cg",
            "--method",
            "layerwise-convex",
            "--data",
            "{good}",
        ),
        "needs a linear data consistency",
    ),
    Case(
        "unrolled-direct-poisson",
        "the direct (per readout line) data consistency with a Poisson-disc mask",
        _args("train", "--arch", "unrolled", "--dc", "direct", "--data", "{good}"),
        "direct needs 2D images and a mask constant along the readout",
    ),
    Case(
        "unrolled-eta",
        "a gradient data-consistency step of length 2.5 (diverges beyond 2)",
        _yaml("arch: unrolled\nunrolled:\n  dc:\n    eta: 2.5\n"),
        "dc.eta=2.5",
    ),
    Case(
        "unrolled-iterations-zero",
        "an unrolled network of 0 iterations",
        _args("train", "--arch", "unrolled", "--iterations", "0", "--data", "{good}"),
        "--iterations",
    ),
    Case(
        "output-not-writable",
        "an output folder below a regular file",
        _args(
            "train",
            "--preset",
            "tiny",
            "--calib-size",
            "6",
            "--data",
            "{good}",
            "--out",
            "{good}/manifest.json/run",
        ),
        "cannot create the run folder",
    ),
    Case(
        "other-configuration",
        "--resume of a run started with another configuration",
        _other_configuration,
        "another configuration",
    ),
    Case(
        "resume-other-option",
        "--resume of a run with an option that changes its configuration (--lr)",
        _resume_other_option,
        "optim.lr: 0.001 -> 0.01",
    ),
    Case(
        "resume-more-layerwise-epochs",
        "--resume of a layer-wise run with more --epochs",
        _resume_more_layerwise_epochs,
        "only supported for end-to-end",
    ),
    Case(
        "resume-without-out",
        "--resume without the run folder (--out)",
        _args("train", "--resume"),
        "--resume needs --out",
    ),
    Case(
        "checkpoint-payload",
        "a checkpoint carrying a pickle payload meant to run code",
        _checkpoint_with_payload,
        "not a readable cvxmri checkpoint",
    ),
    Case(
        "model-payload",
        "a model file carrying a pickle payload meant to run code",
        _model_with_payload,
        "not a cvxmri model file",
    ),
    Case(
        "nifti-missing",
        "simulate from a NIfTI file that does not exist",
        _args("data", "simulate", "--nifti", "{work}/none.nii.gz", "--out", "{work}/out"),
        "no such file",
    ),
    Case(
        "nifti-junk", "simulate from a file that is not NIfTI", _junk_nifti, "cannot read as NIfTI"
    ),
    Case(
        "dataset-exists",
        "simulate into a non-empty folder without --force",
        _existing_dataset,
        "already exists",
    ),
    Case(
        "snr-negative",
        "simulate with SNR -3",
        _args("data", "simulate", "--snr", "-3"),
        "invalid simulation setting snr",
    ),
    Case(
        "simulate-nifti-without-out",
        "simulate from one's own NIfTI without --out (it would land in data/default)",
        _simulate_without_out,
        "--nifti needs --out DIR",
    ),
    Case(
        "simulate-too-small",
        "a volume with room for one slab of the --slab-slices given",
        _simulate_small("6"),
        "need one slab each",
    ),
    Case(
        "simulate-too-small-for-any-slab",
        "a volume of 6 slices: too few for a slab per split even one slice thick",
        _simulate_small(""),
        "2 usable slices",
    ),
    Case(
        "simulate-split-ratio-zero",
        "--split-ratio 0:0:0",
        _args("data", "simulate", "--split-ratio", "0:0:0", "--out", "{work}/out"),
        "at least one split needs a share",
    ),
    Case(
        "nifti-4d-without-frame",
        "simulate from a 4D NIfTI without --frame",
        _four_d(),
        "a 4D volume of 2 frames",
    ),
    Case(
        "nifti-frame-out-of-range",
        "--frame 2 of a 4D NIfTI of 2 frames",
        _four_d("--frame", "2"),
        "frame 2 out of range (the volume has 2 frames: 0 to 1)",
    ),
    Case(
        "data-file-missing",
        "--data naming an .h5 file that does not exist",
        _args("evaluate", "--data", "{work}/some/file.h5", "--out", "{work}/out"),
        "file.h5: no such file",
    ),
    Case(
        "data-nifti",
        "--data naming a NIfTI volume (image data, not k-space)",
        _nifti_as_data,
        "a NIfTI image volume, not fastMRI k-space",
    ),
    Case(
        "train-one-file-without-val",
        "train on one .h5 file without --val-data",
        _train_one_file,
        "is not a dataset root with a val split",
    ),
    Case(
        "reproduce-one-file",
        "reproduce --data on one .h5 file (it needs the three splits)",
        _reproduce_one_file,
        "one file, not a dataset root",
    ),
    Case(
        "reproduce3d-amp",
        "reproduce --preset quick3d with a 2D preset's option (--amp)",
        _args("reproduce", "--preset", "quick3d", "--amp", "--out", "{work}/out"),
        "reproduce --preset quick3d does not take --amp",
    ),
    Case(
        "reproduce3d-every-depth",
        "reproduce --preset quick3d with the 2D comparison's --every-depth",
        _args("reproduce", "--preset", "quick3d", "--no-every-depth", "--out", "{work}/out"),
        "reproduce --preset quick3d does not take --every-depth",
    ),
    Case(
        "reproduce3d-2d-data",
        "reproduce --preset quick3d on a 2D dataset root",
        _args("reproduce", "--preset", "quick3d", "--data", "{good}", "--out", "{work}/out"),
        "a 2D file; quick3d needs 3D volume files",
    ),
    Case(
        "reproduce3d-missing-file",
        "reproduce --preset quick3d --data on a missing .h5 file",
        _args("reproduce", "--preset", "quick3d", "--data", "{work}/x.h5", "--out", "{work}/out"),
        "x.h5: no such file (a missing --data is simulated as a dataset root",
    ),
    Case(
        "data-info-folder",
        "data info on a folder",
        _args("data", "info", "{good}/multicoil_test"),
        "a folder; 'data info' takes one .h5 file",
    ),
    Case(
        "predict-model-missing",
        "predict with a model that is neither a file, a run folder nor a method",
        _args("predict", "--model", "{work}/nothing", "--data", "{good}", "--out", "{work}/out"),
        "no such model file or run folder (or a classical method: zero-filled, cs, cg-sense)",
    ),
    Case(
        "predict-run-without-model",
        "predict with a run folder that has no model.pt (unfinished training)",
        _predict_run_without_model,
        "a folder without model.pt",
    ),
    Case(
        "predict-device-missing",
        "predict on a CUDA device that is not there",
        _args(
            "predict",
            "--model",
            "zero-filled",
            "--data",
            "{good}",
            "--device",
            "cuda:99",
            "--out",
            "{work}/out",
        ),
        "device cuda:99 requested but",
    ),
    Case(
        "predict-fails-midway",
        "predict where the second volume has NaN k-space (no file of the first left)",
        _predict_fails_midway,
        "NaN or Inf",
    ),
    Case(
        "predict-existing-outputs",
        "predict into a folder that already holds a file of an output's name",
        _predict_existing_outputs,
        "already holds",
    ),
    Case(
        "predict-same-names",
        "predict on a dataset root whose multicoil and singlecoil splits share a name",
        _predict_same_names,
        "two volumes named same.h5",
    ),
    Case(
        "predict-two-masks",
        "predict with two --mask (one reconstruction per volume)",
        _args(
            "predict",
            "--model",
            "cs",
            "--data",
            "{good}",
            "--mask",
            "poisson",
            "--mask",
            "cartesian",
            "--out",
            "{work}/out",
        ),
        "predict takes one --mask",
    ),
    Case(
        "3d-no-kspace",
        "a 3D volume file (dims=3) without a kspace dataset",
        _datasets3d(reconstruction_rss=np.ones((4, 16, 32), np.float32)),
        "no 'kspace' dataset",
    ),
    Case(
        "3d-kspace-rank",
        "a 3D volume file whose k-space has 3 axes, not (coils, kx, ky, kz)",
        _datasets3d(kspace=np.ones((4, 16, 32), np.complex64)),
        "3D kspace must be (coils, kx, ky, kz)",
    ),
    Case(
        "3d-kspace-nan",
        "NaN in the k-space of a 3D volume file",
        _datasets3d(kspace=_kspace3d(np.nan)),
        "kspace contains NaN or Inf values",
    ),
    Case(
        "3d-target-shape",
        "a 3D volume file whose reconstruction_rss is not the k-space grid",
        _datasets3d(kspace=_kspace3d(), reconstruction_rss=np.ones((4, 16, 30), np.float32)),
        "reconstruction_rss has shape (4, 16, 30), expected (4, 16, 32)",
    ),
    Case(
        "2d-file-3d-expected",
        "evaluate --dims 3 on 2D multi-slice files",
        _2d_where_3d_expected,
        "not a 3D volume file (no attribute dims=3)",
    ),
    Case(
        "3d-file-2d-expected",
        "2D training on 3D volume files",
        _3d_where_2d_expected,
        "a 3D volume file (attribute dims=3",
    ),
    Case(
        "3d-line-mask",
        "a 1D (cartesian) mask on 3D volumes",
        _3d_line_mask,
        "3D masks are drawn over (ky, kz)",
    ),
    Case(
        "3d-mixed-folder",
        "a split holding both 2D multi-slice and 3D volume files",
        _mixed_2d_3d,
        "mixes 2D multi-slice and 3D volume files",
    ),
    Case(
        "train-3d-true-on-2d-data",
        "true 3D training (train --dims 3) on 2D multi-slice data",
        _args("train", "--dims", "3", "--data", "{good}", "--out", "{work}/out"),
        "not a 3D volume file (no attribute dims=3)",
    ),
    Case(
        "train-3d-patch-too-large",
        "train --dims 3 with a patch side larger than the volumes (4x16x32)",
        _train3d("--crop", "5"),
        "crop 5: a 5x5x5 patch does not fit in the 4x16x32 volumes",
    ),
    Case(
        "train-3d-unrolled-convex-cg",
        "true 3D greedy convex training of the unrolled network with CG data consistency",
        _train3d("--arch", "unrolled", "--dc", "cg"),
        "greedy convex training needs a linear data consistency",
    ),
    Case(
        "train-3d-on-2d-data",
        "train --dims 3 --decoupled on 2D multi-slice data",
        _args("train", "--dims", "3", "--decoupled", "--data", "{good}", "--out", "{work}/out"),
        "not a 3D volume file; --dims 3 takes 3D data",
    ),
    Case(
        "simulate-3d-2d-option",
        "data simulate --dims 3 with the 2D option --slice-step",
        _args("data", "simulate", "--dims", "3", "--slice-step", "3", "--out", "{work}/out"),
        "apply to 2D data only",
    ),
    Case(
        "simulate-2d-3d-matrix",
        "data simulate (2D) with a 3D matrix XxYxZ",
        _args("data", "simulate", "--matrix", "24x16x16", "--out", "{work}/out"),
        "2D data take one size N",
    ),
]


# Cases that also run in a new process (`run_case` with ``fresh``): one per command family,
# with an argparse error, a corrupt file, a pickle payload and a failure midway among them.
FRESH_PROCESS = (
    "not-hdf5",
    "accel-not-number",
    "train-fails-default-folder",
    "checkpoint-payload",
    "predict-fails-midway",
    "simulate-too-small",
    "reproduce-one-file",
    "3d-kspace-nan",
)


@dataclass
class Outcome:
    """What one case printed and left behind."""

    returncode: int
    stderr: str
    payload_ran: bool
    out_exists: bool  # ``work/out`` (unless it was there before) or ``work/runs``


def run_case(case: Case, work: Path, good: Path, fresh: bool = False) -> Outcome:
    """Set the case up in ``work`` and run it: in this process, or (``fresh``) as
    ``python -m cvxmri.cli`` in a new one."""
    argv = case.setup(work, good)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVXMRI_")}
    if fresh:
        result = subprocess.run(
            [sys.executable, "-m", "cvxmri.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            cwd=work,
        )
        returncode, stderr = result.returncode, result.stderr
    else:
        returncode, stderr = _run_in_process(argv, work, env)
    return Outcome(
        returncode,
        stderr,
        (work / "PAYLOAD_RAN").exists(),
        ((work / "out").exists() and not (work / "out" / "keep.txt").exists())
        or (work / "runs").exists(),
    )


def _run_in_process(argv: list[str], work: Path, env: dict[str, str]) -> tuple[int, str]:
    """``cvxmri.cli.main(argv)`` in ``work`` with environment ``env``, its stderr captured,
    and the root logger without handlers (as in a new process, so that `main` installs its
    own console handler on the captured stderr); everything is restored afterwards."""
    from cvxmri.cli import main

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    stderr = io.StringIO()
    try:
        root.handlers = []
        os.environ.clear()
        os.environ.update(env)
        os.chdir(work)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                returncode = main(argv)
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
                returncode = code if isinstance(code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers, root.level = saved_handlers, saved_level
    return returncode, stderr.getvalue()


def write_doc(rows: list[tuple[Case, Outcome]]) -> None:
    """docs/robustness.md: every case with the message it gives."""
    lines = [
        "# Robustness: the bad-input corpus",
        "",
        "Every case runs the `cvxmri` command line (`tests/bad_inputs.py`, checked by",
        "`tests/test_bad_inputs.py`; in the test's process, and some also in a fresh one)",
        "and must exit with status 2 and one line on stderr that",
        "names the problem: no traceback (unless `--debug`), no output folder left behind, and",
        "no pickle payload executed. Regenerate this page with",
        "`.venv/bin/python tests/bad_inputs.py`. Paths are shortened to their last parts.",
        "",
        "| case | input | message |",
        "|---|---|---|",
    ]
    for case, outcome in rows:
        message = outcome.stderr.strip().replace("|", "\\|")
        message = " ".join(_short(word) for word in message.split(" "))
        lines.append(f"| {case.name} | {case.description} | `{message}` |")
    (ROOT / "docs" / "robustness.md").write_text("\n".join(lines) + "\n")


def _short(word: str) -> str:
    if word.startswith("/") and len(word) > 30:
        return (
            ".../"
            + "/".join(word.rstrip(":").split("/")[-2:])
            + (":" if word.endswith(":") else "")
        )
    return word


def main() -> None:
    """Run every case and write docs/robustness.md."""
    import tempfile

    from cvxmri.data.simulate import SimulationConfig, load_nifti, simulate_dataset

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import phantom_nifti

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        source = load_nifti(phantom_nifti(base / "head.nii.gz", depth=120))
        simulate_dataset(
            [source], base / "good", SimulationConfig(matrix=24, coils=3, slab_slices=2)
        )
        rows = []
        for case in CASES:
            work = base / case.name
            work.mkdir()
            rows.append((case, run_case(case, work, base / "good")))
            print(f"{case.name}: {rows[-1][1].stderr.strip()}")
    write_doc(rows)


if __name__ == "__main__":
    main()
