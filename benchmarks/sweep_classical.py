"""Choose the classical methods' weights on the validation split: run `cvxmri.evaluate`
on it for every setting of a grid and write the volume PSNR/SSIM per setting and mask.

Usage:
    .venv/bin/python benchmarks/sweep_classical.py cs --lamda 1e-3 3e-3 ... [--no-shifts]
    .venv/bin/python benchmarks/sweep_classical.py cg-sense --lamda 0 1e-2 --iterations 5 10

Every setting is one `evaluate` call on the split (default ``val``; the test split is never
used to choose anything), with the masks `cvxmri evaluate` draws per file (Poisson disc 4x
and 1D Cartesian 4x, centre 0.04; ``--mask`` picks one), so each row is what ``cvxmri
evaluate --split val --method M --cs-lambda L ...`` prints. Rows are appended to a JSON
file (default ``benchmarks/results/sweep_<method>.json``), so a grid can be refined in
later calls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from cvxmri.evaluate import EvaluateConfig, evaluate
from cvxmri.recon import CGSenseConfig, CSConfig
from cvxmri.runs import environment

ROOT = Path(__file__).resolve().parent.parent
MASKS = ("poisson", "cartesian")


def sweep_rows(config: EvaluateConfig) -> list[dict[str, object]]:
    """One row per mask: the volume and slice PSNR/SSIM means of ``config``'s one method,
    and its time."""
    with tempfile.TemporaryDirectory() as folder:
        summary = evaluate(config, Path(folder))
    return [
        {
            "mask": entry["mask"],
            "psnr": entry["volume"]["psnr"]["mean"],
            "ssim": entry["volume"]["ssim"]["mean"],
            "psnr_slice": entry["slice"]["psnr"]["mean"],
            "ssim_slice": entry["slice"]["ssim"]["mean"],
            "seconds": entry["seconds"],
        }
        for entry in summary["results"]  # type: ignore[union-attr]
    ]


def main() -> None:
    """Run the grid given on the command line and append its rows to the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("cs", "cg-sense"))
    parser.add_argument("--lamda", type=float, nargs="+", required=True)
    parser.add_argument("--iterations", type=int, nargs="+", help="default: the config's")
    parser.add_argument("--no-shifts", action="store_true", help="CS without random shifts")
    parser.add_argument("--wavelet", default="db4", help="CS wavelet (pywt name)")
    parser.add_argument(
        "--mask",
        action="append",
        choices=("poisson", "cartesian"),
        help="Poisson disc 4x and/or 1D Cartesian 4x (default: both)",
    )
    parser.add_argument("--split", default="val")
    parser.add_argument("--data", default="data/default")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"sweep_{args.method}.json"
    record = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    record["environment"] = environment()
    default_iterations = (
        CSConfig().iterations if args.method == "cs" else CGSenseConfig().iterations
    )
    for iterations in args.iterations or [default_iterations]:
        for lamda in args.lamda:
            cs = CSConfig(
                lamda=lamda if args.method == "cs" else CSConfig().lamda,
                iterations=iterations if args.method == "cs" else CSConfig().iterations,
                shifts=not args.no_shifts,
                wavelet=args.wavelet,
            )
            cg = CGSenseConfig(lamda=lamda, iterations=iterations)
            config = EvaluateConfig(
                data=args.data,
                split=args.split,
                methods=[args.method],
                masks=[m for m in EvaluateConfig().masks if m.kind in (args.mask or MASKS)],
                cs=cs,
                cg_sense=cg,
            )
            settings = asdict(cs) if args.method == "cs" else asdict(cg)
            for row in sweep_rows(config):
                full = {
                    "method": args.method,
                    "split": args.split,
                    **settings,
                    **row,
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                record["rows"].append(full)
                print(json.dumps(full), flush=True)
            out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
