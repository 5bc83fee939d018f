"""Lay out any folder-per-class dataset (UC Merced, AID, WHU-RS19, PatternNet, EuroSAT RGB) for training:

    python prepare_folders.py FOLDER [--train-fraction F] [--val-fraction V] [--seed N]
                              [--split-lists TRAIN VAL TEST] [--data-config PATH] [--force]

The class folders are the folders at the top of FOLDER (or under FOLDER/images/); the label map is their
names, sorted. Their .jpg .jpeg .png .tif .tiff images (any case) are the images; other entries are skipped
and counted, hidden ones ignored. Moves the class folders under images/ and writes label_map.json, the
train/val/test image lists and split_protocol.json, as prepare_resisc45.py does; with --data-config, a data
config for the dataset too. The default split is 60/20/20 per class (--train-fraction 0.8, of which
--val-fraction 0.25 validates), seeded. See docs/datasets.md.
"""

import argparse

from myrtle_vision.cli import main_guard, parser
from myrtle_vision.prepare import prepare_folders
from myrtle_vision.splits import add_protocol_arguments, protocol_from_args

DEFAULTS = {"train": "0.8", "val": "0.25"}


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__, config=False)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("folder", help="the dataset folder: one folder per class, at its top or under images/")
    add_protocol_arguments(p, **DEFAULTS, default="60 / 20 / 20 per class (--train-fraction 0.8 --val-fraction 0.25)")
    p.add_argument(
        "--data-config",
        metavar="PATH",
        help="also write a data config for the dataset there (e.g. data_configs/my_dataset.json): the split "
        "files, number_of_classes, and data_configs/data_config.json's transforms",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a --data-config file that differs from the one this would write, and split or label map "
        "files that this tool did not write (its own are replaced anyway)",
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    protocol = protocol_from_args(args, **DEFAULTS)
    prepared = prepare_folders(args.folder, protocol, args.force, args.data_config)
    print("\n".join(prepared.lines(args.folder, label_map=True)))
    return 0


if __name__ == "__main__":
    main_guard(main)
