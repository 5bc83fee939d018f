"""Number formats of the inference accelerator, simulated in FP32 tensors.

A ``q_format`` (``vit_config.q_format``) says which tensors of the ViT are rounded to which
floating-point format. Rounded tensors stay FP32 tensors that hold only values of the smaller
format, so the arithmetic between roundings is FP32 (the "_32" in a name means FP32 accumulation
and outputs):

=========  ===========================================================================
FP32       nothing is rounded
FP16_32    the inputs, weights and biases of every Linear and LayerNorm to FP16;
           accumulation and outputs FP32 (the accelerator's arithmetic)
BF16_32    as FP16_32, to bfloat16
TF32       as FP16_32, to TensorFloat-32 (8-bit exponent, 10-bit mantissa)
FP16_16    every tensor to FP16: as FP16_32, plus the outputs of every Linear and
           LayerNorm, the class and distillation tokens, the position embedding and its
           add, the attention scores, softmax and output, the GELU, and every residual add
=========  ===========================================================================

Rounding (``vit_config.q_rounding``):

- ``"nearest_even"`` (default): IEEE round-to-nearest, ties to even, overflow to infinity,
  subnormals kept; what FP16 hardware does. FP16 and BF16 use torch's native casts, which do
  exactly this; TF32 has no torch dtype and uses :func:`round_nearest_even`, a bitwise
  simulation of any ``qtorch.FloatingPoint`` format (the tests check it against the native casts
  bit for bit).
- ``"qtorch"``: qtorch's ``float_quantize(..., rounding="nearest")``: ties away from zero, and no
  infinity: magnitudes beyond the format's range (and inf and NaN) saturate to the largest value
  with the top exponent counted as finite (131008 for FP16, not 65504). Its C++ extension is
  compiled on first use (about 30 s, cached under ``TORCH_EXTENSIONS_DIR``).

Gradients pass straight through every rounding (the straight-through estimator), so a model
with a ``q_format`` trains with the rounding in its forward pass: quantization-aware training.
The parameters themselves stay FP32 (the master weights); each forward pass rounds them.

``PyTorchINT8`` is not a floating-point format but the earlier release's INT8 post-training
quantization, calibrated after training (:mod:`myrtle_vision.int8`); :class:`Int8Arithmetic` puts
its quantization points where the floating-point formats round, one point (and observer) per tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from qtorch import FloatingPoint
from torch import nn

from .int8 import WEIGHT_SCHEMES, FakeQuant, Int8LayerNorm, Int8Linear

Q_FORMATS = ("FP32", "FP16_16", "FP16_32", "TF32", "BF16_32")  # simulated in training (QAT) and evaluation
# Post-training only (test_quantize.py calibrates them); a config naming one trains and tests in FP32,
# as the earlier release did.
POST_TRAINING_FORMATS = ("PyTorchINT8",)
ROUNDINGS = ("nearest_even", "qtorch")

FP16 = FloatingPoint(exp=5, man=10)
BF16 = FloatingPoint(exp=8, man=7)
TF32 = FloatingPoint(exp=8, man=10)
FP32_FORMAT = FloatingPoint(exp=8, man=23)  # rounding to it changes nothing (the per-layer report's FP32)
NATIVE = {(5, 10): torch.float16, (8, 7): torch.bfloat16}  # formats torch has as a dtype


def round_nearest_even(x: torch.Tensor, fmt: FloatingPoint) -> torch.Tensor:
    """Round FP32 ``x`` to ``fmt`` as IEEE does: nearest, ties to even, overflow to +-inf, subnormals kept.

    Pure torch (CPU and CUDA). ``fmt.exp`` <= 8 and ``fmt.man`` <= 23; the top exponent is
    reserved for inf and NaN, as in IEEE formats.
    """
    x = x.float()
    shift = 23 - fmt.man
    # Round the bit pattern at the last kept mantissa bit, ties to even. The sign bit is untouched and
    # a carry moves into the exponent, so this is exact for every FP32 value of an 8-bit-exponent
    # format, subnormals and overflow to inf included.
    bits = x.view(torch.int32)
    if shift:
        bits = (bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) & ~((1 << shift) - 1)
    out = bits.view(torch.float32)
    if fmt.exp < 8:  # a narrower exponent: its own subnormals and overflow
        emin = 2 - 2 ** (fmt.exp - 1)  # smallest normal exponent: -14 for FP16
        emax = 2 ** (fmt.exp - 1) - 1
        mag = x.abs()
        # Subnormals are multiples of 2^(emin - man). Adding 1.5 * 2^(emin - man + 23) makes FP32's
        # own (ties-to-even) addition round there; subtracting it again is exact.
        magic = 1.5 * 2.0 ** (emin - fmt.man + 23)
        out = torch.where(mag < 2.0**emin, torch.copysign((mag + magic) - magic, x), out)
        largest = (2 - 2.0**-fmt.man) * 2.0**emax
        out = torch.where(out.abs() > largest, torch.copysign(torch.full_like(out, float("inf")), x), out)
    return torch.where(torch.isnan(x), x, out)


def round_qtorch(x: torch.Tensor, fmt: FloatingPoint) -> torch.Tensor:
    """qtorch's nearest rounding (ties away from zero, saturating); compiles its extension on first use."""
    from qtorch.quant import float_quantize  # not at import time: it compiles a C++ extension

    return float_quantize(x.float().contiguous(), fmt.exp, fmt.man, "nearest")


def rounding_function(fmt: FloatingPoint, rounding: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fastest function that rounds an FP32 tensor to ``fmt`` with ``rounding``."""
    if (fmt.exp, fmt.man) == (FP32_FORMAT.exp, FP32_FORMAT.man):
        return lambda x: x.float()
    if rounding == "qtorch":
        return lambda x: round_qtorch(x, fmt)
    if rounding != "nearest_even":
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    dtype = NATIVE.get((fmt.exp, fmt.man))
    if dtype is not None:
        return lambda x: x.to(dtype).float()  # torch's casts round to nearest even, overflow to inf
    return lambda x: round_nearest_even(x, fmt)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Round(nn.Module):
    """Round a tensor to a number format; the gradient passes straight through.

    Each place the model rounds has a Round of its own (a rounding point). ``bypass`` leaves the point in
    FP32, which the per-layer report (:mod:`myrtle_vision.reports.layers`) uses to round one point at a time.
    """

    def __init__(self, fmt: FloatingPoint, rounding: str):
        super().__init__()
        self.fmt, self.rounding = fmt, rounding
        self.fn = rounding_function(fmt, rounding)
        self.bypass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if x.requires_grad and torch.is_grad_enabled():
            return _StraightThrough.apply(x, self.fn)
        return self.fn(x)

    def extra_repr(self) -> str:
        return f"exp={self.fmt.exp}, man={self.fmt.man}, rounding={self.rounding}"


class _RoundsParameters(nn.Module):
    """Rounds its input (``round_input``), its ``weight`` and ``bias`` (``round_params``) and, with
    ``round_output``, its output: three rounding points. In evaluation the rounded parameters are reused
    until a parameter changes (its version counter, storage or device) or the point is bypassed."""

    def rounded(self, name: str) -> torch.Tensor | None:
        p = getattr(self, name)
        if p is None or self.round_params is None:
            return p
        if torch.is_grad_enabled():  # training: round the FP32 master weights, gradient straight through
            return self.round_params(p)
        key = (p.data_ptr(), p._version, p.device, p.dtype, self.round_params.bypass)
        cache = self.__dict__.setdefault("_rounded_cache", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, self.round_params(p.detach()))
        return cache[name][1]

    def set_rounding(self, operands: Callable[[], Round | None], output: Round | None) -> None:
        """``operands`` makes a Round (or None) for the input and another for the parameters."""
        self.round_input, self.round_params, self.round_output = operands(), operands(), output

    def _in(self, x):
        return x if self.round_input is None else self.round_input(x)

    def _out(self, y):
        return y if self.round_output is None else self.round_output(y)


class QLinear(nn.Linear, _RoundsParameters):
    """A Linear whose input, weight and bias are rounded (and with ``output``, its output too).

    The same parameters as ``nn.Linear``, so its state dict (and the checkpoint layout) is unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, operands, output: Round | None):
        super().__init__(in_features, out_features, bias=bias)
        self.set_rounding(operands, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(F.linear(self._in(x), self.rounded("weight"), self.rounded("bias")))


class QLayerNorm(nn.LayerNorm, _RoundsParameters):
    """A LayerNorm whose input, weight and bias are rounded (and with ``output``, its output too)."""

    def __init__(self, dim: int, eps: float, operands, output: Round | None):
        super().__init__(dim, eps=eps)
        self.set_rounding(operands, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(
            F.layer_norm(self._in(x), self.normalized_shape, self.rounded("weight"), self.rounded("bias"), self.eps)
        )


@dataclass(frozen=True)
class Arithmetic:
    """Where a ``q_format`` rounds: ``operands`` (inputs, weights and biases of every Linear and
    LayerNorm) and ``activations`` (every other tensor, FP16_16 only); None means FP32."""

    q_format: str = "FP32"
    rounding: str = "nearest_even"
    operands: FloatingPoint | None = None
    activations: FloatingPoint | None = None

    def _round(self, fmt: FloatingPoint | None) -> Round | None:
        return None if fmt is None else Round(fmt, self.rounding)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        if self.operands is None and self.activations is None:
            return nn.Linear(in_features, out_features, bias=bias)
        return QLinear(
            in_features, out_features, bias, lambda: self._round(self.operands), self._round(self.activations)
        )

    def layer_norm(self, dim: int, eps: float = 1e-5) -> nn.LayerNorm:
        if self.operands is None and self.activations is None:
            return nn.LayerNorm(dim, eps=eps)
        return QLayerNorm(dim, eps, lambda: self._round(self.operands), self._round(self.activations))

    def activation(self) -> nn.Module:
        """Rounding of an activation (a residual add, a token, the GELU, attention): FP16_16 only.

        Each call makes a new module: every point where a tensor is rounded has its own (INT8 gives
        each its own observer)."""
        return nn.Identity() if self.activations is None else Round(self.activations, self.rounding)

    def requantize(self) -> nn.Module:
        """A concatenation's result: INT8 requantizes it to a scale of its own (its parts have
        theirs); a floating-point format has nothing to round there (concatenating computes nothing)."""
        return nn.Identity()

    def final_layer_norm(self, dim: int, eps: float = 1e-5) -> nn.LayerNorm:
        """The LayerNorm after the last block, which normalizes every token: a LayerNorm like the others,
        except under INT8 (which quantizes only the token a head reads, at :meth:`head_input`)."""
        return self.layer_norm(dim, eps)

    def head_input(self) -> nn.Module:
        """The normed token a head reads: INT8 quantizes it here, to a range fitted to that token
        alone (the earlier release normed and quantized only the pooled class token); a floating-point
        format rounded it in the final LayerNorm already."""
        return nn.Identity()

    @property
    def rounds_attention(self) -> bool:
        return self.activations is not None


@dataclass(frozen=True)
class Int8Arithmetic(Arithmetic):
    """PyTorchINT8: int8 weights (``weights``: per_tensor or per_channel) in every Linear, and a
    uint8 quantization point with its own observer on the output of every Linear and LayerNorm (the
    final LayerNorm's at the head's input) and at every activation and requantization (see
    :mod:`myrtle_vision.int8`). Attention is computed in FP32."""

    weights: str = "per_tensor"

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        return Int8Linear(in_features, out_features, bias, per_channel=self.weights == "per_channel")

    def layer_norm(self, dim: int, eps: float = 1e-5) -> nn.LayerNorm:
        return Int8LayerNorm(dim, eps)

    def activation(self) -> nn.Module:
        return FakeQuant()

    def requantize(self) -> nn.Module:
        return FakeQuant()

    def final_layer_norm(self, dim: int, eps: float = 1e-5) -> nn.LayerNorm:
        return nn.LayerNorm(dim, eps=eps)  # FP32; its output is quantized at head_input, the read token only

    def head_input(self) -> nn.Module:
        return FakeQuant()


def arithmetic(q_format: str = "FP32", rounding: str = "nearest_even", int8_weights: str = "per_tensor") -> Arithmetic:
    """The :class:`Arithmetic` of a ``q_format``; an unknown name is a ValueError listing the valid ones.
    ``int8_weights`` (per_tensor or per_channel) is for PyTorchINT8 only."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"q_rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if q_format in POST_TRAINING_FORMATS:
        if int8_weights not in WEIGHT_SCHEMES:
            raise ValueError(f"int8_weights {int8_weights!r} is not one of {', '.join(WEIGHT_SCHEMES)}")
        return Int8Arithmetic(q_format, rounding, weights=int8_weights)
    formats = {
        "FP32": (None, None),
        "FP16_16": (FP16, FP16),
        "FP16_32": (FP16, None),
        "TF32": (TF32, None),
        "BF16_32": (BF16, None),
    }
    if q_format not in formats:
        raise ValueError(f"q_format {q_format!r} is not one of {', '.join(Q_FORMATS + POST_TRAINING_FORMATS)}")
    return Arithmetic(q_format, rounding, *formats[q_format])
