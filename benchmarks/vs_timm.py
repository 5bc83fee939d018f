"""Benchmark: training and inference speed against timm, end to end with the loader, and the loader alone.

    python benchmarks/vs_timm.py                    # ViT-Tiny and ViT-Small at 224 on the default device
    python benchmarks/vs_timm.py --models tiny --settings fp32 --repeats 3 --no-write

Everything is measured in one run on one device:

- the device's fp32 and bf16 matmul rates (square matrix products; TF32 off, as in training);
- for each model (the users' ``train_configs/vit_{tiny,small}.json``, dropout off), ours against
  timm's ``VisionTransformer`` with the same dimensions (no qkv bias, as in the deploy layout;
  dropout off; timm's own AdamW from ``create_optimizer_v2``; the same loss), in identical settings:
  the same precision (autocast) and, for ``+compile``, timm's model compiled too. Training images/s
  (forward, loss, backward, optimizer step: for ours, ``Trainer.train_update``, the training loop's
  own update) for every setting, inference for fp32 eager, each with its share of the matmul rate of
  its precision (model FLOPs counted by ``torch.utils.flop_counter``, attention in plain matmuls);
- end to end: ``train.py`` itself, as a user runs it, on generated 256x256 JPEG files (Resisc45's
  size) with the users' Resisc45 transforms, for ViT-Tiny in our fastest setting: the images/s it
  logs for each update (waiting for the loader included; validation and checkpoints are not),
  median after its first epoch, beside the model-only rate of the same setting;
- the loader alone: the training loader of that run (decoded-image cache, default workers, the
  transforms where ``augment_on: auto`` puts them) over an epoch, against our best ViT-Tiny rate.

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
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import machine, matmul_rate, timed, write_section
from PIL import Image
from torch import nn

from myrtle_vision.cli import main_guard, resolve_device
from myrtle_vision.config import load_config
from myrtle_vision.data import stop_workers
from myrtle_vision.distributed import Processes
from myrtle_vision.errors import UserError
from myrtle_vision.precision import autocast
from myrtle_vision.prepare import write_index
from myrtle_vision.training import Trainer

REPO = Path(__file__).resolve().parents[1]
USER_CONFIGS = {"tiny": "train_configs/vit_tiny.json", "small": "train_configs/vit_small.json"}
RESISC45_DATA_CONFIG = REPO / "data_configs" / "data_config.json"
NUM_CLASSES = 45
HEADING = "## Training and inference speed against timm (vs_timm.py)"
INTRO = (
    "Targets. GPU: the loader delivers at least 1.5x our best ViT-Tiny training rate; end-to-end `train.py` "
    "at least 0.9x the model-only rate in the same setting; ours at least 1.0x timm in every identical setting "
    "(fp32 eager, bf16 eager, bf16 compiled against timm compiled). The 2-core CPU: the loader at least 5x the "
    "earlier loader's images/s (639, decoding JPEGs every epoch); end to end at least 0.95x model-only; ours at "
    "least 1.0x timm. Each device type's table is rewritten when the command is run again on it."
)


# --- inputs -------------------------------------------------------------------------------------


def make_jpeg_dataset(root: Path, per_class: int, size: int = 256) -> Path:
    """45 classes of smooth random size x size JPEGs (about the file size of Resisc45's), split train/val/test."""
    rng = np.random.default_rng(0)
    classes = [f"class_{c:02d}" for c in range(NUM_CLASSES)]
    splits = {"train": [], "val": [], "test": []}
    for name in classes:
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


def write_configs(
    work: Path,
    model: str,
    dataset: Path,
    *,
    image_size: int,
    batch_size: int,
    precision: str,
    compile_: bool,
    epochs: int = 1,
) -> Path:
    """The users' config for ``model``, on the generated data (its own decoded-image cache), one micro-batch per
    update, dropout off, validation and checkpoints only at the end of each epoch."""
    data = json.loads(RESISC45_DATA_CONFIG.read_text())
    data.update(dataset_path=str(dataset), cache_dir=str(work / "cache"))
    for ops in (data["transform_ops_train"], data["transform_ops_val"]):
        for op in ("RandomResizedCrop", "Resize", "CenterCrop"):
            if op in ops:
                ops[op] = image_size
    data_path = work / "data_config.json"
    data_path.write_text(json.dumps(data))
    cfg = json.loads((REPO / USER_CONFIGS[model]).read_text())
    cfg["data_config_path"] = str(data_path)
    cfg["train_config"].update(
        output_directory=str(work / "runs"),
        local_batch_size=batch_size,
        global_batch_size=batch_size,
        precision=precision,
        compile=compile_,
        distributed=False,
        epochs=epochs,
        iters_per_val=10**9,
        iters_per_checkpoint=10**9,
    )
    cfg["vit_config"].update(image_size=image_size, dropout=0.0, emb_dropout=0.0)
    path = work / f"{model}_{precision}{'_compile' if compile_ else ''}.json"
    path.write_text(json.dumps(cfg))
    return path


def timm_vit(vc, num_classes: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=vc.image_size,
        patch_size=vc.patch_size,
        embed_dim=vc.embed_dim,
        depth=vc.depth,
        num_heads=vc.heads,
        mlp_ratio=vc.mlp_dim / vc.embed_dim,
        qkv_bias=False,
        num_classes=num_classes,
    )


# --- measurements -------------------------------------------------------------------------------


def flops_per_image(model: nn.Module, image_size: int, train: bool) -> float:
    """FLOPs of one image through ``model`` (forward, plus backward when ``train``), attention in plain matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(getattr(model, "_orig_mod", model)).float().cpu()
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
            rates[name].append(rate(lambda fn=fn, n=calls[name]: sum(fn() for _ in range(n)), device))
    return {name: statistics.median(r) for name, r in rates.items()}


def rate(fn, device: torch.device) -> float:
    """Images/s of one call of ``fn``, which returns how many images it processed."""
    n = [0]
    seconds = timed(lambda: n.__setitem__(0, fn()), device)
    return n[0] / seconds


class Pair:
    """Our trainer and timm's model in one setting (precision; compiled or not), on the same random batch."""

    def __init__(self, cfg_path: Path, device: torch.device):
        self.cfg = load_config(cfg_path)
        self.device = device
        with contextlib.redirect_stdout(sys.stderr):
            self.trainer = Trainer(self.cfg, Processes(device=device))
        tc, vc = self.cfg.train_config, self.cfg.vit_config
        self.precision = tc.precision
        torch.manual_seed(0)
        self.x = torch.randn(tc.local_batch_size, 3, vc.image_size, vc.image_size, device=device)
        self.y = torch.randint(0, NUM_CLASSES, (tc.local_batch_size,), device=device)
        from timm.optim import create_optimizer_v2

        self.timm = timm_vit(vc, NUM_CLASSES).to(device)
        self.timm_opt = create_optimizer_v2(
            self.timm,
            "adamw",
            lr=tc.peak_lr,
            weight_decay=tc.weight_decay,
            fused=True if device.type == "cuda" else None,
        )
        self.timm_step = torch.compile(self.timm) if tc.compile else self.timm  # like with like
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

    def ours_train(self) -> int:
        self.trainer.model.train()
        return self.trainer.train_update(iter([(self.x, self.y)]), 0).images

    def timm_train(self) -> int:
        self.timm.train()
        self.timm_opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.criterion(self.timm_step(self.x), self.y)
        loss.backward()
        self.timm_opt.step()
        return len(self.y)

    def ours_infer(self) -> int:
        return _infer(self.trainer.model, self.x, self.device, self.precision)

    def timm_infer(self) -> int:
        return _infer(self.timm, self.x, self.device, self.precision)


def _infer(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> int:
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        model(x)
    return len(x)


def loader_rate(trainer: Trainer, repeats: int) -> float:
    """Images/s of the run's training loader over an epoch, its batches finished on the device (on CUDA that
    is where the transforms run); its persistent workers are started by a first, untimed epoch."""
    loader = trainer.train_loader

    def epoch() -> int:
        loader.batch_sampler.set_epoch(0, 0)
        return sum(len(y) for _, y in loader)

    epoch()
    return statistics.median(rate(epoch, trainer.device) for _ in range(repeats))


def end_to_end_rate(cfg_path: Path, device: torch.device, work: Path) -> tuple[float, int]:
    """(median images/s that ``train.py -c cfg_path`` logs per update after its first epoch, updates counted)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-c", str(cfg_path), "--device", device.type],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run_dir = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run directory: "))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    per_epoch = load_config(cfg_path)
    values = [e.value for e in acc.Scalars("train/images_per_sec")]
    first_epoch = len(values) // per_epoch.train_config.epochs
    steady = values[first_epoch:]
    return statistics.median(steady), len(steady)


# --- the run ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(USER_CONFIGS), default=["tiny", "small"])
    p.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="training settings to compare: fp32, bf16 or fp16, each optionally +compile "
        "(default: fp32 fp32+compile bf16 bf16+compile, and fp16 on CUDA)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--images-per-class",
        type=int,
        default=16,
        help="generated training JPEGs per class (45 classes), for the end-to-end run and the loader",
    )
    p.add_argument("--e2e-epochs", type=int, default=3, help="epochs of the end-to-end train.py run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    return p


def main() -> int:
    p = build_parser()
    args = p.parse_args()
    try:
        import timm  # noqa: F401
    except ImportError:
        raise UserError(
            "timm is not installed; it is a benchmark/test dependency: bash scripts/setup.sh requirements-dev.txt"
        ) from None
    device = resolve_device(args.device)
    settings = args.settings or ["fp32", "fp32+compile", "bf16", "bf16+compile"] + (
        ["fp16"] if device.type == "cuda" else []
    )
    for s in settings:
        if s.split("+")[0] not in ("fp32", "bf16", "fp16") or s.split("+")[1:] not in ([], ["compile"]):
            p.error(f"--settings: {s!r} is not fp32, bf16 or fp16, optionally with +compile")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    peak = {"fp32": matmul_rate(device, args.repeats), "bf16": matmul_rate(device, args.repeats, torch.bfloat16)}
    peak["fp16"] = matmul_rate(device, args.repeats, torch.float16) if "fp16" in "".join(settings) else peak["bf16"]
    log("matmul rates: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
    rows, e2e, loader = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = make_jpeg_dataset(work / "jpegs", args.images_per_class)
        flops = {}
        for model in args.models:
            for setting in settings:
                precision, compile_ = setting.split("+")[0], setting.endswith("+compile")
                cfg_path = write_configs(
                    work,
                    model,
                    dataset,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    precision=precision,
                    compile_=compile_,
                )
                pair = Pair(cfg_path, device)
                log(f"{model} {setting}: timing training, ours and timm's in the same setting ...")
                train = alternate({"ours": pair.ours_train, "timm": pair.timm_train}, device, args.warmup, args.repeats)
                if model not in flops:
                    vc = pair.cfg.vit_config
                    flops[model] = {
                        (who, what): flops_per_image(m, vc.image_size, what == "training")
                        for who, m in (("ours", pair.trainer.model), ("timm", pair.timm))
                        for what in ("training", "inference")
                    }
                rows.append((model, setting, "training", train))
                if setting == "fp32":
                    log(f"{model} {setting}: timing inference ...")
                    rows.append(
                        (
                            model,
                            setting,
                            "inference",
                            alternate(
                                {"ours": pair.ours_infer, "timm": pair.timm_infer}, device, args.warmup, args.repeats
                            ),
                        )
                    )
                log(f"{model} {setting}: ours {train['ours']:.1f}, timm {train['timm']:.1f} training images/s")
                del pair
        tiny = [(setting, r["ours"]) for model, setting, what, r in rows if model == "tiny" and what == "training"]
        if tiny:
            best_setting, best_rate = max(tiny, key=lambda t: t[1])
            precision, compile_ = best_setting.split("+")[0], best_setting.endswith("+compile")
            cfg_path = write_configs(
                work,
                "tiny",
                dataset,
                image_size=args.image_size,
                batch_size=args.batch_size,
                precision=precision,
                compile_=compile_,
                epochs=args.e2e_epochs,
            )
            log(f"end to end: train.py -c (ViT-Tiny, {best_setting}) for {args.e2e_epochs} epochs ...")
            e2e = (best_setting, *end_to_end_rate(cfg_path, device, work), best_rate)
            log("timing the loader alone ...")
            with contextlib.redirect_stdout(sys.stderr):
                trainer = Trainer(load_config(cfg_path), Processes(device=device))
            loader = (
                trainer.num_workers,
                "device" if trainer.train_set.pipeline.on_device else "loader workers",
                loader_rate(trainer, max(3, args.repeats // 2)),
                best_rate,
            )
            stop_workers(trainer.train_loader)

    command = " ".join(["python benchmarks/vs_timm.py", *sys.argv[1:]])
    lines = [
        f"`{command}` on {machine(device)}: batch {args.batch_size}, {args.image_size}x{args.image_size}, "
        f"45 classes; median of {args.repeats} alternating timings after {args.warmup} warm-up calls. Measured "
        "matmul rates: " + ", ".join(f"{k} **{v / 1e9:.0f} GFLOP/s**" for k, v in peak.items()) + ".",
        "",
        "Ours against timm in identical settings (timm compiled when ours is):",
        "",
        "| model | setting | measurement | ours images/s | timm images/s | ours / timm | ours: share of matmul rate "
        "| timm: share of matmul rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, setting, what, r in rows:
        top = peak[setting.split("+")[0]]
        share = {k: r[k] * flops[model][(k, what)] / top for k in ("ours", "timm")}
        lines.append(
            f"| ViT-{model.capitalize()} | {setting} | {what} | {r['ours']:.1f} | {r['timm']:.1f} | "
            f"**{r['ours'] / r['timm']:.2f}x** | {share['ours']:.0%} | {share['timm']:.0%} |"
        )
    if e2e is not None:
        setting, e2e_rate, updates, model_only = e2e
        lines += [
            "",
            f"End to end (`train.py` on {NUM_CLASSES * args.images_per_class} generated 256x256 JPEGs, the "
            f"Resisc45 transforms, loader included; median of the images/s logged for its {updates} updates after "
            "its first epoch) against the model-only rate of the same setting:",
            "",
            "| model | setting | train.py images/s | model only images/s | end to end / model only |",
            "|---|---|---|---|---|",
            f"| ViT-Tiny | {setting} | {e2e_rate:.1f} | {model_only:.1f} | **{e2e_rate / model_only:.2f}x** |",
        ]
    if loader is not None:
        workers, where, loader_ips, best_rate = loader
        lines += [
            "",
            "The training loader alone (decoded-image cache, an epoch of the Resisc45 training transforms):",
            "",
            "| loader workers | transforms run on | images/s | best ViT-Tiny training images/s | loader / training |",
            "|---|---|---|---|---|",
            f"| {workers} | {where} | {loader_ips:.0f} | {best_rate:.1f} | **{loader_ips / best_rate:.1f}x** |",
        ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(HEADING, INTRO, f"vs_timm {device.type}", table)
        print("written to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    main_guard(main)
