"""What a training checkpoint holds: written, read and checked here, and nowhere else.

A training checkpoint is a dict::

    format          "myrtle_vision/1"
    model           the ViT in the accelerator's layout (see myrtle_vision.weights.deploy)
    distillation    DeiT runs only: {"dist_token", "head_dist.weight", "head_dist.bias"}, kept
                    apart so that ``model`` stays exactly what the accelerator imports
    quantization    {"q_format", "q_rounding"} the model was trained with ("FP32" unless it was
                    quantization-aware training); ``model`` always holds the FP32 master weights
    optimizer       optimizer state dict
    lr_scheduler    scheduler state dict
    grad_scaler     fp16 runs only: the gradient scaler's state
    iteration       optimizer updates done
    epoch           epochs completed; update_in_epoch: updates done in the current epoch
    best_val_top1   best validation top-1 so far (percent)
    rng             torch (CPU and CUDA), Python and NumPy random states
    config          the resolved train config, data config inline

:class:`TrainingState` holds the live objects a checkpoint is written from and resumed into. The
earlier release's files (``model``, ``optimizer``, ``lr_scheduler``, ``iteration``) resume too,
with their optimizer state (see :mod:`myrtle_vision.earlier_release`). Files are written
atomically (:func:`myrtle_vision.weights.io.save_atomic`) and read with ``weights_only=True``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import earlier_release
from .config import Config
from .errors import UserError
from .optim import start_schedule_at
from .weights.deploy import has_distillation, load_model_weights, model_entries
from .weights.io import load_file

FORMAT = "myrtle_vision/1"


@dataclass
class Progress:
    """Where a run is."""

    iteration: int = 0  # optimizer updates done
    epoch: int = 0  # epochs completed
    update_in_epoch: int = 0  # updates done in the current epoch
    best_val_top1: float = -1.0


@dataclass
class TrainingState:
    """The objects a training checkpoint is written from and resumed into."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress = field(default_factory=Progress)

    def to_dict(self) -> dict:
        """The checkpoint (see the module docstring), tensors copied to the CPU."""
        p, vc = self.progress, self.cfg.vit_config
        return {"format": FORMAT, **model_entries(self.model),
                "quantization": {"q_format": vc.trained_q_format, "q_rounding": vc.q_rounding},
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.scheduler.state_dict(),
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
                "iteration": p.iteration, "epoch": p.epoch,
                "update_in_epoch": p.update_in_epoch, "best_val_top1": p.best_val_top1,
                "rng": rng_state(), "config": self.cfg.to_dict()}

    def resume(self, path: Path, distilled: bool, updates_per_epoch: int) -> tuple[bool, str]:
        """Read the checkpoint at ``path`` into these objects, after checking it fits the config.

        Returns (whether it is an earlier-release file, a line saying what was resumed)."""
        ckpt = load(path)
        current = ckpt.get("format") == FORMAT
        if current and has_distillation(ckpt) and not distilled:
            raise UserError(f"{path}: checkpoint of a DeiT run (it has a distillation token and head), but "
                            f"{self.cfg.path} has no distiller_config")
        trained, vc = trained_format(ckpt), self.cfg.vit_config
        if current and trained != (vc.trained_q_format, vc.q_rounding):
            raise UserError(f"{path}: checkpoint trained with q_format {trained[0]} ({trained[1]} rounding), but "
                            f"{self.cfg.path} has vit_config.q_format {vc.trained_q_format} ({vc.q_rounding} "
                            "rounding); a resumed run keeps its number format")
        load_model_weights(self.model, ckpt, path, require_distillation=current)
        if not current:
            return True, self._resume_earlier_release(ckpt, path, distilled, updates_per_epoch)
        saved = ckpt.get("optimizer") if isinstance(ckpt.get("optimizer"), dict) else {}
        saved_scales = [g.get("lr_scale") if isinstance(g, dict) else None for g in saved.get("param_groups", [])]
        if saved_scales != [g.get("lr_scale") for g in self.optimizer.param_groups]:
            raise UserError(f"{path}: the checkpoint's learning-rate groups differ from {self.cfg.path}'s "
                            "(train_config.layer_decay changed?); a resumed run keeps its layer_decay")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.scaler.is_enabled() and "grad_scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["grad_scaler"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit this config ({e})") from None
        p = self.progress = Progress(ckpt["iteration"], ckpt["epoch"], ckpt["update_in_epoch"], ckpt["best_val_top1"])
        if p.update_in_epoch >= updates_per_epoch:
            p.epoch, p.update_in_epoch = p.epoch + 1, 0
        set_rng_state(ckpt["rng"])
        return False, f"resuming from {path} at iteration {p.iteration} (epoch {p.epoch + 1})"

    def _resume_earlier_release(self, ckpt: dict, path: Path, distilled: bool, upe: int) -> str:
        """Continue an earlier-release run at its iteration, with its optimizer state on our parameters
        and the schedule from that update."""
        iteration = ckpt.get("iteration")
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise UserError(f"{path}: 'iteration' is {iteration!r}, not a count of optimizer updates")
        missing, distilled_file = [], False
        name = self.cfg.train_config.optimizer
        if isinstance(ckpt.get("optimizer"), dict):
            by_name, distilled_file = earlier_release.optimizer_state_by_name(ckpt, path)
            restored = earlier_release.load_optimizer_state(self.optimizer, self.model, by_name, name, path)
            optimizer = f"the {name} state of its {len(restored)} ViT parameters"
        else:
            optimizer = "a fresh optimizer"
            missing.append("the optimizer state (the file has none)")
        if distilled:
            missing.append("the distillation token and head, which start fresh ("
                           + ("the earlier release did not save them; their optimizer state is dropped)"
                              if distilled_file else "the checkpoint is of a ViT trained without a teacher)"))
        missing.append("the data order and random state, which the file does not hold (this release's data order "
                       "continues from that update)")
        self.progress = Progress(iteration, iteration // upe, iteration % upe)
        start_schedule_at(self.optimizer, self.scheduler, iteration)
        return (f"{path}: checkpoint of the earlier release: resuming at iteration {iteration} (epoch "
                f"{iteration // upe + 1}, update {iteration % upe} of {upe}) with its weights, {optimizer} and the "
                f"learning-rate schedule from that update; not restored: {'; '.join(missing)}")




def load(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    ckpt = load_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a checkpoint of this tool (no 'model' entry)")
    return ckpt


def trained_format(ckpt: dict) -> tuple[str, str]:
    """(q_format, q_rounding) of the arithmetic the checkpoint was trained in; FP32 for older files."""
    q = ckpt.get("quantization")
    q = q if isinstance(q, dict) else {}
    return str(q.get("q_format", "FP32")), str(q.get("q_rounding", "nearest_even"))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
