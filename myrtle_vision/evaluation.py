"""Test-split evaluation of a checkpoint: accuracy, per-class report, confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import Config
from .engine import split_accuracy
from .errors import UserError
from .metrics import confusion_image, format_report
from .models import build_model
from .reporting import Reporter


def checkpoint_for(cfg: Config, override: str | None) -> Path:
    path = override or cfg.train_config.checkpoint_path
    if not path:
        raise UserError(f"{cfg.path}: train_config.checkpoint_path: empty; set it or pass --checkpoint")
    return Path(path)


def run_test(cfg: Config, checkpoint: Path, device: torch.device, json_path: str | None = None,
             output_dir: str | None = None) -> dict:
    """Evaluate ``checkpoint`` on every test image; print and save the results; return the JSON dict."""
    ckpt = ckpt_io.load(checkpoint)
    model = build_model(cfg)
    ckpt_io.load_model_weights(model, ckpt, checkpoint)
    model.to(device)
    tc = cfg.train_config
    acc, names = split_accuracy(model, cfg, device, tc.local_batch_size, tc.num_workers)
    print(format_report(acc, names))
    out_dir = Path(output_dir) if output_dir else checkpoint.parent / f"test_{checkpoint.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    image = confusion_image(acc.confusion, names)
    image.save(out_dir / "confusion_matrix.png")
    reporter = Reporter(out_dir)
    reporter.image("test/confusion_matrix", image)
    reporter.scalars(int(ckpt.get("iteration", 0)), **{"test/top1": acc.top1, "test/top5": acc.top5})
    reporter.close()
    print(f"confusion matrix: {out_dir / 'confusion_matrix.png'} (and TensorBoard in {out_dir})")
    result = {"top1": acc.top1, "top5": acc.top5, "num_images": acc.count, "per_class": acc.per_class(names)}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
