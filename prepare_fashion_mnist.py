"""Write Fashion-MNIST as an image-folder dataset for the offline demo.

    python prepare_fashion_mnist.py [--idx-dir DIR] [--out data/fashion-mnist]

Reads the four IDX files (gzipped or not) from the Debian package dataset-fashion-mnist, or from
--idx-dir, and writes PNG images, label_map.json and train/val/test lists in the Resisc45 layout
(data_configs/fashion_mnist.json points at it; data_configs/fashion_mnist_extra.json trains on the
images that --train-per-class leaves out).
"""

import argparse

from myrtle_vision.cli import main_guard, parser
from myrtle_vision.errors import UserError
from myrtle_vision.prepare import FASHION_MNIST_DEBIAN_DIR, prepare_fashion_mnist


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__, config=False)
    p.add_argument("--idx-dir", default=FASHION_MNIST_DEBIAN_DIR, help=f"default: {FASHION_MNIST_DEBIAN_DIR}")
    p.add_argument("--out", default="data/fashion-mnist", help="default: data/fashion-mnist")
    p.add_argument("--val-per-class", type=int, default=500, help="training images per class held out for validation")
    p.add_argument(
        "--train-per-class",
        type=int,
        help="train on only the first N training images of each class "
        "and list the rest in extra_imagepaths.txt (default: all; the demo keeps 500, the scale of "
        "NWPU-RESISC45, and pretrains its teacher on the rest)",
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.train_per_class is not None and args.train_per_class < 1:
        raise UserError(f"--train-per-class: must be at least 1, got {args.train_per_class}")
    counts = prepare_fashion_mnist(args.idx_dir, args.out, args.val_per_class, args.train_per_class)
    extra = f", {counts['extra']} extra (extra_imagepaths.txt)" if "extra" in counts else ""
    print(
        f"{args.out}: ready: {counts['train']} train, {counts['val']} validation, {counts['test']} test images{extra}"
    )
    return 0


if __name__ == "__main__":
    main_guard(main)
