"""Peak memory of iterating the test split lazily (`SliceDataset`) or in memory
(`SliceData`), at 1x and 10x the default dataset's test files; print a table, write JSON.

Usage: .venv/bin/python benchmarks/bench_dataset.py [--data data/default] [--copies 10]

The 10x dataset holds each test file ``copies`` times under new names (symbolic links, with
links to their cached coil maps, so no ESPIRiT runs during the measurement). Each
measurement runs in a fresh Python process and reports its peak resident set size
(``ru_maxrss``) after reading the same number of slices: ``copies`` passes over the 1x
dataset, one pass over the 10x one (the allocator's footprint settles after a few hundred
slices, so equal reads keep that apart from the number of files). ``import`` is the peak
of a process that only imports torch and cvxmri. Masks are Poisson disc (4x), or Cartesian
for ``SliceDataset-cartesian``. The lazy dataset should stay flat from 1x to 10x; the
in-memory split grows with the number of files.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvxmri.data.prepare import EspiritConfig, default_cache_dir, find_files, prepare_volume
from cvxmri.runs import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "dataset_memory.json"
MODES = ("import", "SliceDataset", "SliceDataset-cartesian", "SliceData")
SPLIT = "test"


def child(mode: str, data: Path, cache: Path, passes: int) -> dict[str, float]:
    """One measurement, in this (fresh) process: peak RSS after ``passes`` over the split.
    Torch runs one intra-op thread (as in ``DataLoader`` workers), so the seconds do not
    depend on how busy the machine's other cores are."""
    import torch
    from torch.utils.data import DataLoader

    from cvxmri.data.dataset import SliceDataset
    from cvxmri.data.sample import collate_samples
    from cvxmri.masks import MaskSpec
    from cvxmri.training.data import SliceData

    torch.set_num_threads(1)
    mask = MaskSpec("cartesian", 4.0) if mode.endswith("cartesian") else MaskSpec("poisson", 4.0)
    start = time.perf_counter()
    slices = 0
    if mode.startswith("SliceDataset"):
        dataset = SliceDataset(data, mask, split=SPLIT, cache=cache)
        loader = DataLoader(dataset, batch_size=4, collate_fn=collate_samples)
        for _ in range(passes):
            for batch in loader:
                slices += len(batch)
    elif mode == "SliceData":
        split = SliceData(data, SPLIT, mask)
        masks = split.evaluation_masks()
        for _ in range(passes):
            slices += len(split.pairs(masks))
    seconds = time.perf_counter() - start
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "slices": slices,
        "seconds": seconds,
    }


def replicate(data: Path, out: Path, copies: int) -> Path:
    """A dataset root whose test split holds every test file of ``data`` ``copies`` times
    (links to the files and to their cached coil maps)."""
    cache = default_cache_dir(data) / EspiritConfig().tag()
    target_cache = out / "cache" / EspiritConfig().tag()
    for path in find_files(data, SPLIT):
        for copy in range(copies):
            name = f"{path.stem}_copy{copy}{path.suffix}"
            link = out / path.parent.name / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
            maps = target_cache / path.parent.name / name
            maps.parent.mkdir(parents=True, exist_ok=True)
            maps.symlink_to((cache / path.parent.name / path.name).resolve())
    return out


def measure(mode: str, data: Path, passes: int) -> dict[str, float]:
    """Run `child` in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", mode, "--data", str(data)]
    command += ["--passes", str(passes)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "default")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--passes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cache = default_cache_dir(args.data)
        print(json.dumps(child(args.child, args.data, cache, args.passes)))
        return
    files = find_files(args.data, SPLIT)
    for path in files:  # cache the coil maps first: the measurement reads them
        prepare_volume(path, default_cache_dir(args.data))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scales = {
            1: replicate(args.data, Path(tmp) / "x1", 1),
            args.copies: replicate(args.data, Path(tmp) / f"x{args.copies}", args.copies),
        }
        for mode in MODES:
            for scale, data in scales.items():
                passes = args.copies // scale
                row = {"mode": mode, "files": scale * len(files), "passes": passes}
                rows.append({**row, **measure(mode, data, passes)})
    print(
        f"{'mode':<22} {'files':>5} {'passes':>6} {'slices':>6} {'peak RSS MiB':>12} {'seconds':>8}"
    )
    for row in rows:
        print(
            f"{row['mode']:<22} {row['files']:>5} {row['passes']:>6} {row['slices']:>6} "
            f"{row['peak_rss_mib']:>12.0f} {row['seconds']:>8.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "data": str(args.data),
        "split": SPLIT,
        "copies": args.copies,
        "rows": rows,
        "environment": environment(),
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
