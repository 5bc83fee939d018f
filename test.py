"""Measure a checkpoint's accuracy on the test split: python test.py -c CONFIG [--checkpoint PATH]
On several processes: torchrun --nproc_per_node=N test.py -c CONFIG"""

from myrtle_vision import distributed
from myrtle_vision.cli import main_guard, parser, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.evaluation import checkpoint_for, run_test


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--checkpoint", help="default: the config's train_config.checkpoint_path")
    p.add_argument("--json", help="also write {top1, top5, num_images, per_class} here")
    p.add_argument("--output-dir", help="where the confusion matrix and TensorBoard go "
                                        "(default: test_<checkpoint name> beside the checkpoint)")
    args = p.parse_args()
    cfg = load_config(args.config)
    checkpoint = checkpoint_for(cfg, args.checkpoint)
    with distributed.session(cfg, resolve_device(args.device)) as procs:
        run_test(cfg, checkpoint, procs, json_path=args.json, output_dir=args.output_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
