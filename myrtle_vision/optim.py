"""Optimizer and learning-rate schedule from a train config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None, decay_tokens: bool = False
) -> list[dict]:
    """Matrices decay; biases and norms (every parameter of one dimension) do not. Tokens and position
    embeddings (the model's ``no_weight_decay()``) do not either, unless ``decay_tokens``, as in the
    earlier release, whose model exempted nothing else.

    With ``layer_decay`` (finetuning, as in BEiT and DeiT III), each group also has an
    ``lr_scale``: ``layer_decay ** (depth + 1 - layer)``, where the model says which layer each
    parameter is in (its ``layer_of``; the last layer, depth + 1, has the full learning rate).
    """
    skip = set() if decay_tokens else getattr(model, "no_weight_decay", lambda: set())()
    depth = len(getattr(model, "blocks", ()))
    layer_of = getattr(model, "layer_of", lambda _name: depth + 1)
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = layer_of(name) if layer_decay is not None else depth + 1
        groups.setdefault((layer, decays), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            **({"lr_scale": layer_decay ** (depth + 1 - layer)} if layer_decay is not None else {}),
        }
        for (layer, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    ]


def build_optimizer(
    model: nn.Module,
    *,
    kind: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
    layer_decay: float | None = None,
    decay_tokens: bool = False,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """``kind`` (sgd, adam or adamw) over :func:`param_groups`; SGD with Nesterov momentum when ``momentum``."""
    groups = param_groups(model, weight_decay, layer_decay, decay_tokens)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(betas) if betas is not None else (0.9, 0.999), eps=eps, fused=fused)


def optimizer_for(model: nn.Module, tc: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer a train config describes, at its peak learning rate."""
    return build_optimizer(
        model,
        kind=tc.optimizer,
        lr=tc.peak_lr,
        weight_decay=tc.weight_decay,
        momentum=tc.momentum,
        betas=tc.opt_betas,
        eps=tc.opt_eps,
        layer_decay=tc.layer_decay,
        decay_tokens=tc.weight_decay_tokens,
        fused=fused,
    )


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the optimizer update, stepped once per update.

    Linear warmup from ``warmup_lr`` to ``lr`` over the warmup updates, then ``cosine`` down to
    ``min_lr`` at the last update, ``step`` (timm's: ``lr * decay_rate ** (update // decay)``,
    counted from update 0, with no floor) or ``constant``.
    """

    kind: str
    lr: float
    warmup_lr: float
    min_lr: float
    warmup: int
    total: int
    decay: int = 1
    decay_rate: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, updates_per_epoch: int) -> LRSchedule:
        u = updates_per_epoch
        return cls(
            kind=cfg.scheduler,
            lr=cfg.peak_lr,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            warmup=round(cfg.warmup_epochs * u),
            total=cfg.epochs * u,
            decay=max(1, round(cfg.decay_epochs * u)),
            decay_rate=cfg.decay_rate,
        )

    def __call__(self, update: int) -> float:
        if update < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * update / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.decay_rate ** (update // self.decay)
        span = max(1, self.total - self.warmup)
        t = min(1.0, (update - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that sets every group's lr to ``schedule(update)`` (times the group's ``lr_scale``)."""
    base = schedule.lr if schedule.lr > 0 else 1.0
    for group in optimizer.param_groups:
        group["initial_lr"] = base * group.get("lr_scale", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: schedule(update) / base)


def start_schedule_at(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, update: int
) -> None:
    """Move a fresh scheduler from :func:`build_scheduler` (and its optimizer's learning rates) to ``update``,
    for a run resumed from a checkpoint that holds no scheduler state of ours."""
    lrs = [base * fn(update) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    state = scheduler.state_dict()
    state.update(last_epoch=update, _step_count=update + 1, _last_lr=lrs)
    scheduler.load_state_dict(state)
