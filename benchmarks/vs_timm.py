"""Benchmark: training and inference speed against timm, the data pipeline, and the share of the matmul rate.

    python benchmarks/vs_timm.py                    # ViT-Tiny and ViT-Small at 224 on the default device
    python benchmarks/vs_timm.py --models tiny --settings fp32 --repeats 3 --no-write

Everything is measured in one run on one device:

- the device's fp32 matmul rate (square matrix products; TF32 off, as in training);
- for each model (the users' ``train_configs/vit_{tiny,small}.json``, dropout off), ours against
  timm's ``VisionTransformer`` with the same dimensions (no qkv bias, as in the deploy layout;
  dropout off; timm's own AdamW from ``create_optimizer_v2``; the same label-smoothed loss):
  training images/s (forward, loss, backward, optimizer step: for ours, ``Trainer.train_update``,
  the training loop's own update) and inference images/s, in identical settings (fp32, eager),
  with the share of the matmul rate each achieves (model FLOPs counted by
  ``torch.utils.flop_counter`` with the attention in plain matmuls);
- our training in each ``--settings`` (precision, ``+compile``) against timm in fp32 eager
  (and, on CUDA, against timm in bf16 autocast, the same settings as ours);
- the data pipeline: our training loader, with the data config's default worker count, over
  generated 256x256 JPEGs (Resisc45's size) with the users' Resisc45 training transforms
  (``data_configs/data_config.json``), against our fp32 training rate for ViT-Tiny.

Timings alternate ours and timm so that drifts in machine speed hit both alike, and keep the
median of ``--repeats`` after ``--warmup`` untimed calls. Results go to benchmarks/RESULTS.md
(one section per device type), with the machine named.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, timed, write_section  # noqa: E402
from myrtle_vision.cli import main_guard, resolve_device  # noqa: E402
from myrtle_vision.config import load_config  # noqa: E402
from myrtle_vision.data import train_loader  # noqa: E402
from myrtle_vision.engine import Trainer, autocast  # noqa: E402
from myrtle_vision.errors import UserError  # noqa: E402
from myrtle_vision.prepare import write_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
USER_CONFIGS = {"tiny": "train_configs/vit_tiny.json", "small": "train_configs/vit_small.json"}
RESISC45_DATA_CONFIG = REPO / "data_configs" / "data_config.json"
NUM_CLASSES = 45
HEADING = "## Training and inference speed against timm (vs_timm.py)"
INTRO = ("Targets on the 2-core CPU: in identical settings (fp32, eager) training and inference at least 1.05x "
         "timm's images/s; with our best settings at least 1.5x timm's fp32 eager training rate; the data pipeline "
         "at least 3x the training rate. On a GPU: bf16 training at least 1.0x timm's in the same settings. "
         "Each device type's table is rewritten when the command is run again on it.")


# --- inputs -------------------------------------------------------------------------------------


def make_jpeg_dataset(root: Path, per_class: int, size: int = 256) -> Path:
    """45 classes of smooth random size x size JPEGs (about the file size of Resisc45's), split train/val/test."""
    rng = np.random.default_rng(0)
    classes = [f"class_{c:02d}" for c in range(NUM_CLASSES)]
    splits = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class + 2):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
            noisy = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
            rel = f"{name}/{name}_{i:04d}.jpg"
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / rel, quality=90)
            splits["train" if i < per_class else "val" if i == per_class else "test"].append(rel)
    write_index(root, classes, splits)
    return root


def write_configs(work: Path, model: str, dataset: Path, image_size: int, batch_size: int, precision: str,
                  compile_: bool) -> Path:
    """The users' config for ``model``, on the generated data, one micro-batch per update, dropout off."""
    data = json.loads(RESISC45_DATA_CONFIG.read_text())
    data["dataset_path"] = str(dataset)
    for ops in (data["transform_ops_train"], data["transform_ops_val"]):
        for op in ("RandomResizedCrop", "Resize", "CenterCrop"):
            if op in ops:
                ops[op] = image_size
    data_path = work / "data_config.json"
    data_path.write_text(json.dumps(data))
    cfg = json.loads((REPO / USER_CONFIGS[model]).read_text())
    cfg["data_config_path"] = str(data_path)
    cfg["train_config"].update(output_directory=str(work / "runs"), local_batch_size=batch_size,
                               global_batch_size=batch_size, precision=precision, compile=compile_,
                               distributed=False)
    cfg["vit_config"].update(image_size=image_size, dropout=0.0, emb_dropout=0.0)
    path = work / f"{model}_{precision}{'_compile' if compile_ else ''}.json"
    path.write_text(json.dumps(cfg))
    return path


def timm_vit(vc, num_classes: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=vc.image_size, patch_size=vc.patch_size, embed_dim=vc.embed_dim, depth=vc.depth,
                             num_heads=vc.heads, mlp_ratio=vc.mlp_dim / vc.embed_dim, qkv_bias=False,
                             num_classes=num_classes)


# --- measurements -------------------------------------------------------------------------------


def matmul_rate(device: torch.device, repeats: int) -> float:
    """The best fp32 FLOP/s of square matrix products (n = 1024, 2048, 4096)."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        reps = max(1, int(2e11 // (2 * n ** 3))) if device.type == "cuda" else 1
        fn = lambda: [a @ b for _ in range(reps)]  # noqa: E731
        fn()
        best = max(best, 2 * n ** 3 * reps / statistics.median(timed(fn, device) for _ in range(repeats)))
    return best


def flops_per_image(model: nn.Module, image_size: int, train: bool) -> float:
    """FLOPs of one image through ``model`` (forward, plus backward when ``train``), attention in plain matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).float().cpu()
    x = torch.randn(2, 3, image_size, image_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x)
        if train:
            out.sum().backward()
    return counter.get_total_flops() / 2


def alternate(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Images/s of each ``fn`` (it returns the images it processed): median of ``repeats`` alternating timings.

    Each timing calls its ``fn`` enough times to last about half a second, fixed after warm-up.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {name: max(1, math.ceil(0.5 / timed(fn, device))) for name, fn in fns.items()}
    rates = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            rates[name].append(rate(lambda: sum(fn() for _ in range(calls[name])), device))
    return {name: statistics.median(r) for name, r in rates.items()}


def rate(fn, device: torch.device) -> float:
    """Images/s of one call of ``fn``, which returns how many images it processed."""
    n = [0]
    seconds = timed(lambda: n.__setitem__(0, fn()), device)
    return n[0] / seconds


class Pair:
    """Our trainer and timm's model for one (model, precision, compile) setting, on the same random batch."""

    def __init__(self, cfg_path: Path, device: torch.device, timm_precision: str):
        self.cfg = load_config(cfg_path)
        self.device, self.timm_precision = device, timm_precision
        with contextlib.redirect_stdout(sys.stderr):
            self.trainer = Trainer(self.cfg, device)
        tc, vc = self.cfg.train_config, self.cfg.vit_config
        torch.manual_seed(0)
        self.x = torch.randn(tc.local_batch_size, 3, vc.image_size, vc.image_size, device=device)
        self.y = torch.randint(0, NUM_CLASSES, (tc.local_batch_size,), device=device)
        from timm.optim import create_optimizer_v2

        self.timm = timm_vit(vc, NUM_CLASSES).to(device)
        self.timm_opt = create_optimizer_v2(self.timm, "adamw", lr=tc.lr, weight_decay=tc.weight_decay)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

    def ours_train(self) -> int:
        self.trainer.model.train()
        return self.trainer.train_update(iter([(self.x, self.y)]), 0)[1]

    def timm_train(self) -> int:
        self.timm.train()
        self.timm_opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.timm_precision):
            loss = self.criterion(self.timm(self.x), self.y)
        loss.backward()
        self.timm_opt.step()
        return len(self.y)

    def ours_infer(self) -> int:
        return _infer(self.trainer.model, self.x, self.device, self.cfg.train_config.precision)

    def timm_infer(self) -> int:
        return _infer(self.timm, self.x, self.device, self.timm_precision)


def _infer(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> int:
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        model(x)
    return len(x)


def pipeline_rate(trainer: Trainer, repeats: int) -> tuple[float, int]:
    """(images/s of our training loader over one epoch, worker start-up included; its worker count)."""
    workers = trainer.tc.num_workers

    def epoch() -> int:
        return sum(len(y) for _, y in train_loader(trainer.train_set, trainer.plan, 0, 0, workers, trainer.pin))

    epoch()  # the files into the page cache
    return statistics.median(rate(epoch, torch.device("cpu")) for _ in range(repeats)), workers


# --- the run ------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(USER_CONFIGS), default=["tiny", "small"])
    p.add_argument("--settings", nargs="+", default=None,
                   help="our training settings to try: fp32, bf16 or fp16, each optionally +compile "
                        "(default: fp32 fp32+compile bf16 bf16+compile, and fp16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images-per-class", type=int, default=16, help="generated training JPEGs per class (45 classes)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args()
    try:
        import timm  # noqa: F401
    except ImportError:
        raise UserError("timm is not installed; it is a benchmark/test dependency: "
                        "bash scripts/setup.sh requirements-dev.txt") from None
    device = resolve_device(args.device)
    settings = args.settings or ["fp32", "fp32+compile", "bf16", "bf16+compile"] + (["fp16"] if device.type == "cuda" else [])
    for s in settings:
        if s.split("+")[0] not in ("fp32", "bf16", "fp16") or s.split("+")[1:] not in ([], ["compile"]):
            p.error(f"--settings: {s!r} is not fp32, bf16 or fp16, optionally with +compile")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    peak = matmul_rate(device, args.repeats)
    log(f"fp32 matmul rate: {peak / 1e9:.0f} GFLOP/s")
    same, best, pipeline = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = make_jpeg_dataset(work / "jpegs", args.images_per_class)
        for model in args.models:
            for setting in settings:
                precision, compile_ = setting.split("+")[0], setting.endswith("+compile")
                cfg_path = write_configs(work, model, dataset, args.image_size, args.batch_size, precision, compile_)
                identical = setting == "fp32"
                # timm runs as our first setting does: identical settings, or fp32 eager as the reference;
                # on CUDA with bf16, in bf16 too ("the same settings").
                timm_precision = precision if identical or (device.type == "cuda" and precision == "bf16") else "fp32"
                pair = Pair(cfg_path, device, timm_precision)
                log(f"{model} {setting}: timing training (timm in {timm_precision} eager) ...")
                train = alternate({"ours": pair.ours_train, "timm": pair.timm_train}, device, args.warmup, args.repeats)
                best.append((model, setting, timm_precision, train["ours"], train["timm"]))
                if identical:
                    log(f"{model} {setting}: timing inference ...")
                    infer = alternate({"ours": pair.ours_infer, "timm": pair.timm_infer}, device, args.warmup,
                                      args.repeats)
                    vc = pair.cfg.vit_config
                    fl = {"ours train": flops_per_image(pair.trainer.model, vc.image_size, True),
                          "timm train": flops_per_image(pair.timm, vc.image_size, True),
                          "ours infer": flops_per_image(pair.trainer.model, vc.image_size, False),
                          "timm infer": flops_per_image(pair.timm, vc.image_size, False)}
                    same.append((model, train, infer, fl))
                    if pipeline is None and model == "tiny":
                        log("timing the data pipeline ...")
                        pipeline = (*pipeline_rate(pair.trainer, max(3, args.repeats // 2)), train["ours"])
                log(f"{model} {setting}: ours {train['ours']:.1f}, timm {train['timm']:.1f} training images/s")
                del pair

    command = " ".join(["python benchmarks/vs_timm.py", *sys.argv[1:]])
    lines = [f"`{command}` on {machine(device)}: batch {args.batch_size}, {args.image_size}x{args.image_size}, "
             f"45 classes; median of {args.repeats} alternating timings after {args.warmup} warm-up calls. "
             f"Measured fp32 matmul rate: **{peak / 1e9:.0f} GFLOP/s**.", "",
             "Identical settings (fp32, eager):", "",
             "| model | measurement | ours images/s | timm images/s | ours / timm | ours: share of matmul rate | "
             "timm: share of matmul rate |", "|---|---|---|---|---|---|---|"]
    for model, train, infer, fl in same:
        for what, rates in (("train", train), ("infer", infer)):
            share = {k: rates[k] * fl[f"{k} {what}"] / peak for k in ("ours", "timm")}
            lines.append(f"| ViT-{model.capitalize()} | {'training' if what == 'train' else 'inference'} | "
                         f"{rates['ours']:.1f} | {rates['timm']:.1f} | **{rates['ours'] / rates['timm']:.2f}x** | "
                         f"{share['ours']:.0%} | {share['timm']:.0%} |")
    lines += ["", "Our training settings against timm:", "",
              "| model | our setting | ours images/s | timm setting | timm images/s | ours / timm |",
              "|---|---|---|---|---|---|"]
    for model, setting, timm_precision, ours, theirs in best:
        lines.append(f"| ViT-{model.capitalize()} | {setting} | {ours:.1f} | {timm_precision} eager | {theirs:.1f} | "
                     f"**{ours / theirs:.2f}x** |")
    if pipeline is not None:
        rate, workers, train_rate = pipeline
        lines += ["", "Data pipeline (our training loader, generated 256x256 JPEGs, the Resisc45 training transforms):",
                  "", "| loader workers | images/s | ViT-Tiny fp32 training images/s | pipeline / training |",
                  "|---|---|---|---|", f"| {workers} | {rate:.0f} | {train_rate:.1f} | **{rate / train_rate:.1f}x** |"]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(HEADING, INTRO, f"vs_timm {device.type}", table)
        print("written to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    main_guard(main)
