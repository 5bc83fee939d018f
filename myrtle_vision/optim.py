"""Optimizer and learning-rate schedule from a train config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Matrices decay; biases, norms, tokens and position embeddings do not.

    With ``layer_decay`` (finetuning, as in BEiT and DeiT III), each group also has an
    ``lr_scale``: ``layer_decay ** (depth + 1 - layer)``, where the embeddings are layer 0, block i
    is layer i + 1, and the final norm and the heads are layer depth + 1 (the full learning rate).
    """
    skip = getattr(model, "no_weight_decay", lambda: set())()
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = _layer_of(name, depth) if layer_decay is not None else depth + 1
        groups.setdefault((layer, decays), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             **({"lr_scale": layer_decay ** (depth + 1 - layer)} if layer_decay is not None else {})}
            for (layer, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def _layer_of(name: str, depth: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "dist_token", "patch_embed.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    betas = tuple(cfg.opt_betas) if cfg.opt_betas is not None else (0.9, 0.999)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.opt_eps, fused=fused)


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the optimizer update, stepped once per update.

    Linear warmup from ``warmup_lr`` to ``lr`` over the warmup updates, then ``cosine`` down to
    ``min_lr`` (reached ``cooldown`` updates before the end and held), ``step`` (multiply by
    ``decay_rate`` every ``decay`` updates, never below ``min_lr``) or ``constant``.
    """

    kind: str
    lr: float
    warmup_lr: float
    min_lr: float
    warmup: int
    total: int
    cooldown: int = 0
    decay: int = 1
    decay_rate: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, updates_per_epoch: int) -> "LRSchedule":
        u = updates_per_epoch
        return cls(kind=cfg.scheduler, lr=cfg.lr, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                   warmup=round(cfg.warmup_epochs * u), total=cfg.epochs * u, cooldown=round(cfg.cooldown_epochs * u),
                   decay=max(1, round(cfg.decay_epochs * u)), decay_rate=cfg.decay_rate)

    def __call__(self, update: int) -> float:
        if update < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * update / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return max(self.min_lr, self.lr * self.decay_rate ** ((update - self.warmup) // self.decay))
        span = max(1, self.total - self.cooldown - self.warmup)
        t = min(1.0, (update - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that sets every group's lr to ``schedule(update)`` (times the group's ``lr_scale``)."""
    base = schedule.lr if schedule.lr > 0 else 1.0
    for group in optimizer.param_groups:
        group["initial_lr"] = base * group.get("lr_scale", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: schedule(update) / base)
