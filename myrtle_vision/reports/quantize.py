"""``test_quantize.py``'s report: a checkpoint in FP32 beside a simulated number format on every image of a
split (INT8 calibrated on the first batches of the validation split), with the images whose prediction changed."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from .. import checkpoint, int8
from ..config import Config
from ..distributed import Processes
from ..errors import UserError
from ..evaluation import split_loader, sum_over_processes
from ..files import write_atomic, write_json
from ..metrics import Accumulator, confusion_image, format_side_by_side
from ..models import VisionTransformer
from ..quantization import POST_TRAINING_FORMATS, Q_FORMATS, ROUNDINGS
from ..reporting import say
from ..tta import MODES, describe
from ..tta import predict as tta_predict
from ..weights.deploy import has_distillation
from .outputs import check_outputs, save_png, write_report


@dataclass
class Comparison:
    """Two models on every image of a split: their accuracies, and each image whose top-1 prediction differs."""

    reference: Accumulator
    quantized: Accumulator
    max_logit_diff: float
    # one row per changed image, by its index in the split: (index, true class, reference's prediction,
    # quantized prediction, reference's margin, quantized margin); a margin is top-1 minus runner-up logit
    # (with test-time augmentation the logits are the log of the probabilities averaged over the views, as is
    # max_logit_diff's)
    changed: list[tuple[int, int, int, int, float, float]]


def _margins(logits: torch.Tensor) -> torch.Tensor:
    top = logits.float().topk(min(2, logits.shape[1]), dim=1).values
    return top[:, 0] - top[:, -1]


@torch.no_grad()
def compare(
    reference: torch.nn.Module,
    quantized: torch.nn.Module,
    loader,
    num_classes: int,
    procs: Processes = Processes(),
    tta: str = "none",
) -> Comparison:
    """Both models on every batch of ``loader`` (with several processes: this process's share of the split,
    samples ``rank``, ``rank + world_size``, ..., as :func:`split_loader` deals them), over all shares; ``tta``:
    both on the same views of each batch, each model's probabilities averaged over them (:mod:`..tta`)."""
    reference.eval(), quantized.eval()
    ref_acc, q_acc = Accumulator(num_classes), Accumulator(num_classes)
    max_diff, seen, rows = 0.0, 0, []
    for images, targets in loader:
        images = images.to(procs.device, non_blocking=True)
        targets = targets.to(procs.device, non_blocking=True)
        ref, q = tta_predict(reference, images, tta), tta_predict(quantized, images, tta)
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
    rounding = checkpoint.rounding_for(cfg, trained, q_rounding)
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
    where = f"{cfg.data_config.valid_files} of {cfg.data_config_path}"
    if batches < steps:
        say(
            f"calibrating on all {batches} validation batches ({images} images of {where}): "
            f"--calib_steps {steps} asks for more than the split has",
            procs,
        )
    else:
        say(f"calibrating on the first {batches} validation batches ({images} images of {where})", procs)
    done = int8.calibrate(model, (x for x, _ in islice(loader, batches)))  # on the device already
    assert done == batches, (done, batches)
    return batches, images


def setup(
    cfg: Config,
    checkpoint_path: Path,
    procs: Processes,
    q_format: str | None,
    q_rounding: str | None,
    quantized_ckpt: bool,
    calib_steps: int | None,
    per_channel: bool,
    split: str,
) -> tuple[dict, str, str, Path, tuple[int, str] | None]:
    """What test_quantize.py's reports start from: (the checkpoint, the format and rounding to test in, the default
    output folder ``<split>_<format>_<checkpoint name>`` beside the checkpoint, INT8's (calibration batches, weight
    scheme) or None)."""
    ckpt = checkpoint.load(checkpoint_path)
    trained = checkpoint.trained_format(ckpt, checkpoint_path)
    fmt, rounding = resolve_format(
        cfg, trained, quantized_ckpt=quantized_ckpt, q_format=q_format, q_rounding=q_rounding, path=checkpoint_path
    )
    out_dir = checkpoint_path.parent / f"{split}_{fmt}_{checkpoint_path.stem}"
    return ckpt, fmt, rounding, out_dir, resolve_int8(fmt, q_rounding, calib_steps, per_channel)


def run_quantize_test(
    cfg: Config,
    checkpoint_path: Path,
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
    tta: str = "none",
) -> dict:
    """Test ``checkpoint_path`` in FP32 and in a simulated number format, side by side, on every image of a split
    (the test split unless told); print and return the results, and save both confusion matrices and the
    images whose prediction changed in ``output_dir`` (default: ``<split>_<format>_<checkpoint name>``
    beside the checkpoint).

    Floating-point formats need no calibration (there are no scales to fit), so the validation
    split is not read. PyTorchINT8 is calibrated first, on the first ``calib_steps`` (default 10)
    validation batches, with per-tensor or (``per_channel``) per-row weight scales. The test split
    is read once, both models seeing each batch. A DeiT checkpoint is tested by its class head,
    which is what the accelerator runs. ``tta``: test-time augmentation, both models on the same views
    (:mod:`myrtle_vision.tta`; the default folder then ``<split>_<format>_tta_<mode>_<checkpoint name>``); the
    changed predictions, their margins and the largest logit difference are then over the log of the averaged
    probabilities.
    """
    ckpt, fmt, rounding, out_dir, int8_options = setup(
        cfg, checkpoint_path, procs, q_format, q_rounding, quantized_ckpt, calib_steps, per_channel, split
    )
    if tta != "none" and not output_dir:
        out_dir = out_dir.with_name(f"{split}_{fmt}_tta_{tta}_{checkpoint_path.stem}")
    out_dir = Path(output_dir) if output_dir else out_dir
    check_outputs(procs, out_dir, json_path, force)
    weights = int8_options[1] if int8_options else "per_tensor"
    models = [
        checkpoint.ready_model(
            cfg, ckpt, checkpoint_path, q_format=f, q_rounding=rounding, int8_weights=weights, device=procs.device
        )
        for f in ("FP32", fmt)
    ]
    tc = cfg.train_config
    loader, names = split_loader(cfg, procs, tc.local_batch_size, tc.num_workers, split)
    kind = (
        f"trained with quantization-aware training in {checkpoint.trained_format(ckpt, checkpoint_path)[0]}"
        if quantized_ckpt
        else "trained in FP32, quantized after training"
    )
    how = f"{weights.replace('_', '-')} int8 weights, uint8 activations" if int8_options else f"{rounding} rounding"
    note = unused_int8_flags(fmt, calib_steps, per_channel)
    say(
        f"{checkpoint_path}: {kind}; testing in {fmt} ({how})"
        + (" (DeiT: class head)" if has_distillation(ckpt) else ""),
        procs,
    )
    if note:
        say(note, procs)
    deployed = checkpoint.deployed_weights(ckpt)
    if deployed:
        say(f"{checkpoint_path}: testing {deployed}", procs)
    if tta != "none":
        say(
            describe(tta) + "; both models see the same views, and the changed predictions, margins and the "
            "largest logit difference are over the log of the averaged probabilities",
            procs,
        )
    if int8_options:
        calibrated = calibrate_on_validation(cfg, models[1], procs, int8_options[0])
    comparison = compare(*models, loader, len(names), procs, tta)
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
        "tta": tta,
        "views": MODES[tta],
    }
    if int8_options:
        result.update(calib_steps=calibrated[0], calib_images=calibrated[1], int8_weights=weights)
    if not procs.is_main:
        return result
    say(format_side_by_side([ref, q], ["FP32", fmt], names), procs)
    say(f"predictions unchanged: {unchanged:.2f}% ({changed} of {ref.count} {split} images changed)", procs)
    averaged = f" (of the log of the probabilities averaged over {MODES[tta]} views)" if tta != "none" else ""
    say(f"largest logit difference{averaged}: {comparison.max_logit_diff:.6g}", procs)
    for label, acc in (("FP32", ref), (fmt, q)):  # (out_dir made by check_outputs)
        save_png(confusion_image(acc.confusion, names), out_dir / f"confusion_matrix_{label}.png")
    rows = _changed_rows(comparison, loader, names, fmt)
    write_json(out_dir / "changed_predictions.json", rows, "list of changed predictions")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(CHANGED_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "changed_predictions.csv", text.getvalue(), "list of changed predictions")
    say(f"confusion matrices and the {changed} changed predictions (changed_predictions.csv, .json): {out_dir}", procs)
    result["output_dir"] = str(out_dir)
    write_report(result, json_path)
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
