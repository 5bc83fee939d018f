"""``test.py``'s report: a checkpoint's ViT (or the config's CNN teacher) on every image of a split, printed and
saved (a confusion matrix, TensorBoard, the ``--json`` report)."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..config import Config
from ..distributed import Processes
from ..errors import UserError
from ..evaluation import split_accuracy
from ..metrics import Accumulator, confusion_image, format_report
from ..models.cnn import Resized, load_teacher
from ..quantization import POST_TRAINING_FORMATS
from ..reporting import Reporter, say
from ..tta import MODES, describe
from ..weights.deploy import has_distillation
from .outputs import check_outputs, save_png, write_report


def run_test(
    cfg: Config,
    checkpoint_path: Path,
    procs: Processes = Processes(),
    json_path: str | None = None,
    output_dir: str | None = None,
    split: str = "test",
    force: bool = False,
    tta: str = "none",
) -> dict:
    """Evaluate ``checkpoint_path`` on every image of a split (the test split unless told); print and save the
    results; return the JSON dict.

    With several processes each evaluates its share of the split and the counts are summed; rank 0
    alone prints and writes. Always in FP32 (whatever the config's training ``precision``): the
    weights as deployed. ``tta``: test-time augmentation (:mod:`myrtle_vision.tta`); every figure, the
    average of the heads' too, is then from the probabilities averaged over the views.
    """
    out_dir = _output_dir(output_dir, checkpoint_path, split, tta)
    check_outputs(procs, out_dir, json_path, force)
    ckpt = checkpoint.load(checkpoint_path)
    # A DeiT checkpoint is tested as one whatever the config says: its class head is the plain ViT.
    model = checkpoint.ready_model(cfg, ckpt, checkpoint_path, distilled=has_distillation(ckpt), device=procs.device)
    tc = cfg.train_config
    weights = checkpoint.deployed_weights(ckpt)
    if weights:
        say(f"{checkpoint_path}: testing {weights}", procs)
    if model.args.q_format != "FP32":
        say(
            f"evaluating in {model.args.q_format} arithmetic ({model.args.q_rounding} rounding), "
            f"as {cfg.path} vit_config.q_format says",
            procs,
        )
    if cfg.vit_config.q_format in POST_TRAINING_FORMATS:
        say(
            f"evaluating in FP32: {cfg.path} vit_config.q_format {cfg.vit_config.q_format} is post-training "
            f"quantization, which test.py does not apply; python test_quantize.py -c {cfg.path} gives its figures "
            "beside FP32's",
            procs,
        )
    if tta != "none":
        say(describe(tta), procs)
    acc, avg, names = split_accuracy(model, cfg, procs, tc.local_batch_size, tc.num_workers, split=split, tta=tta)
    result = _result(acc, names, split, tta)
    if avg is not None:
        result["average_heads"] = {"top1": avg.top1, "top5": avg.top5}
    if weights:
        result["weights"] = ckpt.get("deployed")
    if not procs.is_main:
        return result
    say(format_report(acc, names), procs)
    if avg is not None:
        say(
            f"DeiT checkpoint: the figures above are the class head's, which is what the accelerator runs; "
            f"the average of the class and distillation heads gives top-1 {avg.top1:.2f}%, top-{avg.k} {avg.top5:.2f}%"
            + (f" (also averaged over the {MODES[tta]} views)" if tta != "none" else ""),
            procs,
        )
    scalars = {f"{split}/top1": acc.top1, f"{split}/top5": acc.top5}
    if avg is not None:
        scalars.update({f"{split}/top1_average_heads": avg.top1, f"{split}/top5_average_heads": avg.top5})
    _save(acc, names, split, out_dir, int(ckpt.get("iteration", 0)), scalars)
    write_report(result, json_path)
    return result


def run_teacher_test(
    cfg: Config,
    weights: str | None,
    procs: Processes = Processes(),
    json_path: str | None = None,
    output_dir: str | None = None,
    split: str = "test",
    force: bool = False,
    tta: str = "none",
) -> dict:
    """Evaluate the config's CNN teacher (``distiller_config``: its model, image size and, unless ``weights``
    names another file, its weights file) on every image of a split, as distillation sees it (``tta``: with
    test-time augmentation's views, made before the teacher's resize)."""
    dc = cfg.distiller_config
    if dc is None:
        raise UserError(
            f"{cfg.path}: distiller_config: missing; --teacher tests the teacher it names "
            "(teacher_model, teacher_weights_path)"
        )
    path = Path(weights or dc.teacher_weights_path)
    where = f"--teacher {path}" if weights else f"{cfg.path}: distiller_config.teacher_weights_path"
    out_dir = _output_dir(output_dir, path, split, tta)
    check_outputs(procs, out_dir, json_path, force)
    net = load_teacher(dc.teacher_model, cfg.data_config.number_of_classes, path, where)
    model = Resized(net, dc.teacher_image_size).eval().to(procs.device)
    tc = cfg.train_config
    size = f", images resized to {dc.teacher_image_size}" if dc.teacher_image_size else ""
    say(f"{path}: testing teacher {dc.teacher_model} on the {split} split{size}", procs)
    if tta != "none":
        say(describe(tta), procs)
    acc, _, names = split_accuracy(model, cfg, procs, tc.local_batch_size, tc.num_workers, split=split, tta=tta)
    result = {**_result(acc, names, split, tta), "teacher_model": dc.teacher_model, "weights_path": str(path)}
    if not procs.is_main:
        return result
    say(format_report(acc, names), procs)
    _save(acc, names, split, out_dir, 0, {f"{split}/top1": acc.top1, f"{split}/top5": acc.top5})
    write_report(result, json_path)
    return result


def _result(acc: Accumulator, names: list[str], split: str, tta: str) -> dict:
    return {
        "split": split,
        "top1": acc.top1,
        "top5": acc.top5,
        "num_images": acc.count,
        "per_class": acc.per_class(names),
        "tta": tta,
        "views": MODES[tta],
    }


def _output_dir(output_dir: str | None, tested: Path, split: str, tta: str = "none") -> Path:
    """``--output-dir``, else ``test_<file name>`` beside the file tested (``<split>_<file name>`` for
    another split; ``<split>_tta_<mode>_<file name>`` with test-time augmentation, beside the plain report)."""
    if output_dir:
        return Path(output_dir)
    return tested.parent / (f"{split}_{tested.stem}" if tta == "none" else f"{split}_tta_{tta}_{tested.stem}")


def _save(acc: Accumulator, names: list[str], split: str, out_dir: Path, step: int, scalars: dict) -> None:
    """The confusion matrix as a picture and in TensorBoard, with ``scalars``, in ``out_dir``."""
    image = confusion_image(acc.confusion, names)  # (out_dir made by check_outputs)
    save_png(image, out_dir / "confusion_matrix.png")
    reporter = Reporter(out_dir)
    reporter.image(f"{split}/confusion_matrix", image)
    reporter.scalars(step, **scalars)
    reporter.close()
    say(f"confusion matrix: {out_dir / 'confusion_matrix.png'} (and TensorBoard in {out_dir})")
