"""Data-parallel training on many processes (``torchrun``): the process group and the few
collective operations the trainers use.

``torchrun --nproc-per-node N -m cvxmri train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. `process_group` initialises
``torch.distributed`` from them (gloo for CPU tensors, NCCL for CUDA tensors when CUDA is
there) and each process trains on its own device (``cuda:LOCAL_RANK``, `local_device`).
Without torchrun (or with ``WORLD_SIZE`` 1) there is no process group and every helper
here returns at once, leaving its arguments untouched: single-process runs compute exactly
what they computed before.

How the work is split (docs/method.md, "Many processes"):

- rank r holds the training images r, r + N, r + 2N, ... (`shard`), and their stage-input
  caches and sign patterns;
- a mini-batch is the global batch of `cvxmri.training.data.epoch_batches` (``batch_size``
  is the global batch); rank r steps on its part, the draws of its images (`owned`; the
  unrolled trainer, which caches nothing, takes contiguous parts, `batch_part`), and
  `average_gradients` makes every rank's gradient the global batch's before the optimiser
  steps, so all ranks hold the same weights;
- full-batch work (FISTA, the certificate, the certified solver's Gram system) runs on the
  rank's images and its sums are added across ranks (`all_reduce_`, `sum_floats`), so
  that it speaks of the whole training set;
- one process writes files (`is_main`); the others wait for it at a `barrier`.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cvxmri.errors import CvxmriError

# Fault injection for the distributed kill-and-resume test: "R:N" makes rank R kill itself
# (SIGKILL) when it reaches its N-th barrier. Unset in normal use.
FAULT_VARIABLE = "CVXMRI_TEST_KILL_RANK"
_barriers = [0]


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def local_world_size() -> int:
    """Number of processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without a
    process group)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``device`` for this process: under torchrun a CUDA device becomes
    ``cuda:LOCAL_RANK`` (one GPU per process), and a numbered one is refused (every
    process would use it); anything else is kept."""
    if device.type != "cuda" or not launched():
        return device
    if device.index is not None:
        raise CvxmriError(
            f"device {device} under torchrun: each process takes its own GPU "
            "(cuda:LOCAL_RANK); give --device cuda or auto"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group() -> Iterator[None]:
    """The process group of a torchrun launch for the duration of the block (nothing
    without torchrun)."""
    if not launched():
        yield
        return
    if not dist.is_available():
        raise CvxmriError("this PyTorch build has no torch.distributed; run on one process")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    yield
    # Only after success: with another process gone or stuck, tearing the group down
    # could wait for it; the process ends anyway.
    dist.destroy_process_group()


def _all_reduce(tensor: Tensor) -> None:
    """``dist.all_reduce`` (a sum), with a failure (another process died: its connection
    closed, or the timeout passed) as a one-line `CvxmriError`."""
    try:
        dist.all_reduce(tensor)
    except RuntimeError as err:
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
        raise CvxmriError(
            f"rank {rank()}: lost contact with the other processes ({reason[:160]}); one of "
            "them failed or was killed: see its message, then continue the run with --resume"
        ) from None


def barrier() -> None:
    """Wait until every process gets here (a CPU all-reduce, so it works for any backend)."""
    if not active():
        return
    _barriers[0] += 1
    spec = os.environ.get(FAULT_VARIABLE, "")
    if spec == f"{rank()}:{_barriers[0]}":
        os.kill(os.getpid(), signal.SIGKILL)
    _all_reduce(torch.zeros(1))


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` across processes, in place; returns it."""
    if active():
        _all_reduce(tensor)
    return tensor


def sum_floats(*values: float) -> list[float]:
    """The sums across processes of some Python numbers (float64)."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    _all_reduce(total)
    return total.tolist()


def shard(images: Tensor) -> Tensor:
    """This process's share of a training set's images (first axis): images r, r + N,
    r + 2N, ... (all of them on one process)."""
    if not active():
        return images
    return images[rank() :: world_size()]


def owned(batch: Tensor, images: int) -> Tensor:
    """The draws of a global batch (indices whose image is ``draw % images``) that fall on
    images this process holds (its `shard`): its part of the batch, uneven in general."""
    if not active():
        return batch
    return batch[(batch % images) % world_size() == rank()]


def share_positions(indices: Tensor) -> Tensor:
    """Positions in this process's share (`shard`) of the images ``indices`` it holds."""
    if not active():
        return indices
    return indices // world_size()


def gather_first(share: Tensor, count: int) -> Tensor:
    """The first ``count`` images (all, if fewer) of the whole training set (float32, on
    the CPU), put together from every process's share (`shard`); exact: each image is
    added to zeros."""
    if not active():
        return share[:count].float()
    n, r = world_size(), rank()
    count = min(count, int(sum_floats(len(share))[0]))
    images = torch.zeros((count, *share.shape[1:]), dtype=torch.float32)
    images[r::n] = share[: len(range(r, count, n))].float().cpu()
    _all_reduce(images)
    return images


def local_indices(indices: Iterable[int]) -> list[int]:
    """Of the training set's ``indices`` (positions in the whole set), those this process
    holds (`shard`), as positions in its share."""
    n, r = world_size(), rank()
    return [(i - r) // n for i in indices if i % n == r]


def batch_part(batch: Tensor) -> Tensor:
    """This process's part of a global batch of indices: a contiguous piece (as even as
    possible; empty when the batch has fewer items than there are processes)."""
    if not active():
        return batch
    return batch.tensor_split(world_size())[rank()]


def average_gradients(parameters: Iterable[nn.Parameter], count: int, loss: Tensor) -> float:
    """Make every process's gradients those of the global batch and return its loss.

    Each process holds the gradient of the mean loss over its ``count`` images (plus any
    term that is the same everywhere, such as a penalty). The global batch's gradient is
    ``sum_r count_r g_r / sum_r count_r``; the weights sum to 1, so the common terms keep
    their value. A process with no images contributes nothing. One all-reduce carries the
    gradients, the losses and the counts. On one process: ``float(loss)``, gradients
    untouched.
    """
    if not active():
        return float(loss.detach())
    params = [p for p in parameters if p.requires_grad]
    grads = []
    for p in params:
        grad = p.grad if p.grad is not None and count > 0 else torch.zeros_like(p)
        grads.append(grad.detach().float().flatten())
    value = (
        loss.detach().float().reshape(1) if count > 0 else torch.zeros(1, device=grads[0].device)
    )
    flat = torch.cat([*grads, value, torch.ones(1, device=value.device)]) * count
    _all_reduce(flat)
    total = float(flat[-1])
    flat = flat / total
    start = 0
    for p in params:
        size = p.numel()
        p.grad = flat[start : start + size].view_as(p).to(p.dtype)
        start += size
    return float(flat[-2])


def idle_step(parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> float:
    """The step of a process whose part of the global batch is empty: it takes part in
    `average_gradients` with nothing and steps with the others' gradients."""
    params = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    loss = average_gradients(params, 0, torch.zeros(()))
    optimizer.step()
    return loss


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process: decisions taken from local measurements
    (a time limit) are taken together, so every process follows the same path."""
    if not active():
        return flag
    return sum_floats(float(flag))[0] > 0
