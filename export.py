"""Write the file the accelerator imports: a checkpoint's deployed ViT alone, in the deploy layout, in FP32 or
with its weights rounded to FP16, a JSON beside it (format, class names, source checkpoint, sha256), and
optionally ONNX; each checked against the checkpoint on the first test images:
python export.py -c CONFIG [--checkpoint PATH] [--output FILE.pt] [--fp16] [--onnx FILE.onnx] [--check-images N]
                  [--force]"""

import argparse
from pathlib import Path

from myrtle_vision.checkpoint import checkpoint_path_for
from myrtle_vision.cli import main_guard, parser
from myrtle_vision.config import load_config
from myrtle_vision.reports.export import export


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--checkpoint", help="default: the config's train_config.checkpoint_path")
    p.add_argument(
        "--output",
        help="the deploy file (default: <checkpoint name>_deploy[_fp16].pt beside the "
        "checkpoint); its JSON is the same name with .json",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="round the weights to FP16 (IEEE, nearest even), as the accelerator holds them, and store them as float16",
    )
    p.add_argument("--onnx", help="also write the same ViT as ONNX here (needs requirements-onnx.txt)")
    p.add_argument("--check-images", type=int, default=64, help="test images the files are checked on (default 64)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace files at --output/--onnx that are not an earlier "
        "export's (an earlier export's files are replaced anyway)",
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    cfg = load_config(args.config)
    export(
        cfg,
        checkpoint_path_for(cfg, args.checkpoint),
        Path(args.output) if args.output else None,
        fp16=args.fp16,
        onnx=Path(args.onnx) if args.onnx else None,
        check_images=args.check_images,
        force=args.force,
    )
    return 0


if __name__ == "__main__":
    main_guard(main)
