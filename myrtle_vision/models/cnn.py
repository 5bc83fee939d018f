"""CNN teachers for distillation: any torchvision classification model, built by name.

Nothing is downloaded. ImageNet weights come from torchvision's own cache (where
``torchvision.models.get_model(..., weights=...)`` would have put them) or from a file the user
names. A teacher file is a plain torchvision state dict, as the earlier release wrote it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..errors import UserError
from ..teachers import teacher_name_problem
from ..weights.io import describe, mismatch, read_state_dict


def check_name(name: str, where: str) -> None:
    problem = teacher_name_problem(name)
    if problem:
        raise UserError(f"{where}: {problem}")


def build(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``name`` with a ``num_classes``-way classifier."""
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


class Resized(nn.Module):
    """Feed ``model`` its batches resized to ``size`` (bilinear, antialiased) when they differ; no parameters."""

    def __init__(self, model: nn.Module, size: int | None):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(
                images, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.model(images)


def classifier_name(model: nn.Module) -> str:
    """The module that makes the logits: the last Linear registered (the last Conv2d if there is none)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return (linear or conv)[-1]


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the classifier for a freshly initialised ``num_classes``-way one (same input size)."""
    name = classifier_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    setattr(parent, attr, new.to(old.weight.device))
    return model


def _fit_problem(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """How ``state`` fails to fit ``model`` (the first few differences), or None. Auxiliary classifiers
    (Inception's ``aux*``), which torchvision's files may hold, are not needed."""
    return describe(mismatch(model.state_dict(), state, ignore=lambda k: k.startswith("aux")), limit=2)


def _body_fits(model: nn.Module, head: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds everything of ``model`` but its classifier ``head``, in the right shapes."""
    return all(
        k in state and state[k].shape == v.shape for k, v in model.state_dict().items() if not k.startswith(head + ".")
    )


def _classes_in(state: dict[str, torch.Tensor], classifier: str) -> int | None:
    weight = state.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def load_teacher(name: str, num_classes: int, path: str | Path, where: str = "teacher_weights_path") -> nn.Module:
    """A finetuned teacher from a plain state dict, frozen in eval mode.

    A file that does not fit is a one-line error naming the file, the expected architecture and
    class count, and what the file holds.
    """
    check_name(name, where)
    model = build(name, num_classes)
    state = read_state_dict(path, "weights file", where)
    problem = _fit_problem(model, state)
    if problem:
        head = classifier_name(model)
        found = _classes_in(state, head)
        if _body_fits(model, head, state) and found is not None:
            holds = f"it holds a {found}-class {head}"
        else:
            holds = f"it is not a {name}"
        raise UserError(
            f"{where}: {path} does not fit teacher_model {name!r} with {num_classes} classes ({holds}: {problem})"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def imagenet_weights_file(name: str) -> Path | None:
    """The first of ``name``'s torchvision ImageNet weight files already in torchvision's cache."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        weights = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    candidates = [weights.DEFAULT] + [w for w in weights if w is not weights.DEFAULT]
    for w in candidates:
        path = folder / Path(w.url).name
        if path.is_file():
            return path
    return None


def starting_model(name: str, num_classes: int, weights: str | None, where: str = "weights") -> tuple[nn.Module, str]:
    """``name`` ready to finetune for ``num_classes``, and a line saying where its weights came from.

    ``weights``: ``"imagenet"`` (torchvision's cache, never downloaded), a path to a state dict
    (any class count: the classifier is replaced when it differs), or None to start from scratch.
    """
    check_name(name, "model")
    if weights is None:
        return build(name, num_classes), f"{name}: training from scratch (weights is None)"
    if weights == "imagenet":
        path = imagenet_weights_file(name)
        if path is None:
            try:
                url = torchvision.models.get_model_weights(name).DEFAULT.url
            except (ValueError, KeyError):
                url = None
            get = f"download {url} into {Path(torch.hub.get_dir()) / 'checkpoints'}, " if url else ""
            raise UserError(
                f"{where}: no ImageNet weights for {name} on this machine and nothing is downloaded; "
                f"{get}set weights to a .pth file, or set weights to None to train from scratch"
            )
    else:
        path = Path(weights)
    state = read_state_dict(path, "weights file", where)
    model = torchvision.models.get_model(name, weights=None)
    classes = _classes_in(state, classifier_name(model))
    if classes is not None and classes != 1000:
        replace_classifier(model, classes)
    problem = _fit_problem(model, state)
    if problem:
        raise UserError(f"{where}: {path} does not fit {name} ({problem})")
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    if classes != num_classes:
        replace_classifier(model, num_classes)
    return model, f"{name}: starting from {path}"
