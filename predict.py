"""Predict the classes of new images (no labels needed) with a checkpoint, in FP32 and optionally in the
accelerator's number format; one CSV row per file (the top-k classes and probabilities, or why it could not
be read):
python predict.py -c CONFIG --checkpoint PATH INPUT [INPUT ...] [--output predictions.csv] [--topk K] [--q_format F]
    [--tta flip|dihedral]
INPUT: a folder (walked recursively), a .txt/.lst list of paths (relative to the list's folder), or an image.
On several processes: torchrun --nproc_per_node=N predict.py -c CONFIG ..."""

import argparse
from pathlib import Path

from myrtle_vision import distributed
from myrtle_vision.checkpoint import checkpoint_path_for
from myrtle_vision.cli import add_force_argument, add_tta_argument, main_guard, parser, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.quantization import Q_FORMATS, ROUNDINGS
from myrtle_vision.reports.predict import predict


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folders, list files or image files")
    p.add_argument("--checkpoint", help="default: the config's train_config.checkpoint_path")
    p.add_argument("--output", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5, at most the class count)")
    p.add_argument(
        "--q_format",
        "--q-format",
        metavar="F",
        help=f"also predict in this format ({', '.join(f for f in Q_FORMATS if f != 'FP32')}) and mark "
        "the images whose top-1 it changes",
    )
    p.add_argument(
        "--q_rounding",
        "--q-rounding",
        metavar="R",
        help=f"one of {', '.join(ROUNDINGS)} (default: "
        "the checkpoint's if trained with quantization, else the config's vit_config.q_rounding)",
    )
    add_tta_argument(p)
    p.add_argument("--batch-size", type=int, help="default: the config's train_config.local_batch_size")
    add_force_argument(p, "an --output", "an earlier predictions CSV")
    return p


def main() -> int:
    args = build_parser().parse_args()
    cfg = load_config(args.config)
    checkpoint_path = checkpoint_path_for(cfg, args.checkpoint)
    with distributed.session(cfg, resolve_device(args.device)) as procs:
        predict(
            cfg,
            checkpoint_path,
            args.inputs,
            Path(args.output),
            procs,
            topk=args.topk,
            q_format=args.q_format,
            q_rounding=args.q_rounding,
            batch_size=args.batch_size,
            force=args.force,
            tta=args.tta,
        )
    return 0


if __name__ == "__main__":
    main_guard(main)
