"""Evaluation: a model over a data loader (:func:`evaluate`, used by training's validation too), summed over
processes, and over every image of a config's split (:func:`split_loader`, :func:`split_accuracy`). Imports
neither training nor the scripts' reports (:mod:`myrtle_vision.reports`), which use it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .data import class_names, eval_loader, open_split, read_label_map, resolve_workers
from .distributed import Processes
from .errors import UserError
from .metrics import Accumulator
from .precision import autocast
from .tta import predict, predict_heads


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    num_classes: int,
    procs: Processes = Processes(),
    precision: str = "fp32",
    tta: str = "none",
) -> Accumulator:
    """Loss and accuracy of ``model`` (for a ViT: its class head) over every batch of ``loader``
    (with several processes: over every process's share, summed); ``tta``: test-time augmentation's views
    (:mod:`myrtle_vision.tta`), the counts then from the averaged probabilities."""
    return _evaluate(model, loader, num_classes, average_heads=False, procs=procs, precision=precision, tta=tta)[0]


@torch.no_grad()
def evaluate_heads(
    model: nn.Module,
    loader,
    num_classes: int,
    procs: Processes = Processes(),
    precision: str = "fp32",
    tta: str = "none",
) -> tuple[Accumulator, Accumulator]:
    """A DeiT student's (class head, average of class and distillation heads), from one pass per batch (and
    view: with ``tta``, each averaged over the views)."""
    return _evaluate(model, loader, num_classes, average_heads=True, procs=procs, precision=precision, tta=tta)


def sum_over_processes(acc: Accumulator, procs: Processes) -> Accumulator:
    """Add up every process's counts (float64 holds counts exactly up to 2^53)."""
    if procs.enabled:
        packed = torch.cat(
            [
                torch.tensor([acc.count, acc.top5_correct, acc.loss_sum], dtype=torch.float64),
                acc.confusion.flatten().double(),
            ]
        )
        procs.all_reduce_sum(packed)
        acc.count, acc.top5_correct, acc.loss_sum = int(packed[0]), int(packed[1]), float(packed[2])
        acc.confusion = packed[3:].round().long().view_as(acc.confusion)
    return acc


def _evaluate(
    model, loader, num_classes: int, *, average_heads: bool, procs: Processes, precision: str = "fp32", tta: str
) -> tuple[Accumulator, Accumulator]:
    device = next(model.parameters()).device  # the loader's batches are there already (see data.loaders)
    was_training = model.training
    model.eval()
    class_acc, avg_acc = Accumulator(num_classes), Accumulator(num_classes)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            # tta "none": the model's logits themselves; else the log of the probabilities averaged over the views
            if average_heads:
                class_logits, avg_logits = predict_heads(model, images, tta)
            else:
                class_logits = predict(model, images, tta)
        if average_heads:
            avg_acc.update(avg_logits, targets)
        class_acc.update(class_logits, targets)
    model.train(was_training)
    return sum_over_processes(class_acc, procs), sum_over_processes(avg_acc, procs) if average_heads else avg_acc


def check_image_size(dataset, cfg: Config, ops_field: str) -> None:
    """The split's transforms must give the model's input size (checked on its first image)."""
    size = cfg.vit_config.image_size
    height, width = dataset.output_size(0)
    if (height, width) != (size, size):
        raise UserError(
            f"{cfg.data_config_path}: {ops_field} gives {height}x{width} images but vit_config.image_size is {size}"
        )


def split_loader(
    cfg: Config, procs: Processes, batch_size: int, num_workers: int | None, split: str = "test", shard: bool = True
):
    """(a loader over every image of a split, in order, with the evaluation transforms, the training split's
    too; class names). With several processes, each loads its share, and the shares cover the split once."""
    label_map = read_label_map(cfg.data_config)
    dataset = open_split(cfg.data_config, split, label_map, procs.device, evaluation=True)
    check_image_size(dataset, cfg, "transform_ops_val")
    rank, world_size = (procs.rank, procs.world_size) if shard else (0, 1)
    loader = eval_loader(
        dataset, batch_size, resolve_workers(num_workers), device=procs.device, rank=rank, world_size=world_size
    )
    return loader, class_names(label_map)


def split_accuracy(
    model: nn.Module,
    cfg: Config,
    procs: Processes,
    batch_size: int,
    num_workers: int | None,
    *,
    split: str = "test",
    precision: str = "fp32",
    tta: str = "none",
) -> tuple[Accumulator, Accumulator | None, list[str]]:
    """Evaluate on every image of a split: (class head, average of both heads for DeiT else None, class names);
    ``tta``: test-time augmentation (:mod:`myrtle_vision.tta`)."""
    loader, names = split_loader(cfg, procs, batch_size, num_workers, split)
    if getattr(model, "args", None) is not None and model.args.distilled:
        acc, avg = evaluate_heads(model, loader, len(names), procs, precision, tta)
        return acc, avg, names
    return evaluate(model, loader, len(names), procs, precision, tta), None, names
