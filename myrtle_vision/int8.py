"""INT8 post-training quantization (``q_format`` PyTorchINT8), as the earlier release did it,
simulated in FP32 tensors (fake quantization), so that it runs wherever FP32 does (CPU and CUDA).

The earlier release calibrated a ViT with torch's eager-mode quantization and converted it to a
real INT8 model. This module computes the same numbers in FP32 tensors that hold only values of
the INT8 grid:

- **weights** of every Linear: int8, symmetric (zero point 0, range [-128, 127]), one scale
  ``max|w| / 127.5`` per tensor, or per output row with ``per_channel``; biases and LayerNorm
  parameters stay FP32;
- **activations**: uint8, affine, one (scale, zero point) per quantization point, fitted to the
  smallest and largest value the point saw over all calibration batches (the range widened to
  include 0): ``scale = max((max - min) / 255, eps)``, ``zero_point = clamp(-round(min / scale), 0, 255)``.

These are torch's ``MinMaxObserver`` formulas (``quint8`` per-tensor affine, ``reduce_range=False``;
``qint8`` symmetric for weights), which the earlier release used. A value is quantized and
dequantized as torch's kernels do it: ``(clamp(round(x * (1 / scale)) + zero_point) - zero_point) * scale``,
ties to even (``torch.fake_quantize_per_tensor_affine``).

A model built for PyTorchINT8 (see :class:`myrtle_vision.quantization.Int8Arithmetic`) holds one
:class:`FakeQuant` per quantization point and goes through two phases:

1. :func:`calibrate` runs it on calibration batches. Every point records the min and max of what
   passes through it, and passes it on unchanged: the model computes in FP32, weights included.
2. Then every point freezes its scale and zero point and the model is quantized: from then on each
   point quantizes and dequantizes, and each Linear uses its quantized weights.

An uncalibrated model refuses to run, rather than give FP32 figures labelled INT8.
Nothing here is persistent state: the state dict (and the checkpoint layout) is the FP32 model's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

ACT_MIN, ACT_MAX = 0, 255  # activations: uint8, affine
WEIGHT_MIN, WEIGHT_MAX = -128, 127  # weights: int8, symmetric
WEIGHT_SCHEMES = ("per_tensor", "per_channel")
EPS = torch.finfo(torch.float32).eps  # the smallest scale, as MinMaxObserver

UNCALIBRATED, CALIBRATING, QUANTIZED = "uncalibrated", "calibrating", "quantized"
NOT_CALIBRATED = (
    "PyTorchINT8 model used before calibration: run myrtle_vision.int8.calibrate(model, batches) "
    "on at least one batch first"
)


def activation_qparams(min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of uint8 affine quantization for values in [min_val, max_val].

    The range is widened to include 0, so that 0 (padding, ReLU-like zeros) is exact.
    FP32 tensor arithmetic, as ``MinMaxObserver`` computes it, so the scales agree to the bit.
    """
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    scale = torch.clamp((max_pos - min_neg) / float(ACT_MAX - ACT_MIN), min=EPS)
    zero_point = ACT_MIN - torch.round(min_neg / scale).to(torch.int32)
    return scale, torch.clamp(zero_point, ACT_MIN, ACT_MAX)


def weight_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Scale of int8 symmetric quantization: ``max|w| / 127.5``, of the whole tensor or of each output row."""
    w = weight.detach()
    largest = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    return torch.clamp(largest / ((WEIGHT_MAX - WEIGHT_MIN) / 2), min=EPS)


def fake_quantize_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``weight`` on its int8 grid (zero point 0), as FP32."""
    scale = weight_scale(weight, per_channel)
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    if per_channel:
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, WEIGHT_MIN, WEIGHT_MAX)
    return torch.fake_quantize_per_tensor_affine(weight, scale, zero_point, WEIGHT_MIN, WEIGHT_MAX)


class FakeQuant(nn.Module):
    """One activation quantization point, with its own observer: records the range while
    calibrating, then quantizes to uint8 and back with the frozen scale and zero point.

    Its buffers are not persistent, so it adds nothing to the state dict; they follow ``.to(device)``.
    ``bypass`` leaves a calibrated point in FP32 (the per-layer report quantizes one point at a time).
    """

    def __init__(self):
        super().__init__()
        self.bypass = False
        self.phase = UNCALIBRATED
        self.register_buffer("min_val", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("max_val", torch.tensor(float("-inf")), persistent=False)
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("zero_point", None, persistent=False)

    def start_calibration(self) -> None:
        """Forget any earlier range and qparams; record from the next forward pass on."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.scale = self.zero_point = None
        self.phase = CALIBRATING

    def freeze(self) -> None:
        """Fix the scale and zero point from the range recorded; a point that saw nothing stays uncalibrated."""
        if self.min_val > self.max_val:  # never reached (e.g. the distillation token when calibrating the class path)
            self.phase = UNCALIBRATED
            return
        self.scale, self.zero_point = activation_qparams(self.min_val, self.max_val)
        self.phase = QUANTIZED

    def reset(self) -> None:
        """Back to uncalibrated (after a calibration that did not finish)."""
        self.start_calibration()
        self.phase = UNCALIBRATED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase == QUANTIZED:
            if self.bypass:
                return x
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, ACT_MIN, ACT_MAX)
        if self.phase == CALIBRATING:
            lo, hi = torch.aminmax(x.detach())
            self.min_val = torch.minimum(self.min_val, lo.float())
            self.max_val = torch.maximum(self.max_val, hi.float())
            return x
        raise RuntimeError(NOT_CALIBRATED)

    def extra_repr(self) -> str:
        if self.phase != QUANTIZED:
            return self.phase
        return f"scale={self.scale.item():.6g}, zero_point={self.zero_point.item()}"


class WeightQuant(nn.Module):
    """A Linear's weight quantization point: the weight on its int8 grid (``bypass``: FP32)."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel, self.bypass = per_channel, False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.bypass else fake_quantize_weight(weight, self.per_channel)


class Int8Linear(nn.Linear):
    """A Linear with int8 weights, FP32 bias, and a quantization point (``output``) on its output.

    Its input is quantized by the point before it. The weights follow the output point's phase:
    FP32 while it calibrates, quantized once it is. Same parameters as ``nn.Linear``, so the same state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.weight_quant = WeightQuant(per_channel)
        self.output = FakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.output.phase == CALIBRATING else self.weight_quant(self.weight)
        return self.output(F.linear(x, weight, self.bias))

    def extra_repr(self) -> str:
        scheme = "per_channel" if self.weight_quant.per_channel else "per_tensor"
        return super().extra_repr() + f", int8 weights {scheme}"


class Int8LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in FP32 (FP32 weight and bias) on its quantized input, with a quantization
    point (``output``) on its output."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        self.output = FakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(super().forward(x))


def points(model: nn.Module) -> dict[str, FakeQuant]:
    """Every quantization point of ``model`` by module name, in the order the modules were built."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuant)}


def qparams(model: nn.Module) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every calibrated point, by module name."""
    return {
        name: (p.scale.item(), int(p.zero_point.item())) for name, p in points(model).items() if p.phase == QUANTIZED
    }


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Calibrate a PyTorchINT8 ``model`` on ``batches`` of images; return how many there were.

    The model runs in FP32 (evaluation mode) on every batch while each point records its range over
    all of them; then every point freezes its scale and zero point, and the model is quantized.
    Calibrating again starts afresh. With no batch, or if a batch fails, the model is left
    uncalibrated (and refuses to run) rather than half calibrated.
    """
    pts = list(points(model).values())
    if not pts:
        raise ValueError("the model has no INT8 quantization points: build it with q_format PyTorchINT8")
    for p in pts:
        p.start_calibration()
    was_training = model.training
    model.eval()
    count = 0
    try:
        for images in batches:
            model(images)
            count += 1
        if count == 0:
            raise ValueError("INT8 calibration needs at least one batch")
    except BaseException:
        for p in pts:
            p.reset()
        raise
    finally:
        model.train(was_training)
    for p in pts:
        p.freeze()
    return count
