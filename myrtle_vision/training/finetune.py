"""Finetune a CNN teacher for distillation, as the notebook and ``finetune_teacher.py`` do.

The teacher learns with the same data pipeline as the ViT (the data config's splits and
transforms, the same seeded order and augmentation), keeps the weights with the best validation
top-1, saves them as a plain torchvision state dict (what a deit config's
``distiller_config.teacher_weights_path`` loads), and reports their test accuracy. Beside the
weights it writes ``<name>.json``: the parameters, where the weights started from, and the
per-epoch history.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import OPTIMIZERS, build, load_data_config
from ..data import TrainPlan, eval_loader, open_split, read_label_map, train_loader
from ..errors import UserError
from ..evaluation import evaluate
from ..files import check_output, json_with, sha256, write_json
from ..metrics import Accumulator
from ..models.cnn import Resized, starting_model
from ..optim import LRSchedule, build_optimizer, build_scheduler
from ..reporting import ProgressBar, say
from ..weights.io import load_file, save_atomic


@dataclass
class TeacherConfig:
    """The notebook's parameters cell (and ``finetune_teacher.py``'s flags)."""

    data_config: str = "data_configs/data_config.json"
    model: str = "resnet50"  # any torchvision classification model
    weights: str | None = "imagenet"  # "imagenet" (torchvision's cache), a .pth state dict, or None: from scratch
    image_size: int | None = None  # resize batches to this size; None: as the data config's transforms give
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    output_path: str = "resnet50_resisc45_pyt_finetuned_weights.pth"
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    seed: int = 1234
    num_workers: int = 4
    device: str | None = None  # "cpu" or "cuda"; None: cuda when available
    force: bool = False  # replace an output_path file this tool did not write
    path: str = field(default="teacher parameters", repr=False)

    def validate(self, v) -> None:
        for name in ("epochs", "batch_size"):
            v.check(getattr(self, name) >= 1, name, "must be at least 1")
        v.check(self.image_size is None or self.image_size >= 8, "image_size", "must be None or at least 8")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "num_workers"):
            v.check(getattr(self, name) >= 0, name, "must not be negative")
        v.check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        v.choice(self.optimizer, OPTIMIZERS, "optimizer")
        v.check(self.device in (None, "cpu", "cuda"), "device", "must be None, 'cpu' or 'cuda'")
        v.check(bool(self.output_path), "output_path", "must not be empty")

    @classmethod
    def from_dict(cls, params: dict, source: str = "teacher parameters") -> TeacherConfig:
        cfg = build(cls, params, source)
        cfg.path = source
        return cfg

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out


@dataclass
class TeacherResult:
    output_path: Path
    started_from: str
    history: list[dict]  # per epoch: epoch, lr, train_loss, train_top1, val_loss, val_top1, seconds
    best_epoch: int
    best_val_top1: float
    test_top1: float
    test_top5: float
    seconds: float

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["output_path"] = str(self.output_path)
        return out


def _earlier_finetuning(sidecar: Path):
    """An ``ours`` test for the weights file: the one its JSON describes (by sha256; a JSON of a version
    before the sha256 was recorded, by its output_path)."""

    def test(path: Path) -> bool:
        info = json.loads(sidecar.read_text())
        if not isinstance(info, dict) or "parameters" not in info:
            return False
        return info["sha256"] == sha256(path) if "sha256" in info else info.get("output_path") == str(path)

    return test


def finetune_teacher(cfg: TeacherConfig, device: torch.device | None = None) -> TeacherResult:
    """Finetune ``cfg.model`` on ``cfg.data_config``'s training split; return the curves and test accuracy."""
    start_time = time.perf_counter()
    output, sidecar = Path(cfg.output_path), Path(cfg.output_path).with_suffix(".json")
    # an earlier finetuning's files are replaced; anything else only with force
    check_output(
        output,
        f"{cfg.path}: output_path",
        ours=_earlier_finetuning(sidecar),
        force=cfg.force,
        what="teacher weights file",
    )
    check_output(
        sidecar,
        f"{cfg.path}: output_path (its JSON)",
        ours=json_with("parameters", "output_path"),
        force=cfg.force,
        what="teacher's JSON",
    )
    if device is None:
        from ..cli import resolve_device

        device = resolve_device(cfg.device)
    data_cfg = load_data_config(cfg.data_config)
    label_map = read_label_map(data_cfg)
    train_set, val_set, test_set = (open_split(data_cfg, s, label_map, device) for s in ("train", "val", "test"))
    if len(train_set) < cfg.batch_size:
        raise UserError(f"{cfg.path}: batch_size: {cfg.batch_size} is more than the {len(train_set)} training images")

    torch.manual_seed(cfg.seed)
    net, started_from = starting_model(cfg.model, data_cfg.number_of_classes, cfg.weights, f"{cfg.path}: weights")
    say(started_from)
    model = Resized(net, cfg.image_size).to(device)
    # the ViT's optimizer and schedule machinery: the notebook's lr is the rate itself; one update per batch,
    # linear warmup from lr / 100, cosine to zero
    optimizer = build_optimizer(
        net, kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    plan = TrainPlan(
        len(train_set), global_batch=cfg.batch_size, local_batch=cfg.batch_size, seed=cfg.seed, drop_last=True
    )
    upe = plan.updates_per_epoch
    schedule = LRSchedule(
        "cosine",
        lr=cfg.lr,
        warmup_lr=cfg.lr / 100,
        min_lr=0.0,
        warmup=round(cfg.warmup_epochs * upe),
        total=cfg.epochs * upe,
    )
    scheduler = build_scheduler(optimizer, schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    val_loader = eval_loader(val_set, cfg.batch_size, cfg.num_workers, device=device)
    say(
        f"finetuning {cfg.model} on {device}: {len(train_set)} training and {len(val_set)} validation images, "
        f"{cfg.epochs} epochs of {plan.updates_per_epoch} updates",
    )

    history, best_top1, best_epoch = [], -1.0, 0
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        seen = Accumulator(data_cfg.number_of_classes)
        bar = ProgressBar(plan.updates_per_epoch, 0, f"teacher epoch {epoch + 1}/{cfg.epochs}")
        for images, targets in train_loader(train_set, plan, epoch=epoch, num_workers=cfg.num_workers, device=device):
            logits = model(images)
            loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen.update(logits.detach(), targets)
            bar.update(loss=f"{loss.item():.4f}")
        bar.close()
        val = evaluate(model, val_loader, data_cfg.number_of_classes)
        if val.top1 > best_top1:
            best_top1, best_epoch = val.top1, epoch + 1
            save_atomic(
                {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                output,
                "teacher weights",
                "the best weights saved before are intact" if best_epoch > 1 else "nothing was written over it",
            )
            write_json(
                sidecar,
                {
                    "parameters": cfg.to_dict(),
                    "finished": False,
                    "output_path": str(output),
                    "sha256": sha256(output),
                    "best_epoch": best_epoch,
                    "best_val_top1": best_top1,
                },
            )
        history.append(
            {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": seen.loss,
                "train_top1": seen.top1,
                "val_loss": val.loss,
                "val_top1": val.top1,
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        say(
            f"teacher epoch {epoch + 1}/{cfg.epochs}: train loss {seen.loss:.4f} top-1 {seen.top1:.2f}%  "
            f"val loss {val.loss:.4f} top-1 {val.top1:.2f}%  (best {best_top1:.2f}% at epoch {best_epoch})",
        )

    net.load_state_dict(load_file(output, "teacher weights file"))
    test = evaluate(
        model, eval_loader(test_set, cfg.batch_size, cfg.num_workers, device=device), data_cfg.number_of_classes
    )
    result = TeacherResult(
        output_path=output,
        started_from=started_from,
        history=history,
        best_epoch=best_epoch,
        best_val_top1=best_top1,
        test_top1=test.top1,
        test_top5=test.top5,
        seconds=time.perf_counter() - start_time,
    )
    write_json(sidecar, {"parameters": cfg.to_dict(), "finished": True, **result.to_dict(), "sha256": sha256(output)})
    say(
        f"teacher weights (best validation top-1 {best_top1:.2f}%, epoch {best_epoch}) saved to {output}; "
        f"test top-1 {test.top1:.2f}%, top-{test.k} {test.top5:.2f}% on {test.count} images",
    )
    return result


def _cli_type(tp):
    """argparse type for a TeacherConfig field; "none" gives None for optional fields."""
    args = typing.get_args(tp)
    inner = next(a for a in args if a is not type(None)) if args else tp

    def parse(text: str):
        if args and text.lower() in ("none", "null"):
            return None
        return inner(text)

    parse.__name__ = inner.__name__
    return parse


_HELP = {
    "data_config": "the data config the ViT trains with",
    "model": "any torchvision classification model",
    "weights": "imagenet (from torchvision's cache, never downloaded), a .pth state dict, or none (from scratch)",
    "image_size": "resize batches to this size; none: as the data config's transforms give",
    "output_path": "where to save the best weights (a plain state dict)",
    "optimizer": "adamw, adam or sgd",
    "device": "cpu or cuda; none: cuda when available",
    "force": "replace an output_path file that is not an earlier finetuning's output",
}


def add_arguments(parser) -> None:
    """One ``--flag`` per TeacherConfig field, defaulting to the field's default."""
    hints = typing.get_type_hints(TeacherConfig)
    for f in dataclasses.fields(TeacherConfig):
        if f.name == "path":
            continue
        what = f"{_HELP[f.name]}; " if f.name in _HELP else ""
        if hints[f.name] is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true", help=_HELP[f.name])
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_cli_type(hints[f.name]),
            default=f.default,
            help=f"{what}default: {f.default}",
        )
