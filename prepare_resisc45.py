"""Lay out an extracted NWPU-RESISC45 download for training: python prepare_resisc45.py [FOLDER]

Moves the 45 class folders under images/ (if they are not there yet) and writes label_map.json
and the train/val/test image lists (per class, by file name: 489 / 71 / 140). Everything is checked
first; the move is all or nothing, and a move that was stopped part-way is finished by running again.
"""

import argparse

from myrtle_vision.cli import main_guard, parser
from myrtle_vision.prepare import prepare_resisc45


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__, config=False)
    p.add_argument("folder", nargs="?", default="NWPU-RESISC45", help="default: NWPU-RESISC45")
    return p


def main() -> int:
    args = build_parser().parse_args()
    counts = prepare_resisc45(args.folder)
    print(f"{args.folder}: ready: {counts['train']} train, {counts['val']} validation, {counts['test']} test images")
    return 0


if __name__ == "__main__":
    main_guard(main)
