"""Train a ViT from a train config: python train.py -c train_configs/vit_tiny.json
On several processes: torchrun --nproc_per_node=N train.py -c CONFIG"""

from myrtle_vision import distributed
from myrtle_vision.cli import main_guard, parser, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.engine import Interrupted, train


def main() -> int:
    args = parser(__doc__).parse_args()
    cfg = load_config(args.config)
    with distributed.session(cfg, resolve_device(args.device)) as dist:
        try:
            last = train(cfg, dist.device, dist)
        except Interrupted as e:
            if dist.is_main:
                print(f"{e}; set train_config.checkpoint_path to it to resume")
            return 128 + e.signum
    if dist.is_main:
        print(f"done: last checkpoint {last}, best {last.parent / 'best.pt'}")
    return 0


if __name__ == "__main__":
    main_guard(main)
