"""Lay out an extracted NWPU-RESISC45 download for training: python prepare_resisc45.py [FOLDER]

Moves the 45 class folders under images/ (if they are not there yet) and writes label_map.json, the
train/val/test image lists and split_protocol.json (which protocol made them, and the counts per class).
The default split is the earlier release's: per class, by file name, 489 / 71 / 140. --train-fraction
0.1 or 0.2 makes the papers' protocols (that fraction of each class for training, the rest test), and
--split-lists takes published lists (TorchGeo's 60/20/20). Everything is checked first; the move is all or
nothing, and a move that was stopped part-way is finished by running again. See docs/datasets.md.
"""

import argparse

from myrtle_vision.cli import add_force_argument, main_guard, parser
from myrtle_vision.prepare import prepare_resisc45
from myrtle_vision.splits import add_protocol_arguments, protocol_from_args

DEFAULTS = {"train": None, "val": "0.1"}


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__, config=False)
    p.add_argument("folder", nargs="?", default="NWPU-RESISC45", help="default: NWPU-RESISC45")
    add_protocol_arguments(p, **DEFAULTS, default="the earlier release's split, per class 489 / 71 / 140")
    add_force_argument(p, "a split or label map", "one this tool wrote")
    return p


def main() -> int:
    args = build_parser().parse_args()
    prepared = prepare_resisc45(args.folder, protocol_from_args(args, **DEFAULTS), args.force)
    print("\n".join(prepared.lines(args.folder)))
    return 0


if __name__ == "__main__":
    main_guard(main)
