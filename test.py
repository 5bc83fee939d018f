"""Measure a checkpoint's accuracy on the test split: python test.py -c CONFIG [--checkpoint PATH] [--split S]
With test-time augmentation (the mean of the softmax over flipped or rotated views): --tta flip|dihedral
The config's CNN teacher instead: python test.py -c CONFIG --teacher [WEIGHTS]
On several processes: torchrun --nproc_per_node=N test.py -c CONFIG"""

import argparse

from myrtle_vision import distributed
from myrtle_vision.checkpoint import checkpoint_path_for
from myrtle_vision.cli import (
    add_force_argument,
    add_split_argument,
    add_tta_argument,
    main_guard,
    parser,
    resolve_device,
)
from myrtle_vision.config import load_config
from myrtle_vision.reports.test import run_teacher_test, run_test


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--checkpoint", help="default: the config's train_config.checkpoint_path")
    p.add_argument("--json", help="also write {top1, top5, num_images, per_class} here")
    add_force_argument(p, "a --json", "an earlier report")
    p.add_argument(
        "--output-dir",
        help="where the confusion matrix and TensorBoard go (default: <split>_<checkpoint name> beside the checkpoint)",
    )
    add_split_argument(p)
    add_tta_argument(p)
    p.add_argument(
        "--teacher",
        nargs="?",
        const="",
        metavar="WEIGHTS",
        help="test the config's CNN teacher (distiller_config.teacher_model) instead, from WEIGHTS "
        "(default: distiller_config.teacher_weights_path), e.g. a finetune_teacher.py output",
    )
    return p


def main() -> int:
    p = build_parser()
    args = p.parse_args()
    if args.teacher is not None and args.checkpoint:
        p.error("--teacher tests the CNN teacher, --checkpoint a ViT checkpoint: give one of them")
    cfg = load_config(args.config)
    checkpoint_path = None if args.teacher is not None else checkpoint_path_for(cfg, args.checkpoint)
    with distributed.session(cfg, resolve_device(args.device)) as procs:
        if checkpoint_path is None:
            run_teacher_test(
                cfg,
                args.teacher,
                procs,
                json_path=args.json,
                output_dir=args.output_dir,
                split=args.split,
                force=args.force,
                tta=args.tta,
            )
        else:
            run_test(
                cfg,
                checkpoint_path,
                procs,
                json_path=args.json,
                output_dir=args.output_dir,
                split=args.split,
                force=args.force,
                tta=args.tta,
            )
    return 0


if __name__ == "__main__":
    main_guard(main)
