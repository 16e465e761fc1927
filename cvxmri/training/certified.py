"""Certified solving of a gated convex stage through its Gram matrix (docs/method.md).

With fixed gates, the gated program of a stage is a group lasso in the weight ``v``:

    min_v  1/(2N) sum_n ||Phi_n v - r_n||^2 + beta * sum_g ||v_g||

where row ``(pixel, c)`` of ``Phi_n`` holds the input patch at that pixel times the pixel's
gates: ``Phi = [D_1 * U, ..., D_P * U]`` with ``U`` the ``(C_in K^d)``-long patches. The data
term is a quadratic whose coefficients, ``G = Phi^T Phi / N``, ``b = Phi^T r / N`` and
``||r||^2 / N``, are accumulated once over the training set (`gram_system`, streaming over
images). Every iteration after that, and the exact duality gap, costs small matrix products
instead of passes over the images (the Gram idea of skglm's ``GramCD``). The matrix is
``n x n`` with ``n = P * C_in * K^d`` unknowns per output channel, so this route is for stages
with narrow inputs (stage 1's 2 channels: ``n = 1568`` at P 16, K 7).

`solve_gram` runs FISTA in the block-Jacobi metric ``M = blockdiag(G_pp)`` (one block per
pattern; the gates make the unpreconditioned Gram badly conditioned), with the exact prox of
the group norm in that metric, function-value restarts and the textbook momentum rule
``t' = (1 + sqrt(1 + 4 t^2)) / 2``. It stops at a relative duality gap ``tol``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cvxmri import distributed
from cvxmri.errors import CvxmriError
from cvxmri.models.convex import (
    ConvexStage,
    ResidualStatistics,
    certificate_numbers,
    group_norms_of,
    residual_statistics,
)
from cvxmri.training.config import CertifiedConfig

# Eigenvalues of a pattern's Gram block below this fraction of the block's largest are
# raised to it: the metric must be positive definite, and directions the data do not see
# need no scaling.
METRIC_FLOOR = 1e-10
# A matrix-free step constant is doubled (its estimate came from a few images) at most up
# to this multiple of the estimate.
MAX_STEP_GROWTH = 1024
# Safeguarded Newton steps on the prox's scalar equation (see BlockMetric.prox), at most,
# and the relative step below which every live group's root counts as found (Newton's
# steps shrink quadratically: a few steps).
PROX_NEWTON_STEPS = 50
PROX_SETTLED = 1e-14
# Gates packed per integer by `code_groups` (non-negative int64).
CODE_BITS = 62
# Bytes of a float32 Gram matrix's rows that `GramSystem.times` takes to float64 at a time.
GRAM_BLOCK_BYTES = 1 << 23
# Bytes of the per-code patches and patch Grams `_code_sums` holds at a time.
CODE_BYTES = 1 << 28
# Bytes of the subspace route's patch coordinates (`PatchStore`) at most: the basis stops
# growing there too.
STORE_BYTES = 1 << 32
# Pixels whose gated residuals (P * out floats each) the patch store forms at once.
RHS_PIXELS = 1 << 16
# The first patch basis: a full eigendecomposition of the patch Gram up to this many patch
# entries, a randomized subspace iteration beyond (`initial_basis`).
EIGH_SIZE = 4096
# ... from every this-many-th pixel's patch of its images (16 thousand of the 65 thousand
# of 4 images of 128x128): a quarter of the products, and on the default data the bases
# grew to the same or smaller ranks, with the same validation PSNR (docs/benchmarks.md).
BASIS_PIXEL_STEP = 4
RANGE_ITERATIONS = 4
RANGE_OVERSAMPLING = 20
# Bytes of explicit input patches (`_patches`) held at once by the mean patch Gram.
PATCH_SLAB_BYTES = 1 << 28
# Power iterations of a step constant from a random start, and from the previous one's
# vector (a grown basis changes the operator little).
POWER_ITERATIONS = 100
WARM_POWER_ITERATIONS = 20
# A screening pass (`_screened_statistics`) stands in for the exact one while the relative
# gap it shows is above this multiple of ``tol``; at or below it an exact pass decides. On
# the default data's stage 2 the two gaps agreed to 3e-7 (docs/benchmarks.md), far inside
# the margin (1e-4 at the default tol). A screening pass never certifies, so a margin too
# small costs rounds, never a wrong certificate. Below a ``tol`` of `SCREEN_TOL` its
# rounding could hide how close a gap is, and every pass is exact.
SCREEN_MARGIN = 1.1
SCREEN_TOL = 1e-5

# A chunk's stage inputs: a tensor, kept where it is (host memory, a memory-mapped cache, or
# the device), or a function that loads it (from a file, say).
ChunkInputs = Tensor | Callable[[], Tensor]
# (inputs, r, gates) chunks of whole images; residuals and gates on the solver's device.
_Data = list[tuple[ChunkInputs, Tensor, Tensor]]


def stream(
    data: _Data, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The chunks of ``data`` with their inputs on ``device`` (in ``dtype`` if given), one
    chunk at a time: a pass over the training set holds one chunk's inputs on the device
    (two while the next one loads), whatever the set's size."""
    for x, r, d in data:
        inputs = x() if callable(x) else x
        yield inputs.to(device=device, dtype=dtype or inputs.dtype), r, d


def _images_in(data: _Data) -> int:
    """The number of images of ``data`` (this process's share)."""
    return sum(r.shape[0] for _, r, _ in data)


@dataclass
class GramSystem:
    """The quadratic data term of a gated stage: ``L(v) = 1/2 v^T G v - b^T v + rr / 2`` per
    output column of ``v``.

    Attributes:
        gram: ``G = Phi^T Phi / N``, ``(n, n)``, ``n = P * C_in * K^d``; unknowns in the
            order of the weight ``(P, C_in, K...)``. Accumulated in float64 and kept in
            float64; or, on the subspace route (`PatchStore.system`: its matrix is the one
            that grows to GiBs), in float32 and packed: its pattern-pair blocks ``G_pq``
            for ``p <= q`` (in the order of ``torch.triu_indices(P, P)``), ``(P (P + 1) /
            2, m, m)``, since a basis shared by the patterns makes ``G_pq = G_qp`` (and
            each block symmetric). Its products are float64 (`times`); `matrix` unfolds
            it.
        rhs: ``b = Phi^T r / N``, float64 ``(n, out)``.
        rr: ``||r||^2 / N`` (all outputs).
        count: N, the number of training images.
        patterns: P.
        output_groups: the stage's grouping, ``separate`` or ``frobenius``.
        seconds: time spent building the system.
        basis: for a program restricted to a patch subspace (`initial_basis`), its
            orthonormal basis ``Q`` ``(C_in K^d, r)``: a pattern's filter is ``Q a`` and the
            unknowns are the coefficients ``a``; None for the whole program.
    """

    gram: Tensor
    rhs: Tensor
    rr: float
    count: int
    patterns: int
    output_groups: str
    seconds: float = 0.0
    basis: Tensor | None = None

    @property
    def packed(self) -> bool:
        """Whether `gram` holds the pattern-pair blocks only."""
        return self.gram.dim() == 3

    @property
    def block(self) -> int:
        """Unknowns per pattern and output, ``C_in * K^d`` (restricted: the basis rank)."""
        return self.gram.shape[1] if self.packed else self.gram.shape[0] // self.patterns

    @property
    def size(self) -> int:
        """``n``, the unknowns per output channel."""
        return self.patterns * self.block

    def matrix(self) -> Tensor:
        """``G`` as an ``(n, n)`` matrix (a packed one unfolded)."""
        if not self.packed:
            return self.gram
        p, m = self.patterns, self.block
        blocks = self.gram[_pair_index(p, self.gram.device)]  # (P, P, m, m)
        return blocks.permute(0, 2, 1, 3).reshape(p * m, p * m)

    def times(self, v: Tensor) -> Tensor:
        """``G v`` in float64 (``v`` ``(n, k)`` float64): a float32 matrix a block of rows
        (packed: of pattern-pair blocks) at a time (`GRAM_BLOCK_BYTES`) in float64, so that
        the products are exact ones of the stored matrix. (Products in float32 leave the
        objective's last digits to rounding, and FISTA's monotone steps then fail near the
        optimum.)"""
        if self.packed:
            return self._packed_times(v)
        if self.gram.dtype == torch.float64:
            return self.gram @ v
        n = self.gram.shape[0]
        rows = min(n, max(1, GRAM_BLOCK_BYTES // (8 * self.gram.shape[1])))
        # One block buffer for every block (no allocation per block).
        block = torch.empty(rows, self.gram.shape[1], dtype=torch.float64, device=v.device)
        out = torch.empty(n, v.shape[1], dtype=torch.float64, device=v.device)
        for first in range(0, n, rows):
            last = min(n, first + rows)
            part = block[: last - first]
            part.copy_(self.gram[first:last])
            torch.matmul(part, v, out=out[first:last])
        return out

    def _packed_times(self, v: Tensor) -> Tensor:
        """`times` of a packed matrix: each stored block ``G_pq`` is read once for both
        of its products, ``G_pq v_q`` (pattern p's rows) and ``G_pq v_p`` (q's, as
        ``G_qp = G_pq``): half the memory traffic of the unfolded matrix, whose product is
        bound by it."""
        p, m, k = self.patterns, self.block, v.shape[1]
        upper = torch.triu_indices(p, p, device=v.device)
        per = v.view(p, m, k)
        out = torch.zeros(p, m, k, dtype=torch.float64, device=v.device)
        pairs = upper.shape[1]
        chunk = min(pairs, max(1, GRAM_BLOCK_BYTES // (8 * m * m)))
        buffer = torch.empty(chunk, m, m, dtype=torch.float64, device=v.device)
        for first in range(0, pairs, chunk):
            last = min(pairs, first + chunk)
            blocks = buffer[: last - first]
            blocks.copy_(self.gram[first:last])
            rows, columns = upper[0, first:last], upper[1, first:last]
            both = torch.bmm(blocks, torch.cat([per[columns], per[rows]], dim=2))
            out.index_add_(0, rows, both[..., :k])
            across = rows != columns  # (a diagonal block's product counts once)
            out.index_add_(0, columns[across], both[across][..., k:])
        return out.view(p * m, k)

    def per_pattern(self, v: Tensor) -> Tensor:
        """``v`` ``(n, out)`` in the per-pattern layout ``(P, out, C_in K^d)`` of a weight."""
        return v.T.reshape(v.shape[1], self.patterns, self.block).transpose(0, 1)

    def flat(self, per: Tensor) -> Tensor:
        """The inverse of `per_pattern`."""
        return per.transpose(0, 1).reshape(per.shape[1], -1).T

    def to_weight(self, v: Tensor, shape: torch.Size) -> Tensor:
        """``v`` ``(n, out)`` as a stage weight of ``shape`` ``(P, out, C_in, K...)``
        (restricted: the filters ``Q a``)."""
        per = self.per_pattern(v)
        if self.basis is not None:
            per = per @ self.basis.T
        return per.reshape(shape)

    def from_weight(self, weight: Tensor) -> Tensor:
        """A stage weight ``(P, out, C_in, K...)`` as ``(n, out)`` float64 (restricted: its
        coordinates ``Q^T w``, which for a gradient is the restricted program's)."""
        per = weight.detach().reshape(*weight.shape[:2], -1).double()
        if self.basis is not None:
            per = per @ self.basis
        return self.flat(per)

    def group_view(self, v: Tensor) -> Tensor:
        """``v`` ``(n, out)`` as ``(groups, unknowns per group)``: ``(P * out, block)``
        for separate groups (group ``p * out + c``), ``(P, out * block)`` for frobenius."""
        per = self.per_pattern(v)
        if self.output_groups == "separate":
            return per.reshape(-1, self.block)
        return per.reshape(self.patterns, -1)

    def group_norms(self, v: Tensor) -> Tensor:
        """Norms of the penalty's groups of ``v``."""
        return torch.linalg.vector_norm(self.group_view(v), dim=1)

    def beta_max(self) -> float:
        """The smallest ``beta`` at which ``v = 0`` is optimal: the largest group norm of
        the gradient ``-b`` at 0."""
        return float(self.group_norms(self.rhs).max())

    def certificate(self, v: Tensor, beta: float, gv: Tensor | None = None) -> dict[str, float]:
        """Primal, dual and duality gap of ``v`` (``(n, out)``) at ``beta``, exact in float64
        (``gv``: ``G v`` when the caller has it, saving the product).

        With the residual ``e = r - Phi v``: ``||e||^2 / N = rr - 2 b.v + v.Gv``,
        ``<r, e> / N = rr - b.v``, and the gradient is ``Gv - b``. The dual point is ``s e``
        with ``s = clip(<r, e> / ||e||^2, 0, beta / max_g ||(Gv - b)_g||)``, the best
        feasible multiple of the residual.
        """
        gv = self.times(v) if gv is None else gv
        bv = float((self.rhs * v).sum())
        ee = max(self.rr - 2 * bv + float((v * gv).sum()), 0.0)
        re = self.rr - bv
        norms = self.group_norms(v)
        primal = 0.5 * ee + beta * float(norms.sum())
        max_dual = float(self.group_norms(gv - self.rhs).max())
        groups = float((norms > 0).sum())
        return {**certificate_numbers(primal, re, ee, beta, max_dual), "groups": groups}


def _patches(stage: ConvexStage, x: Tensor, rows: range | None = None) -> Tensor:
    """The ``C_in * K^d`` input patches of every pixel, ``(B * pixels, C_in * K^d)``, in the
    order of a weight's ``(C_in, K...)``: the ``K^d`` shifted copies of the zero-padded
    input, exact in any dtype (a float64 convolution with one-hot filters, the same
    numbers, takes torch's slow path). ``rows``: only the pixels of these indices along
    the first spatial axis (a slab, `patch_slabs`)."""
    k, spatial = stage.config.kernel_size, x.shape[2:]
    padded = F.pad(x, [k // 2] * (2 * stage.ndim))
    if rows is not None:
        padded = padded[:, :, rows.start : rows.stop + k - 1]
        spatial = torch.Size([len(rows), *spatial[1:]])
    copies = [
        padded[(..., *(slice(s, s + n) for s, n in zip(shift, spatial, strict=True)))]
        for shift in itertools.product(range(k), repeat=stage.ndim)
    ]
    u = torch.stack(copies, dim=2)  # (B, C_in, K^d, *spatial)
    return u.flatten(1, 2).movedim(1, -1).reshape(-1, u.shape[1] * u.shape[2])


def patch_slabs(stage: ConvexStage, x: Tensor) -> list[range]:
    """Ranges along the first spatial axis of ``x`` whose patches (`_patches`) hold at
    most `PATCH_SLAB_BYTES` (at least one row each): a wide input's patches whole would
    take ``C_in K^d`` times the input (5 GiB for one 320x320 image of 256 channels at
    K 7)."""
    k, spatial = stage.config.kernel_size, x.shape[2:]
    per_row = x.shape[0] * x.shape[1] * k**stage.ndim * math.prod(spatial[1:]) * x.element_size()
    step = max(1, PATCH_SLAB_BYTES // max(1, per_row))
    return [range(top, min(spatial[0], top + step)) for top in range(0, spatial[0], step)]


def _projected_patches(stage: ConvexStage, x: Tensor, basis: Tensor) -> Tensor:
    """The patches' coordinates in ``basis`` (``(C_in K^d, r)``), ``(B * pixels, r)``
    float32: one float32 convolution with the basis vectors as filters. The Gram matrix
    built from them is the model of the Gram route's refinement rounds, whose exact
    float64 gradients remove its rounding."""
    k, r = stage.config.kernel_size, basis.shape[1]
    filters = basis.T.reshape(r, stage.in_channels, *([k] * stage.ndim)).float()
    z = stage.ops.conv(x.float(), filters, padding=k // 2)  # (B, r, *spatial)
    return z.movedim(1, -1).reshape(-1, r)


@dataclass
class CodeGroups:
    """Pixels grouped by gate code (their P gates as a bit string; see `gram_system`).

    Attributes:
        order: the permutation that sorts the pixels by code (each code's pixels
            contiguous).
        starts: where each code's pixels begin in that order.
        counts: how many pixels each code has.
        codes: each code's gates, ``(codes, P)`` bool.
    """

    order: Tensor
    starts: Tensor
    counts: Tensor
    codes: Tensor


def code_groups(d: Tensor) -> CodeGroups:
    """The `CodeGroups` of pixels with gates ``d`` ``(pixels, P)`` (bool), the codes in
    order of their pixel counts (`_code_sums` takes the codes of one count together)."""
    # The gates packed into integers of `CODE_BITS` bits, a pattern at a time (8 bytes a
    # pixel per integer, not per pattern): one integer, a 1D unique, much faster than
    # rows; more (P > 62), a unique of their rows.
    words = []
    for first in range(0, d.shape[1], CODE_BITS):
        word = torch.zeros(d.shape[0], dtype=torch.long, device=d.device)
        for bit, column in enumerate(d[:, first : first + CODE_BITS].T):
            word |= column.long() << bit
        words.append(word)
    if len(words) == 1:
        _, inverse, counts = torch.unique(words[0], return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = torch.unique(
            torch.stack(words, dim=1), dim=0, return_inverse=True, return_counts=True
        )
    by_count = torch.argsort(counts, stable=True)
    rank = torch.empty_like(by_count)
    rank[by_count] = torch.arange(by_count.numel(), device=d.device)
    counts = counts[by_count]
    order = torch.argsort(rank[inverse], stable=True)
    starts = counts.cumsum(0) - counts
    return CodeGroups(order, starts, counts, d[order[starts]])


def _code_sums(u: Tensor, w: Tensor, groups: CodeGroups, upper_p: Tensor) -> Tensor:
    """``sum_pixels (D_p D_q) u w^T`` for every pattern pair ``(p <= q)`` of ``upper_p``,
    ``(pairs, m * n)`` float64, from patches ``u`` ``(pixels, m)`` and ``w``
    ``(pixels, n)`` sorted by gate code (products in their dtype) and the pixels'
    `CodeGroups`: each code's patch Gram once, then one product over the codes.

    The codes come in order of their pixel counts (`code_groups`), so the pixels of the
    codes of one count are consecutive rows, viewed as a ``(codes, count, m)`` tensor
    without a copy: the codes' patch Grams are batched matrix products over the rows as
    they lie. They fill a buffer of `CODE_BYTES`, whose codes' pattern pairs are one
    matrix product."""
    m, n = u.shape[1], w.shape[1]
    pairs = upper_p.shape[1]
    sums = torch.zeros(pairs, m * n, dtype=torch.float64, device=u.device)
    step = max(1, CODE_BYTES // (u.element_size() * m * n))
    blocks = torch.empty(min(step, groups.counts.numel()), m, n, dtype=u.dtype, device=u.device)
    first = filled = 0  # the buffer holds the patch Grams of codes first .. first + filled - 1

    def flush() -> None:
        codes = groups.codes[first : first + filled].to(u.dtype)
        code_pairs = codes[:, upper_p[0]] * codes[:, upper_p[1]]  # (codes, pairs)
        sums.add_((code_pairs.T @ blocks[:filled].view(filled, m * n)).double())

    sizes, numbers = torch.unique_consecutive(groups.counts, return_counts=True)
    start = 0  # the first pixel of the next code
    for size, number in zip(sizes.tolist(), numbers.tolist(), strict=True):
        done = 0
        while done < number:
            k = min(number - done, blocks.shape[0] - filled)
            rows = slice(start, start + k * size)
            torch.bmm(
                u[rows].view(k, size, m).transpose(1, 2),
                w[rows].view(k, size, n),
                out=blocks[filled : filled + k],
            )
            filled, done, start = filled + k, done + k, start + k * size
            if filled == blocks.shape[0]:
                flush()
                first, filled = first + filled, 0
    if filled:
        flush()
    return sums


def _assemble_gram(sums: Tensor, p: int, m: int) -> Tensor:
    """The ``(P m, P m)`` float64 matrix whose pattern blocks are ``sums`` (`_code_sums`
    of all ``m`` coordinates against themselves, summed over every process)."""
    pairs, index = sums.view(-1, m, m), _pair_index(p, sums.device)
    gram = torch.empty(p, m, p, m, dtype=torch.float64, device=sums.device)
    # One pattern's rows at a time (the pairs re-indexed whole would be another matrix
    # of the Gram's size).
    for q in range(p):
        gram[q] = pairs[index[q]].transpose(0, 1)
    return gram.reshape(p * m, p * m)


def _assemble_packed(sums: Tensor, m: int, old: Tensor | None) -> Tensor:
    """The packed float32 matrix (`GramSystem.gram`) whose pattern-pair blocks have the
    rows of their last ``m - r0`` coordinates (and, by symmetry, those columns) from
    ``sums`` (`_code_sums`, summed over every process) and their first ``r0`` rows and
    columns from the packed ``old`` ``(pairs, r0, r0)``."""
    r0 = 0 if old is None else old.shape[1]
    new = sums.view(-1, m - r0, m)
    gram = torch.empty(new.shape[0], m, m, dtype=torch.float32, device=sums.device)
    gram[:, r0:] = new
    gram[:, :, r0:] = new.transpose(1, 2)
    if old is not None:
        gram[:, :r0, :r0] = old
    return gram


@torch.no_grad()
def gram_system(
    stage: ConvexStage, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]]
) -> GramSystem:
    """Accumulate the stage's `GramSystem` over ``(x, r, gates or None)`` batches of whole
    images (iterated once; gates as `ConvexStage.pattern_gates`), in float64.

    Block ``(p, q)`` of ``G`` is ``sum_pixels D_p D_q u u^T``. Pixels with the same gate
    code (their P gates as a bit string) share every factor ``D_p D_q``, and a batch has far
    fewer codes than pixels (spatially smooth gates: 5.5 thousand codes on 885 thousand
    pixels of the default data's stage 1). So each code's patch Gram ``S_c = U_c^T U_c`` is
    summed once, and ``G = sum_c (d_c d_c^T) (x) S_c`` is one matrix product over the codes
    (and the pattern pairs). Under torchrun each process passes its share of the training
    set (`cvxmri.distributed.shard`) and the system is summed over all of them.
    """
    began = time.perf_counter()
    p = stage.config.patterns
    m = stage.in_channels * stage.config.kernel_size**stage.ndim
    device = stage.gate_weight.device
    upper_p = torch.triu_indices(p, p, device=device)
    sums = torch.zeros(upper_p.shape[1], m * m, dtype=torch.float64, device=device)
    rhs: Tensor | None = None
    rr = 0.0
    count = 0
    for x, r, gates in batches:
        d = stage.pattern_gates(x.float()) if gates is None else gates
        u = _patches(stage, x.double())
        d_all = d.movedim(1, -1).reshape(-1, p)
        r_all = r.double().movedim(1, -1).reshape(u.shape[0], -1)
        part = _rhs_blocks(_gated_residuals(d_all, r_all), u, p).reshape(p * m, -1)
        rhs = part if rhs is None else rhs + part
        rr += float(r_all.square().sum())
        groups = code_groups(d_all)
        u = u[groups.order]
        sums += _code_sums(u, u, groups, upper_p)
        count += x.shape[0]
    if rhs is None or count == 0:
        raise CvxmriError("the training set is empty: no (x, r) batches")
    # Under torchrun: the sums over every process's share of the training set.
    distributed.all_reduce_(sums)
    distributed.all_reduce_(rhs)
    rr, total = distributed.sum_floats(rr, count)
    count = int(total)
    return GramSystem(
        _assemble_gram(sums.div_(count), p, m),
        rhs / count,
        rr / count,
        count,
        p,
        stage.config.output_groups,
        time.perf_counter() - began,
    )


def _gated_residuals(d: Tensor, r: Tensor) -> Tensor:
    """Each pattern's gate times each output's residual, ``(pixels, P * out)`` in ``r``'s
    dtype, from gates ``d`` ``(pixels, P)`` and residuals ``r`` ``(pixels, out)``."""
    return (d.to(r.dtype)[:, :, None] * r[:, None, :]).reshape(d.shape[0], -1)


def _rhs_blocks(gated: Tensor, u: Tensor, patterns: int) -> Tensor:
    """``b = sum_pixels (D_p u) r^T`` per pattern, ``(P, m, out)`` float64, from the
    `_gated_residuals` and the patches (or coordinates) ``u`` ``(pixels, m)``, the product
    in their dtype."""
    return (gated.T @ u).double().view(patterns, -1, u.shape[1]).transpose(1, 2)


class PatchStore:
    """A wide stage's training set held for the subspace route (`StageSolver`): its pixels
    sorted by gate code over the whole training set (`code_groups`), their gated
    residuals, and their patches' coordinates in the current basis (`_projected_patches`,
    float32), grown by columns.

    Two savings over streaming batches (`gram_system`): a code's pixels in every image are
    summed together, so the pattern-pair product runs over the distinct codes of the
    whole set (51 thousand on the default data's stage 2), not each batch's codes again;
    and a grown basis computes only its new columns'
    coordinates. The coordinates take ``4 * pixels`` bytes per column, in one buffer of
    `columns` columns (`buffer`), zeroed when it is made: its rows are scattered to (code
    order), and a first touch of its pages in that order cost seconds of page faults,
    where zeroing touches them in sequence; the next stage's store can take it over. Its
    Gram matrices
    are kept in float32 (half the memory; the refinement rounds' exact passes remove the
    rounding, and the main job's stages took the same rounds and iterations as with
    float64, docs/benchmarks.md) and packed (`GramSystem.gram`: the pattern-pair blocks
    once, another half).
    """

    def __init__(
        self, stage: ConvexStage, data: _Data, columns: int, buffer: Tensor | None = None
    ) -> None:
        """Sort the pixels of ``data`` (``(x, r, gates)`` batches) by gate code, with room
        for the coordinates of ``columns`` basis columns, fewer if `STORE_BYTES` holds
        fewer. ``buffer``: an earlier store's `buffer`, taken as this one's when its shape
        and device fit (its pages already touched: the first touch of a new one's costs
        seconds, the stages of a network have the same pixels)."""
        self.stage, self.data = stage, data
        p = stage.config.patterns
        d_all = torch.cat([d.movedim(1, -1).reshape(-1, p) for _, _, d in data])
        r_all = torch.cat([r.double().movedim(1, -1).reshape(-1, r.shape[1]) for _, r, _ in data])
        self.groups = code_groups(d_all)
        # Where each pixel (in the batches' order) lies in code order: coordinates are
        # written there a batch at a time (`system`).
        order = self.groups.order
        self._position = torch.empty_like(order)
        self._position[order] = torch.arange(order.numel(), device=order.device)
        # Residuals in code order (a pixel's gates are its code's); their products with
        # the gates (the gated residuals, P * out floats a pixel) are formed a chunk at a
        # time (`_rhs`).
        self.residual = r_all[order].float()
        self.out = r_all.shape[1]
        rr, count, pixels = distributed.sum_floats(
            float(r_all.square().sum()), _images_in(data), d_all.shape[0]
        )
        self.rr, self.count = rr, int(count)
        # Counted on every process's pixels together, so that all processes agree (each
        # holds only its share under torchrun, a stricter bound than needed).
        self.columns = min(columns, STORE_BYTES // (4 * max(1, int(pixels))))
        shape = (d_all.shape[0], self.columns)
        fits = buffer is not None and buffer.shape == shape and buffer.device == d_all.device
        self.buffer = buffer if fits else torch.zeros(shape, device=d_all.device)

    def held_bytes(self) -> int:
        """Bytes of the store: the coordinates' buffer (all `columns` of it, zeroed when
        made), the residuals, the code grouping and the codes' gates."""
        groups = self.groups
        held = (self.buffer, self.residual, groups.order, self._position, groups.starts)
        return sum(t.numel() * t.element_size() for t in (*held, groups.counts, groups.codes))

    def _rhs(self, coordinates: Tensor) -> Tensor:
        """`_rhs_blocks` of ``coordinates`` ``(pixels, r)`` (code order), ``(P, r, out)``
        float64, the gated residuals formed `RHS_PIXELS` pixels at a time."""
        p = self.stage.config.patterns
        total = torch.zeros(
            p, coordinates.shape[1], self.out, dtype=torch.float64, device=coordinates.device
        )
        for start in range(0, coordinates.shape[0], RHS_PIXELS):
            part = slice(start, start + RHS_PIXELS)
            gates = self._gates(start, min(start + RHS_PIXELS, coordinates.shape[0]))
            gated = _gated_residuals(gates, self.residual[part])
            total += _rhs_blocks(gated, coordinates[part], p)
        return total

    @torch.no_grad()
    def predictions(self, coordinates: Tensor) -> list[Tensor]:
        """The model's predictions ``sum_p D_p U Q a_p`` (float32) of weights with
        coordinates ``coordinates`` ``(P, out, r)`` in the basis's first ``r`` columns,
        per batch of the store's data ``(B, out, *spatial)``, from the stored coordinates
        (``r`` products a pixel instead of a convolution's ``C_in K^d``)."""
        p, r = coordinates.shape[0], coordinates.shape[2]
        weights = coordinates.permute(2, 0, 1).reshape(r, -1).float()  # (r, P * out)
        ordered = torch.empty(self.residual.shape, device=weights.device)
        for start in range(0, ordered.shape[0], RHS_PIXELS):
            stop = min(start + RHS_PIXELS, ordered.shape[0])
            responses = (self.buffer[start:stop, :r] @ weights).view(stop - start, p, -1)
            gates = self._gates(start, stop).to(responses.dtype)
            ordered[start:stop] = (gates.unsqueeze(2) * responses).sum(dim=1)
        pixels = ordered[self._position]  # back to the batches' order
        out, first = [], 0
        for _, r_batch, _ in self.data:
            count = r_batch[:, 0].numel()
            spatial = (r_batch.shape[0], *r_batch.shape[2:], r_batch.shape[1])
            out.append(pixels[first : first + count].view(spatial).movedim(-1, 1))
            first += count
        return out

    def _gates(self, start: int, stop: int) -> Tensor:
        """The gates ``(stop - start, P)`` of the pixels ``start .. stop - 1`` in code
        order: their codes' gates, each repeated over the code's pixels there."""
        starts, counts = self.groups.starts, self.groups.counts
        first = int(torch.searchsorted(starts, start, right=True)) - 1
        last = int(torch.searchsorted(starts, stop - 1, right=True))
        low = starts[first:last].clamp(min=start)
        high = (starts[first:last] + counts[first:last]).clamp(max=stop)
        return self.groups.codes[first:last].repeat_interleave(high - low, dim=0)

    @torch.no_grad()
    def system(self, basis: Tensor, previous: GramSystem | None = None) -> GramSystem:
        """The `GramSystem` of the program restricted to filters ``Q a``, ``Q = basis``
        (``(C_in K^d, r)``, orthonormal, at most `columns` columns). ``previous``: the
        system of the basis's first ``r0`` columns (the store holds their coordinates);
        its matrix and right-hand side are kept, and only the new columns' coordinates
        and blocks computed."""
        began = time.perf_counter()
        stage, p = self.stage, self.stage.config.patterns
        old = 0 if previous is None else previous.block
        m = basis.shape[1]
        if m > self.columns:
            raise CvxmriError(f"a basis of {m} columns exceeds the store's {self.columns}")
        # Each batch's coordinates straight to their places in code order (the whole set's
        # at once, and a sorted copy of them, would take 8 bytes a pixel a new column).
        new = self.buffer[:, old:m]
        start = 0
        for x, _, _ in stream(self.data, new.device):
            coordinates = _projected_patches(stage, x, basis[:, old:])
            rows = self._position[start : start + coordinates.shape[0]]
            new.index_copy_(0, rows, coordinates)
            start += coordinates.shape[0]
        upper_p = torch.triu_indices(p, p, device=new.device)
        sums = _code_sums(new, self.buffer[:, :m], self.groups, upper_p)
        rhs = self._rhs(new)  # the new rows of every pattern
        distributed.all_reduce_(sums)
        distributed.all_reduce_(rhs)
        # Means over the images: the previous system's blocks are kept as they are (no
        # copy of its matrix beside the new one).
        sums.div_(self.count)
        rhs = rhs / self.count
        kept = None
        if previous is not None:
            kept = previous.gram
            rhs = torch.cat([previous.rhs.view(p, old, self.out), rhs], 1)
        return GramSystem(
            _assemble_packed(sums, m, kept),
            rhs.reshape(p * m, self.out),
            self.rr / self.count,
            self.count,
            p,
            stage.config.output_groups,
            time.perf_counter() - began,
            basis,
        )


def _pair_index(size: int, device: torch.device) -> Tensor:
    """``index[i, j]``: the position of the unordered pair ``{i, j}`` in
    ``torch.triu_indices(size, size)``."""
    upper = torch.triu_indices(size, size, device=device)
    index = torch.empty(size, size, dtype=torch.long, device=device)
    positions = torch.arange(upper.shape[1], device=device)
    index[upper[0], upper[1]] = positions
    index[upper[1], upper[0]] = positions
    return index


class BlockMetric:
    """A block-Jacobi metric ``M = blockdiag(M_p)``, one positive definite ``m x m`` block
    per pattern (shared by its output channels), and the exact prox of the group norm in it.

    Tensors are in the per-pattern layout ``(P, out, m)`` (`GramSystem.per_pattern`; a stage
    weight ``(P, out, C_in, K...)`` flattened). ``M_p = Q_p diag(lambda_p) Q_p^T``
    (eigenvalues floored at ``METRIC_FLOOR`` times the block's largest). In the eigenbasis
    the prox ``argmin_u L/2 ||u - z||_M^2 + beta ||u||`` of a group is
    ``u_i = a_i z_i / (a_i + t)`` with ``a = L lambda`` and the scalar ``t > 0`` solving
    ``t ||a z / (a + t)|| = beta`` (safeguarded Newton); the group is zero when
    ``||a z|| <= beta``.
    """

    def __init__(self, blocks: Tensor, output_groups: str) -> None:
        """Eigendecompose ``blocks`` ``(P, m, m)`` (symmetric, float64)."""
        values, vectors = torch.linalg.eigh(blocks)  # (P, m), (P, m, m)
        floor = METRIC_FLOOR * values.amax(dim=1, keepdim=True).clamp_min(
            torch.finfo(values.dtype).tiny
        )
        self.values = values.clamp_min(floor)
        self.vectors = vectors
        self.output_groups = output_groups

    @classmethod
    def from_gram(cls, system: GramSystem) -> BlockMetric:
        """The metric of the diagonal blocks ``G_pp`` of the Gram matrix."""
        p, m = system.patterns, system.block
        if system.packed:
            diagonal = torch.arange(p, device=system.gram.device)
            blocks = system.gram[_pair_index(p, system.gram.device)[diagonal, diagonal]]
        else:
            blocks = system.gram.view(p, m, p, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return cls(blocks.double(), system.output_groups)

    def solve(self, g: Tensor) -> Tensor:
        """``M^{-1} g``."""
        e = (g @ self.vectors) / self.values[:, None, :]
        return e @ self.vectors.transpose(1, 2)

    def quadratic(self, d: Tensor) -> float:
        """``d^T M d`` summed over output channels."""
        e = d @ self.vectors
        return float((self.values[:, None, :] * e * e).sum())

    def prox(self, z: Tensor, lipschitz: float, beta: float) -> Tensor:
        """``argmin_u lipschitz/2 ||u - z||_M^2 + beta * sum_g ||u_g||``."""
        if beta == 0:
            return z.clone()
        e = z @ self.vectors  # (P, out, m) in the eigenbases
        p, out, m = e.shape
        a = (lipschitz * self.values)[:, None, :].expand(p, out, m)
        shape = (p * out, m) if self.output_groups == "separate" else (p, out * m)
        ze, ae = e.reshape(shape), a.reshape(shape)
        az = ae * ze
        limit = torch.linalg.vector_norm(az, dim=1)  # t q(t) -> ||a z|| as t -> inf
        alive = limit > beta
        # q(t) = ||a z / (a + t)|| decreases; the root of t q(t) = beta is that of
        # f(t) = 1 / q(t) - t / beta, which is close to linear (exactly so for one distinct
        # a), so Newton's method converges in a few steps. It is kept inside the bracket
        # [beta / ||z||, beta max(a) / (||a z|| - beta)] (t ||a z|| / (max a + t) <= t q(t)
        # <= t ||z||), falling back to bisection when a step leaves it.
        tiny = torch.finfo(limit.dtype).tiny
        lo = beta / torch.linalg.vector_norm(ze, dim=1).clamp_min(tiny)
        hi = torch.maximum(beta * ae.amax(dim=1) / (limit - beta).clamp_min(tiny), lo)
        t = lo.clone()
        for _ in range(PROX_NEWTON_STEPS):
            w = az / (ae + t[:, None])
            q = torch.linalg.vector_norm(w, dim=1).clamp_min(tiny)
            f = 1 / q - t / beta
            lo = torch.where(f > 0, t, lo)
            hi = torch.where(f > 0, hi, t)
            # d(1/q)/dt = sum(w^2 / (a + t)) / q^3
            slope = (w * w / (ae + t[:, None])).sum(dim=1) / q**3 - 1 / beta
            newton = t - f / slope
            # (Closed: at the root Newton's step is nil, and bisecting would leave it.)
            inside = (newton >= lo) & (newton <= hi)
            following = torch.where(inside, newton, (lo + hi) / 2)
            settled = ((following - t).abs() <= PROX_SETTLED * t) | ~alive
            t = following
            if bool(settled.all()):
                break
        t = t[:, None]
        u = torch.where(alive[:, None], az / (ae + t), torch.zeros_like(az))
        return u.reshape(p, out, m) @ self.vectors.transpose(1, 2)


def metric_lipschitz(
    hessian: Callable[[Tensor], Tensor],
    metric: BlockMetric,
    shape: tuple[int, ...],
    iterations: int,
) -> float:
    """The largest eigenvalue of ``M^{-1} H`` for the Hessian product ``hessian`` on
    per-pattern tensors of ``shape``, times 1.01: `power_iteration` from a seeded random
    start (the step constant of FISTA in the metric ``M``; the solvers double it if a step
    ever increases the objective)."""
    start = _random_start(shape, metric.values.device)
    return power_iteration(hessian, metric, start, iterations)[0]


def _random_start(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A seeded standard normal float64 tensor: the power iteration's start."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device)


def power_iteration(
    hessian: Callable[[Tensor], Tensor], metric: BlockMetric, start: Tensor, iterations: int
) -> tuple[float, Tensor]:
    """``iterations`` power steps on ``M^{-1} H`` from ``start`` (per-pattern layout): the
    generalised Rayleigh quotient ``u^T H u / u^T M u`` times 1.01, and the last vector
    (unit norm), a start for a nearby operator."""
    u = start / torch.linalg.vector_norm(start).clamp_min(torch.finfo(start.dtype).tiny)
    for _ in range(max(1, iterations)):
        w = metric.solve(hessian(u))
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0:
            return 1.0, u
        u = w / norm
    return 1.01 * float((u * hessian(u)).sum()) / metric.quadratic(u), u


def objective(system: GramSystem, v: Tensor, gv: Tensor, beta: float) -> float:
    """``L(v) + beta * sum_g ||v_g||`` of ``v`` ``(n, out)``, given ``gv = G v``."""
    value = 0.5 * (system.rr - 2 * float((system.rhs * v).sum()) + float((v * gv).sum()))
    return value + beta * float(system.group_norms(v).sum())


def solve_gram(
    system: GramSystem,
    beta: float,
    start: Tensor | None = None,
    *,
    tol: float = 1e-3,
    max_iterations: int = 20000,
    max_seconds: float = math.inf,
    check_every: int = 25,
    metric: BlockMetric | None = None,
    lipschitz: float | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Solve the group lasso of ``system`` at ``beta`` to relative duality gap ``tol``.

    FISTA in the block-Jacobi metric ``M`` (`BlockMetric.from_gram` by default) from
    ``start`` (``(n, out)``; zero by default): ``v' = prox_M(y - M^{-1} (G y - b) / L)``,
    with ``L`` the largest eigenvalue of ``M^{-1} G`` (`metric_lipschitz`), the momentum
    reset whenever the objective increases, and ``L`` doubled if a plain step does. Every
    ``check_every`` iterations the exact certificate (`GramSystem.certificate`, from the
    product ``G v`` the step carries: no product of its own, but a few reductions, which
    on a small system cost as much as a step) is evaluated and passed to
    ``callback(iteration, cert)``; the run stops at ``relative_gap <= tol``,
    ``max_iterations`` or ``max_seconds``.

    Returns the solution ``(n, out)`` and its certificate with ``iterations`` and
    ``seconds``.
    """
    if not math.isfinite(beta) or beta < 0:
        raise CvxmriError(f"beta must be a finite number >= 0, got {beta!r}")
    began = time.perf_counter()
    metric = metric or BlockMetric.from_gram(system)
    out = system.rhs.shape[1]
    per, flat = system.per_pattern, system.flat

    def hessian(u: Tensor) -> Tensor:
        return per(system.times(flat(u)))

    step = lipschitz or metric_lipschitz(hessian, metric, per(system.rhs).shape, 100)
    current = (
        torch.zeros(system.size, out, dtype=torch.float64, device=system.gram.device)
        if start is None
        else start.clone()
    )
    # G times the current and the extrapolated point, kept along (one product a step).
    g_current = system.times(current)
    value = objective(system, current, g_current, beta)
    extrapolated, g_extrapolated, momentum, plain = current, g_current, 1.0, True
    done = halvings = 0
    cert = system.certificate(current, beta, g_current)
    while cert["relative_gap"] > tol and done < max_iterations:
        grad = per(g_extrapolated - system.rhs)
        candidate = flat(metric.prox(per(extrapolated) - metric.solve(grad) / step, step, beta))
        g_candidate = system.times(candidate)
        candidate_value = objective(system, candidate, g_candidate, beta)
        done += 1
        # An increase within the rounding of the objective's terms is none: ``||r||^2``,
        # ``b^T v`` and ``v^T G v`` nearly cancel near a close fit.
        if candidate_value > value + 1e-12 * abs(value) + 1e-13 * abs(system.rr):
            if plain:
                # A plain step with a large enough constant never increases the objective:
                # the power iteration under-estimated it.
                step *= 2
                halvings += 1
                if halvings > 60:
                    raise CvxmriError("solve_gram: the objective keeps increasing; not finite?")
            # Restart: the momentum overshot.
            momentum, extrapolated, g_extrapolated, plain = 1.0, current, g_current, True
            continue
        following = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        factor = (momentum - 1) / following
        extrapolated = candidate + factor * (candidate - current)
        g_extrapolated = g_candidate + factor * (g_candidate - g_current)
        momentum, plain = following, factor == 0
        current, g_current, value = candidate, g_candidate, candidate_value
        if done % check_every == 0:
            cert = system.certificate(current, beta, g_current)
            if callback is not None:
                callback(done, cert)
            if time.perf_counter() - began > max_seconds:
                break
    cert = system.certificate(current, beta, g_current)
    return current, {**cert, "iterations": float(done), "seconds": time.perf_counter() - began}


def refinement_model(system: GramSystem, v: Tensor, gradient: Tensor, ee: float) -> GramSystem:
    """The quadratic model of one refinement round at ``v`` (``(n, out)``): the curvature
    of ``system``, with the exact gradient ``gradient`` (same layout) and the exact
    ``||e||^2 / N`` ``ee`` at ``v`` (from a pass over the data), so that the model's value
    and gradient at ``v`` are the data's, whatever the matrix's rounding."""
    gv = system.times(v)
    rhs = gv - gradient
    rr = ee + 2 * float((rhs * v).sum()) - float((v * gv).sum())
    return GramSystem(system.gram, rhs, rr, system.count, system.patterns, system.output_groups)


# ------------------------------------------------------------------ solving a stage


def _set_weight(stage: ConvexStage, weight: Tensor) -> None:
    with torch.no_grad():
        stage.v.copy_(weight.reshape(stage.v.shape))


def _exact_certificate(
    stage: ConvexStage, data: _Data, beta: float, basis: Tensor | None = None
) -> tuple[dict[str, float], ResidualStatistics]:
    """The float64 certificate of the stage's weights at ``beta`` from one pass, and the
    pass's statistics (the exact gradient, ``||e||^2 / N``).

    With a ``basis`` ``Q`` (weights ``Q a``), the certificate is still the whole
    program's, and ``subspace_relative_gap`` is the restricted program's (the dual norms
    of the gradient's coordinates ``Q^T g``) from the same pass."""
    batches = stream(data, stage.v.device)
    stats = residual_statistics(stage, ((x, r, d, None) for x, r, d in batches))
    return _certificate_of(stage, stats, beta, basis), stats


def _screened_statistics(
    stage: ConvexStage, data: _Data, predictions: list[Tensor] | None = None
) -> ResidualStatistics:
    """`residual_statistics` from float32 convolutions (each chunk's products in float32,
    their sums over the chunks in float64): a screening pass, several times faster than the
    exact float64 one and close to it (gradients within 3e-5, relative gaps within 3e-7 on
    the default data's stage 2), enough to see that a gap is still above ``tol`` and to
    grow a basis, but not a certificate. ``predictions``: the model's, per chunk, when the
    caller has them (`PatchStore.predictions`), saving the forward convolutions."""
    weight = stage.effective_weight().detach().float()
    grad = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    re = ee = 0.0
    with torch.no_grad():
        for i, (x, r, d) in enumerate(stream(data, weight.device, torch.float32)):
            prediction = None if predictions is None else predictions[i]
            if prediction is None:
                prediction = stage.apply_weight(x, weight, d)
            e = r.float() - prediction
            re += float((r.double() * e).sum())
            ee += float(e.double().square().sum())
            grad -= stage.apply_adjoint(x, e, d).double()
    distributed.all_reduce_(grad)
    re, ee, total = distributed.sum_floats(re, ee, _images_in(data))
    count = int(total)
    return ResidualStatistics(grad / count, re / count, ee / count, 0.0, count)


def _certificate_of(
    stage: ConvexStage, stats: ResidualStatistics, beta: float, basis: Tensor | None
) -> dict[str, float]:
    """`_exact_certificate` from a pass's statistics at the stage's current weights."""
    groups = stage.config.output_groups
    with torch.no_grad():
        norms = group_norms_of(stage.v.detach().double(), groups)
    primal = 0.5 * stats.ee + beta * float(norms.sum())
    max_dual = float(group_norms_of(stats.gradient, groups).max())
    cert = {
        **certificate_numbers(primal, stats.re, stats.ee, beta, max_dual),
        "groups": float((norms > 0).sum()),
    }
    if basis is not None:
        projected = stats.gradient.reshape(*stats.gradient.shape[:2], -1) @ basis
        restricted = float(group_norms_of(projected, groups).max())
        within = certificate_numbers(primal, stats.re, stats.ee, beta, restricted)
        cert["subspace_relative_gap"] = within["relative_gap"]
    return cert


class StageSolver:
    """Solves one gated stage's program on a fixed training set to a relative duality gap,
    for any ``beta``, warm-started from the stage's current weights (which it overwrites).

    Two routes, chosen by the number of unknowns per output channel ``n = P C_in K^d``:

    - ``n <= gram_unknowns``: the Gram matrix of the training set (`gram_system`) is the
      model Hessian. Each round solves the model (`solve_gram`, block-Jacobi FISTA) with the
      exact gradient of the training set (one float64 pass),
      ``model(u) = L(v) + g^T (u - v) + 1/2 (u - v)^T G (u - v)``, and stops once the exact
      certificate reaches ``tol``: iterative refinement, which removes the float32
      rounding of the accumulated matrix (usually one or two rounds).
    - wider stages with ``subspace = r > 0``: the program restricted to filters in the
      span of the ``r`` leading principal directions ``Q`` of the stage's input patches
      (`initial_basis`), ``n = P r`` unknowns, by the Gram route above, growing the basis
      while the whole program's gap is above ``tol`` (`_solve_subspace`), up to
      ``subspace_unknowns`` unknowns. The certificate is the whole program's;
      ``subspace_relative_gap`` the restricted one's (one pass gives both). With
      ``screen`` (and ``tol`` at least `SCREEN_TOL`) a round's pass is a screening one
      (`_screened_statistics`, float32 convolutions) while its gap is above
      `SCREEN_MARGIN` times ``tol``, and exact from there; a solve stopped by a bound
      after a screening pass ends with an exact one, so the returned certificate is
      always float64.
    - wider stages otherwise: FISTA on the whole training set (a forward and an adjoint
      convolution pass per iteration) in the block-Jacobi metric ``M_p = f_p S`` (``S``
      the mean patch Gram of a few images, ``f_p`` the pattern's active fraction), with
      the exact prox in that metric (`BlockMetric`); certified by a float64 pass every
      ``check_every`` iterations.

    The inputs stay where they are given (`ChunkInputs`: host memory, a memory-mapped
    cache, or a function that loads them) and every pass moves one chunk at a time to the
    weights' device (`stream`), so the device holds the residuals, the gates and what the
    route keeps, not the training set's inputs. They may be bf16 (a stage-input cache under
    autocast): every product takes them to float32 (patch coordinates, Gram matrix) or
    float64 (the exact passes), so the certificate is that of the program on the bf16
    inputs.

    Either stops at ``tol`` or after ``max_seconds`` per ``beta``. Under torchrun each
    process passes its share of the training set (`cvxmri.distributed.shard`); every sum is
    over all processes, so they all take the same steps.
    """

    def __init__(
        self,
        stage: ConvexStage,
        data: _Data,
        *,
        tol: float = 1e-3,
        max_seconds: float = math.inf,
        gram_unknowns: int = 4096,
        max_rounds: int = 20,
        check_every: int = 10,
        max_iterations: int = 2000,
        subspace: int = 0,
        subspace_rounds: int = 0,
        subspace_unknowns: int = CertifiedConfig.subspace_unknowns,
        screen: bool = CertifiedConfig.screen,
        buffer: Tensor | None = None,
    ) -> None:
        """Set up the route for ``stage`` on ``data`` (``(inputs, r, gates)`` chunks of
        whole images, gates as `ConvexStage.pattern_gates`, ``r`` and the gates on the
        weights' device). ``buffer``: an earlier solver's ``store.buffer``, for the
        subspace route's patch store to reuse (`PatchStore`)."""
        if stage.config.program != "gated":
            raise CvxmriError("the certified solver needs convex.program=gated")
        if not data:
            raise CvxmriError("the training set is empty: no (x, r) batches")
        self.stage, self.data = stage, data
        self.tol, self.max_seconds = tol, max_seconds
        self.max_rounds, self.check_every = max_rounds, check_every
        self.max_iterations = max_iterations
        self.subspace_rounds = subspace_rounds
        self.count = int(distributed.sum_floats(_images_in(data))[0])
        began = time.perf_counter()
        p = stage.config.patterns
        block = stage.in_channels * stage.config.kernel_size**stage.ndim
        self.unknowns = p * block
        self.basis: Tensor | None = None
        self.store: PatchStore | None = None
        self.screen = False
        # The statistics of the last pass, the weights they are of, and whether the pass
        # was exact: a new beta starts where the last one ended.
        self._last: tuple[ResidualStatistics, Tensor, bool] | None = None
        # The coordinates ``(P, out, r)`` in the basis of the weights the solver set last,
        # and those weights: a screening pass at them takes the store's predictions.
        self._coordinates: tuple[Tensor, Tensor] | None = None
        self._power: Tensor | None = None
        if self.unknowns <= gram_unknowns:
            self.route = "gram"
        elif subspace > 0:
            self.route = "subspace"
            # (The Gram route's rounds usually certify: a screening pass would be spent.)
            self.screen = screen and tol >= SCREEN_TOL
            self.store = PatchStore(stage, data, max(1, subspace_unknowns // p), buffer)
            self.room = self.store.columns
            self.basis = initial_basis(stage, _subset(data, self.count), min(subspace, self.room))
        else:
            self.route = "matrix-free"
        if self.route != "matrix-free":
            self._build(self.basis)
        else:
            subset = _subset(data, self.count)
            self.metric = _patch_metric(stage, data, _mean_patch_gram(stage, subset))
            self.lipschitz = _operator_lipschitz(stage, subset, self.metric, 20)
        self.setup_seconds = time.perf_counter() - began

    def _build(self, basis: Tensor | None, previous: GramSystem | None = None) -> None:
        """The Gram system (restricted to ``basis`` if given; ``previous``: that of the
        basis's leading columns, kept), its metric and step."""
        self.basis = basis
        if self.store is None:
            system = gram_system(self.stage, stream(self.data, self.stage.v.device))
        else:
            assert basis is not None
            system = self.store.system(basis, previous)
        self.system = system
        self.metric = BlockMetric.from_gram(system)

        def hessian(u: Tensor) -> Tensor:
            return system.per_pattern(system.times(system.flat(u)))

        shape = (system.patterns, self.stage.out_channels, system.block)
        if self._power is None:
            start, iterations = _random_start(shape, system.gram.device), POWER_ITERATIONS
        else:
            # The last vector, zero in the new coordinates.
            start = torch.zeros(shape, dtype=torch.float64, device=self._power.device)
            start[..., : self._power.shape[-1]] = self._power
            iterations = WARM_POWER_ITERATIONS
        self.lipschitz, self._power = power_iteration(hessian, self.metric, start, iterations)
        self.unknowns = system.size

    def beta_max(self) -> float:
        """The smallest ``beta`` at which ``v = 0`` is optimal (one pass at 0: float64, or a
        screening one when the solver screens, a scale for the path, not a certificate)."""
        saved = self.stage.v.detach().clone()
        _set_weight(self.stage, torch.zeros_like(saved))
        cert = self._pass(0.0, exact=not self.screen)[0]
        _set_weight(self.stage, saved)
        return cert["max_dual_norm"]

    def _pass(
        self, beta: float, exact: bool = False
    ) -> tuple[dict[str, float], ResidualStatistics, int, int]:
        """The certificate at ``beta`` and the statistics of the current weights: the last
        pass's if it was at them, else a new pass, a screening one
        (`_screened_statistics`) unless ``exact`` or ``screen`` is off. Whenever the gap
        may be within ``tol`` (at most `SCREEN_MARGIN` times it), the pass is exact. Also
        returns the exact and the screening passes it took (the last pass, and with it
        a path that starts at the zero weight, is kept: `_last`)."""
        stage = self.stage
        weights = stage.v.detach()
        exact = exact or not self.screen
        last = self._last
        exact_passes = screened = 0
        if last is not None and torch.equal(last[1], weights) and (last[2] or not exact):
            stats, was_exact = last[0], last[2]
        elif exact:
            stats, was_exact = _exact_certificate(stage, self.data, beta, self.basis)[1], True
            exact_passes += 1
        else:
            predictions = None
            if self.store is not None and self._coordinates is not None:
                coordinates, at = self._coordinates
                if torch.equal(at, weights):
                    predictions = self.store.predictions(coordinates)
            stats, was_exact = _screened_statistics(stage, self.data, predictions), False
            screened += 1
        cert = _certificate_of(stage, stats, beta, self.basis)
        if not was_exact and cert["relative_gap"] <= SCREEN_MARGIN * self.tol:
            cert, stats = _exact_certificate(stage, self.data, beta, self.basis)
            was_exact = True
            exact_passes += 1
        self._last = (stats, weights.clone(), was_exact)
        return cert, stats, exact_passes, screened

    def solve(
        self, beta: float, callback: Callable[[float, dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        """Solve at ``beta`` from the current weights; ``callback(seconds, certificate)``
        after every pass's certificate (a screening pass's too). Returns the last, exact
        certificate with ``iterations`` (model or FISTA iterations), ``passes`` (exact
        float64 passes), ``screened`` (screening passes; Gram routes), ``seconds`` and
        ``held_mib`` (`held_bytes` after it, in MiB)."""
        if self.route == "subspace":
            result = self._solve_subspace(beta, callback)
        elif self.route == "gram":
            result = self._solve_gram(beta, callback)[0]
        else:
            result = self._solve_matrix_free(beta, callback)
        if self.route != "matrix-free":
            # Stopped by a bound after a screening pass: the reported certificate is exact.
            began = time.perf_counter()
            cert, _, exact_passes, _ = self._pass(beta, exact=True)
            result = {
                **result,
                **cert,
                "passes": result["passes"] + exact_passes,
                "seconds": result["seconds"] + time.perf_counter() - began,
            }
        return {**result, "held_mib": self.held_bytes() / 2**20}

    def held_bytes(self) -> int:
        """Bytes of what the route keeps across the path: the Gram system (matrix and
        right-hand side), the metric's eigenvectors and, on the subspace route, the patch
        store (`PatchStore.held_bytes`). Not counted: the stage's inputs (the trainer's),
        and the working memory of a pass or a Gram build."""
        held = self.metric.vectors.numel() * self.metric.vectors.element_size()
        if hasattr(self, "system"):
            held += sum(t.numel() * t.element_size() for t in (self.system.gram, self.system.rhs))
        if self.store is not None:
            held += self.store.held_bytes()
        return held

    def _solve_subspace(
        self, beta: float, callback: Callable[[float, dict[str, float]], None] | None
    ) -> dict[str, float]:
        """The restricted program by the Gram route; then, while the whole program's gap
        is above ``tol`` (up to ``subspace_rounds`` times), the basis grows by the whole
        gradient's components outside it (the directions in which the restricted optimum
        is not optimal; at most one per group), and the program is solved again from
        the current weights (which lie in the old span)."""
        began = time.perf_counter()
        iterations = passes = screened = 0.0
        rounds = 0
        while True:
            offset = time.perf_counter() - began
            timed = None if callback is None else _shifted(callback, offset)
            cert, stats = self._solve_gram(beta, timed)
            iterations += cert["iterations"]
            passes += cert["passes"]
            screened += cert["screened"]
            if cert["relative_gap"] <= self.tol or rounds >= self.subspace_rounds:
                break
            assert self.basis is not None
            grown = _grow_basis(self.basis, stats.gradient)[:, : self.room]
            if grown.shape[1] == self.basis.shape[1]:
                break
            # The weights lie in the old span: the last pass is the new program's too.
            self._build(grown, self.system)
            rounds += 1
        assert self.basis is not None
        return {
            **cert,
            "iterations": iterations,
            "passes": passes,
            "screened": screened,
            "rank": float(self.basis.shape[1]),
            "rounds": float(rounds),
            "seconds": time.perf_counter() - began,
        }

    def _solve_gram(
        self, beta: float, callback: Callable[[float, dict[str, float]], None] | None
    ) -> tuple[dict[str, float], ResidualStatistics]:
        """The Gram route's rounds; the certificate and the statistics of the last pass.
        A pass at the current weights is not repeated (the statistics do not depend on
        beta or the basis: a new beta, or a grown basis, starts from the last one's)."""
        began = time.perf_counter()
        system, stage = self.system, self.stage
        v = system.from_weight(stage.v)
        iterations = passes = screened = 0
        while True:
            cert, stats, exact_passes, screening = self._pass(beta)
            passes += exact_passes
            screened += screening
            seconds = time.perf_counter() - began
            if callback is not None:
                callback(seconds, cert)
            if (
                cert.get("subspace_relative_gap", cert["relative_gap"]) <= self.tol
                or passes + screened > self.max_rounds
                or distributed.any_process(seconds > self.max_seconds)
            ):
                break
            v, inner = solve_gram(
                refinement_model(system, v, system.from_weight(stats.gradient), stats.ee),
                beta,
                v,
                tol=self.tol / 4,
                max_iterations=self.max_iterations,
                # A certificate costs no product (the step carries G v), only a few
                # reductions, small beside a CNN stage's product: every step is checked,
                # so a model solve stops at its first step within tol / 4.
                check_every=1,
                metric=self.metric,
                lipschitz=self.lipschitz,
            )
            iterations += int(inner["iterations"])
            _set_weight(stage, system.to_weight(v, stage.v.shape).to(stage.v.dtype))
            if system.basis is not None:
                self._coordinates = (system.per_pattern(v), stage.v.detach().clone())
        result = {
            **cert,
            "iterations": float(iterations),
            "passes": float(passes),
            "screened": float(screened),
            "seconds": time.perf_counter() - began,
        }
        return result, stats

    def _solve_matrix_free(
        self, beta: float, callback: Callable[[float, dict[str, float]], None] | None
    ) -> dict[str, float]:
        began = time.perf_counter()
        stage, data, metric = self.stage, self.data, self.metric
        n = self.count
        shape = stage.v.shape
        per_shape = (shape[0], shape[1], -1)

        def passing() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
            # Its convolution passes take the weights' dtype (bf16 inputs become float32).
            return stream(data, stage.v.device, stage.v.dtype)

        def predict(weight: Tensor) -> list[Tensor]:
            w = weight.reshape(shape).to(stage.v.dtype)
            return [stage.apply_weight(x, w, d) for x, _, d in passing()]

        def value(weight: Tensor, preds: list[Tensor]) -> float:
            (misfit,) = distributed.sum_floats(
                sum(
                    float((p - r).double().square().sum())
                    for p, (_, r, _) in zip(preds, data, strict=True)
                )
            )
            norms = group_norms_of(weight.reshape(shape), stage.config.output_groups)
            return 0.5 * misfit / n + beta * float(norms.sum())

        step = self.lipschitz
        slack = 10 * torch.finfo(stage.v.dtype).eps
        with torch.no_grad():
            current = stage.v.detach().double().reshape(per_shape)
            preds = predict(current)
            current_value = value(current, preds)
            extrapolated, extra_preds = current, preds
            momentum, plain = 1.0, True
            iterations = passes = 0
            cert, _ = _exact_certificate(stage, data, beta)
            passes += 1
            if callback is not None:
                callback(time.perf_counter() - began, cert)
            while cert["relative_gap"] > self.tol and iterations < self.max_iterations:
                grad = (
                    distributed.all_reduce_(
                        sum(
                            stage.apply_adjoint(x, p - r, d).double()
                            for (x, r, d), p in zip(passing(), extra_preds, strict=True)
                        )
                    )
                    / n
                )
                z = extrapolated - metric.solve(grad.reshape(per_shape)) / step
                candidate = metric.prox(z, step, beta)
                candidate_preds = predict(candidate)
                candidate_value = value(candidate, candidate_preds)
                iterations += 1
                # (A margin of the forward pass's rounding: in float32 the objective's last
                # digits are noise near the optimum.)
                if candidate_value > current_value + slack * abs(current_value):
                    if plain and step < MAX_STEP_GROWTH * self.lipschitz:
                        step *= 2
                    momentum, plain = 1.0, True
                    extrapolated, extra_preds = current, preds
                    continue
                following = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
                factor = (momentum - 1) / following
                extrapolated = candidate + factor * (candidate - current)
                extra_preds = [
                    c + factor * (c - o) for c, o in zip(candidate_preds, preds, strict=True)
                ]
                momentum, plain = following, factor == 0
                current, preds, current_value = candidate, candidate_preds, candidate_value
                if iterations % self.check_every == 0:
                    _set_weight(stage, current.to(stage.v.dtype))
                    cert, _ = _exact_certificate(stage, data, beta)
                    passes += 1
                    seconds = time.perf_counter() - began
                    if callback is not None:
                        callback(seconds, cert)
                    if distributed.any_process(seconds > self.max_seconds):
                        break
            _set_weight(stage, current.to(stage.v.dtype))
            if iterations % self.check_every:
                cert, _ = _exact_certificate(stage, data, beta)
                passes += 1
        return {
            **cert,
            "iterations": float(iterations),
            "passes": float(passes),
            "seconds": time.perf_counter() - began,
        }


def _shifted(
    callback: Callable[[float, dict[str, float]], None], offset: float
) -> Callable[[float, dict[str, float]], None]:
    """``callback`` with ``offset`` seconds added to its time."""

    def shifted(seconds: float, cert: dict[str, float]) -> None:
        callback(seconds + offset, cert)

    return shifted


def _image_of(x: ChunkInputs, i: int) -> ChunkInputs:
    """Image ``i`` of a chunk's inputs: a view of a tensor, or a function that loads the
    chunk and keeps only that image."""
    if callable(x):
        load = x
        return lambda: load()[i : i + 1].clone()
    return x[i : i + 1]


def _images(data: _Data) -> _Data:
    """The chunks split into single images."""
    return [
        (_image_of(x, i), r[i : i + 1], d[i : i + 1]) for x, r, d in data for i in range(r.shape[0])
    ]


def _subset(data: _Data, count: int) -> _Data:
    """Four images spread over the whole training set of ``count`` images (under
    torchrun, each process holds those of the four in its share)."""
    images = _images(data)
    chosen = range(count)[:: max(1, count // 4)][:4]
    return [images[i] for i in distributed.local_indices(chosen)]


@torch.no_grad()
def _mean_patch_gram(stage: ConvexStage, subset: _Data, pixel_step: int = 1) -> Tensor:
    """The mean patch Gram ``U^T U`` per image of the ``subset`` images, float64
    ``(C_in K^d, C_in K^d)``; with ``pixel_step`` s, of every s-th pixel's patch (times
    s, an estimate)."""
    m = stage.in_channels * stage.config.kernel_size**stage.ndim
    patch_gram = torch.zeros(m, m, dtype=torch.float64, device=stage.gate_weight.device)
    images = 0
    for x, _, _ in stream(subset, patch_gram.device):
        for rows in patch_slabs(stage, x):
            u = _patches(stage, x.float(), rows)[::pixel_step]
            patch_gram += (u.T @ u).double()
        images += x.shape[0]
    distributed.all_reduce_(patch_gram)
    images = int(distributed.sum_floats(images)[0])
    return patch_gram * (pixel_step / images)


def _grow_basis(basis: Tensor, gradient: Tensor) -> Tensor:
    """``basis`` ``(m, r)`` and an orthonormal basis of the components of the groups'
    gradients (``gradient`` ``(P, out, C_in, K...)``; one ``m``-vector per pattern and
    output) outside its span: two rounds of projection for orthogonality, directions
    below ``1e-8`` of the gradient's largest singular value dropped (so a basis that
    spans every direction gains none from the rounding left by the projection)."""
    whole = gradient.reshape(-1, basis.shape[0]).T.to(basis.dtype)  # (m, groups)
    if whole.numel() == 0 or basis.shape[1] >= basis.shape[0]:
        return basis
    g = whole
    for _ in range(2):
        g = g - basis @ (basis.T @ g)
    u, values, _ = torch.linalg.svd(g, full_matrices=False)
    scale = float(torch.linalg.matrix_norm(whole, ord=2))
    if scale == 0:
        return basis
    new = u[:, values > 1e-8 * scale]
    new = new - basis @ (basis.T @ new)
    new, _ = torch.linalg.qr(new)
    return torch.cat([basis, new], dim=1)


def patch_basis(patch_gram: Tensor, rank: int) -> Tensor:
    """The orthonormal basis ``(m, r)`` of the ``r = min(rank, m)`` leading eigenvectors
    of a patch Gram ``(m, m)`` (the principal directions of the patches), float64."""
    _, vectors = torch.linalg.eigh(patch_gram.double())
    return vectors[:, -min(rank, patch_gram.shape[0]) :].flip(1).contiguous()


def leading_directions(
    gram_times: Callable[[Tensor], Tensor], size: int, rank: int, device: torch.device
) -> Tensor:
    """An orthonormal basis ``(size, r)`` of the ``r = min(rank, size)`` leading
    eigenvectors of a symmetric positive semidefinite operator given by its products
    ``gram_times(q)`` (``(size, k)`` float64 to the same): a seeded randomized subspace
    iteration (`RANGE_ITERATIONS` products with ``r + RANGE_OVERSAMPLING`` vectors), then
    Rayleigh-Ritz. Its leading vectors are eigenvectors to the accuracy that the start of
    a growing basis needs (the growth adds what the solution misses)."""
    r = min(rank, size)
    width = min(size, r + RANGE_OVERSAMPLING)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(size, width, generator=generator, dtype=torch.float64).to(device)
    for _ in range(RANGE_ITERATIONS):
        q, _ = torch.linalg.qr(gram_times(q))
    _, small = torch.linalg.eigh(q.T @ gram_times(q))
    return (q @ small[:, -r:].flip(1)).contiguous()


@torch.no_grad()
def initial_basis(stage: ConvexStage, subset: _Data, rank: int) -> Tensor:
    """The subspace route's first basis ``(C_in K^d, r)``: the leading principal
    directions of the ``subset`` images' patches. Up to `EIGH_SIZE` patch entries from
    the mean patch Gram of every `BASIS_PIXEL_STEP`-th pixel (`_mean_patch_gram`,
    `patch_basis`); beyond (``C_in K^d =
    12544`` at 256 channels and K 7, whose Gram takes ``C_in K^d`` times the pixels'
    products and its decomposition minutes) by `leading_directions` through convolutions:
    ``U^T (U q)`` is a convolution with the columns of ``q`` as filters and the weight
    gradient of that convolution, no patch held."""
    k, c_in = stage.config.kernel_size, stage.in_channels
    size = c_in * k**stage.ndim
    device = stage.gate_weight.device
    if size <= EIGH_SIZE:
        return patch_basis(_mean_patch_gram(stage, subset, BASIS_PIXEL_STEP), rank)
    kernel = (c_in, *([k] * stage.ndim))

    def gram_times(q: Tensor) -> Tensor:
        filters = q.T.reshape(q.shape[1], *kernel).float()
        total = torch.zeros(q.shape[1], size, dtype=torch.float64, device=device)
        for x, _, _ in stream(subset, device):
            y = stage.ops.conv(x.float(), filters, padding=k // 2)
            grad = stage.ops.conv_weight(x.float(), filters.shape, y, padding=k // 2)
            total += grad.reshape(q.shape[1], size).double()
        distributed.all_reduce_(total)
        return total.T

    return leading_directions(gram_times, size, rank, device)


@torch.no_grad()
def _patch_metric(stage: ConvexStage, data: _Data, patch_gram: Tensor) -> BlockMetric:
    """``M_p = f_p S``: ``S`` the mean patch Gram (`_mean_patch_gram`), ``f_p`` pattern
    p's active fraction on all of ``data``."""
    p = stage.config.patterns
    active = torch.zeros(p, dtype=torch.float64)
    pixels = 0
    for _, _, d in data:
        active += d.transpose(0, 1).reshape(p, -1).sum(dim=1, dtype=torch.float64).cpu()
        pixels += d[:, 0].numel()
    distributed.all_reduce_(active)
    pixels = int(distributed.sum_floats(pixels)[0])
    fractions = (active / max(pixels, 1)).to(stage.gate_weight.device)
    blocks = fractions[:, None, None] * patch_gram[None]
    return BlockMetric(blocks, stage.config.output_groups)


@torch.no_grad()
def _operator_lipschitz(
    stage: ConvexStage, subset: _Data, metric: BlockMetric, iterations: int
) -> float:
    """`metric_lipschitz` of the Hessian ``A^T A / N`` of the ``subset`` images."""
    shape = stage.v.shape
    count = int(distributed.sum_floats(_images_in(subset))[0])

    def hessian(u: Tensor) -> Tensor:
        w = u.reshape(shape).to(stage.v.dtype)
        h = torch.zeros(shape, dtype=stage.v.dtype, device=stage.v.device)
        for x, _, d in stream(subset, stage.v.device, stage.v.dtype):
            h += stage.apply_adjoint(x, stage.apply_weight(x, w, d), d)
        return (distributed.all_reduce_(h) / count).double().reshape(u.shape)

    per_shape = (shape[0], shape[1], math.prod(shape[2:]))
    return 1.05 * metric_lipschitz(hessian, metric, per_shape, iterations)
