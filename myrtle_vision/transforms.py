"""Image transforms described by a data config's ``transform_ops_*`` objects.

An ops object maps an op name to its argument, applied in the order written, e.g.::

    {"RandomResizedCrop": 224, "RandomHorizontalFlip": null,
     "Normalize": {"Mean": [0.485, 0.456, 0.406], "Std": [0.229, 0.224, 0.225]}}

:func:`parse_ops` validates such an object (it runs when the config is loaded) and
:func:`build_transform` turns the parsed ops into a torchvision v2 pipeline that takes an RGB image
and returns a uint8 tensor (C, H, W), plus a :class:`Normalizer` that converts a batch of them to
float in [0, 1] and applies ``Normalize`` (which must therefore come last) to the whole batch.
Two ops torchvision lacks, :class:`RandomRotation90` and :class:`RandomTranspose`, are v2 transforms
written here, drawing their parameters as torchvision's own do.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2._transform import _RandomApplyTransform  # the coin of torchvision's flips

from .errors import did_you_mean


class OpError(ValueError):
    """A bad op in an ops object: ``where`` names the op (and argument), ``problem`` says what."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _size(name: str, v) -> int | list[int]:
    if _is_int(v) and v > 0:
        return v
    if isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v):
        return list(v)
    raise OpError(name, f"expected a positive integer size or [height, width], got {v!r}")


def _low_high(name: str, v, lo: float, hi: float) -> tuple[float, float]:
    """A checked [low, high] range within [lo, hi]."""
    if isinstance(v, list) and len(v) == 2 and all(_is_num(x) and lo <= x <= hi for x in v) and v[0] <= v[1]:
        return (float(v[0]), float(v[1]))
    raise OpError(name, f"expected [low, high] with {lo} <= low <= high <= {hi}, got {v!r}")


def _kwargs(name: str, v: dict, allowed: dict[str, Callable[[str, Any], Any]]) -> dict:
    if not isinstance(v, dict):
        raise OpError(name, f"expected an object with keys {sorted(allowed)}, got {v!r}")
    out = {}
    for key, value in v.items():
        if key not in allowed:
            raise OpError(
                f"{name}.{key}", "unknown argument" + did_you_mean(key, allowed, f"; valid: {sorted(allowed)}")
            )
        out[key] = allowed[key](f"{name}.{key}", value)
    return out


def _prob(name: str, v) -> dict:
    if v is None:
        return {}
    if _is_num(v) and 0 <= v <= 1:
        return {"p": float(v)}
    raise OpError(name, f"expected null or a probability in [0, 1], got {v!r}")


def _uniform_quarter_turns(name: str, v) -> dict:
    if v is None:
        return {}
    raise OpError(name, f"expected null (a rotation by k quarter turns, k uniform in 0..3), got {v!r}")


def _nonneg_int(name, v):
    if _is_int(v) and v >= 0:
        return v
    raise OpError(name, f"expected a non-negative integer, got {v!r}")


def _jitter(name, v):
    if _is_num(v) and v >= 0:
        return float(v)
    if isinstance(v, list):
        return list(_low_high(name, v, 0.0, float("inf")))
    raise OpError(name, f"expected a non-negative number or [low, high], got {v!r}")


def _parse_resized_crop(name, v):
    if isinstance(v, dict):
        kw = _kwargs(
            name,
            v,
            {
                "size": _size,
                "scale": lambda n, x: _low_high(n, x, 0.0, 1.0),
                "ratio": lambda n, x: _low_high(n, x, 1e-3, 1e3),
            },
        )
        if "size" not in kw:
            raise OpError(f"{name}.size", "missing")
        return kw
    return {"size": _size(name, v)}


def _positive_int(name, v) -> int:
    if _is_int(v) and v > 0:
        return v
    raise OpError(name, f"expected a positive integer, got {v!r}")


def _parse_resize(name, v):
    """``n``: n x n, as the earlier release (``Resize((n, n))``); ``[h, w]``; or ``{"shorter_side": n}``:
    the shorter side to n, keeping the aspect ratio (torchvision's ``Resize(n)``)."""
    if isinstance(v, dict):
        kw = _kwargs(name, v, {"shorter_side": _positive_int})
        if "shorter_side" not in kw:
            raise OpError(f"{name}.shorter_side", "missing")
        return {"size": kw["shorter_side"]}
    size = _size(name, v)
    return {"size": [size, size] if _is_int(size) else size}


def _parse_random_crop(name, v):
    if isinstance(v, dict):
        kw = _kwargs(name, v, {"size": _size, "padding": _nonneg_int})
        if "size" not in kw:
            raise OpError(f"{name}.size", "missing")
        return kw
    return {"size": _size(name, v)}


def _parse_randaugment(name, v):
    if v is None:
        return {}
    kw = _kwargs(name, v, {"num_ops": _nonneg_int, "magnitude": _nonneg_int, "num_magnitude_bins": _nonneg_int})
    if kw.get("magnitude", 9) >= kw.get("num_magnitude_bins", 31):
        raise OpError(f"{name}.magnitude", "must be smaller than num_magnitude_bins (31 by default)")
    return kw


def _parse_color_jitter(name, v):
    if _is_num(v):  # one strength for brightness, contrast and saturation, as timm's color_jitter
        return {k: _jitter(name, v) for k in ("brightness", "contrast", "saturation")}
    kw = _kwargs(name, v, {"brightness": _jitter, "contrast": _jitter, "saturation": _jitter, "hue": _jitter})
    hue = kw.get("hue", 0.0)
    if (hue if isinstance(hue, float) else max(map(abs, hue))) > 0.5:
        raise OpError(f"{name}.hue", "must be within [-0.5, 0.5]")
    return kw


def _parse_normalize(name, v):
    def triple(n, x):
        if isinstance(x, list) and len(x) == 3 and all(_is_num(e) for e in x):
            return [float(e) for e in x]
        raise OpError(n, f"expected 3 numbers (images are RGB), got {x!r}")

    kw = _kwargs(name, v, {"Mean": triple, "Std": triple})
    for key in ("Mean", "Std"):
        if key not in kw:
            raise OpError(f"{name}.{key}", "missing")
    if min(kw["Std"]) <= 0:
        raise OpError(f"{name}.Std", "every value must be positive")
    return {"mean": kw["Mean"], "std": kw["Std"]}


def rot90(image: torch.Tensor, k: int) -> torch.Tensor:
    """``image`` (..., H, W) turned k quarter turns counter-clockwise (torchvision's ``rotate`` by 90 * k
    degrees with ``expand=True``), exactly: pixels are only moved, never resampled."""
    return image.rot90(k, (-2, -1))


def transpose(image: torch.Tensor) -> torch.Tensor:
    """``image`` (..., H, W) with its height and width axes swapped (mirrored in its main diagonal)."""
    return image.transpose(-2, -1)


class RandomRotation90(T.Transform):
    """Turn an image tensor by k quarter turns, k uniform in {0, 1, 2, 3}: an aerial scene has no up.
    torchvision has no such transform; this one draws k in ``make_params``, as torchvision's random
    transforms draw theirs, so the batched path (myrtle_vision.data.augment) draws the same k."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return tv_tensors.wrap(rot90(inpt, params["k"]), like=inpt)


class RandomTranspose(_RandomApplyTransform):
    """Transpose an image tensor with probability ``p`` (torchvision's flips' coin). With the flips and
    the quarter turns it gives all 8 symmetries of a square."""

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return tv_tensors.wrap(transpose(inpt), like=inpt)


# op name -> (argument parser, torchvision v2 class, or this module's where torchvision has none)
OPS: dict[str, tuple[Callable[[str, Any], dict], Callable[..., Any]]] = {
    "Resize": (_parse_resize, T.Resize),
    "RandomResizedCrop": (_parse_resized_crop, T.RandomResizedCrop),
    "CenterCrop": (lambda n, v: {"size": _size(n, v)}, T.CenterCrop),
    "RandomCrop": (_parse_random_crop, T.RandomCrop),
    "RandomHorizontalFlip": (_prob, T.RandomHorizontalFlip),
    "RandomVerticalFlip": (_prob, T.RandomVerticalFlip),
    "RandomRotation90": (_uniform_quarter_turns, RandomRotation90),
    "RandomTranspose": (_prob, RandomTranspose),
    "RandAugment": (_parse_randaugment, T.RandAugment),
    "ColorJitter": (_parse_color_jitter, T.ColorJitter),
    "Normalize": (_parse_normalize, T.Normalize),
}


# Ops that a batch can go through at once on its device (see myrtle_vision.data.augment); the others
# (RandAugment, ColorJitter) act on pixel values image by image and run per image in the loader workers.
BATCHABLE = (
    "Resize",
    "RandomResizedCrop",
    "CenterCrop",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "RandomRotation90",
    "RandomTranspose",
    "Normalize",
)


def per_image_only(parsed: list[tuple[str, dict]]) -> list[str]:
    """The ops of a parsed ops object that cannot be batched (they run per image in the loader workers)."""
    return [name for name, _ in parsed if name not in BATCHABLE]


def parse_ops(ops) -> list[tuple[str, dict]]:
    """Validate an ops object; return ``[(op name, torchvision keyword arguments), ...]``."""
    if not isinstance(ops, dict):
        raise OpError("", f"expected an object mapping op names to arguments, got {type(ops).__name__}")
    parsed = []
    for name, value in ops.items():
        if name not in OPS:
            raise OpError(name, "unknown op" + did_you_mean(name, OPS, f"; valid ops: {', '.join(OPS)}"))
        parsed.append((name, OPS[name][0](name, value)))
    names = [n for n, _ in parsed]
    if "Normalize" in names and names[-1] != "Normalize":
        raise OpError("Normalize", "must be the last op (it works on float tensors; the others on images)")
    return parsed


def stack(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of one size (and their labels) into a batch: what crosses from the loader workers
    (a quarter of the bytes of the float batch it becomes)."""
    return torch.stack([img for img, _ in samples]), torch.tensor([label for _, label in samples], dtype=torch.int64)


class Normalizer:
    """A uint8 batch to float in [0, 1], then ``Normalize``d, on whatever device it is: torchvision's
    ``ToDtype`` (times 1/255) and ``Normalize`` (minus mean, over std), the same operations in the same
    order, so the values are identical, but in place on one new float tensor, for a whole batch at once
    (three times faster on a CPU, where the temporaries' memory is the cost)."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        self.mean, self.std = mean, std
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).mul_(1.0 / 255)
        if self.mean is not None:
            if images.device not in self._constants:
                self._constants[images.device] = tuple(
                    torch.tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1)
                    for v in (self.mean, self.std)
                )
            mean, std = self._constants[images.device]
            x.sub_(mean).div_(std)
        return x


def build_transform(parsed: list[tuple[str, dict]]) -> tuple[T.Compose, Normalizer]:
    """Per-image v2 pipeline (an RGB image -> uint8 tensor) and the batch step that finishes it."""
    steps: list = [T.ToImage()]
    normalize = {}
    for name, kwargs in parsed:
        if name == "Normalize":
            normalize = kwargs
        else:
            steps.append(OPS[name][1](**kwargs))
    return T.Compose(steps), Normalizer(**normalize)
