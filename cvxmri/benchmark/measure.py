"""Peak training memory of one workload, measured in a fresh process.

`run_trial` starts ``python -m cvxmri.benchmark.measure '<workload json>' ...``; the child
(`measure_here`) builds the workload and measures it:

1. After imports and one step of the same workload on one small image (which loads the
   code the step runs; then freed), it records the **baseline**: resident memory (CPU:
   ``VmRSS`` from ``/proc/self/status``) or allocated memory (CUDA:
   ``torch.cuda.memory_allocated``).
2. It builds the modules, the frozen prefix, the optimiser and the input batch, and runs one
   step on a small image (16x16), which creates Adam's state (it has the parameters' shapes
   whatever the image size). The **state** is what is then resident beyond the baseline:
   weights, frozen prefix, Adam state, the batch.
3. It returns freed heap to the system (``malloc_trim``), resets the peak counter (CPU:
   ``/proc/self/clear_refs`` 5 resets ``VmHWM``; CUDA: ``reset_peak_memory_stats``) and
   runs ``steps`` full-size steps. The **peak** is the high-water mark during those steps
   minus the baseline: training memory = weights + prefix + Adam state + batch + the step's
   activations, gradients and work space. CUDA also reports the allocator's reserved peak.
   A workload with ``part="stage_pass"`` runs its once-per-stage pass instead of the step
   (the step's state stays resident, so this over-counts the pass by it), one with
   ``part="solve"`` a certified convex solve (`Prepared.part`), whose certificate and
   counts (unknowns, passes, basis rank, set-up seconds) the result keeps as
   ``details``.

An unrolled, 3D or certified-solve workload's child runs with glibc's mmap threshold
fixed (`MMAP_THRESHOLD_ENV`), so that on the CPU freed tensors leave the resident set and
its peaks do not depend on the allocation history (a 3D search compares peaks of patches a
few voxels apart; a solve's peak is fitted against its training set's size, and the heap
left behind by its many medium-sized temporaries would count as memory per image).

The budget: on CUDA the process's allocator is capped at the budget
(``torch.cuda.set_per_process_memory_fraction``), so a configuration that does not fit
raises a real out-of-memory error; on the CPU a configuration fits when its measured peak is
within the budget, and the child's data segment is limited (``RLIMIT_DATA``) to
``2 x budget`` or 80% of the available memory, whichever is less, so that a search never
endangers the machine (an allocation beyond it fails and counts as out of memory).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cvxmri.benchmark.workload import Workload

MARKER = "CVXMRI_MEASUREMENT "
STATUS = Path("/proc/self/status")

CPU_METHOD = (
    "CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs before the "
    "measured steps) of a fresh process per configuration and batch size, minus its "
    "resident size after imports and a small warm-up step; counts weights, frozen "
    "prefix, Adam state, the input batch, activations, gradients and work space"
)
CUDA_METHOD = (
    "CUDA: torch.cuda.max_memory_allocated during the measured steps (peak stats reset "
    "after setup, cache emptied) of a fresh process per configuration and batch size, "
    "minus the allocation after a small warm-up step; the allocator is capped at the "
    "budget (set_per_process_memory_fraction), so 'does not fit' is a real out-of-memory "
    "error; counts weights, frozen prefix, Adam state, the input batch, activations, "
    "gradients and work space"
)


# The environment of an unrolled workload's child on the CPU: glibc's mmap threshold fixed
# at 64 KiB. By default the threshold rises to the size of any mapped block that is freed, and
# later blocks of that size come from the heap, where freed memory stays resident and
# fragments; for the peaks of unrolled training (tens of MiB) that made the resident size
# depend on the allocation history by more than the differences measured (one end-to-end
# step, T = 10, measured 33 and 58 MiB in two runs; 32 MiB with the fixed threshold, its
# tensors 28 MiB by `tensor_peak_bytes`). With a fixed threshold every tensor above 64 KiB
# is a mapping of its own, unmapped when freed, so the resident peak follows the tensors
# alive at once.
MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MMAP_THRESHOLD_METHOD = (
    CPU_METHOD + "; glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536), "
    "so that freed tensors leave the resident set"
)


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not in {STATUS}")
    return int(match.group(1))


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to return
        pass


def _limit_data(budget_bytes: int) -> None:
    """Cap this process's data segment so that an oversized trial fails, not the machine."""
    import resource

    from cvxmri.training.data import available_memory

    allowed = min(2 * budget_bytes, int(0.8 * available_memory()))
    current = _status_kib("VmData") * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (current + allowed, resource.RLIM_INFINITY))


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def measure_here(w: Workload, steps: int, budget_bytes: int) -> dict[str, Any]:
    """Measure ``w`` in this process (a fresh one: see the module docstring)."""
    import torch

    from cvxmri.benchmark.workload import WARMUP_SIZE, prepare

    device = torch.device(w.device)
    cuda = device.type == "cuda"
    # Load the code the step runs (libraries, kernels) before the baseline: one step of the
    # same workload on two small images (so that every thread has run), then free it.
    side = max(w.kernel_size, WARMUP_SIZE)
    volume = tuple(min(n, side) for n in w.volume)
    small = prepare(replace(w, batch=2, size=side, volume=volume))
    small.warmup()
    small.step()
    del small
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        if not STATUS.exists():
            raise RuntimeError("CPU memory measurement needs Linux (/proc/self/status)")
        _limit_data(budget_bytes)
        _trim_heap()
        baseline = _status_kib("VmRSS") * 1024
    result: dict[str, Any] = {"batch": w.batch, "oom": False}
    try:
        prepared = prepare(w)
        prepared.warmup()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            state = torch.cuda.memory_allocated(device) - baseline
        else:
            _trim_heap()
            Path("/proc/self/clear_refs").write_text("5")
            state = _status_kib("VmRSS") * 1024 - baseline
        run = prepared.part(w.part)
        began = time.perf_counter()
        for _ in range(steps):
            out = run()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - began) / steps
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) - baseline
            result["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        else:
            peak = _status_kib("VmHWM") * 1024 - baseline
        result.update(peak_bytes=peak, state_bytes=state, seconds=seconds)
        if isinstance(out, dict):  # a solve's certificate and counts
            result["details"] = {k: float(v) for k, v in out.items() if isinstance(v, int | float)}
    except Exception as err:
        if not _is_out_of_memory(err):
            raise
        result.update(oom=True, error=str(err).splitlines()[0][:200])
    return result


def tensor_peak_bytes(run: Callable[[], Any]) -> int:
    """The peak of the bytes held at once by tensor storages that torch operations create
    while ``run()`` runs (a `TorchDispatchMode` counts each new storage when an operation
    returns it and uncounts it when the storage is freed; storages that existed before are
    not counted; the garbage collector is paused meanwhile). Deterministic, unlike the
    resident size, but blind to memory that is not a tensor (work space inside a kernel, the
    allocator's overhead): a cross-check of what a step keeps alive, used by the tests."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    # The collector would free reference cycles at moments that vary from run to run.
    gc.collect()
    before: set[int] = set()
    live: dict[int, int] = {}
    peak = [0]
    finalizers = []

    def watch(storage: torch.UntypedStorage, pointer: int, forget: Callable[[int], Any]) -> None:
        # A freed storage's address may be reused: forget it when it is freed.
        finalizers.append(weakref.finalize(storage, forget, pointer))

    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and not o.is_meta:
            storage = o.untyped_storage()
            if storage.data_ptr() not in before:
                before.add(storage.data_ptr())
                watch(storage, storage.data_ptr(), before.discard)

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                pointer = storage.data_ptr()
                if pointer in before or pointer in live or storage.nbytes() == 0:
                    continue
                live[pointer] = storage.nbytes()
                watch(storage, pointer, lambda p: live.pop(p, None))
                peak[0] = max(peak[0], sum(live.values()))
            return out

    gc.disable()
    try:
        with Counter():
            run()
    finally:
        gc.enable()
        for finalizer in finalizers:
            finalizer.detach()
    return peak[0]


def run_trial(
    w: Workload, steps: int, budget_bytes: int, timeout: float | None = None
) -> dict[str, Any]:
    """Measure ``w`` in a fresh Python process and return its result (`measure_here`);
    a child killed by the system (out of memory) counts as out of memory. An unrolled,
    3D or certified-solve workload's child runs with `MMAP_THRESHOLD_ENV` (it changes
    nothing on CUDA)."""
    command = [
        sys.executable,
        "-m",
        "cvxmri.benchmark.measure",
        w.to_json(),
        str(steps),
        str(budget_bytes),
    ]
    fixed_threshold = w.arch == "unrolled" or w.ndim == 3 or w.part == "solve"
    env = {**os.environ, **MMAP_THRESHOLD_ENV} if fixed_threshold else None
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return {"batch": w.batch, "oom": False, "error": f"timed out after {timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    if done.returncode < 0:
        return {"batch": w.batch, "oom": True, "error": f"killed by signal {-done.returncode}"}
    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"measurement of {w.describe()} at batch {w.batch} failed: {tail[0]}")


def main(argv: list[str]) -> None:
    """Child entry point: ``WORKLOAD_JSON STEPS BUDGET_BYTES``."""
    workload = Workload.from_json(argv[0])
    result = measure_here(workload, int(argv[1]), int(argv[2]))
    print(MARKER + json.dumps(result), flush=True)


def result_header(schema: str, device: Any) -> dict[str, Any]:
    """The fields every benchmark result starts with: ``schema``, ``date``, ``device`` (a
    ``torch.device``, named with the GPU's or the processor's name), ``command`` and
    ``environment`` (with torch's thread count)."""
    from datetime import date

    import torch

    from cvxmri.runs import environment

    env = environment()
    env["torch_threads"] = str(torch.get_num_threads())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else env["processor"]
    return {
        "schema": schema,
        "date": str(date.today()),
        "device": f"{device} ({name})",
        "command": env["command"],
        "environment": env,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
