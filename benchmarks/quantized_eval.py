"""Benchmark: evaluation time in a simulated number format against FP32, on the same data and machine.

    python benchmarks/quantized_eval.py [-c train_configs/vit_demo.json] [--checkpoint PATH] [--repeats 5]
    python benchmarks/quantized_eval.py -c train_configs/vit_tiny.json --random-batches 4  # model only

Two measurements, each alternating FP32 and the other formats so that drifts in machine speed hit
both alike; the figure kept is the median over repeats:

- evaluation: the whole test split through the data loader (decode, transforms, model), as
  test.py and test_quantize.py run it;
- model only: the model's forward passes over the same test batches, held in memory (or, with
  ``--random-batches N``, over N random batches: for configs whose dataset is not on disk).

Results go to benchmarks/RESULTS.md (its section for this benchmark is replaced), with the machine.
The target for FP16_32 is at most 1.15x FP32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _common import machine, timed, write_section

from myrtle_vision import checkpoint
from myrtle_vision.cli import main_guard, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.distributed import Processes
from myrtle_vision.evaluation import evaluate, split_loader
from myrtle_vision.models import build_model
from myrtle_vision.quantization import Q_FORMATS as FORMATS

HEADING = "## Evaluation in a simulated number format against FP32 (quantized_eval.py)"
INTRO = (
    "Target: FP16_32 evaluation at most 1.15x the time of FP32 evaluation on the same data and machine. "
    "Each table is rewritten when its command is run again."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="train_configs/vit_demo.json")
    p.add_argument(
        "--checkpoint", help="weights to load (default: a fresh initialisation; speed does not depend on them)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random-batches", type=int, metavar="N", help="model only, on N random batches")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p


def main() -> int:
    args = build_parser().parse_args()
    cfg = load_config(args.config)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    models = {}
    for f in FORMATS:
        if args.checkpoint:
            model = checkpoint.ready_model(cfg, checkpoint.load(args.checkpoint), args.checkpoint, q_format=f)
        else:
            model = build_model(cfg, distilled=False, q_format=f)
            if models:
                model.load_state_dict(models["FP32"].state_dict())
        models[f] = model.to(device).eval()
    tc = cfg.train_config
    if args.random_batches:
        size = cfg.vit_config.image_size
        batches = [torch.randn(tc.local_batch_size, 3, size, size, device=device) for _ in range(args.random_batches)]
        what = f"{args.random_batches} random batches of {tc.local_batch_size} {size}x{size} images"
    else:
        loader, names = split_loader(cfg, Processes(device=device), tc.local_batch_size, tc.num_workers)
        batches = [x.to(device) for x, _ in loader]
        what = f"the test split, batch {tc.local_batch_size}, {loader.loader.num_workers} loader worker(s)"
    n_images = sum(len(x) for x in batches)

    def forward_all(model):
        with torch.no_grad():
            for x in batches:
                model(x)

    for model in models.values():  # warm-up: allocator, kernels, rounded-weight caches
        forward_all(model)
    e2e = {f: [] for f in FORMATS}
    fwd = {f: [] for f in FORMATS}
    for r in range(args.repeats):
        for f, model in models.items():
            fwd[f].append(timed(lambda model=model: forward_all(model), device))
        for f in () if args.random_batches else ("FP32", "FP16_32"):  # slow: the target pair only
            e2e[f].append(timed(lambda f=f: evaluate(models[f], loader, len(names)), device))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{f} {fwd[f][-1]:.2f} s" for f in FORMATS), flush=True)
    med = {f: statistics.median(v) for f, v in fwd.items()}
    e2e_med = {f: statistics.median(v) for f, v in e2e.items() if v}
    command = " ".join(["python benchmarks/quantized_eval.py", *sys.argv[1:]])
    lines = [
        f"`{command}`: {Path(args.config).name}, {n_images} images ({what}), on {machine(device)}; "
        f"median of {args.repeats} alternating repeats.",
        "",
        "| measurement | format | seconds | images/s | time vs FP32 |",
        "|---|---|---|---|---|",
    ]
    for f, s in e2e_med.items():
        lines.append(f"| evaluation (data + model) | {f} | {s:.2f} | {n_images / s:.0f} | {s / e2e_med['FP32']:.2f}x |")
    for f, s in med.items():
        lines.append(f"| model only | {f} | {s:.2f} | {n_images / s:.0f} | {s / med['FP32']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        key = Path(args.config).stem + ("_random" if args.random_batches else "")
        write_section(HEADING, INTRO, f"quantized_eval {key}", table)
        print("written to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    main_guard(main)
