"""Train a ViT from a train config: python train.py -c train_configs/vit_tiny.json
With "distributed": true it trains on every visible GPU, one process each (or --nproc_per_node N);
on several machines: torchrun --nnodes=M --nproc_per_node=N ... train.py -c CONFIG"""

import argparse

from myrtle_vision import distributed
from myrtle_vision.cli import main_guard, parser, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.reporting import say
from myrtle_vision.training import Interrupted, train


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument(
        "--nproc_per_node",
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train in N processes on this machine (one per GPU on CUDA; Gloo on CPU); default: one per "
        "visible GPU when train_config.distributed is true, else one",
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    cfg = load_config(args.config)
    device = resolve_device(args.device)
    nproc = distributed.processes_to_start(cfg, device, args.nproc_per_node)
    if nproc > 1:
        say(
            f"starting {nproc} processes on {device.type} with PyTorch's launcher "
            f"(as torchrun --standalone --nproc_per_node={nproc})"
        )
        return distributed.launch(
            nproc, __file__, ["-c", args.config] + (["--device", args.device] if args.device else [])
        )
    with distributed.session(cfg, device) as procs:
        try:
            last = train(cfg, procs)
        except Interrupted as e:
            say(f"{e}; set train_config.checkpoint_path to it to resume", procs)
            return 128 + e.signum
    best = last.parent / "best.pt"
    say(f"done: last checkpoint {last}" + (f", best {best}" if best.is_file() else ""), procs)
    return 0


if __name__ == "__main__":
    main_guard(main)
