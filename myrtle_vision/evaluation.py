"""Evaluation: a model over a data loader (:func:`evaluate`, used by training's validation too), any
split of a config's data (:func:`split_accuracy`), a checkpoint's test-split report for ``test.py``,
and the same checkpoint in FP32 beside a simulated number format for ``test_quantize.py`` (INT8
calibrated on the first batches of the validation split). Never imports training.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt_io
from . import int8
from .config import Config
from .data import class_names, eval_loader, open_split, read_label_map, resolve_workers
from .distributed import Processes
from .errors import UserError
from .files import check_folder, check_output, json_with, write_atomic, write_json
from .metrics import Accumulator, confusion_image, format_report, format_side_by_side
from .models import VisionTransformer
from .models.cnn import Resized, load_teacher
from .precision import autocast
from .quantization import POST_TRAINING_FORMATS, Q_FORMATS, ROUNDINGS
from .reporting import Reporter
from .weights.deploy import has_distillation


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, num_classes: int, procs: Processes = Processes(), precision: str = "fp32"
) -> Accumulator:
    """Loss and accuracy of ``model`` (for a ViT: its class head) over every batch of ``loader``
    (with several processes: over every process's share, summed)."""
    return _evaluate(model, loader, num_classes, average_heads=False, procs=procs, precision=precision)[0]


@torch.no_grad()
def evaluate_heads(
    model: nn.Module, loader, num_classes: int, procs: Processes = Processes(), precision: str = "fp32"
) -> tuple[Accumulator, Accumulator]:
    """A DeiT student's (class head, average of class and distillation heads), from one pass per batch."""
    return _evaluate(model, loader, num_classes, average_heads=True, procs=procs, precision=precision)


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
    model, loader, num_classes: int, *, average_heads: bool, procs: Processes, precision: str = "fp32"
) -> tuple[Accumulator, Accumulator]:
    device = next(model.parameters()).device  # the loader's batches are there already (see data.loaders)
    was_training = model.training
    model.eval()
    class_acc, avg_acc = Accumulator(num_classes), Accumulator(num_classes)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            if average_heads:
                class_logits, dist_logits = model.forward_heads(images)
                avg_logits = (class_logits.float() + dist_logits.float()) / 2
            else:
                class_logits = model(images)
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
) -> tuple[Accumulator, Accumulator | None, list[str]]:
    """Evaluate on every image of a split: (class head, average of both heads for DeiT else None, class names)."""
    loader, names = split_loader(cfg, procs, batch_size, num_workers, split)
    if getattr(model, "args", None) is not None and model.args.distilled:
        acc, avg = evaluate_heads(model, loader, len(names), procs, precision)
        return acc, avg, names
    return evaluate(model, loader, len(names), procs, precision), None, names


def run_test(
    cfg: Config,
    checkpoint: Path,
    procs: Processes = Processes(),
    json_path: str | None = None,
    output_dir: str | None = None,
    split: str = "test",
    force: bool = False,
) -> dict:
    """Evaluate ``checkpoint`` on every image of a split (the test split unless told); print and save the
    results; return the JSON dict.

    With several processes each evaluates its share of the split and the counts are summed; rank 0
    alone prints and writes. Always in FP32 (whatever the config's training ``precision``): the
    weights as deployed.
    """
    out_dir = _output_dir(output_dir, checkpoint, split)
    check_outputs(procs, out_dir, json_path, force)
    ckpt = ckpt_io.load(checkpoint)
    # A DeiT checkpoint is tested as one whatever the config says: its class head is the plain ViT.
    model = ckpt_io.ready_model(cfg, ckpt, checkpoint, distilled=has_distillation(ckpt), device=procs.device)
    tc = cfg.train_config
    weights = ckpt_io.deployed_weights(ckpt)
    if procs.is_main and weights:
        print(f"{checkpoint}: testing {weights}")
    if procs.is_main and model.args.q_format != "FP32":
        print(
            f"evaluating in {model.args.q_format} arithmetic ({model.args.q_rounding} rounding), "
            f"as {cfg.path} vit_config.q_format says"
        )
    if procs.is_main and cfg.vit_config.q_format in POST_TRAINING_FORMATS:
        print(
            f"evaluating in FP32: {cfg.path} vit_config.q_format {cfg.vit_config.q_format} is post-training "
            f"quantization, which test.py does not apply; python test_quantize.py -c {cfg.path} gives its figures "
            "beside FP32's"
        )
    acc, avg, names = split_accuracy(model, cfg, procs, tc.local_batch_size, tc.num_workers, split=split)
    result = _result(acc, names, split)
    if avg is not None:
        result["average_heads"] = {"top1": avg.top1, "top5": avg.top5}
    if weights:
        result["weights"] = ckpt.get("deployed")
    if not procs.is_main:
        return result
    print(format_report(acc, names))
    if avg is not None:
        print(
            f"DeiT checkpoint: the figures above are the class head's, which is what the accelerator runs; "
            f"the average of the class and distillation heads gives top-1 {avg.top1:.2f}%, top-{avg.k} {avg.top5:.2f}%"
        )
    scalars = {f"{split}/top1": acc.top1, f"{split}/top5": acc.top5}
    if avg is not None:
        scalars.update({f"{split}/top1_average_heads": avg.top1, f"{split}/top5_average_heads": avg.top5})
    _save(acc, names, split, out_dir, int(ckpt.get("iteration", 0)), scalars)
    _write_json(result, json_path)
    return result


def run_teacher_test(
    cfg: Config,
    weights: str | None,
    procs: Processes = Processes(),
    json_path: str | None = None,
    output_dir: str | None = None,
    split: str = "test",
    force: bool = False,
) -> dict:
    """Evaluate the config's CNN teacher (``distiller_config``: its model, image size and, unless ``weights``
    names another file, its weights file) on every image of a split, as distillation sees it."""
    dc = cfg.distiller_config
    if dc is None:
        raise UserError(
            f"{cfg.path}: distiller_config: missing; --teacher tests the teacher it names "
            "(teacher_model, teacher_weights_path)"
        )
    path = Path(weights or dc.teacher_weights_path)
    where = f"--teacher {path}" if weights else f"{cfg.path}: distiller_config.teacher_weights_path"
    out_dir = _output_dir(output_dir, path, split)
    check_outputs(procs, out_dir, json_path, force)
    net = load_teacher(dc.teacher_model, cfg.data_config.number_of_classes, path, where)
    model = Resized(net, dc.teacher_image_size).eval().to(procs.device)
    tc = cfg.train_config
    if procs.is_main:
        size = f", images resized to {dc.teacher_image_size}" if dc.teacher_image_size else ""
        print(f"{path}: testing teacher {dc.teacher_model} on the {split} split{size}")
    acc, _, names = split_accuracy(model, cfg, procs, tc.local_batch_size, tc.num_workers, split=split)
    result = {**_result(acc, names, split), "teacher_model": dc.teacher_model, "weights_path": str(path)}
    if not procs.is_main:
        return result
    print(format_report(acc, names))
    _save(acc, names, split, out_dir, 0, {f"{split}/top1": acc.top1, f"{split}/top5": acc.top5})
    _write_json(result, json_path)
    return result


def _result(acc: Accumulator, names: list[str], split: str) -> dict:
    return {
        "split": split,
        "top1": acc.top1,
        "top5": acc.top5,
        "num_images": acc.count,
        "per_class": acc.per_class(names),
    }


def _output_dir(output_dir: str | None, tested: Path, split: str) -> Path:
    """``--output-dir``, else ``test_<file name>`` beside the file tested (``<split>_<file name>`` for
    another split)."""
    return Path(output_dir) if output_dir else tested.parent / f"{split}_{tested.stem}"


def _save(acc: Accumulator, names: list[str], split: str, out_dir: Path, step: int, scalars: dict) -> None:
    """The confusion matrix as a picture and in TensorBoard, with ``scalars``, in ``out_dir``."""
    image = confusion_image(acc.confusion, names)  # (out_dir made by check_outputs)
    save_png(image, out_dir / "confusion_matrix.png")
    reporter = Reporter(out_dir)
    reporter.image(f"{split}/confusion_matrix", image)
    reporter.scalars(step, **scalars)
    reporter.close()
    print(f"confusion matrix: {out_dir / 'confusion_matrix.png'} (and TensorBoard in {out_dir})")


def _write_json(result: dict, json_path: str | None) -> None:
    if json_path:
        write_json(json_path, result, "JSON report")


def save_png(image, path: Path) -> None:
    write_atomic(path, lambda f: image.save(f, format="PNG"), "picture")


def check_outputs(procs: Processes, out_dir: Path, json_path: str | None, force: bool = False) -> None:
    """Before the evaluation: the report folder and the ``--json`` file can be written (an existing JSON file is
    replaced only when it is an earlier report, or with ``force``)."""

    def check():
        check_folder(out_dir, "--output-dir")
        if json_path:
            check_output(json_path, "--json", ours=json_with("num_images"), force=force, what="JSON report")

    procs.on_main(check)


@dataclass
class Comparison:
    """Two models on every image of a split: their accuracies, and each image whose top-1 prediction differs."""

    reference: Accumulator
    quantized: Accumulator
    max_logit_diff: float
    # one row per changed image, by its index in the split: (index, true class, reference's prediction,
    # quantized prediction, reference's margin, quantized margin); a margin is top-1 minus runner-up logit
    changed: list[tuple[int, int, int, int, float, float]]


def _margins(logits: torch.Tensor) -> torch.Tensor:
    top = logits.float().topk(min(2, logits.shape[1]), dim=1).values
    return top[:, 0] - top[:, -1]


@torch.no_grad()
def compare(
    reference: torch.nn.Module, quantized: torch.nn.Module, loader, num_classes: int, procs: Processes = Processes()
) -> Comparison:
    """Both models on every batch of ``loader`` (with several processes: this process's share of the split,
    samples ``rank``, ``rank + world_size``, ..., as :func:`split_loader` deals them), over all shares."""
    reference.eval(), quantized.eval()
    ref_acc, q_acc = Accumulator(num_classes), Accumulator(num_classes)
    max_diff, seen, rows = 0.0, 0, []
    for images, targets in loader:
        images = images.to(procs.device, non_blocking=True)
        targets = targets.to(procs.device, non_blocking=True)
        ref, q = reference(images), quantized(images)
        ref_acc.update(ref, targets)
        q_acc.update(q, targets)
        ref_pred, q_pred = ref.argmax(1), q.argmax(1)
        where = (ref_pred != q_pred).nonzero().flatten()
        if where.numel():
            index = procs.rank + (seen + where) * procs.world_size
            rows.append(
                torch.stack(
                    [
                        index.double(),
                        targets[where].double(),
                        ref_pred[where].double(),
                        q_pred[where].double(),
                        _margins(ref[where]).double(),
                        _margins(q[where]).double(),
                    ],
                    1,
                ).cpu()
            )
        seen += targets.numel()
        max_diff = max(max_diff, (ref - q).abs().max().item())
    max_diff = float(procs.all_reduce_max(torch.tensor([max_diff], dtype=torch.float64)).item())
    ref_acc, q_acc = sum_over_processes(ref_acc, procs), sum_over_processes(q_acc, procs)
    return Comparison(ref_acc, q_acc, max_diff, _gather_rows(rows, ref_acc.count, procs))


def _gather_rows(rows: list[torch.Tensor], count: int, procs: Processes) -> list[tuple]:
    """Every process's changed rows, in split order: each row is summed into its image's slot of a table
    as long as the split (the other processes add zeros there)."""
    mine = torch.cat(rows) if rows else torch.zeros(0, 6, dtype=torch.float64)
    if procs.enabled:
        table = torch.zeros(count, 7, dtype=torch.float64)  # count: the whole split, summed over processes
        slots = mine[:, 0].long()
        table[slots, 0] = 1
        table[slots, 1:] = mine
        procs.all_reduce_sum(table)
        mine = table[table[:, 0] > 0, 1:]
    return [(int(i), int(t), int(r), int(q), float(mr), float(mq)) for i, t, r, q, mr, mq in mine.tolist()]


def resolve_format(
    cfg: Config,
    trained: tuple[str, str],
    *,
    quantized_ckpt: bool,
    q_format: str | None,
    q_rounding: str | None,
    path: Path,
) -> tuple[str, str]:
    """The (q_format, q_rounding) to test in; the checkpoint's kind must match ``--quantized_ckpt``."""
    if trained[0] != "FP32" and not quantized_ckpt:
        raise UserError(
            f"{path}: checkpoint made by quantization-aware training (q_format {trained[0]}); "
            "add --quantized_ckpt to test it"
        )
    if trained[0] == "FP32" and quantized_ckpt:
        if (q_format or cfg.vit_config.q_format) in POST_TRAINING_FORMATS:
            raise UserError(
                f"{path}: FP32 checkpoint; drop --quantized_ckpt: PyTorchINT8 is post-training "
                "quantization, its configs train in FP32 and test_quantize.py quantizes the FP32 "
                "checkpoint"
            )
        raise UserError(
            f"{path}: FP32 checkpoint, not made by quantization-aware training; drop --quantized_ckpt "
            "(test_quantize.py quantizes an FP32 checkpoint after training)"
        )
    if q_format is not None and q_format not in Q_FORMATS + POST_TRAINING_FORMATS:
        raise UserError(f"--q_format {q_format!r} is not one of {', '.join(Q_FORMATS + POST_TRAINING_FORMATS)}")
    if q_rounding is not None and q_rounding not in ROUNDINGS:
        raise UserError(f"--q_rounding {q_rounding!r} is not one of {', '.join(ROUNDINGS)}")
    vc = cfg.vit_config
    # The flag, else the config's format, else the one it was trained in, else the accelerator's.
    fmt = q_format or next(f for f in (vc.q_format, trained[0], "FP16_32") if f != "FP32")
    # (quantized_ckpt is now whether the checkpoint was trained in another format than FP32)
    rounding = ckpt_io.rounding_for(cfg, trained, q_rounding)
    return fmt, rounding


DEFAULT_CALIB_STEPS = 10  # validation batches that calibrate PyTorchINT8, as in the earlier release


def unused_int8_flags(fmt: str, calib_steps: int | None, per_channel: bool) -> str | None:
    """A note when INT8's flags come with a floating-point format, which has nothing to calibrate.

    The earlier release calibrated whatever the format, so ``--calib_steps`` is accepted (a user's
    old command keeps working) but said to be unused, and the line names the format actually tested.
    """
    given = [flag for flag, on in (("--calib_steps", calib_steps is not None), ("--per_channel", per_channel)) if on]
    if fmt in POST_TRAINING_FORMATS or not given:
        return None
    return (
        f"{' and '.join(given)} unused: testing {fmt}, a floating-point format with no calibration and no "
        "weight scales (INT8 is --q_format PyTorchINT8)"
    )


def resolve_int8(
    fmt: str, q_rounding: str | None, calib_steps: int | None, per_channel: bool
) -> tuple[int, str] | None:
    """(calibration batches, int8 weight scheme) for PyTorchINT8, None for a floating-point format."""
    if fmt not in POST_TRAINING_FORMATS:
        return None
    if q_rounding is not None:
        raise UserError(
            f"--q_rounding {q_rounding}: applies to the floating-point formats, not to {fmt} "
            "(integer quantization, which rounds to nearest, ties to even); drop it"
        )
    steps = DEFAULT_CALIB_STEPS if calib_steps is None else calib_steps
    if steps < 1:
        raise UserError(
            f"--calib_steps {steps}: must be at least 1 (the number of validation batches that calibrate {fmt})"
        )
    return steps, "per_channel" if per_channel else "per_tensor"


def calibrate_on_validation(cfg: Config, model: VisionTransformer, procs: Processes, steps: int) -> tuple[int, int]:
    """Calibrate an INT8 ``model`` on the first ``steps`` batches of the validation split (its evaluation
    transforms, in order, ``local_batch_size`` images each); return (batches, images) used.

    Every process reads the same batches, of the whole split rather than its share, so that all
    processes quantize with the same scales. A split with fewer batches is used whole, and that is said.
    """
    tc = cfg.train_config
    loader, _ = split_loader(cfg, procs, tc.local_batch_size, tc.num_workers, "val", shard=False)
    batches = min(steps, len(loader))
    images = min(batches * tc.local_batch_size, len(loader.dataset))
    if procs.is_main:
        where = f"{cfg.data_config.valid_files} of {cfg.data_config_path}"
        if batches < steps:
            print(
                f"calibrating on all {batches} validation batches ({images} images of {where}): "
                f"--calib_steps {steps} asks for more than the split has",
                flush=True,
            )
        else:
            print(f"calibrating on the first {batches} validation batches ({images} images of {where})", flush=True)
    done = int8.calibrate(model, (x for x, _ in islice(loader, batches)))  # on the device already
    assert done == batches, (done, batches)
    return batches, images


def run_quantize_test(
    cfg: Config,
    checkpoint: Path,
    procs: Processes = Processes(),
    q_format: str | None = None,
    q_rounding: str | None = None,
    quantized_ckpt: bool = False,
    json_path: str | None = None,
    calib_steps: int | None = None,
    per_channel: bool = False,
    split: str = "test",
    output_dir: str | None = None,
    force: bool = False,
) -> dict:
    """Test ``checkpoint`` in FP32 and in a simulated number format, side by side, on every image of a split
    (the test split unless told); print and return the results, and save both confusion matrices and the
    images whose prediction changed in ``output_dir`` (default: ``<split>_<format>_<checkpoint name>``
    beside the checkpoint).

    Floating-point formats need no calibration (there are no scales to fit), so the validation
    split is not read. PyTorchINT8 is calibrated first, on the first ``calib_steps`` (default 10)
    validation batches, with per-tensor or (``per_channel``) per-row weight scales. The test split
    is read once, both models seeing each batch. A DeiT checkpoint is tested by its class head,
    which is what the accelerator runs.
    """
    ckpt = ckpt_io.load(checkpoint)
    trained = ckpt_io.trained_format(ckpt, checkpoint)
    fmt, rounding = resolve_format(
        cfg, trained, quantized_ckpt=quantized_ckpt, q_format=q_format, q_rounding=q_rounding, path=checkpoint
    )
    out_dir = Path(output_dir) if output_dir else checkpoint.parent / f"{split}_{fmt}_{checkpoint.stem}"
    check_outputs(procs, out_dir, json_path, force)
    int8_options = resolve_int8(fmt, q_rounding, calib_steps, per_channel)
    weights = int8_options[1] if int8_options else "per_tensor"
    models = [
        ckpt_io.ready_model(
            cfg, ckpt, checkpoint, q_format=f, q_rounding=rounding, int8_weights=weights, device=procs.device
        )
        for f in ("FP32", fmt)
    ]
    tc = cfg.train_config
    loader, names = split_loader(cfg, procs, tc.local_batch_size, tc.num_workers, split)
    kind = (
        f"trained with quantization-aware training in {trained[0]}"
        if quantized_ckpt
        else "trained in FP32, quantized after training"
    )
    how = f"{weights.replace('_', '-')} int8 weights, uint8 activations" if int8_options else f"{rounding} rounding"
    note = unused_int8_flags(fmt, calib_steps, per_channel)
    if procs.is_main:
        print(
            f"{checkpoint}: {kind}; testing in {fmt} ({how})"
            + (" (DeiT: class head)" if has_distillation(ckpt) else ""),
            flush=True,
        )
        if note:
            print(note, flush=True)
        deployed = ckpt_io.deployed_weights(ckpt)
        if deployed:
            print(f"{checkpoint}: testing {deployed}", flush=True)
    if int8_options:
        calibrated = calibrate_on_validation(cfg, models[1], procs, int8_options[0])
    comparison = compare(*models, loader, len(names), procs)
    ref, q, changed = comparison.reference, comparison.quantized, len(comparison.changed)
    unchanged = 100.0 * (ref.count - changed) / max(1, ref.count)
    result = {
        "q_format": fmt,
        "q_rounding": None if int8_options else rounding,
        "quantized_ckpt": quantized_ckpt,
        "split": split,
        "num_images": ref.count,
        "fp32": {"top1": ref.top1, "top5": ref.top5, "per_class": ref.per_class(names)},
        "quantized": {"top1": q.top1, "top5": q.top5, "per_class": q.per_class(names)},
        "unchanged_predictions": unchanged,
        "changed_predictions": changed,
        "max_logit_diff": comparison.max_logit_diff,
    }
    if int8_options:
        result.update(calib_steps=calibrated[0], calib_images=calibrated[1], int8_weights=weights)
    if not procs.is_main:
        return result
    print(format_side_by_side([ref, q], ["FP32", fmt], names))
    print(f"predictions unchanged: {unchanged:.2f}% ({changed} of {ref.count} {split} images changed)")
    print(f"largest logit difference: {comparison.max_logit_diff:.6g}")
    for label, acc in (("FP32", ref), (fmt, q)):  # (out_dir made by check_outputs)
        save_png(confusion_image(acc.confusion, names), out_dir / f"confusion_matrix_{label}.png")
    rows = _changed_rows(comparison, loader, names, fmt)
    write_json(out_dir / "changed_predictions.json", rows, "list of changed predictions")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(CHANGED_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "changed_predictions.csv", text.getvalue(), "list of changed predictions")
    print(f"confusion matrices and the {changed} changed predictions (changed_predictions.csv, .json): {out_dir}")
    result["output_dir"] = str(out_dir)
    _write_json(result, json_path)
    return result


CHANGED_FIELDS = ("path", "true_class", "fp32_prediction", "quantized_prediction", "fp32_margin", "quantized_margin")


def _changed_rows(comparison: Comparison, loader, names: list[str], fmt: str) -> list[dict]:
    """The images whose top-1 changed, in split order, with class names; a margin is the predicted class's
    logit minus the runner-up's (small: the image was near a decision boundary)."""
    dataset = loader.dataset
    dataset = getattr(dataset, "dataset", dataset)  # under several processes, this process's Subset of the split
    return [
        dict(zip(CHANGED_FIELDS, (dataset.paths[i], names[t], names[r], names[q], mr, mq)))
        for i, t, r, q, mr, mq in comparison.changed
    ]
