"""Number formats: rounding bit for bit, the wrapped Linear and LayerNorm, straight-through gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qtorch.quant import float_quantize

from myrtle_vision.models.vit import ViTArgs, VisionTransformer
from myrtle_vision.quantization import (BF16, FP16, Q_FORMATS, TF32, QLayerNorm, QLinear, Round, arithmetic,
                                        round_nearest_even, round_qtorch)

DTYPES = {"FP16": (FP16, torch.float16), "BF16": (BF16, torch.bfloat16)}


def representable(dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, sorted, as FP32."""
    values = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    return values[torch.isfinite(values)].unique()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))


@pytest.mark.parametrize("name", DTYPES)
def test_native_cast_equals_the_bitwise_simulation_bit_for_bit(name):
    fmt, dtype = DTYPES[name]
    values = representable(dtype)
    ties = ((values[1:].double() + values[:-1].double()) / 2).float()
    up, down = torch.full_like(ties, float("inf")), torch.full_like(ties, -float("inf"))
    random_bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1_000_000,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.int64).to(torch.int32).view(torch.float32)  # every exponent, inf and NaN
    x = torch.cat([values, ties, torch.nextafter(ties, up), torch.nextafter(ties, down), random_bits,
                   torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 65519.99, 65520.0, 3.4e38])])
    assert same_bits(round_nearest_even(x, fmt), x.to(dtype).float()).all()


def test_tf32_simulation_keeps_ten_mantissa_bits_and_rounds_ties_to_even():
    big = torch.finfo(torch.float32).max
    x = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -20, -(1 + 2 ** -11),  # ties, not a tie
                      2 ** -130, 2 ** -140, 3 * 2 ** -137, big, -0.0])  # subnormals, overflow
    expected = torch.tensor([1.0, 1 + 2 ** -9, 1 + 2 ** -10, -1.0, 2 ** -130, 0.0, 2 ** -135, float("inf"), -0.0])
    assert same_bits(round_nearest_even(x, TF32), expected).all()
    # away from ties it is qtorch's nearest rounding, on values of every magnitude
    y = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * torch.logspace(-30, 30, 100_000)
    y = y[(y.view(torch.int32) & 0x1FFF) != 0x1000]  # drop the few exact ties
    assert torch.equal(round_nearest_even(y, TF32), round_qtorch(y, TF32))


@pytest.mark.parametrize("name", DTYPES)
def test_nearest_even_and_qtorch_rounding_differ_exactly_on_ties_and_overflow(name):
    fmt, dtype = DTYPES[name]
    values = representable(dtype)
    lower, upper = values[:-1].double(), values[1:].double()
    ties = ((lower + upper) / 2).float()
    between = torch.cat([(0.75 * lower + 0.25 * upper).float(), (0.25 * lower + 0.75 * upper).float()])
    largest = values.max().item()
    beyond = torch.linspace(largest, min(3 * largest, torch.finfo(torch.float32).max), 10_001)  # past the largest
    x = torch.cat([values, ties, between, beyond, -beyond])
    rne, qt = round_nearest_even(x, fmt), round_qtorch(x, fmt)

    # On a tie, ties-to-even and ties-away pick the same neighbour when the one away from zero is even.
    away = torch.where(ties > 0, values[1:], values[:-1])
    tie_to_odd = torch.zeros(len(x), dtype=torch.bool)
    tie_to_odd[len(values):len(values) + len(ties)] = (away.to(dtype).view(torch.int16) & 1).bool()
    overflow = torch.isinf(rne)  # IEEE: overflow to infinity
    assert overflow.sum() > 1000 and tie_to_odd.sum() > 1000
    if name == "FP16":
        assert ((rne != qt) == (tie_to_odd | overflow)).all()
        # qtorch saturates instead, at the top exponent counted as finite: 131008, not 65504
        assert torch.isfinite(qt).all() and qt.abs().max().item() == 131008
        assert round_qtorch(torch.tensor([70000.0]), fmt).item() == 70016  # finite where IEEE FP16 has inf
    else:  # BF16 has FP32's exponent range: both overflow to inf, only ties differ
        assert ((rne != qt) == tie_to_odd).all()


def direct(x: torch.Tensor, fmt, rounding: str) -> torch.Tensor:
    """Rounding written independently of the module: torch's cast, or qtorch's own function."""
    if fmt is None:
        return x
    if rounding == "qtorch":
        return float_quantize(x.contiguous(), fmt.exp, fmt.man, "nearest")
    native = {(5, 10): torch.float16, (8, 7): torch.bfloat16}.get((fmt.exp, fmt.man))
    return x.to(native).float() if native else round_nearest_even(x, fmt)


FORMS = {"FP32": (None, None), "FP16_16": (FP16, FP16), "FP16_32": (FP16, None), "TF32": (TF32, None),
         "BF16_32": (BF16, None)}


@pytest.mark.parametrize("rounding", ["nearest_even", "qtorch"])
@pytest.mark.parametrize("q_format", Q_FORMATS)
def test_quantized_linear_and_layer_norm_equal_a_direct_computation(q_format, rounding):
    assert set(FORMS) == set(Q_FORMATS)
    operands, outputs = FORMS[q_format]
    ar = arithmetic(q_format, rounding)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 48, generator=g) * 3
    linear, norm = ar.linear(48, 40), ar.layer_norm(48)
    with torch.no_grad():
        for p in [*linear.parameters(), *norm.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    q = lambda t: direct(t, operands, rounding)  # noqa: E731
    out = lambda t: direct(t, outputs, rounding)  # noqa: E731
    want_linear = out(F.linear(q(x), q(linear.weight), q(linear.bias)))
    want_norm = out(F.layer_norm(q(x), (48,), q(norm.weight), q(norm.bias), 1e-5))
    for grad in (True, False):  # training (rounding every call) and evaluation (rounded weights cached)
        with torch.set_grad_enabled(grad):
            assert torch.equal(linear(x), want_linear)
            assert torch.equal(norm(x), want_norm)
    if q_format == "FP32":
        assert type(linear) is torch.nn.Linear and type(norm) is torch.nn.LayerNorm
    else:
        assert isinstance(linear, QLinear) and isinstance(norm, QLayerNorm)
        assert not torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))  # it did round something


def test_rounded_weights_are_recomputed_when_the_weights_change():
    linear = arithmetic("FP16_32").linear(8, 8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = linear(x)
        linear.weight.add_(1.0)
        assert not torch.equal(linear(x), first)
        assert torch.equal(linear(x), F.linear(x.half().float(), linear.weight.half().float(), linear.bias.half().float()))


def test_gradients_pass_straight_through_the_rounding():
    x = torch.tensor([1 + 2 ** -11, 70000.0, -3.3], requires_grad=True)
    w = torch.tensor([2.0, 3.0, 5.0])
    (Round(FP16, "nearest_even")(x) * w).sum().backward()
    assert torch.equal(x.grad, w)  # even where rounding changed the value or overflowed


@pytest.mark.parametrize("q_format", ["FP16_16", "FP16_32", "BF16_32", "TF32"])
def test_every_parameter_of_a_quantized_vit_gets_a_gradient(q_format):
    torch.manual_seed(0)
    model = VisionTransformer(ViTArgs(image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, heads=2,
                                      mlp_dim=64, distilled=True, q_format=q_format))
    class_logits, dist_logits = model.forward_heads(torch.randn(3, 3, 16, 16))
    (class_logits.logsumexp(-1) + dist_logits.logsumexp(-1)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("q_format", Q_FORMATS)
def test_quantized_model_keeps_the_state_dict_and_the_class_path(q_format):
    torch.manual_seed(0)
    kw = dict(image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, heads=2, mlp_dim=64)
    reference = VisionTransformer(ViTArgs(**kw))
    model = VisionTransformer(ViTArgs(**kw, q_format=q_format))
    deit = VisionTransformer(ViTArgs(**kw, q_format=q_format, distilled=True))
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.load_state_dict(reference.state_dict())
    deit.load_state_dict(reference.state_dict(), strict=False)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out, ref = model(x), reference(x)
        assert torch.equal(deit.forward_heads(x)[0], out)  # DeiT's class head is the plain ViT, quantized too
    if q_format == "FP32":
        assert torch.equal(out, ref)
    else:
        assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)


def test_fp16_16_rounds_every_activation_to_fp16():
    torch.manual_seed(0)
    model = VisionTransformer(ViTArgs(image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, heads=2,
                                      mlp_dim=64, q_format="FP16_16"))
    seen = []
    for module in model.modules():
        if not isinstance(module, torch.nn.GELU):  # its output goes straight to its own rounding
            module.register_forward_hook(lambda m, i, o: seen.append(o) if torch.is_tensor(o) else None)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert len(seen) > 30
    for out in seen:
        assert torch.equal(out, out.half().float())


def test_unknown_format_and_rounding_list_the_valid_ones():
    with pytest.raises(ValueError, match="FP16_32"):
        arithmetic("FP8")
    with pytest.raises(ValueError, match="nearest_even, qtorch"):
        arithmetic("FP16_32", "stochastic")
