"""The training job: set-up, the epoch loop and the update step. Knows nothing of argument parsing.

:func:`train` runs a whole training job from a :class:`~myrtle_vision.config.Config`; what its
checkpoints hold is :mod:`myrtle_vision.checkpoint`'s, and validation is
:func:`myrtle_vision.evaluation.evaluate`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import checkpoint
from ..config import Config
from ..data import (
    TrainPlan,
    class_names,
    derive_seed,
    eval_loader,
    open_split,
    read_label_map,
    resolve_workers,
    stop_workers,
    train_loader,
)
from ..data.batch_augment import BatchAugment
from ..distributed import Processes
from ..errors import TrainingStopped, UserError, reason
from ..evaluation import check_image_size, evaluate, evaluate_heads
from ..files import check_folder, remove_stale_temporaries, write_atomic
from ..losses import DistillationLoss, WeightedCrossEntropy
from ..models import build_model
from ..models.cnn import Resized, load_teacher
from ..optim import LRSchedule, build_scheduler, optimizer_for
from ..precision import autocast
from ..reporting import Reporter
from ..weights.foreign import load_pretrained
from ..weights.io import link_atomic, save_atomic

MAX_SKIPPED_IN_A_ROW = 10  # nonfinite_loss "skip" gives up after this many non-finite updates in a row


class NonFiniteLoss(TrainingStopped):
    """The training loss became NaN or infinite: the run stops, and nothing is saved."""


class Update(NamedTuple):
    """What one optimizer update reports: mean loss, images, whether any process asked to stop."""

    loss: float
    images: int
    stop: bool


def nonfinite_gradients(params, device: torch.device) -> torch.Tensor:
    """1.0 on ``device`` if any gradient holds an inf or a NaN, else 0.0, without waiting for the device
    (the fused check PyTorch's gradient scaler uses, with a scale of 1: the gradients are unchanged)."""
    grads = [q.grad for q in params if q.grad is not None]
    found = torch.zeros(1, device=device)
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
    return found[0].double()


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, path: Path):
        self.signum, self.path = signum, path
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {path}")


class _StopRequests(list):
    """The signals received: the first asks the run to stop at the next update boundary (and save); a
    second stops it at once, by raising KeyboardInterrupt wherever the main thread is (at its next Python
    instruction: a single torch operation under way finishes first), saving nothing more. Except inside
    :func:`_whole_writes`: a checkpoint write under way is finished first, and the KeyboardInterrupt is
    raised as it ends. (Raised inside ``torch.save``, it would leave the write's temporary file behind,
    and torch's archive writer can turn it into a RuntimeError that reads as a failed write, exit 3.)"""

    def __init__(self):
        super().__init__()
        self.writing, self.held = 0, False

    def handle(self, signum, _frame):
        if not self:
            self.append(signum)
        elif self.writing:
            self.held = True
        else:
            raise KeyboardInterrupt


@contextmanager
def _stop_on_signals():
    """Turn the first SIGINT/SIGTERM into a request to stop at the next update boundary; a second stops
    at once (see :class:`_StopRequests`)."""
    requests = _StopRequests()
    previous = {s: signal.signal(s, requests.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _whole_writes(requests: _StopRequests | None):
    """Around a checkpoint write: a second signal that comes during it stops the run once it is done."""
    if requests is None:
        yield
        return
    requests.writing += 1
    try:
        yield
    finally:
        requests.writing -= 1
    if requests.held and not requests.writing:
        raise KeyboardInterrupt


def _in_its_run_dir(checkpoint_path: Path) -> bool:
    """Whether ``checkpoint_path`` lies in a run directory of ours (a ``config.json`` beside it), where resuming
    goes on writing."""
    return (checkpoint_path.parent / "config.json").is_file()


def new_run_dir(output_directory: str) -> Path:
    base = Path(output_directory) / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    try:
        run_dir.mkdir(parents=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise UserError(
            f"{run_dir}: cannot create the run directory ({reason(e)}); check train_config.output_directory"
        ) from None
    return run_dir


class _BothHeads(nn.Module):
    """``forward`` is the DeiT student's ``forward_heads``, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.forward_heads(images)


class Trainer:
    """One training job: model, optimizer, schedule, data plan, and where it writes.

    With several processes (``procs``), each trains on its share of every update, gradients are
    averaged across processes on the last micro-batch of the update, and rank 0 alone writes.
    """

    def __init__(self, cfg: Config, procs: Processes = Processes()):
        self.cfg, self.tc, self.procs, self.device = cfg, cfg.train_config, procs, procs.device
        # what the run says: rank 0 alone prints (and, once the run directory is made, logs to TensorBoard)
        self.reporter = Reporter(enabled=procs.is_main)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32: the accelerator sees these weights
        self._check_output_folder()
        self._open_data()
        self._check_fits_this_run()
        torch.manual_seed(self.tc.seed)
        self._build_model()
        self._build_optimizer()
        self._build_loss()
        self.training_state = checkpoint.TrainingState(
            cfg, self.model, self.optimizer, self.scheduler, self.scaler, ema=self.ema
        )
        self.skipped_in_a_row = 0
        self._stop_requests: _StopRequests | None = None  # while fit() has its signal handler installed
        self.run_dir = self._resume() if self.tc.checkpoint_path else self._new_run_dir()
        self._start_loaders()
        self.step_module = self._wrap_for_the_step()

    def _check_output_folder(self) -> None:
        """Before the data is opened (decoding it can take minutes): the folder this run will write in can be
        written (the checkpoint's own run directory when it resumes there, else output_directory)."""
        ckpt = Path(self.tc.checkpoint_path) if self.tc.checkpoint_path else None
        if ckpt is not None and _in_its_run_dir(ckpt):
            folder, field = ckpt.parent, "checkpoint_path (its run directory)"
        else:
            folder, field = Path(self.tc.output_directory), "output_directory"
        self._on_rank0(lambda: check_folder(folder, f"{self.cfg.path}: train_config.{field}"))

    def _open_data(self) -> None:
        label_map = read_label_map(self.cfg.data_config)
        self.class_names = class_names(label_map)
        self.train_set = open_split(self.cfg.data_config, "train", label_map, self.device)
        self.val_set = open_split(self.cfg.data_config, "val", label_map, self.device)
        check_image_size(self.train_set, self.cfg, "transform_ops_train")
        check_image_size(self.val_set, self.cfg, "transform_ops_val")

    def _check_fits_this_run(self) -> None:
        """The config's rules that depend on the data, the device or the processes (the others are checked
        when the config is loaded)."""
        cfg, tc, procs = self.cfg, self.tc, self.procs
        if len(self.train_set) < tc.global_batch_size and tc.drop_last_batch:
            raise UserError(
                f"{self.train_set.list_path}: {len(self.train_set)} images, fewer than one global batch "
                f"({cfg.path}: train_config.global_batch_size {tc.global_batch_size}); lower it or set "
                "drop_last_batch to false"
            )
        if tc.precision == "fp16" and self.device.type != "cuda":
            raise UserError(
                f"{cfg.path}: train_config.precision fp16 needs CUDA (float16 autocast with a gradient "
                "scaler); on CPU use bf16 or fp32"
            )
        if tc.global_batch_size < procs.world_size:
            raise UserError(
                f"{cfg.path}: train_config.global_batch_size {tc.global_batch_size} is smaller than the "
                f"{procs.world_size} processes: each needs at least one image per update"
            )

    def _build_model(self) -> None:
        cfg, vc = self.cfg, self.cfg.vit_config
        self.model = build_model(cfg)
        if vc.pretrained_weights and not self.tc.checkpoint_path:  # a resumed run has its weights in its checkpoint
            fresh = load_pretrained(
                self.model, vc.pretrained_weights, vc.pretrained_format, f"{cfg.path}: vit_config.pretrained_weights"
            )
            self.reporter.print(
                f"starting from {vc.pretrained_format} weights {vc.pretrained_weights}"
                + (
                    f" ({', '.join(fresh)} freshly initialised: not in the file, or for another class count)"
                    if fresh
                    else ""
                )
            )
        self.model.to(self.device)
        # DeiT's model EMA: torch's AveragedModel, which starts from the weights after the first update
        decay = self.tc.ema_decay
        self.ema = (
            None
            if decay is None
            else AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        )

    def _build_optimizer(self) -> None:
        """Optimizer, the data plan, the learning-rate schedule, and (fp16) the gradient scaler."""
        tc, procs = self.tc, self.procs
        self.optimizer = optimizer_for(self.model, tc, fused=True if self.device.type == "cuda" else None)
        self.plan = TrainPlan(
            len(self.train_set),
            global_batch=tc.global_batch_size,
            local_batch=tc.local_batch_size,
            seed=tc.seed,
            drop_last=tc.drop_last_batch,
            rank=procs.rank,
            world_size=procs.world_size,
            repeats=tc.repeated_augmentation,
            balance_labels=self.train_set.labels if tc.class_balanced_sampler else None,
        )
        self.schedule = LRSchedule.from_config(tc, self.plan.updates_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        # fp16 needs its loss scaled so that small gradients survive; bf16 has FP32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")

    def _build_loss(self) -> None:
        """Cross entropy (weighted per class by ``class_weights``; of class probabilities when MixUp or CutMix
        mix the batch); for DeiT, the teacher and the distillation loss around it, whose class-head term
        alone is weighted."""
        self.batch_augment = BatchAugment.from_config(self.tc, self.cfg.data_config.number_of_classes)
        self.class_weights = self._class_weights()
        if self.class_weights is None:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=self.tc.label_smoothing)
        else:
            self.criterion = WeightedCrossEntropy(self.class_weights.to(self.device), self.tc.label_smoothing)
            shown = ", ".join(f"{name} {w:.4g}" for name, w in zip(self.class_names, self.class_weights.tolist()))
            self.reporter.print(
                f"class weights (train_config.class_weights {json.dumps(self.tc.class_weights)}): {shown}"
            )
        self.teacher = None
        dc = self.cfg.distiller_config
        if dc is not None:
            where = f"{self.cfg.path}: distiller_config.teacher_weights_path"
            teacher = load_teacher(
                dc.teacher_model, self.cfg.data_config.number_of_classes, dc.teacher_weights_path, where
            )
            self.teacher = Resized(teacher, dc.teacher_image_size).eval().to(self.device)
            self.criterion = DistillationLoss(self.criterion, dc.distillation_type, dc.alpha, dc.temperature)

    def _class_weights(self) -> torch.Tensor | None:
        """``train_config.class_weights`` as a tensor: None when off, the config's list, or "balanced":
        N / (classes x images of the class), counted on the training split (scikit-learn's "balanced")."""
        weights = self.tc.class_weights
        if weights is None:
            return None
        if weights != "balanced":
            return torch.tensor(weights, dtype=torch.float32)
        counts = torch.bincount(torch.tensor(self.train_set.labels), minlength=len(self.class_names))
        empty = [name for name, n in zip(self.class_names, counts.tolist()) if n == 0]
        if empty:
            raise UserError(
                f"{self.cfg.path}: train_config.class_weights: balanced, but class {empty[0]!r} has no "
                f"images in {self.train_set.list_path}; give a list of weights instead"
            )
        return (len(self.train_set) / (len(self.class_names) * counts.double())).float()

    def _start_loaders(self) -> None:
        """Workers that live as long as the run: no start-up at every epoch and validation."""
        tc, procs = self.tc, self.procs
        self.num_workers = resolve_workers(tc.num_workers)
        self.train_loader = train_loader(
            self.train_set,
            self.plan,
            epoch=self.progress.epoch,
            start_update=self.progress.update_in_epoch,
            num_workers=self.num_workers,
            device=self.device,
            persistent=True,
        )
        self.val_loader = eval_loader(
            self.val_set,
            tc.local_batch_size,
            self.num_workers,
            device=self.device,
            rank=procs.rank,
            world_size=procs.world_size,
            persistent=True,
        )

    def _wrap_for_the_step(self) -> nn.Module:
        """What the training step calls: the model (both heads for DeiT), wrapped for gradient averaging, and
        compiled around that, as PyTorch recommends; checkpoints and evaluation use the plain model."""
        module = _BothHeads(self.model) if self.teacher is not None else self.model
        if self.procs.enabled:
            module = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return torch.compile(module) if self.tc.compile else module

    def _new_run_dir(self) -> Path:
        """A fresh run directory, made by rank 0 and shared with the other processes."""
        return self._on_rank0(lambda: new_run_dir(self.tc.output_directory))

    def _on_rank0(self, write):
        """``write()`` on rank 0, its result (or the UserError it raised) on every process."""
        return self.procs.on_main(write)

    # --- checkpoints -------------------------------------------------------------------------

    def _resume(self) -> Path:
        path = Path(self.tc.checkpoint_path)
        if not path.is_file():
            raise UserError(
                f"{self.cfg.path}: train_config.checkpoint_path: {path}: "
                + ("is a folder, not a checkpoint" if path.is_dir() else "checkpoint not found")
            )
        earlier, said = self.training_state.resume(path, self.teacher is not None, self.plan.updates_per_epoch)
        self.reporter.print(said)
        # Continue in the run's own folder when the checkpoint lives in one.
        return path.parent if not earlier and _in_its_run_dir(path) else self._new_run_dir()

    @property
    def progress(self) -> checkpoint.Progress:
        return self.training_state.progress

    def state(self) -> dict:
        """What a checkpoint of this moment holds (see :mod:`myrtle_vision.checkpoint`)."""
        return self.training_state.to_dict()

    def save_checkpoint(self) -> Path:
        """Rank 0 writes; every process returns the path (or raises, if the write failed)."""
        return self._on_rank0(self._write_checkpoint)

    def _write_checkpoint(self) -> Path:
        with _whole_writes(self._stop_requests):
            path = save_atomic(self.state(), self.run_dir / f"checkpoint_{self.progress.iteration:07d}.pt")
            link_atomic(path, self.run_dir / "last.pt")
            keep = self.tc.keep_checkpoints
            if keep is not None:
                for old in sorted(self.run_dir.glob("checkpoint_*.pt"))[:-keep]:
                    old.unlink()
        return path

    def _write_best(self) -> Path:
        with _whole_writes(self._stop_requests):
            return save_atomic(self.state(), self.run_dir / "best.pt")

    # --- loops -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Validate the trained weights (and their average, with ``ema_decay``); the weights to deploy (the
        average, with ``ema_deploy``) alone pick ``best.pt``."""
        p = self.progress
        acc, figures = self._validate(self.model, "val")
        where = f"iteration {p.iteration} (epoch {p.epoch + 1}): "
        if self.ema is not None:
            ema_acc, ema_figures = self._validate(self.ema.module, "val_ema")
            where += figures.format(best="") + f"\n  weight average (EMA {self.tc.ema_decay:g}): "
            figures, acc = ema_figures, ema_acc if self.training_state.deploys_ema else acc
        improved = acc.top1 > p.best_val_top1
        if improved:
            p.best_val_top1 = acc.top1
        best = f"  best top-1 {p.best_val_top1:.2f}%"
        if self.ema is not None:
            best += " (of the " + ("weight average)" if self.training_state.deploys_ema else "trained weights)")
        self.reporter.print(where + figures.format(best=best))
        if improved:
            self._on_rank0(self._write_best)

    def _validate(self, model: nn.Module, tag: str):
        """``model``'s validation figures, logged under ``tag``, and a line of them with room for ``{best}``. The
        class head is what the accelerator runs: for DeiT its figures count, both heads' average beside them."""
        p, both = self.progress, ""
        if self.teacher is not None:
            acc, avg = evaluate_heads(model, self.val_loader, len(self.class_names), self.procs, self.tc.precision)
            self.reporter.scalars(p.iteration, **{f"{tag}/top1_average_heads": avg.top1})
            both = f"  (average of both heads: top-1 {avg.top1:.2f}%)"
        else:
            acc = evaluate(model, self.val_loader, len(self.class_names), self.procs, self.tc.precision)
        self.reporter.scalars(
            p.iteration, **{f"{tag}/loss": acc.loss, f"{tag}/top1": acc.top1, f"{tag}/top5": acc.top5}
        )
        return acc, f"val loss {acc.loss:.4f}  top-1 {acc.top1:.2f}%  top-{acc.k} {acc.top5:.2f}%{{best}}{both}"

    def train_update(self, batches, update: int, stop: bool = False) -> Update:
        """One optimizer update over this process's micro-batches.

        Returns the mean loss over all processes' images, the images, and whether any process asked to
        stop (``stop``). The micro-batches are queued without waiting for the device: the loss is summed
        there, and whether the gradients are finite is found there. After them, one collective (with
        several processes) and one host synchronisation read the loss, that flag and the stop requests
        together; then the optimizer steps, or the update is stopped or skipped (``nonfinite_loss``).
        With fp16, the gradient scaler's own step reads its overflow flag too (a second synchronisation).
        """
        p, tc, procs = self.progress, self.tc, self.procs
        n_micro = self.plan.num_micro_batches(update)
        n_images = min(tc.global_batch_size, len(self.train_set) - update * tc.global_batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in range(n_micro):
            images, targets = next(batches)  # on the device already (see myrtle_vision.data.loaders)
            # dropout, stochastic depth, erasing and mixing depend on the position in the run only
            torch.manual_seed(derive_seed(tc.seed, 2, p.iteration, m, procs.rank))
            if self.batch_augment.enabled:
                images, targets = self.batch_augment(images, targets)
            # Gradients are averaged across processes once per update, on its last micro-batch.
            ddp = getattr(self.step_module, "_orig_mod", self.step_module)  # under torch.compile, the DDP module
            sync = contextlib.nullcontext() if not procs.enabled or m == n_micro - 1 else ddp.no_sync()
            with sync:
                with autocast(self.device, tc.precision):
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(images)
                        loss = self.criterion(*self.step_module(images), teacher_logits, targets)
                    else:
                        loss = self.criterion(self.step_module(images), targets)
                # Weight each micro-batch by its share of the update, so the gradient is the mean over the
                # update's images; times the process count, because averaging across processes divides by it.
                self.scaler.scale(loss * (targets.shape[0] * procs.world_size / n_images)).backward()
            loss_sum += loss.detach().double() * targets.shape[0]
        # The gradients are averaged over processes, so every process sees the same flag and norm.
        norm, bad_grads = None, torch.zeros((), dtype=torch.float64, device=self.device)
        if not self.scaler.is_enabled():  # (with fp16 the scaler skips steps whose gradients overflowed)
            if tc.clip_grad is not None:
                norm = nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad, foreach=True)
                bad_grads = (~torch.isfinite(norm)).double()
            else:
                bad_grads = nonfinite_gradients(self.model.parameters(), self.device)
        stop_flag = torch.full((), float(stop), dtype=torch.float64, device=self.device)  # a fill, not a copy
        stats = torch.stack([loss_sum, bad_grads, stop_flag])
        total_loss, nonfinite, stops = procs.all_reduce_sum(stats).tolist()  # the one host synchronisation
        mean_loss = total_loss / n_images  # the same on every process, NaN included
        problem = None
        if not math.isfinite(mean_loss):
            problem = f"the training loss is {mean_loss}"
        elif nonfinite:
            problem = f"the gradient norm is {norm.item()}" if norm is not None else "the gradients are not finite"
        if problem is not None:
            self._nonfinite(problem)
        else:
            self.skipped_in_a_row = 0
            if self.scaler.is_enabled() and tc.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad, foreach=True)
            self.scaler.step(self.optimizer)  # with fp16, skipped when the scaled gradients overflowed
            self.scaler.update()
        self.scheduler.step()
        if self.ema is not None and (p.iteration + 1) % tc.ema_every == 0:
            self.ema.update_parameters(self.model)
        return Update(mean_loss, n_images, stops > 0)

    def _nonfinite(self, problem: str) -> None:
        """Stop before the optimizer step (``nonfinite_loss: stop``), or drop this update's gradients (``skip``:
        the update still counts, so the data and the learning-rate schedule go on)."""
        p = self.progress
        where = f"iteration {p.iteration + 1} (epoch {p.epoch + 1}): {problem}"
        if self.tc.nonfinite_loss == "skip" and self.skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
            self.skipped_in_a_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.reporter.print(f"{where}; update skipped (train_config.nonfinite_loss is skip)")
            return
        saved = sorted(self.run_dir.glob("checkpoint_*.pt"))
        last = f"the last checkpoint, {saved[-1]}, is untouched" if saved else "no checkpoint was written yet"
        more = f" after {MAX_SKIPPED_IN_A_ROW} skipped updates in a row" if self.tc.nonfinite_loss == "skip" else ""
        raise NonFiniteLoss(
            f"{where}{more}; stopped without saving: {last}. Lower the learning rate, set clip_grad, "
            "or set train_config.nonfinite_loss to skip"
        )

    def _prepare_run_dir(self) -> None:
        """Clear what a killed run left half-written in the run directory (checked writable at start-up, by
        :meth:`_check_output_folder`), and save the config beside the checkpoints."""
        remove_stale_temporaries(self.run_dir)  # left by a run killed while writing
        write_atomic(self.run_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n", "config")

    def fit(self) -> Path:
        """Train to the end (or until a signal); returns the path of the last checkpoint."""
        tc, p, procs = self.tc, self.progress, self.procs
        self._on_rank0(self._prepare_run_dir)
        reporter = self.reporter
        reporter.log_to(self.run_dir)
        reporter.scalars(p.iteration, **{"train/peak_lr": tc.peak_lr})
        saved_at, last_val_at, started_at = p.iteration, -1, p.iteration
        if p.epoch >= tc.epochs:
            reporter.print(
                f"{tc.checkpoint_path}: its run has trained all {tc.epochs} epochs of {self.cfg.path}; "
                "nothing to train (raise train_config.epochs to train on)"
            )
        self.model.train()
        with _stop_on_signals() as stop:
            self._stop_requests = stop
            try:
                processes = f" in {procs.world_size} processes" if procs.enabled else ""
                reporter.print(
                    f"training on {self.device}{processes}: {len(self.train_set)} training images, "
                    f"{len(self.val_set)} validation images, {self.plan.updates_per_epoch} updates per "
                    f"epoch of {tc.global_batch_size} images"
                )
                while p.epoch < tc.epochs:
                    bar = reporter.progress_bar(
                        self.plan.updates_per_epoch, p.update_in_epoch, f"epoch {p.epoch + 1}/{tc.epochs}"
                    )
                    self.train_loader.batch_sampler.set_epoch(p.epoch, p.update_in_epoch)
                    batches = iter(self.train_loader)
                    for update in range(p.update_in_epoch, self.plan.updates_per_epoch):
                        start = time.perf_counter()
                        lr = self.optimizer.param_groups[-1]["lr"]  # the last group has the full lr (layer_decay)
                        loss, n, stopping = self.train_update(batches, update, bool(stop))
                        p.iteration, p.update_in_epoch = p.iteration + 1, update + 1
                        ips = n / (time.perf_counter() - start)
                        bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                        reporter.scalars(
                            p.iteration, **{"train/loss": loss, "train/lr": lr, "train/images_per_sec": ips}
                        )
                        if p.iteration % tc.iters_per_val == 0:
                            self.validate()
                            last_val_at = p.iteration
                        # every process stops after the same update (train_update shares the requests); one
                        # process also stops for a signal that came after the update, during validation
                        stopping = stopping or (bool(stop) and not procs.enabled)
                        if p.iteration % tc.iters_per_checkpoint == 0 or stopping:
                            self.save_checkpoint()
                            saved_at = p.iteration
                        if stopping:
                            raise Interrupted(stop[0] if stop else signal.SIGTERM, self.run_dir / "last.pt")
                    reporter.close_bar()
                    epoch_end_val = (p.epoch + 1) % tc.epochs_per_val == 0 or p.epoch + 1 == tc.epochs
                    if epoch_end_val and last_val_at != p.iteration:
                        self.validate()
                        last_val_at = p.iteration
                    p.epoch, p.update_in_epoch = p.epoch + 1, 0
                if p.iteration > started_at or not (self.run_dir / "last.pt").exists():
                    self.save_checkpoint()  # (re)written after the epoch-end validation and bookkeeping
            except (Interrupted, KeyboardInterrupt):
                raise  # a second Ctrl-C may land anywhere, even inside optimizer.step: save nothing then
            except TrainingStopped:
                raise  # a checkpoint write that failed, or a non-finite loss: writing again would not help
            except Exception:
                # Model, optimizer and scheduler still hold the last completed update: keep it (rank 0
                # alone, with no collective: the other processes may have stopped already).
                if p.iteration > saved_at and procs.is_main:
                    try:
                        reporter.print(
                            f"stopped by an error; iteration {p.iteration} saved to {self._write_checkpoint()}"
                        )
                    except TrainingStopped as e:
                        reporter.print(f"stopped by an error, and iteration {p.iteration} could not be saved: {e}")
                if stop:  # e.g. the same signal also stopped the data workers
                    raise Interrupted(stop[0], self.run_dir / "last.pt") from None
                raise
            finally:
                self._stop_requests = None
                reporter.close()
                stop_workers(self.train_loader)
                stop_workers(self.val_loader)
        return self.run_dir / "last.pt"


def train(cfg: Config, procs: Processes = Processes()) -> Path:
    """Train as ``cfg`` says, in this process's share of ``procs``; returns the last checkpoint's path."""
    trainer = Trainer(cfg, procs)
    report = trainer.reporter.print
    report(f"run directory: {trainer.run_dir}")
    report(cfg.train_config.describe_lr())
    dc = cfg.distiller_config
    if dc is not None:
        report(
            f"distilling from {dc.teacher_model} {dc.teacher_weights_path} ({dc.distillation_type}, "
            f"loss = {dc.alpha:g} x cross entropy to the labels + {1 - dc.alpha:g} x distillation term "
            f"(alpha weights the labels)"
            + (f", temperature {dc.temperature:g}" if dc.distillation_type == "soft" else "")
            + ")"
        )
    vc = cfg.vit_config
    if vc.q_format != vc.trained_q_format:
        report(
            f"vit_config.q_format {vc.q_format} is post-training quantization: training runs in FP32, as in the "
            f"earlier release; test_quantize.py quantizes the checkpoint"
        )
    elif vc.q_format != "FP32":
        report(
            f"quantization-aware training: the forward pass simulates {vc.q_format} ({vc.q_rounding} rounding); "
            "gradients pass straight through and the weights stay FP32"
        )
    return trainer.fit()
