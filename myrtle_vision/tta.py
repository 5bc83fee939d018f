"""Test-time augmentation (``--tta`` of test.py, test_quantize.py and predict.py): each image is also seen
flipped (``flip``) or in all 8 rotations and flips of the square (``dihedral``: aerial scenes have no up), and
the prediction is the average of the softmax over the views.

The views are made from the evaluation-transformed batch, on its device (``torch.flip`` and ``torch.rot90`` of
the (B, C, H, W) tensor; the ViT's images are square). Where code expects logits it is given the log of the
averaged probabilities (:func:`average`): its softmax is the averaged probabilities, and its argmax and top-k
are theirs. ``none`` is one view, the image itself, and its logits are passed on untouched, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# the modes and how many views each makes; the order of the views is views()'s
MODES = {"none": 1, "flip": 2, "dihedral": 8}
DESCRIPTIONS = {
    "none": "the image alone",
    "flip": "the image and its horizontal flip",
    "dihedral": "the image rotated by 0, 90, 180 and 270 degrees, then its horizontal flip rotated the same",
}


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a (B, C, H, W) batch, in this order: ``none``: the batch; ``flip``: the batch, its
    horizontal flip (``torch.flip`` of the width); ``dihedral``: ``torch.rot90(x, k, (-2, -1))`` for k = 0..3
    (counter-clockwise quarter turns) of the batch, then of its horizontal flip."""
    if mode not in MODES:
        raise ValueError(f"test-time augmentation {mode!r}: not one of {', '.join(MODES)}")
    if mode == "none":
        return [images]
    flipped = images.flip(-1)
    if mode == "flip":
        return [images, flipped]
    if images.shape[-2] != images.shape[-1]:
        raise ValueError(f"dihedral test-time augmentation needs square images, not {tuple(images.shape[-2:])}")
    # contiguous: a quarter turn is a transposed view, and the formats' kernels (qtorch, INT8) want plain memory
    return [torch.rot90(x, k, (-2, -1)).contiguous() for x in (images, flipped) for k in range(4)]


def log_mean_softmax(outputs: list[torch.Tensor]) -> torch.Tensor:
    """log(mean over the views of softmax(logits)), in FP32 (computed as a log-sum-exp, so that a class
    no view gives any probability is a large negative number, not minus infinity)."""
    logp = torch.stack([o.float().log_softmax(1) for o in outputs])
    return torch.logsumexp(logp, 0) - math.log(len(outputs))


def average(outputs: list[torch.Tensor]) -> torch.Tensor:
    """What code that expects logits is given for the views' ``outputs``: one view's logits as they are, else
    :func:`log_mean_softmax`."""
    return outputs[0] if len(outputs) == 1 else log_mean_softmax(outputs)


def predict(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """``model`` on every view of ``images``, averaged (:func:`average`)."""
    return average([model(view) for view in views(images, mode)])


def predict_heads(model, images: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A DeiT student's (class head, average of class and distillation heads) over the views, each averaged
    over the views as :func:`predict` does (the heads' logits averaged first, view by view)."""
    class_out, avg_out = [], []
    for view in views(images, mode):
        class_logits, dist_logits = model.forward_heads(view)
        class_out.append(class_logits)
        avg_out.append((class_logits.float() + dist_logits.float()) / 2)
    return average(class_out), average(avg_out)


def describe(mode: str) -> str:
    """One line for the reports, when a mode other than ``none`` is on."""
    return (
        f"test-time augmentation {mode}: {MODES[mode]} views of each image ({DESCRIPTIONS[mode]}), the prediction "
        f"the average of their softmax; {MODES[mode]} times the forward passes"
    )
