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
    # A DeiT checkpoint is tested as one whatever the config says: its class head is the plain ViT.
    model = build_model(cfg, distilled=ckpt_io.has_distillation(ckpt))
    ckpt_io.load_model_weights(model, ckpt, checkpoint)
    model.to(device)
    tc = cfg.train_config
    acc, avg, names = split_accuracy(model, cfg, device, tc.local_batch_size, tc.num_workers)
    print(format_report(acc, names))
    if avg is not None:
        print(f"DeiT checkpoint: the figures above are the class head's, which is what the accelerator runs; "
              f"the average of the class and distillation heads gives top-1 {avg.top1:.2f}%, top-{avg.k} {avg.top5:.2f}%")
    out_dir = Path(output_dir) if output_dir else checkpoint.parent / f"test_{checkpoint.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    image = confusion_image(acc.confusion, names)
    image.save(out_dir / "confusion_matrix.png")
    reporter = Reporter(out_dir)
    reporter.image("test/confusion_matrix", image)
    scalars = {"test/top1": acc.top1, "test/top5": acc.top5}
    if avg is not None:
        scalars.update({"test/top1_average_heads": avg.top1, "test/top5_average_heads": avg.top5})
    reporter.scalars(int(ckpt.get("iteration", 0)), **scalars)
    reporter.close()
    print(f"confusion matrix: {out_dir / 'confusion_matrix.png'} (and TensorBoard in {out_dir})")
    result = {"top1": acc.top1, "top5": acc.top5, "num_images": acc.count, "per_class": acc.per_class(names)}
    if avg is not None:
        result["average_heads"] = {"top1": avg.top1, "top5": avg.top5}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
