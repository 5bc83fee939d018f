"""Predictions on new, unlabelled images (``predict.py``): the images a user names (folders walked
recursively, list files, single paths), the config's evaluation transforms, the checkpoint's deployed ViT
in FP32 and, optionally, in the accelerator's number format, and one CSV row per image: the top-k classes
and probabilities, whether FP16 changes the top-1, or why the image could not be read.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from .. import checkpoint
from ..config import Config
from ..data import class_names, eval_loader, read_label_map, resolve_workers
from ..data.augment import pipeline_for
from ..data.images import ImageFiles
from ..distributed import Processes
from ..errors import UserError
from ..files import check_output, write_atomic
from ..quantization import Q_FORMATS, ROUNDINGS
from ..reporting import Reporter, say
from ..tta import MODES, describe
from ..tta import predict as tta_predict

LIST_SUFFIXES = (".txt", ".lst")


def collect_inputs(inputs: list[str]) -> list[str]:
    """The image paths the user named, in order: a folder's files (recursively, sorted, hidden ones left
    out), the lines of a ``.txt``/``.lst`` list file (relative to its folder), or the path itself. Whether
    each is an image is found out when it is read."""
    paths: list[str] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            paths += [
                str(p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: cannot read the list file ({e})") from None
            paths += [str(path.parent / line.strip()) for line in lines if line.strip()]
        else:
            paths.append(str(path))
    if not paths:
        raise UserError(f"{', '.join(inputs)}: no files to predict on")
    return paths


def printable(path: str) -> str:
    """A path as UTF-8 text: the bytes of a file name that is not UTF-8 as ``\\xNN`` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def earlier_predictions(path: Path) -> bool:
    """An ``ours`` test (:func:`myrtle_vision.files.check_output`): a CSV this tool wrote (by its header)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split(",")
    return header[:3] == ["path", "top1", "prob1"] and header[-1] == "error"


def columns(k: int, q_format: str | None) -> list[str]:
    names = ["path"] + [f"{kind}{i}" for i in range(1, k + 1) for kind in ("top", "prob")]
    if q_format:
        names += [f"{q_format}_{kind}{i}" for i in range(1, k + 1) for kind in ("top", "prob")]
        names.append("top1_changed")
    return names + ["error"]


@torch.no_grad()
def predict(
    cfg: Config,
    checkpoint_path: Path,
    inputs: list[str],
    output: Path,
    procs: Processes = Processes(),
    *,
    topk: int = 5,
    q_format: str | None = None,
    q_rounding: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    force: bool = False,
    tta: str = "none",
) -> dict:
    """Write ``output`` (CSV, one row per input file, in the order given, UTF-8; see :func:`printable`) and
    return a summary. With several processes each predicts its share; rank 0 writes. An existing ``output`` is
    replaced only when it is an earlier predictions CSV, or with ``force``. ``tta``: test-time augmentation
    (:mod:`myrtle_vision.tta`), the probabilities then the softmax averaged over the views, each model's
    (with ``q_format``, both see the same views)."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    procs.on_main(
        lambda: check_output(output, "--output", ours=earlier_predictions, force=force, what="predictions CSV")
    )
    ckpt = checkpoint.load(checkpoint_path)
    names = class_names(read_label_map(cfg.data_config))
    k = min(topk, len(names))
    if k < 1:
        raise UserError(f"--topk {topk}: must be at least 1")
    formats, rounding = ["FP32"], None
    if q_format:
        if q_format not in Q_FORMATS or q_format == "FP32":
            raise UserError(
                f"--q_format {q_format!r}: predict.py compares FP32 with one of "
                f"{', '.join(f for f in Q_FORMATS if f != 'FP32')} (INT8 needs calibration: "
                "test_quantize.py)"
            )
        rounding = checkpoint.rounding_for(cfg, checkpoint.trained_format(ckpt, checkpoint_path), q_rounding)
        if rounding not in ROUNDINGS:
            raise UserError(f"--q_rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
        formats.append(q_format)
    # a DeiT checkpoint predicts with its class head: the plain ViT the accelerator runs
    models = [
        checkpoint.ready_model(cfg, ckpt, checkpoint_path, q_format=fmt, q_rounding=rounding, device=procs.device)
        for fmt in formats
    ]
    paths = collect_inputs(inputs)
    dc = cfg.data_config
    pipeline = pipeline_for(dc.transform_ops_val, dc.augment_on, procs.device)
    dataset = ImageFiles(paths, pipeline, cfg.vit_config.image_size, f"{cfg.data_config_path}: transform_ops_val")
    tc = cfg.train_config
    loader = eval_loader(
        dataset,
        batch_size or tc.local_batch_size,
        resolve_workers(num_workers, tc.num_workers),
        device=procs.device,
        rank=procs.rank,
        world_size=procs.world_size,
    )
    if tta != "none":
        say(describe(tta), procs)
    rows: dict[int, dict] = {}
    reporter = Reporter(enabled=procs.is_main)  # no TensorBoard: a progress bar only
    bar = reporter.progress_bar(len(loader), 0, "predicting")
    for batch, failed in loader:
        for index, reason in failed:
            rows[index] = {"path": printable(paths[index]), "error": printable(reason)}
        if batch is not None:
            images, indices = batch
            results = [_topk(tta_predict(model, images, tta), k) for model in models]
            for j, index in enumerate(indices.tolist()):
                row = {"path": printable(paths[index])}
                for fmt, (probs, classes) in zip(formats, results):
                    prefix = "" if fmt == "FP32" else f"{fmt}_"
                    for i in range(k):
                        row[f"{prefix}top{i + 1}"] = names[classes[j][i]]
                        row[f"{prefix}prob{i + 1}"] = f"{probs[j][i]:.6f}"
                if len(results) > 1:
                    row["top1_changed"] = int(results[0][1][j][0] != results[1][1][j][0])
                rows[index] = row
        bar.update()
    reporter.close()
    gathered = {i: row for part in procs.gather(rows) for i, row in part.items()}
    errors = sum("error" in row for row in gathered.values())
    changed = sum(int(row.get("top1_changed", 0)) for row in gathered.values())
    summary = {"images": len(paths) - errors, "errors": errors, "output": str(output), "tta": tta, "views": MODES[tta]}
    if q_format:
        summary.update(q_format=q_format, top1_changed=changed)
    if procs.is_main:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns(k, q_format if len(formats) > 1 else None))
        writer.writeheader()
        writer.writerows(gathered[i] for i in range(len(paths)))
        write_atomic(output, text.getvalue(), "predictions CSV")
        line = f"{output}: {summary['images']} images predicted, top-{k} each"
        if tta != "none":
            line += f" (the softmax averaged over {MODES[tta]} views, --tta {tta})"
        if q_format:
            line += f"; {q_format} changes the top-1 of {changed}"
        if errors:
            first = next(row for row in (gathered[i] for i in range(len(paths))) if "error" in row)
            line += f"; {errors} files could not be used (error rows; first: {first['path']}: {first['error']})"
        say(line)
    return summary


def _topk(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """The top ``k`` probabilities and classes; with test-time augmentation ``logits`` is the log of the averaged
    probabilities, whose softmax is those probabilities."""
    probs, classes = logits.float().softmax(1).topk(k, dim=1)
    return probs.tolist(), classes.tolist()
