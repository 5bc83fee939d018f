"""Finetune a CNN teacher for DeiT distillation (the headless equivalent of Finetune_CNN_Resisc45.ipynb).

Example: python finetune_teacher.py --model resnet50 --weights imagenet --epochs 10
"""

import argparse

from myrtle_vision.cli import main_guard
from myrtle_vision.training.finetune import TeacherConfig, add_arguments, finetune_teacher


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main() -> int:
    cfg = TeacherConfig.from_dict(vars(build_parser().parse_args()), "finetune_teacher.py arguments")
    finetune_teacher(cfg)
    return 0


if __name__ == "__main__":
    main_guard(main)
