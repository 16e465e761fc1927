"""The `cvxmri` command line.

Errors in the user's input end the command with one line on stderr, ``cvxmri: error: ...``,
and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from cvxmri.errors import CvxmriError

log = logging.getLogger("cvxmri")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cvxmri: error: {message} (see '{self.prog} --help')\n")


_DATA_HELP = (
    "dataset root (multicoil_<split>/), flat folder of .h5 files or one .h5 file "
    "(default %(default)s)"
)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _split_ratio(text: str) -> tuple[int, int, int]:
    """``TRAIN:VAL:TEST`` of integers >= 0, not all 0 (``3:1:1``)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected TRAIN:VAL:TEST such as 3:1:1, got {text!r}")
    train, val, test = (int(part) for part in parts)
    if train + val + test == 0:
        raise argparse.ArgumentTypeError(f"at least one split needs a share, got {text!r}")
    return train, val, test


def _matrix(text: str) -> tuple[int, ...]:
    """``N`` (a square matrix in 2D, a cube in 3D) or ``XxYxZ`` (3D: readout, ky, kz)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 3) or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected N or XxYxZ such as 80x96x80, got {text!r}")
    values = tuple(int(part) for part in parts)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"matrix sizes must be >= 1, got {text!r}")
    return values


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_mask_options(parser: argparse.ArgumentParser, train: bool = False) -> None:
    """--mask, --accel, --center-fraction and --calib-size; without them, the values of the
    --config file, else (train) of the preset, else the defaults named in the help."""

    def default(value: str) -> str:
        return (
            f"default: the --config file's, else the preset's ({value} but tiny: 6)"
            if (train and value == "16")
            else f"default: the --config file's, else {value}"
        )

    parser.add_argument(
        "--mask",
        action="append",
        choices=("poisson", "cartesian", "equispaced", "file"),
        help="sampling pattern (default: the --config file's, else poisson)"
        if train
        else "sampling pattern; repeat for several (default: the --config file's, else "
        "poisson and cartesian); file: the 'mask' dataset stored in each HDF5 file",
    )
    parser.add_argument("--accel", type=_number, help=f"acceleration R ({default('4')})")
    parser.add_argument(
        "--center-fraction",
        type=_number,
        help=f"fully sampled centre fraction of the 1D masks ({default('0.04')})",
    )
    parser.add_argument(
        "--calib-size",
        type=_positive_int,
        help=f"side of the fully sampled centre of the Poisson-disc mask ({default('16')})",
    )


def _mask_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The `MaskSpec` parameters given on the command line (not their defaults)."""
    given = {
        "acceleration": args.accel,
        "center_fraction": args.center_fraction,
        "calib_size": None if args.calib_size is None else (args.calib_size, args.calib_size),
    }
    return {name: value for name, value in given.items() if value is not None}


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """``--debug`` and ``-v``; sub-commands take them too, with ``argparse.SUPPRESS`` as
    their default so that they never reset an option given before the sub-command."""
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log progress details"
    )


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every sub-command below ``parser`` (``data simulate``, ``train``...)."""
    leaves = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                leaves += _leaf_parsers(sub) or [sub]
    return leaves


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from cvxmri import __version__
    from cvxmri.models.dc import DC_KINDS

    parser = _Parser(prog="cvxmri", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cvxmri {__version__}")
    _add_global_options(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="build and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    simulate = data_commands.add_parser(
        "simulate", help="simulate multi-coil fastMRI-layout k-space from NIfTI volumes"
    )
    simulate.add_argument(
        "--nifti",
        action="append",
        type=Path,
        help="magnitude volume to simulate from; repeat for several "
        "(default: Colin27 and MNI152, installed offline)",
    )
    simulate.add_argument(
        "--out",
        type=Path,
        help="dataset root (default data/default; required with --nifti)",
    )
    simulate.add_argument(
        "--frame",
        type=_nonnegative_int,
        help="the frame (0, 1, ...) of 4D --nifti volumes to simulate from",
    )
    simulate.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=2,
        help="2: multi-slice fastMRI files; 3: 3D volumes, kspace (coils, kx, ky, kz), one "
        "slab along the readout per file (default 2)",
    )
    simulate.add_argument(
        "--matrix",
        type=_matrix,
        help="recon matrix: N (2D, default 128) or XxYxZ, readout first (3D, default 80x96x80)",
    )
    simulate.add_argument("--coils", type=_positive_int, default=8, help="number of coils")
    simulate.add_argument("--snr", type=_number, default=30.0, help="SNR of the combined image")
    simulate.add_argument(
        "--readout-oversampling", type=_positive_int, help="2D: default 1 (fastMRI knee: 2)"
    )
    simulate.add_argument(
        "--slice-step", type=_positive_int, help="2D: use every n-th slice (default 2)"
    )
    simulate.add_argument(
        "--slab-slices",
        type=_positive_int,
        help="slices per file (slab) (default 6, fewer when the volumes are too small for "
        "every split to get one); 3D: readout positions per file (default 12)",
    )
    simulate.add_argument(
        "--guard-slices",
        type=_nonnegative_int,
        help="slices (3D: readout positions) dropped between neighbouring slabs (default 2; 3D: 4)",
    )
    simulate.add_argument(
        "--split-ratio",
        type=_split_ratio,
        default=(3, 1, 1),
        help="slabs of train:val:test, assigned cyclically (default 3:1:1; 0:0:1: test only)",
    )
    simulate.add_argument("--seed", type=int, default=0, help="random seed")
    simulate.add_argument("--force", action="store_true", help="replace an existing dataset")

    prepare = data_commands.add_parser(
        "prepare", help="compute and cache the ESPIRiT coil maps of every split"
    )
    prepare.add_argument("--data", type=Path, default=Path("data/default"), help=_DATA_HELP)
    prepare.add_argument("--split", action="append", help="split(s) (default: all three)")
    prepare.add_argument(
        "--workers", type=_positive_int, default=1, help="files computed in parallel processes"
    )
    prepare.add_argument(
        "--backend", default="torch", help="ESPIRiT implementation: torch (default) or sigpy"
    )

    info = data_commands.add_parser("info", help="print what a fastMRI HDF5 file holds")
    info.add_argument("file", type=Path)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate reconstruction methods on a split (PSNR, SSIM, NMSE)"
    )
    evaluate.add_argument(
        "--method",
        action="append",
        help="zero-filled, cs or cg-sense; repeat for several (default: all three, also "
        "beside --model)",
    )
    evaluate.add_argument(
        "--model",
        action="append",
        type=Path,
        help="a trained network (model.pt, or its run folder), evaluated beside the "
        "methods; repeatable",
    )
    _add_mask_options(evaluate)
    evaluate.add_argument(
        "--data", type=Path, help=_DATA_HELP.replace("%(default)s", "data/default")
    )
    evaluate.add_argument(
        "--split", help="split of a dataset root (default test; flat folders: none)"
    )
    evaluate.add_argument(
        "--target", choices=("sense", "rss"), help="reference image (default sense)"
    )
    evaluate.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        help="refuse data that are not 2D multi-slice (2) or 3D volume (3) files "
        "(default: what the files are)",
    )
    evaluate.add_argument(
        "--device", help="where the networks run: cpu, cuda or auto (default cpu)"
    )
    _add_classical_options(evaluate)
    evaluate.add_argument(
        "--config",
        type=Path,
        help="YAML config (an evaluation's config.yaml is one); options given override it",
    )
    evaluate.add_argument("--out", type=Path, help="run folder (default runs/evaluate-<time>)")
    evaluate.add_argument("--force", action="store_true", help="replace an existing run folder")
    _add_predict_parser(commands)
    train = commands.add_parser(
        "train", help="train a network (layer-wise convex, layer-wise, end-to-end)"
    )
    train.add_argument(
        "--method",
        choices=("layerwise-convex", "layerwise-nonconvex", "end-to-end"),
        help="training method (default layerwise-convex)",
    )
    train.add_argument(
        "--preset", default="quick", help="quick (CPU, minutes), paper (GPU) or tiny"
    )
    train.add_argument(
        "--config",
        type=Path,
        help="YAML config over the preset (a run's config.yaml is one); options given override it",
    )
    _add_mask_options(train, train=True)
    train.add_argument(
        "--arch",
        choices=("cnn", "unrolled"),
        help="cnn (the paper's network, default) or unrolled (T iterations of a regulariser "
        "and data consistency; layer-wise methods train it one iteration at a time)",
    )
    train.add_argument(
        "--iterations", type=_positive_int, help="unrolled: iterations T (default 8)"
    )
    train.add_argument(
        "--dc",
        choices=DC_KINDS,
        help="unrolled: data consistency, a gradient step, CG-SENSE, the CG-SENSE step by "
        "a fixed Chebyshev polynomial (exactly linear), or solved exactly per readout line "
        "(direct: 2D, 1D Cartesian masks; default gradient)",
    )
    train.add_argument(
        "--dc-lamda",
        type=_number,
        help="unrolled: the proximal weight lambda of --dc cg, chebyshev or direct "
        "(default 0.05; smaller trusts the data more)",
    )
    train.add_argument(
        "--shared-weights",
        action="store_true",
        help="unrolled, end-to-end: one regulariser for all iterations",
    )
    train.add_argument("--layers", type=_positive_int, help="cnn: network depth k+1 (paper: 5)")
    train.add_argument(
        "--channels", type=_positive_int, help="hidden width (unrolled: of each regulariser)"
    )
    train.add_argument("--epochs", type=_positive_int, help="epochs (per stage for layer-wise)")
    train.add_argument("--lr", type=_number, help="Adam learning rate")
    train.add_argument("--batch-size", type=_positive_int, help="images (crops) per step")
    train.add_argument("--beta", type=_number, help="group-lasso weight of the convex stages")
    train.add_argument("--program", choices=("gated", "cone"), help="convex program of a stage")
    train.add_argument(
        "--solver",
        choices=("adam", "fista", "certified"),
        help="convex stages: adam (mini-batches, the paper), fista (full batch at --beta) or "
        "certified (beta path chosen on validation, each beta solved to a duality gap; "
        "default: the preset's, certified for quick, adam for paper, tiny and 3D)",
    )
    train.add_argument("--stage-cache", choices=("memory", "disk", "none"))
    train.add_argument(
        "--data",
        type=Path,
        help="training data: a dataset root, a flat folder of .h5 files or one file "
        "(default data/default)",
    )
    train.add_argument(
        "--val-data",
        type=Path,
        help="validation data, in the same forms (default: the val split of --data)",
    )
    train.add_argument(
        "--kernel",
        type=_positive_int,
        help="KxK kernels (3D: KxKxK; unrolled: of each regulariser; default: the preset's, "
        "3 in 3D; unrolled 2D: 5)",
    )
    train.add_argument(
        "--crop",
        type=_nonnegative_int,
        help="side of the random training crops, a cube's in 3D (0: whole images or volumes)",
    )
    train.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        help="3: train on 3D volume files (--data default data/default3d) with 3D "
        "convolutions on cubic patches (unrolled: whole volumes), or with --decoupled on "
        "their (ky, kz) planes",
    )
    train.add_argument(
        "--decoupled",
        action="store_true",
        help="with --dims 3: inverse-FFT the readout and train on every readout position's "
        "(ky, kz) plane as a 2D sample (the data's decoupled view, <data>/decoupled)",
    )
    train.add_argument(
        "--carry",
        action=argparse.BooleanOptionalAction,
        help="convex stages after the first keep an always-on pattern that starts at the "
        "previous depth's prediction (default: the preset's, on for quick)",
    )
    train.add_argument("--device", help="cpu, cuda or auto")
    train.add_argument("--amp", action="store_true", help="bf16 autocast")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--out", type=Path, help="run folder (default runs/<method>-<mask>-<time>)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its own config.yaml "
        "(end-to-end: --epochs N beyond the saved count extends a finished run)",
    )
    train.add_argument("--force", action="store_true", help="replace an existing run folder")
    _add_reproduce_parsers(commands)
    _add_benchmark_parsers(commands)
    for leaf in _leaf_parsers(parser):
        _add_global_options(leaf, argparse.SUPPRESS)
    return parser


def _add_classical_options(parser: argparse.ArgumentParser) -> None:
    """The settings of the classical methods: --cs-lambda, --cs-iterations, --cs-no-shifts,
    --cg-lambda and --cg-iterations (default: the --config file's, else the defaults)."""
    parser.add_argument("--cs-lambda", type=_number, help="CS l1-wavelet weight")
    parser.add_argument("--cs-iterations", type=_positive_int, help="CS iterations")
    parser.add_argument(
        "--cs-no-shifts",
        action="store_true",
        help="CS without random wavelet shifts (the earlier solver, sigpy's L1WaveletRecon)",
    )
    parser.add_argument("--cg-lambda", type=_number, help="CG-SENSE Tikhonov weight (>= 0)")
    parser.add_argument("--cg-iterations", type=_positive_int, help="CG-SENSE iterations")


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    """`cvxmri predict`."""
    predict = commands.add_parser(
        "predict",
        help="write reconstructions: one HDF5 per volume in fastMRI's submission layout",
    )
    predict.add_argument(
        "--model",
        required=True,
        help="a trained network (model.pt, or its run folder) or a classical method: "
        "zero-filled, cs or cg-sense",
    )
    predict.add_argument(
        "--data", type=Path, required=True, help=_DATA_HELP.replace(" (default %(default)s)", "")
    )
    predict.add_argument(
        "--out", type=Path, required=True, help="folder for the reconstructions (made if missing)"
    )
    predict.add_argument(
        "--split", default="test", help="split of a dataset root (default test; else none)"
    )
    predict.add_argument(
        "--mask",
        action="append",
        choices=("poisson", "cartesian", "equispaced", "file"),
        help="sampling pattern (default: each file's own 'mask' dataset when it has one, as "
        "fastMRI's test files do; else the network's training mask, else poisson); file: "
        "every file's own",
    )
    predict.add_argument(
        "--accel", type=_number, help="acceleration of drawn masks (default: training's, else 4)"
    )
    predict.add_argument(
        "--center-fraction",
        type=_number,
        help="fully sampled centre fraction of drawn 1D masks (default: training's, else 0.04)",
    )
    predict.add_argument(
        "--calib-size",
        type=_positive_int,
        help="side of the fully sampled centre of drawn Poisson-disc masks "
        "(default: training's, else 16)",
    )
    predict.add_argument(
        "--device", default="cpu", help="where a network runs: cpu, cuda or auto (default cpu)"
    )
    predict.add_argument(
        "--nifti", action="store_true", help="also write a .nii.gz per volume, for viewers"
    )
    _add_classical_options(predict)
    predict.add_argument(
        "--force", action="store_true", help="replace output files of the same names"
    )


def _add_reproduce_parsers(commands: argparse._SubParsersAction) -> None:
    """`cvxmri reproduce` and `cvxmri report`."""
    from cvxmri.models.dc import DC_KINDS

    reproduce = commands.add_parser(
        "reproduce",
        help="the paper's experiment in one command (resumable), with a report",
    )
    reproduce.add_argument(
        "--preset",
        choices=("quick", "paper", "tiny", "quick3d"),
        default="quick",
        help="quick (2 CPU cores, about 30 min), paper (GPU), tiny (tests) or quick3d "
        "(the 3D comparison on 3D volumes, 2 CPU cores)",
    )
    reproduce.add_argument(
        "--data",
        type=Path,
        help="dataset root, simulated when missing (default data/default; quick3d: data/default3d)",
    )
    reproduce.add_argument("--out", type=Path, help="folder (default runs/reproduce-<preset>)")
    reproduce.add_argument("--device", default="auto", help="cpu, cuda or auto")
    reproduce.add_argument("--amp", action="store_true", help="bf16 autocast in training")
    reproduce.add_argument(
        "--iterations",
        type=_nonnegative_int,
        help="T of the unrolled networks' comparison (default: the preset's, 12 for quick; "
        "0 leaves the comparison out)",
    )
    reproduce.add_argument(
        "--dc",
        choices=DC_KINDS,
        help="data consistency of the unrolled networks on every mask (default: per mask, "
        "direct for 1D Cartesian, gradient otherwise; cg leaves out greedy convex "
        "training, which needs a linear one: chebyshev and direct are)",
    )
    reproduce.add_argument(
        "--every-depth",
        action=argparse.BooleanOptionalAction,
        help="train end-to-end networks of every depth from 2 too, the end-to-end depth "
        "curve (default: the preset's; quick trains the full depth only, which saves minutes "
        "on 2 CPU cores)",
    )
    _benchmark_json_options(reproduce)
    reproduce.add_argument(
        "--force", action="store_true", help="start again in a folder begun with other settings"
    )
    report = commands.add_parser("report", help="rebuild the report of a reproduce folder")
    report.add_argument("folder", type=Path, help="the reproduce folder")
    _benchmark_json_options(report)


def _benchmark_json_options(parser: argparse.ArgumentParser) -> None:
    for kind in ("memory", "speed"):
        parser.add_argument(
            f"--{kind}-json",
            type=Path,
            help=f"a {kind} benchmark's JSON (cvxmri benchmark {kind}), shown in the report",
        )


def _benchmark_jsons(args: argparse.Namespace) -> dict[str, Path]:
    return {
        kind: path
        for kind, path in (("memory", args.memory_json), ("speed", args.speed_json))
        if path is not None
    }


def _mask_specs(args: argparse.Namespace, configured: Sequence[object]) -> list:
    """Evaluation masks: the kinds given with ``--mask`` (else the configured ones), each with
    the parameters given on the command line, else those of the configured mask of its
    kind, else the defaults."""
    from dataclasses import replace

    from cvxmri.masks import MaskSpec

    by_kind = {mask.kind: mask for mask in configured}  # type: ignore[attr-defined]
    kinds = args.mask or list(by_kind)
    specs = [
        replace(by_kind.get(kind) or MaskSpec(kind, 4.0), **_mask_overrides(args))
        for kind in dict.fromkeys(kinds)
    ]
    for spec in specs:
        spec.validate()
    return specs


def _cmd_simulate(args: argparse.Namespace) -> None:
    from cvxmri.data.simulate import SimulationConfig, default_sources, load_nifti, simulate_dataset

    if args.frame is not None and not args.nifti:
        raise CvxmriError("--frame picks a frame of 4D --nifti volumes; no --nifti given")
    # The volumes are checked first (a missing file is the first thing to fix).
    sources = [load_nifti(p, args.frame) for p in args.nifti] if args.nifti else None
    if args.nifti and args.out is None:
        raise CvxmriError(
            "--nifti needs --out DIR: the default data/default is the default dataset's"
        )
    if args.dims == 3:
        if args.readout_oversampling is not None or args.slice_step is not None:
            raise CvxmriError("--readout-oversampling and --slice-step apply to 2D data only")
        _simulate3d(args, sources or default_sources(dims=3))
        return
    if args.matrix is not None and len(args.matrix) != 1:
        given = "x".join(map(str, args.matrix))
        raise CvxmriError(f"--matrix {given}: 2D data take one size N (--dims 3 for XxYxZ)")
    out = args.out or Path("data/default")
    config = SimulationConfig(
        matrix=args.matrix[0] if args.matrix else SimulationConfig.matrix,
        coils=args.coils,
        snr=args.snr,
        readout_oversampling=args.readout_oversampling or SimulationConfig.readout_oversampling,
        slice_step=args.slice_step or SimulationConfig.slice_step,
        seed=args.seed,
        slab_slices=args.slab_slices or SimulationConfig.slab_slices,
        guard_slices=(
            SimulationConfig.guard_slices if args.guard_slices is None else args.guard_slices
        ),
        split_ratio=args.split_ratio,
    )
    config.validate()
    manifest = simulate_dataset(
        sources or default_sources(),
        out,
        config,
        overwrite=args.force,
        fit_slabs=args.slab_slices is None,
    )
    counts = manifest["counts"]
    slab = manifest["config"]["slab_slices"]  # type: ignore[index]
    print(
        f"wrote {len(manifest['files'])} files to {out} "  # type: ignore[arg-type]
        f"(slices: train {counts['train']}, val {counts['val']}, test {counts['test']}; "  # type: ignore[index]
        f"slabs of {slab}); manifest: {out / 'manifest.json'}"
    )


def _simulate3d(args: argparse.Namespace, sources: list) -> None:
    """``data simulate --dims 3``: 3D volumes (`cvxmri.data.simulate3d`)."""
    from cvxmri.data.simulate3d import Simulation3DConfig, simulate_dataset3d

    defaults = Simulation3DConfig()
    matrix = args.matrix or defaults.matrix
    config = Simulation3DConfig(
        matrix=matrix * 3 if len(matrix) == 1 else matrix,
        coils=args.coils,
        snr=args.snr,
        slab=args.slab_slices or defaults.slab,
        guard=defaults.guard if args.guard_slices is None else args.guard_slices,
        split_ratio=args.split_ratio,
        seed=args.seed,
    )
    out = args.out or Path("data/default3d")
    manifest = simulate_dataset3d(sources, out, config, overwrite=args.force)
    counts = manifest["counts"]
    print(
        f"wrote {len(manifest['files'])} 3D files to {out} "  # type: ignore[arg-type]
        f"(volumes: train {counts['train']}, val {counts['val']}, test {counts['test']}; "  # type: ignore[index]
        f"slabs of {config.slab} readout positions, matrix {'x'.join(map(str, config.matrix))}); "
        f"manifest: {out / 'manifest.json'}"
    )


def _cmd_prepare(args: argparse.Namespace) -> None:
    from cvxmri.data.prepare import EspiritConfig, default_cache_dir, find_files, precompute_maps

    config = EspiritConfig(backend=args.backend)
    cache = default_cache_dir(args.data)
    splits = args.split or ["train", "val", "test"]
    paths = list(dict.fromkeys(p for s in splits for p in find_files(args.data, s)))
    computed = precompute_maps(paths, cache, config, args.workers, progress=True)
    print(
        f"coil maps of {len(paths)} files under {cache / config.tag()} "
        f"({computed} computed, {len(paths) - computed} already cached)"
    )


def _cmd_info(args: argparse.Namespace) -> None:
    from cvxmri.data.fastmri_h5 import read_volume
    from cvxmri.data.prepare import check_data_file
    from cvxmri.data.volume3d import file_dims, read_volume3d

    if args.file.is_dir():
        raise CvxmriError(f"{args.file}: a folder; 'data info' takes one .h5 file")
    if args.file.is_file():
        check_data_file(args.file)
    if file_dims(args.file) == 3:
        volume3d = read_volume3d(args.file)
        coils, *grid = volume3d.kspace.shape
        print(f"{args.file}: 3D multi-coil volume, {coils} coils")
        print(f"  kspace (kx x ky x kz): {' x '.join(map(str, grid))}, kx the readout")
        target = "none" if volume3d.target is None else f"{volume3d.target.shape}"
        print(f"  target (reconstruction_rss): {target}")
        print(f"  attributes: {volume3d.attrs}")
        return
    volume = read_volume(args.file)
    kind = "multi-coil" if volume.multicoil else "single-coil"
    enc = volume.encoding
    print(f"{args.file}: {kind}, {volume.kspace.shape[0]} slices, {volume.kspace.shape[1]} coils")
    print(f"  kspace (H x W): {volume.kspace.shape[-2]} x {volume.kspace.shape[-1]}")
    print(f"  recon matrix: {enc.recon_shape[0]} x {enc.recon_shape[1]}")
    print(f"  acquired phase-encoding columns: [{enc.padding[0]}, {enc.padding[1]})")
    target = "none" if volume.target is None else f"{volume.target.shape}"
    print(f"  target: {target}")
    print(f"  attributes: {volume.attrs}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from cvxmri.config import load_yaml
    from cvxmri.evaluate import EvaluateConfig, evaluate, format_table
    from cvxmri.runs import default_run_dir, run_folder

    # The YAML file over the defaults, then the options given on the command line.
    config = load_yaml(EvaluateConfig, args.config) if args.config else EvaluateConfig()
    given = {
        "data": None if args.data is None else str(args.data),
        "split": args.split,
        "target": args.target,
        "device": args.device,
        "dims": args.dims,
        "methods": args.method,
        "models": None if args.model is None else [str(p) for p in args.model],
    }
    overrides = {name: value for name, value in given.items() if value is not None}
    overrides["masks"] = _mask_specs(args, config.masks)
    config = replace(
        config,
        cs=_cs_config(args, config.cs),
        cg_sense=_cg_sense_config(args, config.cg_sense),
        **overrides,
    )
    config.validate()
    out = args.out or default_run_dir("evaluate")
    with run_folder(out, config, overwrite=args.force) as folder:
        summary = evaluate(config, folder)
    table = format_table(summary)
    target = summary["target_source"]
    print(f"{config.split} split, target {target} (mean ± std over volumes / slices)")
    print(table)
    print(f"results: {out}")


def _cs_config(args: argparse.Namespace, cs: object) -> object:
    """``cs`` with --cs-lambda, --cs-iterations and --cs-no-shifts, where given."""
    from dataclasses import replace

    if args.cs_lambda is not None:
        cs = replace(cs, lamda=args.cs_lambda)  # type: ignore[type-var]
    if args.cs_iterations is not None:
        cs = replace(cs, iterations=args.cs_iterations)  # type: ignore[type-var]
    if args.cs_no_shifts:
        cs = replace(cs, shifts=False)  # type: ignore[type-var]
    return cs


def _cg_sense_config(args: argparse.Namespace, cg: object) -> object:
    """``cg`` (CG-SENSE settings) with --cg-lambda and --cg-iterations, where given."""
    from dataclasses import replace

    if args.cg_lambda is not None:
        cg = replace(cg, lamda=args.cg_lambda)  # type: ignore[type-var]
    if args.cg_iterations is not None:
        cg = replace(cg, iterations=args.cg_iterations)  # type: ignore[type-var]
    return cg


def _cmd_predict(args: argparse.Namespace) -> None:
    from cvxmri.masks import MaskSpec
    from cvxmri.predict import PredictConfig, predict, training_mask
    from cvxmri.recon import CGSenseConfig, CSConfig

    if args.mask and len(args.mask) > 1:
        raise CvxmriError("predict takes one --mask (one reconstruction per volume)")
    # Drawn masks: the kind given, with the parameters given, else the training mask's.
    trained = training_mask(args.model)
    spec = _mask_specs(args, [trained or MaskSpec("poisson", 4.0)])[0]
    config = PredictConfig(
        model=args.model,
        data=str(args.data),
        split=args.split,
        mask=spec,
        file_masks=not args.mask,
        nifti=args.nifti,
        cs=_cs_config(args, CSConfig()),  # type: ignore[arg-type]
        cg_sense=_cg_sense_config(args, CGSenseConfig()),  # type: ignore[arg-type]
        device=args.device,
    )
    written = predict(config, args.out, overwrite=args.force)
    files = written["files"]
    masks = sorted({str(f["mask"]) for f in files})  # type: ignore[union-attr, index]
    print(
        f"{written['method']}: wrote {len(files)} reconstruction(s) to {args.out} "  # type: ignore[arg-type]
        f"(mask: {', '.join(masks)}; dataset 'reconstruction', slices x H x W float32)"
    )


def _train_config(args: argparse.Namespace) -> object:
    """The preset, then the YAML file over it, then the options given on the command line
    over both (options left out never override: argparse defaults are None here).

    A run's own ``config.yaml`` is a complete config, so ``--config RUN/config.yaml``
    reproduces that run's configuration; ``--resume`` without ``--config`` reads the run's.
    ``convex.patterns`` and ``convex.kernel_size`` are recorded as the stages use them
    (derived from ``channels`` and ``kernel_size``).
    """
    from dataclasses import replace

    import yaml

    from cvxmri.config import from_dict, to_dict
    from cvxmri.data.prepare import check_data_file
    from cvxmri.training.config import TrainConfig, preset

    if args.mask and len(args.mask) > 1:
        raise CvxmriError("train takes one --mask")
    if args.resume and args.out is None:
        raise CvxmriError("--resume needs --out RUN, the run folder to continue")
    if args.resume and args.config is None and (args.out / "config.yaml").is_file():
        # A resumed run starts from its own configuration; options given override it
        # (and are refused by `check_resumable` if they change it, but for more epochs).
        args.config = args.out / "config.yaml"
    overlay: object = {}
    if args.config:
        if not args.config.is_file():
            raise CvxmriError(f"{args.config}: no such config file")
        try:
            overlay = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as err:
            raise CvxmriError(
                f"{args.config}: not valid YAML ({str(err).splitlines()[0]})"
            ) from None
        if not isinstance(overlay, dict):
            raise CvxmriError(f"{args.config}: expected a mapping at the top level")
    # The preset depends on the mask kind (paper: 40 epochs for Poisson disc, 30 for 1D).
    yaml_mask = overlay.get("mask") if isinstance(overlay, dict) else None
    kind = args.mask[0] if args.mask else None
    if kind is None and isinstance(yaml_mask, dict) and isinstance(yaml_mask.get("kind"), str):
        kind = yaml_mask["kind"]
    # True 3D training (3x3x3 kernels, cubic crops) unless the 3D data are decoupled into
    # 2D planes; a --config file (a 3D run's config.yaml) may say so too.
    yaml_dims = overlay.get("dims") if isinstance(overlay, dict) else None
    dims = 2 if args.decoupled else args.dims or (yaml_dims if yaml_dims in (2, 3) else 2)
    base = _merge(to_dict(preset(args.preset, kind or "poisson", dims)), overlay, str(args.config))
    config = from_dict(TrainConfig, base, str(args.config or "preset"))
    if dims == 3 and args.data is None and not (isinstance(overlay, dict) and "data" in overlay):
        config = replace(config, data="data/default3d")
    mask = replace(config.mask, **_mask_overrides(args))
    if args.mask:
        mask = replace(mask, kind=args.mask[0])
    optim = config.optim
    for name, value in (
        ("epochs", args.epochs),
        ("lr", args.lr),
        ("batch_size", args.batch_size),
    ):
        if value is not None:
            optim = replace(optim, **{name: value})
    convex = config.convex
    if args.beta is not None:
        convex = replace(convex, beta=args.beta)
    if args.program is not None:
        convex = replace(convex, program=args.program)
    arch = args.arch or config.arch
    unrolled = config.unrolled
    for name, value in (
        ("iterations", args.iterations),
        ("channels", args.channels if arch == "unrolled" else None),
        ("kernel_size", args.kernel if arch == "unrolled" else None),
        ("shared", args.shared_weights or None),
    ):
        if value is not None:
            unrolled = replace(unrolled, **{name: value})
    if args.dc is not None:
        unrolled = replace(unrolled, dc=replace(unrolled.dc, kind=args.dc))
    if args.dc_lamda is not None:
        unrolled = replace(unrolled, dc=replace(unrolled.dc, lamda=args.dc_lamda))
    overrides = {
        "method": args.method,
        "arch": args.arch,
        "layers": args.layers,
        "channels": args.channels if arch == "cnn" else None,
        "kernel_size": args.kernel,
        "crop": args.crop,
        "crops_per_image": 1 if args.crop == 0 else None,
        "dims": None if args.dims is None else dims,
        "stage_cache": args.stage_cache,
        "solver": args.solver,
        "carry": args.carry,
        "device": args.device,
        "seed": args.seed,
        "data": None if args.data is None else str(args.data),
        "val_data": None if args.val_data is None else str(args.val_data),
        "amp": args.amp or None,
    }
    config = replace(
        config,
        mask=mask,
        optim=optim,
        convex=convex,
        unrolled=unrolled,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    # Record the convex program as it runs: its pattern count and kernel size follow
    # channels and kernel_size (`TrainConfig.stage_config`), whatever the preset says.
    config = replace(config, convex=config.stage_config())
    if config.arch == "unrolled":
        # Data consistency needs the whole field of view: unrolled networks train on whole
        # images, whatever crops the preset draws for the CNN.
        config = replace(config, crop=0, crops_per_image=1)
    # A file that cannot be k-space (a NIfTI volume...) is named as such, not as a
    # dataset root without a val split.
    for data in (config.data, config.val_data):
        if data and Path(data).is_file():
            check_data_file(Path(data))
    config.validate()
    return config


def _merge(base: dict, overlay: object, where: str) -> dict:
    if not isinstance(overlay, dict):
        raise CvxmriError(f"{where}: expected a mapping at the top level")
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def _cmd_train(args: argparse.Namespace) -> None:
    from cvxmri import distributed
    from cvxmri.training.run import train

    if args.decoupled:
        _decoupled_data(args)
    config = _train_config(args)
    if args.decoupled:
        config.mask.validate(ndim=3)  # type: ignore[attr-defined]
    out = args.out or default_train_dir(config)
    metrics = train(
        config, out, resume=args.resume, force=args.force, progress=_epoch_progress(args)
    )
    if not distributed.is_main():
        return
    final = metrics["final"]
    size = (
        f"unrolled, {config.unrolled.iterations} iterations"
        if config.arch == "unrolled"
        else f"{config.layers} layers"
    )
    print(
        f"{config.method} {config.mask.describe()}, {size}: "
        f"val PSNR {final['val_psnr']:.2f} dB, SSIM {final['val_ssim']:.4f} "
        f"({metrics['train_seconds']:.0f} s)"
    )
    print(f"model: {out / 'model.pt'}")


def _decoupled_data(args: argparse.Namespace) -> None:
    """``train --dims 3 --decoupled``: ``--data`` (and ``--val-data``) replaced by the
    decoupled 2D view of the 3D dataset (`cvxmri.data.decoupled.decouple_dataset`)."""
    from cvxmri.data.decoupled import decouple_dataset

    if args.dims != 3:
        raise CvxmriError("--decoupled applies to 3D data: add --dims 3")
    if args.resume and args.data is None:
        return  # the run's config.yaml names its decoupled data
    args.data = decouple_dataset(args.data or Path("data/default3d"))
    if args.val_data is not None:
        args.val_data = decouple_dataset(args.val_data)


def _epoch_progress(args: argparse.Namespace) -> Callable[[dict], None] | None:
    """One line per epoch on stderr when it is a terminal (and -v does not already log
    every row); None otherwise, so that logs and captured output stay as they were."""
    if args.verbose or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    from cvxmri.training.trainer import epoch_summary

    def show(row: dict) -> None:
        tqdm.write(epoch_summary(row), file=sys.stderr)

    return show


def default_train_dir(config: object) -> Path:
    """``runs/<method>-<mask kind>-<date>-<time>``."""
    from cvxmri.runs import default_run_dir

    return default_run_dir(f"{config.method}-{config.mask.kind}")  # type: ignore[attr-defined]


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from cvxmri.models.dc import LINEAR_DC_KINDS
    from cvxmri.reproduce import default_folder, reproduce, reproduce_preset

    if args.preset == "quick3d":
        _reproduce3d(args)
        return
    config = replace(
        reproduce_preset(args.preset),
        data=str(args.data or "data/default"),
        device=args.device,
        amp=args.amp,
    )
    unrolled = config.unrolled
    if args.iterations == 0:
        unrolled = replace(unrolled, methods=[])
    elif args.iterations is not None:
        network = replace(unrolled.network, iterations=args.iterations)
        unrolled = replace(unrolled, network=network, end_to_end_iterations=[])
    if args.dc is not None:
        # The command line's data consistency wins over the preset's per-mask choice.
        network = replace(unrolled.network, dc=replace(unrolled.network.dc, kind=args.dc))
        unrolled = replace(unrolled, network=network, dc_by_mask={})
    if args.dc not in (None, *LINEAR_DC_KINDS) and "layerwise-convex" in unrolled.methods:
        # A fixed number of CG steps is not linear: no certified convex iteration on it.
        unrolled = replace(
            unrolled, methods=[m for m in unrolled.methods if m != "layerwise-convex"]
        )
        print(
            "reproduce: --dc cg is not linear, so the unrolled comparison runs without greedy "
            "convex training (non-convex and end-to-end only; --dc chebyshev keeps it)",
            file=sys.stderr,
        )
    config = replace(config, unrolled=unrolled)
    if args.every_depth is not None:
        config = replace(config, end_to_end_every_depth=args.every_depth)
    out = args.out or default_folder(args.preset)
    report = reproduce(config, out, force=args.force, benchmarks=_benchmark_jsons(args))
    _print_report(out, report)


def _reproduce3d(args: argparse.Namespace) -> None:
    """``reproduce --preset quick3d`` (`cvxmri.reproduce3d`)."""
    import json

    from cvxmri.reproduce import default_folder
    from cvxmri.reproduce3d import Reproduce3DConfig, format_results3d, reproduce3d

    refused = [
        name
        for name, value in (
            ("--amp", args.amp),
            ("--iterations", args.iterations),
            ("--every-depth", args.every_depth is not None),
            ("--dc", args.dc),
            ("--memory-json", getattr(args, "memory_json", None)),
            ("--speed-json", getattr(args, "speed_json", None)),
        )
        if value
    ]
    if refused:
        raise CvxmriError(f"reproduce --preset quick3d does not take {refused[0]}")
    config = Reproduce3DConfig(data=str(args.data or "data/default3d"), device=args.device)
    out = args.out or default_folder(args.preset)
    report = reproduce3d(config, out, force=args.force)
    results = json.loads((out / "results.json").read_text())
    print(f"{results['config']['split']} split, volume mean ± std:")
    print(format_results3d(results))
    print(f"report: {report} (Markdown: {report.with_suffix('.md')})")


def _cmd_report(args: argparse.Namespace) -> None:
    from cvxmri.reproduce import rebuild_report
    from cvxmri.reproduce3d import is_folder3d, rebuild_report3d

    if is_folder3d(args.folder):
        if _benchmark_jsons(args):
            raise CvxmriError("the report of a quick3d folder takes no benchmark JSONs")
        report = rebuild_report3d(args.folder)
        print(f"report: {report} (Markdown: {report.with_suffix('.md')})")
        return
    _print_report(args.folder, rebuild_report(args.folder, _benchmark_jsons(args)))


def _print_report(folder: Path, report: Path) -> None:
    import json

    from cvxmri.reproduce import format_results

    results = json.loads((folder / "results.json").read_text())
    print(f"{results['config']['split']} split, volume mean ± std, networks at full depth:")
    print(format_results(results))
    print(f"report: {report} (Markdown: {report.with_suffix('.md')})")


def _int_list(text: str) -> list[int]:
    """``2,5,8``, ``2-12`` or both (``2-4,8``) of integers >= 0; '' is an empty list."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise argparse.ArgumentTypeError(f"not a list of integers >= 0: {text!r}")
        values += range(int(lo), int(hi or lo) + 1)
    return values


def _add_benchmark_parsers(commands: argparse._SubParsersAction) -> None:
    """`cvxmri benchmark memory` and `cvxmri benchmark speed`."""
    from cvxmri.benchmark.workload import METHODS, STAGE_INPUTS
    from cvxmri.models.dc import DC_KINDS

    benchmark = commands.add_parser("benchmark", help="measure training memory and speed")
    kinds = benchmark.add_subparsers(dest="benchmark_command", required=True, parser_class=_Parser)
    memory = kinds.add_parser(
        "memory",
        help="peak training memory against batch size and depth; largest batch in a budget",
    )
    speed = kinds.add_parser(
        "speed", help="training throughput, training time and compute efficiency"
    )
    # The architecture defaults depend on --arch (`_ARCH_DEFAULTS`).
    for parser in (memory, speed):
        for name, flag, text in (
            ("layers", "--layers", "network depth"),
            ("channels", "--channels", "hidden width"),
            ("kernel", "--kernel", "kernel size"),
            ("size", "--size", "image side"),
        ):
            unrolled = _ARCH_DEFAULTS["unrolled"].get(name, "not used")
            parser.add_argument(
                flag,
                type=int,
                help=f"{text} (default {_CNN_DEFAULTS[name]}; --arch unrolled: {unrolled})",
            )
        parser.add_argument(
            "--arch",
            choices=("cnn", "unrolled"),
            default="cnn",
            help="cnn (the paper's network, default) or unrolled: against the iterations T "
            "(--iterations)",
        )
        parser.add_argument(
            "--iterations",
            type=int,
            nargs="+",
            help="unrolled: the values of T measured (default: memory 1 2 5 10 20, speed 1 2 4 8)",
        )
        parser.add_argument("--coils", type=int, help="unrolled: receive coils (default 8)")
        parser.add_argument(
            "--dc",
            choices=DC_KINDS,
            help="unrolled: data consistency (default gradient)",
        )
        parser.add_argument(
            "--method", action="append", choices=METHODS, help="repeatable (default: all)"
        )
        parser.add_argument(
            "--stage-inputs",
            action="append",
            choices=STAGE_INPUTS,
            help="layer-wise stage inputs; repeatable (default: both)",
        )
        parser.add_argument(
            "--precision",
            action="append",
            choices=("fp32", "bf16"),
            help="fp32 or bf16 autocast; repeatable (default: both)",
        )
        parser.add_argument(
            "--pattern-chunk",
            type=int,
            default=32,
            help="gate patterns a convex stage processes at once, 0: all (default 32)",
        )
        parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
        parser.add_argument("--seed", type=int, default=0, help="random seed")
        parser.add_argument("--force", action="store_true", help="replace an existing folder")
    memory.add_argument("--budget-gb", type=_number, default=12.0, help="GiB (default 12)")
    memory.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=2,
        help="3: the largest cubic patch of 3D training per method (batch 1, fp32, kernel 3 "
        "by default), within the budget and within 12 and 80 GiB (extrapolated); with --arch "
        "unrolled: peak memory against T on whole volumes (--volume)",
    )
    memory.add_argument(
        "--volume",
        type=_matrix,
        help="--dims 3 --arch unrolled: the volumes' shape XxYxZ, readout first (default "
        "12x96x80, a slab of data/default3d)",
    )
    memory.add_argument(
        "--fit-sides",
        type=_int_list,
        default=[16, 32],
        help="--dims 3: patch sides measured first (16,32)",
    )
    memory.add_argument("--max-side", type=int, default=1024, help="--dims 3: search limit (1024)")
    memory.add_argument(
        "--direct-seconds",
        type=_number,
        default=60.0,
        help="--dims 3, --search auto: search directly when a step at the predicted side "
        "takes at most this long (60)",
    )
    memory.add_argument(
        "--search",
        choices=("auto", "direct", "fit"),
        default="auto",
        help="largest batch: direct search or straight-line fit (auto: direct on CUDA)",
    )
    memory.add_argument(
        "--fit-batches", type=_int_list, default=[1, 2, 4], help="batch sizes measured first"
    )
    memory.add_argument("--max-batch", type=int, default=4096, help="search limit (4096)")
    memory.add_argument("--steps", type=int, default=1, help="measured steps per trial (1)")
    memory.add_argument(
        "--depths", type=_int_list, default=list(range(2, 13)), help="depth sweep (2-12)"
    )
    memory.add_argument(
        "--depth-batch",
        type=int,
        default=1,
        help="batch of the depth and chunk sweeps; --arch unrolled: of every step (1)",
    )
    memory.add_argument(
        "--chunks",
        type=_int_list,
        default=[0, 8, 16, 32, 64],
        help="pattern chunks of the chunk sweep (0,8,16,32,64); '' for none",
    )
    memory.add_argument(
        "--certified-images",
        type=_int_list,
        help="training-set sizes of the convex stages' certified solve (2,4); '' for none",
    )
    memory.add_argument(
        "--trial-timeout", type=_number, default=3600.0, help="seconds per trial (3600)"
    )
    memory.add_argument("--out", type=Path, help="folder (default runs/benchmark-memory-<time>)")
    speed.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    speed.add_argument("--repeats", type=int, default=3, help="timed steps (default 3)")
    speed.add_argument(
        "--epochs",
        type=int,
        help="epochs per stage (default 40; --arch unrolled: 30, per greedy iteration)",
    )
    speed.add_argument(
        "--images", type=int, help="training images (default 1000; --arch unrolled: 18)"
    )
    speed.add_argument(
        "--certified-images",
        type=_int_list,
        help="training-set sizes of the convex stages' timed certified solve (2); '' for none",
    )
    speed.add_argument("--out", type=Path, help="folder (default runs/benchmark-speed-<time>)")


_CNN_DEFAULTS = {"layers": 5, "channels": 256, "kernel": 7, "size": 320}
_ARCH_DEFAULTS = {"cnn": _CNN_DEFAULTS, "unrolled": {"channels": 16, "kernel": 5, "size": 128}}
_SPEED_DEFAULTS = {"cnn": {"epochs": 40, "images": 1000}, "unrolled": {"epochs": 30, "images": 18}}
# Options of `cvxmri benchmark` that only one architecture takes (None unless given).
_UNROLLED_ONLY = ("iterations", "coils", "dc")
_CNN_ONLY = ("layers", "stage_inputs", "certified_images")


def _benchmark_architecture(args: argparse.Namespace) -> None:
    """Fill the benchmark's architecture defaults of ``args.arch`` in place; refuse an
    option the other architecture takes."""
    refused = _CNN_ONLY if args.arch == "unrolled" else _UNROLLED_ONLY
    for name in refused:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise CvxmriError(f"{flag} does not apply to --arch {args.arch}")
    if args.arch == "unrolled" and "bf16" in (args.precision or []):
        raise CvxmriError("unrolled training has no bf16 autocast: --precision fp32 only")
    defaults = dict(_ARCH_DEFAULTS[args.arch])
    if args.benchmark_command == "speed":
        defaults |= _SPEED_DEFAULTS[args.arch]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _benchmark_common(args: argparse.Namespace) -> dict[str, object]:
    from cvxmri.benchmark.workload import METHODS, STAGE_INPUTS
    from cvxmri.training.trainer import resolve_device

    return {
        "layers": args.layers,
        "channels": args.channels,
        "kernel_size": args.kernel,
        "size": args.size,
        "methods": list(dict.fromkeys(args.method or METHODS)),
        "stage_inputs": list(dict.fromkeys(args.stage_inputs or STAGE_INPUTS)),
        "precisions": list(dict.fromkeys(args.precision or ["fp32", "bf16"])),
        "pattern_chunk": args.pattern_chunk,
        "device": str(resolve_device(args.device)),
        "seed": args.seed,
    }


def _cmd_benchmark_memory(args: argparse.Namespace) -> None:
    from cvxmri.benchmark.memory import MemoryBenchConfig, format_tables, run_memory_benchmark
    from cvxmri.runs import default_run_dir, run_folder

    if args.volume is not None and (args.dims != 3 or args.arch != "unrolled"):
        raise CvxmriError("--volume applies to --dims 3 --arch unrolled (the volumes measured)")
    if args.certified_images is not None and (args.dims != 2 or args.arch != "cnn"):
        raise CvxmriError("--certified-images applies to the 2D CNN (--dims 2 --arch cnn)")
    if args.dims == 3 and args.arch != "unrolled":
        _benchmark_memory3d(args)
        return
    if args.dims == 3:
        if args.size is not None:
            raise CvxmriError(
                "--size does not apply to --dims 3 --arch unrolled (whole volumes: --volume)"
            )
        args.kernel = args.kernel or 3
    _benchmark_architecture(args)
    if args.arch == "unrolled":
        _unrolled_benchmark_memory(args)
        return
    config = MemoryBenchConfig(
        **_benchmark_common(args),  # type: ignore[arg-type]
        budget_gb=args.budget_gb,
        search=args.search,
        fit_batches=args.fit_batches,
        max_batch=args.max_batch,
        steps=args.steps,
        depths=args.depths,
        depth_batch=args.depth_batch,
        chunks=args.chunks,
        trial_timeout=args.trial_timeout,
    )
    if args.certified_images is not None:
        config = replace(config, certified_images=args.certified_images)
    config.validate()
    out = args.out or default_run_dir("benchmark-memory")
    with run_folder(out, config, overwrite=args.force) as folder:
        result = run_memory_benchmark(config, folder)
    print(format_tables(result))
    print(f"results: {out}")


def _benchmark_memory3d(args: argparse.Namespace) -> None:
    """`cvxmri benchmark memory --dims 3`: the largest cubic patch per method."""
    from cvxmri.benchmark.memory3d import (
        Memory3DConfig,
        format_tables3d,
        run_memory3d_benchmark,
    )
    from cvxmri.runs import default_run_dir, run_folder
    from cvxmri.training.trainer import resolve_device

    for name, flag in (
        ("size", "--size"),
        ("iterations", "--iterations"),
        ("coils", "--coils"),
        ("dc", "--dc"),
        ("stage_inputs", "--stage-inputs"),
    ):
        if getattr(args, name) is not None:
            raise CvxmriError(f"{flag} does not apply to --dims 3 (the patch side is searched)")
    if (args.precision or ["fp32"]) != ["fp32"]:
        raise CvxmriError("--dims 3 measures the CNN in fp32 (--precision fp32)")
    config = Memory3DConfig(
        layers=args.layers or _CNN_DEFAULTS["layers"],
        channels=args.channels or _CNN_DEFAULTS["channels"],
        kernel_size=args.kernel or 3,
        budget_gb=args.budget_gb,
        methods=list(
            dict.fromkeys(args.method or ["end-to-end", "layerwise-convex", "layerwise-nonconvex"])
        ),
        pattern_chunk=args.pattern_chunk,
        search=args.search,
        fit_sides=args.fit_sides,
        max_side=args.max_side,
        direct_seconds=args.direct_seconds,
        steps=args.steps,
        device=str(resolve_device(args.device)),
        trial_timeout=args.trial_timeout,
        seed=args.seed,
    )
    config.validate()
    out = args.out or default_run_dir("benchmark-memory3d")
    with run_folder(out, config, overwrite=args.force) as folder:
        result = run_memory3d_benchmark(config, folder)
    print(format_tables3d(result))
    print(f"results: {out}")


def _unrolled_common(args: argparse.Namespace) -> dict[str, object]:
    """The settings both unrolled benchmarks take from the command line."""
    from cvxmri.benchmark.workload import METHODS
    from cvxmri.training.trainer import resolve_device

    return {
        "channels": args.channels,
        "kernel_size": args.kernel,
        "size": args.size,
        "methods": list(dict.fromkeys(args.method or METHODS)),
        "device": str(resolve_device(args.device)),
        "seed": args.seed,
    }


def _unrolled_options(args: argparse.Namespace, config: Any) -> None:
    """Apply ``--iterations``, ``--coils`` and ``--dc`` where given, then validate."""
    if args.iterations is not None:
        config.iterations = list(dict.fromkeys(args.iterations))
    if args.coils is not None:
        config.coils = args.coils
    if args.dc is not None:
        config.dc = args.dc
    config.validate()


def _unrolled_benchmark_memory(args: argparse.Namespace) -> None:
    """`cvxmri benchmark memory --arch unrolled`: peak memory against T (``--dims 3``: on
    whole volumes of shape ``--volume``)."""
    from cvxmri.benchmark.memory_unrolled import (
        UnrolledMemoryConfig,
        format_unrolled_tables,
        run_unrolled_memory_benchmark,
    )
    from cvxmri.runs import default_run_dir, run_folder

    config = UnrolledMemoryConfig(
        **_unrolled_common(args),  # type: ignore[arg-type]
        budget_gb=args.budget_gb,
        steps=args.steps,
        batch=args.depth_batch,
        trial_timeout=args.trial_timeout,
        dims=args.dims,
    )
    if args.dims == 3 and args.volume is not None:
        if len(args.volume) == 1:
            args.volume = args.volume * 3
        config.volume = list(args.volume)
    _unrolled_options(args, config)
    out = args.out or default_run_dir("benchmark-memory")
    with run_folder(out, config, overwrite=args.force) as folder:
        result = run_unrolled_memory_benchmark(config, folder)
    print(format_unrolled_tables(result))
    print(f"results: {out}")


def _cmd_benchmark_speed(args: argparse.Namespace) -> None:
    from cvxmri.benchmark.speed import SpeedBenchConfig, format_tables, run_speed_benchmark
    from cvxmri.runs import default_run_dir, run_folder

    _benchmark_architecture(args)
    if args.arch == "unrolled":
        _unrolled_benchmark_speed(args)
        return
    config = SpeedBenchConfig(
        **_benchmark_common(args),  # type: ignore[arg-type]
        batch=args.batch,
        repeats=args.repeats,
        epochs=args.epochs,
        images=args.images,
        certified_images=[2] if args.certified_images is None else args.certified_images,
    )
    config.validate()
    out = args.out or default_run_dir("benchmark-speed")
    with run_folder(out, config, overwrite=args.force) as folder:
        result = run_speed_benchmark(config, folder)
    print(format_tables(result))
    print(f"results: {out}")


def _unrolled_benchmark_speed(args: argparse.Namespace) -> None:
    """`cvxmri benchmark speed --arch unrolled`: training time against T."""
    from cvxmri.benchmark.speed_unrolled import (
        UnrolledSpeedConfig,
        format_unrolled_speed,
        run_unrolled_speed_benchmark,
    )
    from cvxmri.runs import default_run_dir, run_folder

    config = UnrolledSpeedConfig(
        **_unrolled_common(args),  # type: ignore[arg-type]
        batch=args.batch,
        repeats=args.repeats,
        epochs=args.epochs,
        images=args.images,
    )
    _unrolled_options(args, config)
    out = args.out or default_run_dir("benchmark-speed")
    with run_folder(out, config, overwrite=args.force) as folder:
        result = run_unrolled_speed_benchmark(config, folder)
    print(format_unrolled_speed(result))
    print(f"results: {out}")


COMMANDS = {
    ("data", "simulate"): _cmd_simulate,
    ("data", "prepare"): _cmd_prepare,
    ("data", "info"): _cmd_info,
    ("evaluate", None): _cmd_evaluate,
    ("predict", None): _cmd_predict,
    ("train", None): _cmd_train,
    ("reproduce", None): _cmd_reproduce,
    ("report", None): _cmd_report,
    ("benchmark", "memory"): _cmd_benchmark_memory,
    ("benchmark", "speed"): _cmd_benchmark_speed,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cvxmri` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    # The run folder's log gets INFO; the console only what -v asks for.
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[console])
    sub = getattr(args, "data_command", None) or getattr(args, "benchmark_command", None)
    command = COMMANDS[(args.command, sub)]
    try:
        if args.command == "train":
            from cvxmri import distributed

            with distributed.process_group():
                command(args)
        else:
            # As `cvxmri.distributed.launched`, without importing torch for every command.
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise CvxmriError(
                    f"{args.command} runs on one process; only train runs under torchrun "
                    "(run it without torchrun)"
                )
            command(args)
    except CvxmriError as err:
        if args.debug:
            raise
        print(f"cvxmri: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvxmri: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else ""
        print(
            f"cvxmri: internal error: {type(err).__name__}: {message} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
