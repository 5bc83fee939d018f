"""What a training checkpoint holds: written, read and checked here, and nowhere else.

A training checkpoint is a dict::

    format          "myrtle_vision/1"
    model           the ViT to deploy, in the accelerator's layout (see myrtle_vision.weights.deploy)
    distillation    DeiT runs only: {"dist_token", "head_dist.weight", "head_dist.bias"}, kept
                    apart so that ``model`` stays exactly what the accelerator imports
    deployed        which weights ``model`` holds: "raw" (the trained weights) or "ema" (their
                    moving average, with train_config.ema_deploy)
    ema             runs with train_config.ema_decay only: {"decay", "n_averaged"}, and the
                    average's state dict ("weights") when ``model`` holds the raw weights
    raw_weights     when ``model`` holds the average: the trained weights' state dict (to resume)
    quantization    {"q_format", "q_rounding"} the model was trained with ("FP32" unless it was
                    quantization-aware training); ``model`` always holds the FP32 master weights
    optimizer       optimizer state dict
    lr_scheduler    scheduler state dict
    grad_scaler     fp16 runs only: the gradient scaler's state
    iteration       optimizer updates done
    epoch           epochs completed; update_in_epoch: updates done in the current epoch
    best_val_top1   best validation top-1 so far (percent)
    config          the resolved train config, data config inline

:class:`TrainingState` holds the live objects a checkpoint is written from and resumed into. The
earlier release's files (``model``, ``optimizer``, ``lr_scheduler``, ``iteration``) resume too,
with their optimizer state (see :mod:`myrtle_vision.earlier_release`). Files are written
atomically (:func:`myrtle_vision.weights.io.save_atomic`) and read with ``weights_only=True``.

No random-number generator state is saved, and none is restored: resuming does not need it. Every
random draw of training is a function of where it falls in the run, never of the draws before it:
the data order by (seed, epoch) and each image's augmentation by (seed, epoch, index), in whichever
worker (:mod:`myrtle_vision.data.plan`, :mod:`myrtle_vision.data.images`); dropout, stochastic
depth, random erasing and MixUp/CutMix from torch's generators (CPU and CUDA) seeded again before
every micro-batch by (seed, update, micro-batch, rank) (``Trainer.train_update``). The model's
initialisation is seeded by ``seed`` and then overwritten by the checkpoint's weights. So a resumed
run is bit-identical to an uninterrupted one whatever state the global generators are in
(tests/test_exact_resume.py sets torch's, Python's and NumPy's to arbitrary states before resuming).
Checkpoints written before this change hold an ``rng`` entry; it is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from . import earlier_release
from .config import Config
from .errors import UserError
from .models import VisionTransformer, build_model
from .optim import start_schedule_at
from .quantization import Q_FORMATS, ROUNDINGS
from .weights.deploy import has_distillation, load_model_weights, model_entries
from .weights.io import describe, load_file, mismatch

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
    ema: AveragedModel | None = None
    progress: Progress = field(default_factory=Progress)

    @property
    def deploys_ema(self) -> bool:
        return self.ema is not None and self.cfg.train_config.ema_deploy

    def deployed_model(self) -> nn.Module:
        """The weights to deploy, validate for best.pt, and write as the checkpoint's ``model``."""
        return self.ema.module if self.deploys_ema else self.model

    def _weight_entries(self) -> dict:
        entries = {**model_entries(self.deployed_model()), "deployed": "ema" if self.deploys_ema else "raw"}
        if self.ema is not None:
            entries["ema"] = {"decay": self.cfg.train_config.ema_decay, "n_averaged": int(self.ema.n_averaged)}
            if self.deploys_ema:
                entries["raw_weights"] = _cpu_state(self.model)
            else:
                entries["ema"]["weights"] = _cpu_state(self.ema.module)
        return entries

    def _load_weights(self, ckpt: dict, path: Path, current: bool) -> None:
        """The trained weights (and the average) from wherever the checkpoint keeps them."""
        if self.ema is not None and not (current and isinstance(ckpt.get("ema"), dict)):
            raise UserError(
                f"{path}: checkpoint of a run without a weight average, but {self.cfg.path} sets "
                "train_config.ema_decay; a resumed run keeps its ema_decay (set it to null)"
            )
        if self.ema is None and current and isinstance(ckpt.get("ema"), dict):
            raise UserError(
                f"{path}: checkpoint of a run with a weight average (ema_decay "
                f"{ckpt['ema'].get('decay')}), but {self.cfg.path} has train_config.ema_decay null; "
                "a resumed run keeps its ema_decay"
            )
        if ckpt.get("deployed") == "ema":
            load_model_weights(self.ema.module, ckpt, path)
            _load_state(self.model, ckpt.get("raw_weights"), path, "raw_weights")
        else:
            load_model_weights(self.model, ckpt, path, require_distillation=current)
            if self.ema is not None:
                _load_state(self.ema.module, ckpt["ema"].get("weights"), path, "ema.weights")
        if self.ema is not None:
            self.ema.n_averaged.fill_(int(ckpt["ema"].get("n_averaged", 0)))

    def to_dict(self) -> dict:
        """The checkpoint (see the module docstring), tensors copied to the CPU."""
        p, vc = self.progress, self.cfg.vit_config
        return {
            "format": FORMAT,
            **self._weight_entries(),
            "quantization": {"q_format": vc.trained_q_format, "q_rounding": vc.q_rounding},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            "iteration": p.iteration,
            "epoch": p.epoch,
            "update_in_epoch": p.update_in_epoch,
            "best_val_top1": p.best_val_top1,
            "config": self.cfg.to_dict(),
        }

    def resume(self, path: Path, distilled: bool, updates_per_epoch: int) -> tuple[bool, str]:
        """Read the checkpoint at ``path`` into these objects, after checking it fits the config.

        Returns (whether it is an earlier-release file, a line saying what was resumed)."""
        ckpt = load(path)
        current = ckpt.get("format") == FORMAT
        if current and has_distillation(ckpt) and not distilled:
            raise UserError(
                f"{path}: checkpoint of a DeiT run (it has a distillation token and head), but "
                f"{self.cfg.path} has no distiller_config"
            )
        trained, vc = trained_format(ckpt, path), self.cfg.vit_config
        if current and trained != (vc.trained_q_format, vc.q_rounding):
            raise UserError(
                f"{path}: checkpoint trained with q_format {trained[0]} ({trained[1]} rounding), but "
                f"{self.cfg.path} has vit_config.q_format {vc.trained_q_format} ({vc.q_rounding} "
                "rounding); a resumed run keeps its number format"
            )
        self._load_weights(ckpt, path, current)
        if not current:
            return True, self._resume_earlier_release(ckpt, path, distilled, updates_per_epoch)
        missing = [k for k in ("optimizer", "lr_scheduler") if not isinstance(ckpt.get(k), dict)]
        if missing:
            raise UserError(
                f"{path}: the checkpoint has no {' or '.join(repr(k) for k in missing)} entry, which a "
                "resumed run needs (a file written by this tool's training has both)"
            )
        p = _progress(ckpt, path)
        saved = ckpt["optimizer"]
        saved_scales = [g.get("lr_scale") if isinstance(g, dict) else None for g in saved.get("param_groups", [])]
        if saved_scales != [g.get("lr_scale") for g in self.optimizer.param_groups]:
            raise UserError(
                f"{path}: the checkpoint's learning-rate groups differ from {self.cfg.path}'s "
                "(train_config.layer_decay changed?); a resumed run keeps its layer_decay"
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.scaler.is_enabled() and "grad_scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["grad_scaler"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit this config ({e})") from None
        self.progress = p
        if p.update_in_epoch >= updates_per_epoch:
            p.epoch, p.update_in_epoch = p.epoch + 1, 0
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
            missing.append(
                "the distillation token and head, which start fresh ("
                + (
                    "the earlier release did not save them; their optimizer state is dropped)"
                    if distilled_file
                    else "the checkpoint is of a ViT trained without a teacher)"
                )
            )
        missing.append(
            "the data order, which the file does not hold (this release's data order continues from that update)"
        )
        self.progress = Progress(iteration, iteration // upe, iteration % upe)
        start_schedule_at(self.optimizer, self.scheduler, iteration)
        return (
            f"{path}: checkpoint of the earlier release: resuming at iteration {iteration} (epoch "
            f"{iteration // upe + 1}, update {iteration % upe} of {upe}) with its weights, {optimizer} and the "
            f"learning-rate schedule from that update; not restored: {'; '.join(missing)}"
        )


def _progress(ckpt: dict, path: Path) -> Progress:
    """Where the checkpoint's run was: counts that are whole numbers, not negative, and agree with each other."""
    counts = {}
    for key in ("iteration", "epoch", "update_in_epoch"):
        value = ckpt.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{path}: {key!r} is {value!r}, not a count (a whole number, 0 or more)")
        counts[key] = value
    if counts["iteration"] < counts["update_in_epoch"]:
        raise UserError(
            f"{path}: 'iteration' {counts['iteration']} is less than 'update_in_epoch' "
            f"{counts['update_in_epoch']}; the file was not written by this tool's training"
        )
    best = ckpt.get("best_val_top1", -1.0)
    if not isinstance(best, (int, float)) or isinstance(best, bool) or not -1.0 <= best <= 100.0:
        raise UserError(f"{path}: 'best_val_top1' is {best!r}, not a top-1 accuracy in percent")
    return Progress(counts["iteration"], counts["epoch"], counts["update_in_epoch"], float(best))


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _load_state(model: nn.Module, state, path: Path, entry: str) -> None:
    if not isinstance(state, dict):
        raise UserError(f"{path}: the checkpoint has no '{entry}' entry")
    problem = describe(mismatch(model.state_dict(), state, "the config's model"))
    if problem:
        raise UserError(f"{path}: '{entry}' does not fit the config's model ({problem})")
    model.load_state_dict(state)


def load(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    ckpt = load_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a checkpoint of this tool (no 'model' entry)")
    return ckpt


def deployed_weights(ckpt: dict) -> str | None:
    """What the checkpoint's ``model`` entry holds, for runs that kept a weight average (None otherwise)."""
    ema = ckpt.get("ema")
    if not isinstance(ema, dict):
        return None
    if ckpt.get("deployed") == "ema":
        return (
            f"the weight average (EMA decay {ema.get('decay')}, {ema.get('n_averaged')} updates averaged), "
            "which the run deploys (train_config.ema_deploy)"
        )
    return "the trained weights, which the run deploys (its weight average is not deployed: ema_deploy is false)"


def trained_format(ckpt: dict, path: str | Path = "the checkpoint") -> tuple[str, str]:
    """(q_format, q_rounding) of the arithmetic the checkpoint was trained in; FP32 for older files. An
    entry that names no format or rounding this tool knows is a UserError naming ``path``."""
    q = ckpt.get("quantization", {})
    if not isinstance(q, dict):
        raise UserError(f"{path}: 'quantization' is {q!r}, not {{'q_format': ..., 'q_rounding': ...}}")
    fmt, rounding = q.get("q_format", "FP32"), q.get("q_rounding", "nearest_even")
    if fmt not in Q_FORMATS:
        raise UserError(f"{path}: 'quantization.q_format' is {fmt!r}, not one of {', '.join(Q_FORMATS)}")
    if rounding not in ROUNDINGS:
        raise UserError(f"{path}: 'quantization.q_rounding' is {rounding!r}, not one of {', '.join(ROUNDINGS)}")
    return fmt, rounding


def checkpoint_path_for(cfg: Config, override: str | None) -> Path:
    """The checkpoint a script reads: ``--checkpoint``, else the config's ``train_config.checkpoint_path``."""
    path = override or cfg.train_config.checkpoint_path
    if not path:
        raise UserError(f"{cfg.path}: train_config.checkpoint_path: empty; set it or pass --checkpoint")
    return Path(path)


def rounding_for(cfg: Config, trained: tuple[str, str], q_rounding: str | None) -> str:
    """The rounding a checkpoint is run in: ``q_rounding`` (a flag), else the one it was trained in when that
    was quantization-aware training (``trained``: :func:`trained_format`), else the config's."""
    return q_rounding or (trained[1] if trained[0] != "FP32" else cfg.vit_config.q_rounding)


def ready_model(
    cfg: Config,
    ckpt: dict,
    path: str | Path,
    *,
    distilled: bool = False,
    q_format: str | None = None,
    q_rounding: str | None = None,
    int8_weights: str = "per_tensor",
    device: torch.device | None = None,
) -> VisionTransformer:
    """The checkpoint's ViT, ready to run: built as ``cfg`` says (in ``q_format`` and ``q_rounding`` when given,
    see :func:`myrtle_vision.models.build_model`), the checkpoint's weights in it, in evaluation mode, on
    ``device``. Not ``distilled``: the plain ViT the accelerator runs (a DeiT checkpoint's class head)."""
    model = build_model(cfg, distilled=distilled, q_format=q_format, q_rounding=q_rounding, int8_weights=int8_weights)
    load_model_weights(model, ckpt, path, require_distillation=False)
    return model.to(device).eval() if device is not None else model.eval()
