"""Training configuration: typed dataclasses, YAML, and the `quick` and `paper` presets.

The two presets run the same code; they differ only in size. `paper` is the experiment of
the paper (7x7 kernels, 256 channels, 5 layers, Adam 1e-4 halved every 10 epochs, 40 epochs
for Poisson disc and 30 for 1D Cartesian, whole 320x320 images; for a GPU). `quick` runs
the whole comparison on 2 CPU cores in minutes: 32 channels, four 64x64 training crops
per image and epoch, 30 epochs (per stage), and a larger learning rate, 1e-3 (chosen on the
validation split); its convex stages are solved by the certified solver (a beta path on
whole images, every beta to a relative duality gap of 1e-3) and carry the previous depth's
prediction (``carry``) through gates selected from four times as many candidates
(``convex.gate_pool``), where `paper` keeps the paper's Adam and plain stages: at 256
channels and a full training set the certified solver's subspace route outgrows its memory
budget (`cvxmri.training.certified.STORE_BYTES`).

With ``dims`` 3 (true 3D training on volume files, `cvxmri.training.data.VolumeData`) every
preset uses 3x3x3 kernels (the unrolled network's regularisers too), and its training crops
are cubes: of side 12 (the default slab thickness of ``data/default3d``) for quick, 4 for
tiny, and whole volumes for paper (the unrolled network always trains on whole volumes);
convex stages take the memory-lean step (``pattern_chunk`` 32), as in the 3D memory
benchmark, and Adam without ``carry`` or gate selection (the 3D comparison's setting): the
certified solver holds its stage's whole training set, which the 3D comparison (memory is
its point) does not afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from cvxmri.data.prepare import is_dataset_root
from cvxmri.errors import CvxmriError, check_settings
from cvxmri.masks import MaskSpec
from cvxmri.models.convex import ConvexStageConfig
from cvxmri.models.dc import LINE_MASK_KINDS, LINEAR_DC_KINDS, DCConfig
from cvxmri.models.stages import StageSpec

METHODS = ("layerwise-convex", "layerwise-nonconvex", "end-to-end")
PRESETS = ("quick", "paper", "tiny")
SOLVERS = ("adam", "fista", "certified")
ARCHS = ("cnn", "unrolled")


@dataclass
class OptimConfig:
    """Adam with a step schedule: ``lr`` multiplied by ``gamma`` every ``step`` epochs.

    For layer-wise training, ``epochs`` is per stage, and the schedule restarts each stage.
    """

    lr: float = 1e-4
    step: int = 10
    gamma: float = 0.5
    epochs: int = 40
    batch_size: int = 4


@dataclass
class CertifiedConfig:
    """The certified solver of convex stages (``solver: certified``; `StageSolver`).

    Attributes:
        tol: relative duality gap at which a stage's program counts as solved.
        betas: a CNN stage's beta path, as fractions of the stage's ``beta_max`` (the
            smallest beta at which the zero weight is optimal), solved in this order, each
            warm-started from the previous solution; the stage keeps the beta with the best
            validation PSNR (`path_done` says when the path stops early). It starts at 1e-2:
            on the default data no stage selected 3e-2, and stages 3-4 were below the
            depth before them there, at seconds each (docs/benchmarks.md, "a path from
            1e-2"). Unrolled iterations have their own path (`UnrolledConfig.betas`).
        seconds: time budget per beta (0: none); a beta stopped by it reports the gap it
            reached.
        gram_unknowns: stages with at most this many unknowns per output channel
            (``patterns * C_in * K^d``) are solved through their Gram matrix, wider ones
            matrix-free.
        check_every: matrix-free iterations between float64 certificates.
        max_iterations: iterations per beta (matrix-free) or per model solve (Gram).
        subspace: wider stages start from the program restricted to filters in the span
            of this many leading principal directions of their input patches, solved by
            the Gram route (0: the whole program, matrix-free, which does not certify a
            32-channel stage in reasonable time on a CPU; docs/benchmarks.md).
        subspace_rounds: times a subspace grows per beta, by the whole gradient's
            components outside it, while the whole program's gap is above ``tol``.
        subspace_unknowns: the subspace's unknowns per output (patterns x basis rank) at
            most; the basis stops growing there. Its float64 Gram matrix takes 8 x this^2
            bytes (2 GiB at 16384: a basis of 1024 directions at 16 patterns, 128 at the
            paper's 128).
        screen: on the subspace route, refinement rounds and basis growth take their
            gradients from screening passes with float32 convolutions, several times
            faster than the exact float64 ones; an exact pass is made whenever a gap may
            be within ``tol``, so every reported certificate is exact (False: every pass
            exact).
        min_gain: a CNN stage's path stops once a beta's validation PSNR is at most this
            many dB above the best before it (0: once one is not better): smaller betas
            cost more (more groups, more subspace directions) and gain less and less. An
            unrolled iteration solves the whole path (its betas share one Gram matrix and
            cost a second or two each; small gains compound over iterations), stopping
            only after two betas worse than the best.
    """

    tol: float = 1e-3
    betas: tuple[float, ...] = (1e-2, 3e-3, 1e-3)
    seconds: float = 0.0
    gram_unknowns: int = 4096
    check_every: int = 10
    max_iterations: int = 2000
    subspace: int = 100
    subspace_rounds: int = 6
    subspace_unknowns: int = 16384
    screen: bool = True
    min_gain: float = 0.1

    def validate(self) -> None:
        """Raise `CvxmriError` naming the first invalid setting."""
        check_settings(
            "training",
            self,
            {
                "tol": (math.isfinite(self.tol) and 0 < self.tol < 1, "in (0, 1)"),
                "betas": beta_path_rule(self.betas),
                "seconds": (math.isfinite(self.seconds) and self.seconds >= 0, ">= 0 (0: none)"),
                "gram_unknowns": (self.gram_unknowns >= 0, ">= 0"),
                "check_every": (self.check_every >= 1, ">= 1"),
                "max_iterations": (self.max_iterations >= 1, ">= 1"),
                "subspace": (self.subspace >= 0, ">= 0"),
                "subspace_rounds": (self.subspace_rounds >= 0, ">= 0"),
                "subspace_unknowns": (self.subspace_unknowns >= 1, ">= 1"),
                "min_gain": (math.isfinite(self.min_gain) and self.min_gain >= 0, ">= 0 dB"),
            },
            "certified.",
        )

    def path_done(self, val_psnrs: list[float]) -> bool:
        """Whether the beta path stops after betas with these validation PSNRs (dB, in path
        order): once the last is at most `min_gain` above the best before it."""
        return len(val_psnrs) > 1 and val_psnrs[-1] <= max(val_psnrs[:-1]) + self.min_gain


def beta_path_rule(betas: tuple[float, ...]) -> tuple[bool, str]:
    """The `check_settings` rule of a beta path: fractions of ``beta_max`` in (0, 1]."""
    return (
        len(betas) > 0 and all(math.isfinite(b) and 0 < b <= 1 for b in betas),
        "a non-empty list of fractions in (0, 1]",
    )


def hidden_layer_rules(channels: int, kernel_size: int) -> dict[str, tuple[bool, str]]:
    """`check_settings` rules of a hidden layer's width and kernel (a CNN's layers, an
    unrolled network's regularisers): convex programs split the width into gate patterns
    of two channels each (``w`` and ``z``, or a complex output), and kernels are centred."""
    return {
        "channels": (
            channels >= 2 and channels % 2 == 0,
            "even and >= 2 (a convex layer has channels / 2 gate patterns)",
        ),
        "kernel_size": (kernel_size >= 1 and kernel_size % 2 == 1, "odd"),
    }


@dataclass
class UnrolledConfig:
    """The unrolled network of ``arch: unrolled`` (`cvxmri.models.unrolled.UnrolledNet`).

    Attributes:
        iterations: T, the number of regulariser-plus-data-consistency iterations.
        channels: hidden width of each iteration's regulariser (``KxK conv -> ReLU ->
            1x1``; ``KxKxK`` in 3D). A convex iteration has ``channels // 2`` gate
            patterns, each with a complex output (real and imaginary channels, one group),
            the same width.
        kernel_size: KxK (3D: KxKxK) of the regularisers' hidden layers.
        dc: the data-consistency step.
        shared: one regulariser for every iteration (end-to-end only; greedy training
            trains one module per iteration).
        gram_images: greedy convex iterations: at most this many training images (every
            k-th) accumulate the Gram matrix that is the solver's model (0: all of them).
            Its exact passes, and so the certificate, still run over every training
            image: a smaller model costs a few more passes (cheap: two data-consistency
            steps an image) and saves most of the build (one per design column an image).
        betas: greedy convex iterations: the beta path of each, as fractions of its
            ``beta_max``, solved whole (`CertifiedConfig.min_gain`); the other settings of
            the solver are ``certified``'s.
    """

    iterations: int = 8
    channels: int = 16
    kernel_size: int = 5
    dc: DCConfig = field(default_factory=DCConfig)
    shared: bool = False
    gram_images: int = 0
    betas: tuple[float, ...] = (3e-2, 1e-2, 3e-3, 1e-3)

    def validate(self, method: str) -> None:
        """Raise `CvxmriError` naming the first invalid setting."""
        check_settings(
            "training",
            self,
            {
                "iterations": (self.iterations >= 1, ">= 1"),
                **hidden_layer_rules(self.channels, self.kernel_size),
                "shared": (
                    not self.shared or method == "end-to-end",
                    "false (shared weights need method end-to-end; greedy training trains "
                    "one module per iteration)",
                ),
                "gram_images": (self.gram_images >= 0, ">= 0 (0: every training image)"),
                "betas": beta_path_rule(self.betas),
            },
            "unrolled.",
        )
        self.dc.validate()
        if method == "layerwise-convex" and self.dc.kind not in LINEAR_DC_KINDS:
            # A fixed number of CG steps is not linear in its right-hand side (its step
            # lengths depend on it), so the iteration would not be the group lasso that the
            # solver certifies.
            raise CvxmriError(
                "greedy convex training needs a linear data consistency: --dc cg is not "
                "exactly linear (CG's step lengths depend on the image), so its certificate "
                "would bound nothing; use --dc gradient, --dc chebyshev (the same "
                "proximal step by a fixed polynomial) or, for 1D Cartesian masks, --dc direct"
            )


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder.

    Attributes:
        method: layerwise-convex, layerwise (non-convex greedy ablation) or end-to-end.
        arch: ``cnn`` (`ReconCNN`, ``layers`` deep, the paper's network) or ``unrolled``
            (`UnrolledNet`, see ``unrolled``; layer-wise methods train it greedily, one
            iteration at a time, and its convex iterations are always solved by the
            certified path, ``certified``).
        data: training data: a dataset root (its ``multicoil_train/``), a flat folder of
            ``.h5`` files (e.g. fastMRI's ``knee/multicoil_train``) or one file.
        val_data: validation data, in the same forms; empty: the ``val`` split of ``data``
            (which must then be a dataset root).
        mask: the sampling pattern.
        layers: depth k+1 of the final network (k stages for layer-wise training).
        channels: hidden width of the end-to-end and non-convex networks. Convex stages get
            ``channels // 2`` gate patterns, each with 2 output channels (real, imaginary),
            so their hidden layers have the same width.
        kernel_size: KxK of every hidden layer.
        convex: the convex program of each stage (its ``patterns`` is set from ``channels``).
        hidden_layer: what a frozen convex stage becomes: ``gated`` (its gated features, exact) or
            ``relu`` (the mapped ReLU units, exact where the cone constraints hold).
        carry: convex stages after the first keep pattern 0 always on, initialised to
            the previous stage's output layer, so each stage starts at the previous depth's
            prediction (gated program only).
        optim: optimiser and schedule.
        crop: side of the random training crops (0: whole images). Evaluation always uses
            whole images.
        crops_per_image: random crops drawn from every training image in one epoch.
        fixed_masks: one mask per training slice for the whole run (needed for the convex
            certificate and for caching stage inputs); otherwise a fresh mask per epoch.
        stage_cache: where layer-wise stage inputs are kept: memory, disk, or none
            (recomputed from the frozen prefix for every batch).
        certificate_every: compute the convex certificate every n epochs (and at the end).
        unrolled: the unrolled network of ``arch: unrolled``.
        solver: how the CNN's convex stages are solved: ``adam`` (mini-batches of crops, as
            the paper), ``fista`` (full-batch proximal gradient on whole images at
            ``convex.beta``) or
            ``certified`` (a beta path chosen on validation, every beta solved to a relative
            duality gap; see ``certified``). The last two solve the convex program itself
            (gated program, fixed masks, cached stage inputs).
        certified: the settings of ``solver: certified``.
        fista_iterations: FISTA iterations per stage (it stops earlier at ``fista_tol``).
        fista_tol: relative duality gap at which FISTA stops.
        amp: bf16 autocast for the forward passes (convex stages: bf16 convolutions, gates
            in full precision).
        pattern_chunk: convex stages compute their gradient this many gate patterns at a
            time (0: all at once); smaller needs less memory.
        checkpointing: end-to-end: recompute each hidden layer in the backward pass
            (gradient checkpointing) instead of keeping its activations.
        device: cpu, cuda, or auto (cuda when available).
        dims: 2 (slices of fastMRI-layout files) or 3 (true 3D: whole volumes of 3D volume
            files, `cvxmri.data.volume3d`, 3D convolutions, either arch; ``crop`` is then a
            cube's side, at most the volumes' shortest axis).
        seed: every random choice (masks, crops, order, initialisation) derives from it.
        max_train_slices: use at most this many training slices (0: all).
    """

    method: str = "layerwise-convex"
    arch: str = "cnn"
    data: str = "data/default"
    val_data: str = ""
    mask: MaskSpec = field(default_factory=lambda: MaskSpec("poisson", 4.0))
    layers: int = 5
    channels: int = 256
    kernel_size: int = 7
    convex: ConvexStageConfig = field(default_factory=ConvexStageConfig)
    unrolled: UnrolledConfig = field(default_factory=UnrolledConfig)
    hidden_layer: str = "gated"
    carry: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    crop: int = 0
    crops_per_image: int = 1
    fixed_masks: bool = True
    stage_cache: str = "memory"
    certificate_every: int = 1
    solver: str = "adam"
    certified: CertifiedConfig = field(default_factory=CertifiedConfig)
    fista_iterations: int = 300
    fista_tol: float = 1e-4
    amp: bool = False
    pattern_chunk: int = 0
    checkpointing: bool = False
    device: str = "auto"
    dims: int = 2
    seed: int = 0
    max_train_slices: int = 0

    def validate(self) -> None:
        """Raise `CvxmriError` for impossible settings."""
        if self.method not in METHODS:
            raise CvxmriError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.arch not in ARCHS:
            raise CvxmriError(f"unknown arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.dims not in (2, 3):
            raise CvxmriError(f"invalid training setting dims={self.dims!r} (2 or 3)")
        if self.arch == "unrolled":
            self.unrolled.validate(self.method)
            if self.method != "end-to-end" and not self.fixed_masks:
                raise CvxmriError("greedy unrolled training needs fixed_masks=true")
            if self.unrolled.dc.kind == "direct" and (
                self.dims != 2 or self.mask.kind not in LINE_MASK_KINDS
            ):
                raise CvxmriError(
                    "unrolled.dc.kind=direct needs 2D images and a mask constant along the "
                    f"readout ({' or '.join(LINE_MASK_KINDS)}; use chebyshev otherwise)"
                )
        self.mask.validate(ndim=self.dims)
        if self.mask.kind == "file":
            raise CvxmriError("mask 'file' is for evaluation; training draws its masks")
        self.convex.validate()
        check_settings(
            "training",
            self,
            {
                "layers": (self.layers >= 2, ">= 2 (a hidden layer and the last 1x1)"),
                **hidden_layer_rules(self.channels, self.kernel_size),
                "hidden_layer": (self.hidden_layer in ("gated", "relu"), "gated or relu"),
                "optim.lr": (math.isfinite(self.optim.lr) and self.optim.lr > 0, "> 0"),
                "optim.step": (self.optim.step >= 1, ">= 1 epoch"),
                "optim.gamma": (0 < self.optim.gamma <= 1, "in (0, 1]"),
                "optim.epochs": (self.optim.epochs >= 1, ">= 1"),
                "optim.batch_size": (self.optim.batch_size >= 1, ">= 1"),
                "crop": (
                    self.crop == 0 or self.crop >= self.kernel_size,
                    f"0 (whole images) or at least the kernel size {self.kernel_size}",
                ),
                "crops_per_image": (
                    self.crops_per_image >= 1 and (self.crop > 0 or self.crops_per_image == 1),
                    ">= 1, and 1 without crops",
                ),
                "stage_cache": (
                    self.stage_cache in ("memory", "disk", "none"),
                    "memory, disk or none",
                ),
                "certificate_every": (self.certificate_every >= 0, ">= 0 (0: never)"),
                "solver": (self.solver in SOLVERS, " or ".join(SOLVERS)),
                "fista_iterations": (self.fista_iterations >= 1, ">= 1"),
                "fista_tol": (0 <= self.fista_tol < 1, "in [0, 1)"),
                "pattern_chunk": (self.pattern_chunk >= 0, ">= 0 (0: all patterns at once)"),
                "device": (
                    self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                    "auto, cpu, cuda or cuda:N",
                ),
                "max_train_slices": (self.max_train_slices >= 0, ">= 0 (0: all)"),
            },
        )
        if (
            self.hidden_layer == "relu"
            and self.convex.program != "cone"
            and self.method == "layerwise-convex"
        ):
            raise CvxmriError("hidden_layer=relu needs convex.program=cone (exact ReLU mapping)")
        self.certified.validate()
        if self.solver != "adam" and (
            self.convex.program != "gated" or self.stage_cache == "none" or not self.fixed_masks
        ):
            raise CvxmriError(
                f"solver={self.solver} needs convex.program=gated, fixed masks and cached "
                "stage inputs"
            )
        if not self.val_data and Path(self.data).exists() and not is_dataset_root(self.data, "val"):
            raise CvxmriError(
                f"{self.data} is not a dataset root with a val split (multicoil_val/): "
                "give the validation data with val_data (--val-data)"
            )
        if self.carry and self.convex.program != "gated":
            raise CvxmriError("carry needs convex.program=gated")
        if self.stage_cache != "none" and not self.fixed_masks:
            raise CvxmriError("stage inputs can only be cached with fixed_masks=true")

    def stage_config(self) -> ConvexStageConfig:
        """The convex stage settings with the pattern count that gives ``channels`` units and
        the network's kernel size (`StageSpec.convex_config`)."""
        return self.stage_spec().convex_config()

    def stage_spec(self) -> StageSpec:
        """How this run builds its layer-wise stages (`cvxmri.models.stages.build_stage`;
        layer-wise methods only)."""
        return StageSpec(
            method=self.method,
            channels=self.channels,
            kernel_size=self.kernel_size,
            convex=self.convex,
            hidden_layer=self.hidden_layer,
            carry=self.carry,
            amp=self.amp,
            pattern_chunk=self.pattern_chunk,
            ndim=self.dims,
        )


def preset(name: str, mask_kind: str = "poisson", dims: int = 2) -> TrainConfig:
    """A named preset; the paper trains 40 epochs for Poisson disc and 30 for Cartesian.
    ``dims`` 3: the same for true 3D training, with 3x3x3 kernels and cubic crops (see the
    module docstring)."""
    config = _preset2d(name, mask_kind)
    if dims == 3:
        crop = {"quick": 12, "tiny": 4, "paper": 0}[name]
        # Pattern chunks: the convex step's memory-lean path, whose working memory does
        # not grow with the patch (`ConvexStage.data_term_and_gradient`).
        unrolled = replace(config.unrolled, kernel_size=3)
        return replace(
            config,
            dims=3,
            kernel_size=3,
            crop=crop,
            pattern_chunk=32,
            unrolled=unrolled,
            solver="adam",
            carry=False,
            convex=replace(config.convex, gate_pool=1),
        )
    return config


def _preset2d(name: str, mask_kind: str) -> TrainConfig:
    if name == "paper":
        epochs = 40 if mask_kind == "poisson" else 30
        # Pattern chunks of 32 bound a convex step's memory at 320x320 with 256 channels
        # (docs/benchmarks.md, "Memory and speed").
        return TrainConfig(
            pattern_chunk=32,
            optim=OptimConfig(lr=1e-4, step=10, gamma=0.5, epochs=epochs, batch_size=4),
        )
    if name == "quick":
        return TrainConfig(
            channels=32,
            crop=64,
            crops_per_image=4,
            certificate_every=10,
            optim=OptimConfig(lr=1e-3, step=10, gamma=0.5, epochs=30, batch_size=8),
            solver="certified",
            carry=True,
            convex=ConvexStageConfig(gate_pool=4),
        )
    if name == "tiny":
        return TrainConfig(
            mask=MaskSpec("poisson", 4.0, calib_size=(6, 6)),
            layers=3,
            channels=8,
            kernel_size=3,
            crop=16,
            optim=OptimConfig(lr=1e-3, step=1, gamma=0.5, epochs=1, batch_size=4),
            max_train_slices=4,
        )
    raise CvxmriError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
