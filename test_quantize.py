"""Test a checkpoint in FP32 and in the accelerator's number format, side by side:
python test_quantize.py -c CONFIG [--checkpoint PATH] [--q_format F] [--quantized_ckpt] [--json PATH]
On several processes: torchrun --nproc_per_node=N test_quantize.py -c CONFIG ..."""

from myrtle_vision import distributed
from myrtle_vision.cli import main_guard, parser, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.evaluation import checkpoint_for, run_quantize_test
from myrtle_vision.quantization import Q_FORMATS, ROUNDINGS


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--checkpoint", help="default: the config's train_config.checkpoint_path")
    p.add_argument("--q_format", "--q-format", metavar="F",
                   help=f"one of {', '.join(Q_FORMATS)} (default: the config's vit_config.q_format unless it is "
                        "FP32, else the format the checkpoint was trained in, else FP16_32)")
    p.add_argument("--q_rounding", "--q-rounding", metavar="R",
                   help=f"one of {', '.join(ROUNDINGS)} (default: the checkpoint's with --quantized_ckpt, "
                        "else the config's vit_config.q_rounding)")
    p.add_argument("--quantized_ckpt", "--quantized-ckpt", action="store_true",
                   help="the checkpoint was made by quantization-aware training (a non-FP32 q_format)")
    p.add_argument("--json", help="also write the FP32 and quantized results here")
    args = p.parse_args()
    cfg = load_config(args.config)
    checkpoint = checkpoint_for(cfg, args.checkpoint)
    with distributed.session(cfg, resolve_device(args.device)) as dist:
        run_quantize_test(cfg, checkpoint, dist.device, args.q_format, args.q_rounding, args.quantized_ckpt,
                          args.json, dist)
    return 0


if __name__ == "__main__":
    main_guard(main)
