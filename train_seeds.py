"""Train and test one config over several seeds, and report its test top-1 as papers do, mean ± standard deviation:
python train_seeds.py -c train_configs/vit_tiny.json --seeds 1 2 3 4 5 [--out runs/seeds_vit_tiny] [--split test]

Each seed is trained by train.py and tested by test.py as you would run them; a seed measured before on the same
config is not run again, so a stopped run is finished by running the same command."""

import argparse
from pathlib import Path

from myrtle_vision.cli import add_force_argument, add_split_argument, add_tta_argument, main_guard, parser
from myrtle_vision.seeds import run_seeds


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], metavar="S", help="default: 1 2 3 4 5")
    p.add_argument(
        "--out", help="where the seeds' configs, runs, logs and seeds.json go (default: runs/seeds_<config>)"
    )
    add_split_argument(p)
    add_tta_argument(p)
    p.add_argument(
        "--report",
        action="store_true",
        help="run nothing: summarise the seeds measured in --out, each on the split it was measured on (for a "
        "protocol that redraws the split for each run: prepare, train one seed, prepare again, ...)",
    )
    add_force_argument(p, "an --out/seeds.json", "an earlier summary")
    return p


def main() -> int:
    args = build_parser().parse_args()
    out = args.out or f"runs/seeds_{Path(args.config).stem}"
    device = ["--device", args.device] if args.device else []
    scripts = Path(__file__).resolve().parent
    test_args = ["--split", args.split, "--tta", args.tta, *device]
    run_seeds(args.config, args.seeds, out, scripts, device, test_args, force=args.force, report=args.report)
    return 0


if __name__ == "__main__":
    main_guard(main)
