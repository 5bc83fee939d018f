"""Test a checkpoint in FP32 and in the accelerator's number format (or INT8), side by side:
python test_quantize.py -c CONFIG [--checkpoint PATH] [--q_format F] [--quantized_ckpt] [--json PATH]
With test-time augmentation, both models seeing the same views: --tta flip|dihedral
INT8 post-training quantization, as the earlier release: --q_format PyTorchINT8 [--calib_steps N] [--per_channel]
Where the format hurts, rounding point by rounding point: --per-layer [--per-layer-images N] [--split S]
On several processes: torchrun --nproc_per_node=N test_quantize.py -c CONFIG ..."""

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
from myrtle_vision.errors import UserError
from myrtle_vision.quantization import POST_TRAINING_FORMATS, Q_FORMATS, ROUNDINGS
from myrtle_vision.reports.layers import DEFAULT_IMAGES, run_layer_report
from myrtle_vision.reports.quantize import DEFAULT_CALIB_STEPS, run_quantize_test


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--checkpoint", help="default: the config's train_config.checkpoint_path")
    p.add_argument(
        "--q_format",
        "--q-format",
        metavar="F",
        help=f"one of {', '.join(Q_FORMATS + POST_TRAINING_FORMATS)} (default: the config's "
        "vit_config.q_format unless it is FP32, else the format the checkpoint was trained in, "
        "else FP16_32)",
    )
    p.add_argument(
        "--q_rounding",
        "--q-rounding",
        metavar="R",
        help=f"one of {', '.join(ROUNDINGS)} (default: the checkpoint's with --quantized_ckpt, "
        "else the config's vit_config.q_rounding); not for PyTorchINT8",
    )
    p.add_argument(
        "--quantized_ckpt",
        "--quantized-ckpt",
        action="store_true",
        help="the checkpoint was made by quantization-aware training (a non-FP32 q_format)",
    )
    p.add_argument(
        "--calib_steps",
        "--calib-steps",
        type=int,
        metavar="N",
        help=f"PyTorchINT8: calibrate on the first N validation batches (default {DEFAULT_CALIB_STEPS}; "
        "all of them if the split has fewer)",
    )
    p.add_argument(
        "--per_channel",
        "--per-channel",
        action="store_true",
        help="PyTorchINT8: one weight scale per output row of each Linear (default: one per weight tensor)",
    )
    p.add_argument("--json", help="also write the FP32 and quantized results here")
    add_force_argument(p, "a --json", "an earlier report")
    p.add_argument(
        "--output-dir",
        help="where both confusion matrices and the list of changed predictions go "
        "(default: <split>_<format>_<checkpoint name> beside the checkpoint)",
    )
    add_split_argument(p, default=None, says="test; val with --per-layer")
    add_tta_argument(p)
    p.add_argument(
        "--per-layer",
        "--per_layer",
        action="store_true",
        help="instead of the side-by-side test: where the format hurts the model, every rounding point's range "
        "against the format and what rounding it costs (layers.csv, layers.json, layers.png in --output-dir)",
    )
    p.add_argument(
        "--per-layer-images",
        "--per_layer_images",
        type=int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help=f"--per-layer: the first N images of the split (default {DEFAULT_IMAGES})",
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.per_layer and args.tta != "none":
        raise UserError(
            f"--tta {args.tta} with --per-layer: the per-layer report measures each rounding point on the images "
            "as they are; drop one of them"
        )
    cfg = load_config(args.config)
    checkpoint_path = checkpoint_path_for(cfg, args.checkpoint)
    options = dict(
        q_format=args.q_format,
        q_rounding=args.q_rounding,
        quantized_ckpt=args.quantized_ckpt,
        json_path=args.json,
        calib_steps=args.calib_steps,
        per_channel=args.per_channel,
        output_dir=args.output_dir,
        force=args.force,
    )
    with distributed.session(cfg, resolve_device(args.device)) as procs:
        if args.per_layer:
            run_layer_report(
                cfg, checkpoint_path, procs, split=args.split or "val", images=args.per_layer_images, **options
            )
        else:
            run_quantize_test(cfg, checkpoint_path, procs, split=args.split or "test", tta=args.tta, **options)
    return 0


if __name__ == "__main__":
    main_guard(main)
