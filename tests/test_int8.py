"""INT8 post-training quantization (PyTorchINT8): the model's logits against an independent
quantize-dequantize ViT written from the state dict, the scales against torch's observers and
quantized tensors (what the earlier release used), calibration on exactly the first batches, and the
errors of a model used uncalibrated."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import train_config
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from myrtle_vision.distributed import Processes
from myrtle_vision import int8
from myrtle_vision.weights import deploy
from myrtle_vision.config import load_config
from myrtle_vision.evaluation import split_loader
from myrtle_vision.evaluation import calibrate_on_validation
from myrtle_vision.models.vit import ViTArgs, VisionTransformer

EPS = torch.finfo(torch.float32).eps
SCHEMES = ["per_tensor", "per_channel"]

# torch's quantized tensors (the reference for the grid) are deprecated but still computed
pytestmark = pytest.mark.filterwarnings("ignore:.*quantize.*deprecated:UserWarning")


def fake_quant(x: torch.Tensor, scale, zero_point, lo: int, hi: int) -> torch.Tensor:
    """Quantize to [lo, hi] and dequantize. Multiplies by the reciprocal of the scale, as torch's
    quantize kernels do (x / s differs from x * (1/s) in the last bit now and then, which moves a value
    on a rounding tie); torch.round rounds ties to even, as their nearbyint."""
    return (torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, lo, hi) - zero_point) * scale


def uint8_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine uint8 over [lo, hi] widened to hold 0: 255 steps; FP32 arithmetic."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / 255, min=EPS)
    return scale, torch.clamp(-torch.round(lo / scale), 0, 255)


def int8_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric int8: scale max|w| / 127.5 (of the tensor, or of each output row), zero point 0."""
    largest = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    return fake_quant(w, torch.clamp(largest / 127.5, min=EPS), 0, -128, 127)


class Int8Reference:
    """The earlier release's INT8 ViT, written out from a state dict with functional ops: its own
    min/max at every quantization point (named as the model's modules, to compare), its own scales and
    quantize-dequantize. Attention uses torch's fused kernel, as the model does: it is FP32 in both,
    and a different FP32 rounding there could move an activation across an INT8 rounding tie."""

    def __init__(self, state_dict: dict[str, torch.Tensor], args: ViTArgs, per_channel: bool):
        self.sd, self.args, self.per_channel = state_dict, args, per_channel
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        self.ranges, self.qparams = {}, None
        for images in batches:
            self(images)
        self.qparams = {name: uint8_qparams(lo, hi) for name, (lo, hi) in self.ranges.items()}

    def point(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.qparams is None:  # calibrating: record the range, pass the value on
            lo, hi = self.ranges.get(name, (x.min(), x.max()))
            self.ranges[name] = (torch.minimum(lo, x.min()), torch.maximum(hi, x.max()))
            return x
        return fake_quant(x, *self.qparams[name], 0, 255)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.sd[f"{name}.weight"]
        if self.qparams is not None:  # weights are FP32 while calibrating
            w = int8_weight(w, self.per_channel)
        return self.point(f"{name}.output", F.linear(x, w, self.sd.get(f"{name}.bias")))

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        eps = self.args.layer_norm_eps
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], eps)

    @torch.no_grad()
    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        a, p = self.args, self.args.patch_size
        B, C = img.shape[:2]
        cols = F.unfold(img, p, stride=p)  # (B, C*p*p, L): each patch as (channel, row, column)
        # as the model flattens them: (row, column, channel)
        patches = cols.reshape(B, C, p, p, -1).permute(0, 4, 2, 3, 1).reshape(B, -1, p * p * C)
        x = self.linear("patch_embed.proj", self.point("patch_embed.round_in", patches))
        cls = self.point("round_cls", self.sd["cls_token"]).expand(B, -1, -1)
        x = self.point("round_cat", torch.cat([cls, x], dim=1))
        x = self.point("round_pos_add", x + self.point("round_pos", self.sd["pos_embed"]))
        N, D = x.shape[1:]
        for i in range(a.depth):
            b = f"blocks.{i}"
            qkv = self.linear(f"{b}.attn.qkv", self.point(f"{b}.norm1.output", self.norm(f"{b}.norm1", x)))
            # qkv dequantized: the attention is FP32
            q, k, v = qkv.reshape(B, N, 3, a.heads, D // a.heads).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
            attn = self.linear(f"{b}.attn.proj", self.point(f"{b}.attn.round_out", attn))
            x = self.point(f"{b}.round_add1", x + attn)
            h = self.linear(f"{b}.mlp.fc1", self.point(f"{b}.norm2.output", self.norm(f"{b}.norm2", x)))
            h = self.point(f"{b}.mlp.round_act", F.gelu(h))  # GELU in FP32 on the dequantized fc1 output
            x = self.point(f"{b}.round_add2", x + self.linear(f"{b}.mlp.fc2", h))
        cls_out = self.point("round_head", self.norm("norm", x[:, 0]))  # the pooled class token, normed
        return self.linear("head", cls_out)


def tiny_args(**kw) -> ViTArgs:
    """The conftest configs' model (32x32 images, 3 classes), with biases on q, k and v."""
    defaults = dict(image_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, heads=2, mlp_dim=64,
                    qkv_bias=True)
    return ViTArgs(**{**defaults, **kw})


def random_weights(args: ViTArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """An FP32 ViT's state dict with every parameter random (LayerNorm scales around 1, the rest around 0,
    biases and tokens included), so that every point has a range of its own."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, v in VisionTransformer(args).state_dict().items():
        noise = torch.randn(v.shape, generator=g)
        layer_norm_scale = name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight"
        out[name] = 1 + 0.3 * noise if layer_norm_scale else noise * (0.3 if v.ndim > 1 else 0.5)
    return out


def int8_model(args: ViTArgs, sd: dict[str, torch.Tensor], scheme: str = "per_tensor") -> VisionTransformer:
    model = VisionTransformer(replace(args, q_format="PyTorchINT8", int8_weights=scheme))
    model.load_state_dict(sd)  # strict: the INT8 model has the FP32 model's state dict
    return model.eval()


@pytest.fixture
def splits(tmp_path, data_cfg):
    """(config, validation batches, test batches) of the generated dataset, batch 4, in order."""
    cfg = load_config(train_config(tmp_path / "t.json", data_cfg, tmp_path / "out"))
    batches = {s: [x for x, _ in split_loader(cfg, Processes(), 4, 0, s)[0]] for s in ("val", "test")}
    return cfg, batches["val"], batches["test"]


def expected_points(depth: int) -> set[str]:
    """The earlier release's quantization points in our module names."""
    per_block = ["norm1.output", "attn.qkv.output", "attn.round_out", "attn.proj.output", "round_add1",
                 "norm2.output", "mlp.fc1.output", "mlp.round_act", "mlp.fc2.output", "round_add2"]
    return {"patch_embed.round_in", "patch_embed.proj.output", "round_cls", "round_cat", "round_pos", "round_pos_add",
            "round_head", "head.output"} | {f"blocks.{i}.{p}" for i in range(depth) for p in per_block}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_logits_equal_an_independent_quantize_dequantize(splits, scheme):
    _, val, test = splits
    args = tiny_args()
    sd = random_weights(args)
    model = int8_model(args, sd, scheme)
    fp32 = VisionTransformer(args).eval()
    fp32.load_state_dict(sd)
    assert int8.calibrate(model, val[:2]) == 2
    ref = Int8Reference(sd, args, per_channel=scheme == "per_channel")
    ref.calibrate(val[:2])
    # the same points, and the same scales and zero points, to the bit
    got = int8.qparams(model)
    assert set(got) == set(ref.qparams) == expected_points(args.depth)
    assert got == {k: (s.item(), int(z.item())) for k, (s, z) in ref.qparams.items()}
    with torch.no_grad():
        for images in test:
            logits, want, float_logits = model(images), ref(images), fp32(images)
            tol = 1e-5 * want.abs().max().item()
            torch.testing.assert_close(logits, want, rtol=0, atol=tol)
            assert (logits - float_logits).abs().max() > 100 * tol  # it did quantize
            # the logits are on the head's uint8 grid
            assert torch.equal(fake_quant(logits, *ref.qparams["head.output"], 0, 255), logits)
    other = int8_model(args, sd, SCHEMES[1 - SCHEMES.index(scheme)])
    int8.calibrate(other, val[:2])
    with torch.no_grad():
        assert not torch.equal(other(test[0]), model(test[0]))  # the weight scheme matters


def test_scales_are_the_earlier_release_observers_and_its_quantized_tensors():
    """torch's MinMaxObserver (uint8 affine activations, int8 symmetric weights, reduce_range off) and
    torch.quantize_per_tensor / per_channel: what the earlier release calibrated and converted with."""
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(500, generator=g) * 3 + 1, torch.rand(300, generator=g) + 2, -torch.rand(300, generator=g) - 1,
             torch.zeros(10), torch.full((5,), 1e-9), torch.randn(4, 100, generator=g) * 1e3]
    for x in cases:
        observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
        observer(x[: len(x) // 2]), observer(x[len(x) // 2:])  # the range over two batches
        scale, zero_point = observer.calculate_qparams()
        point = int8.FakeQuant()
        point.start_calibration()
        point(x[: len(x) // 2]), point(x[len(x) // 2:])
        point.freeze()
        assert point.scale.item() == scale.item() and point.zero_point.item() == zero_point.item()
        real = torch.quantize_per_tensor(x, scale.item(), int(zero_point), torch.quint8).dequantize()
        assert torch.equal(point(x), real)
    w = torch.randn(24, 40, generator=g) * torch.logspace(-2, 1, 24).unsqueeze(1)
    observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, reduce_range=False)
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    assert int8.weight_scale(w, per_channel=False).item() == scale.item() and zero_point.item() == 0
    assert torch.equal(int8.fake_quantize_weight(w, per_channel=False),
                       torch.quantize_per_tensor(w, scale.item(), 0, torch.qint8).dequantize())
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                        reduce_range=False)
    observer(w)
    scales, zero_points = observer.calculate_qparams()
    assert torch.equal(int8.weight_scale(w, per_channel=True), scales) and not zero_points.any()
    assert torch.equal(int8.fake_quantize_weight(w, per_channel=True),
                       torch.quantize_per_channel(w, scales.double(), zero_points, 0, torch.qint8).dequantize())


def test_calibration_uses_exactly_the_first_batches_of_the_validation_split(splits, capsys):
    cfg, val, _ = splits
    args = tiny_args()
    sd = random_weights(args, seed=2)
    model = int8_model(args, sd)
    found = {}
    for steps in (2, 1, 3, 10):  # calibrating again starts afresh
        assert calibrate_on_validation(cfg, model, Processes(), steps) == (min(steps, 3), min(4 * steps, 12))
        ref = Int8Reference(sd, args, per_channel=False)
        ref.calibrate(val[:steps])  # the split's first batches, loaded here on their own
        found[steps] = int8.qparams(model)
        assert found[steps] == {k: (s.item(), int(z.item())) for k, (s, z) in ref.qparams.items()}
    assert found[1] != found[2] != found[3]
    assert found[10] == found[3]
    out = capsys.readouterr().out
    assert "calibrating on the first 2 validation batches (8 images of val_imagepaths.txt" in out
    assert "calibrating on all 3 validation batches (12 images" in out and "--calib_steps 10" in out


def test_an_uncalibrated_model_refuses_to_run(splits):
    _, val, _ = splits
    args = tiny_args()
    model = int8_model(args, random_weights(args))
    with pytest.raises(RuntimeError, match="before calibration"):
        model(val[0])
    with pytest.raises(ValueError, match="at least one batch"):
        int8.calibrate(model, [])
    with pytest.raises(RuntimeError, match="before calibration"):
        model(val[0])
    int8.calibrate(model, val[:1])
    with pytest.raises(RuntimeError, match="size"):  # a calibration that fails half way ...
        int8.calibrate(model, [val[0], torch.zeros(2, 3, 16, 16)])
    with pytest.raises(RuntimeError, match="before calibration"):  # ... leaves it uncalibrated, not calibrating
        model(val[0])
    with pytest.raises(ValueError, match="q_format PyTorchINT8"):
        int8.calibrate(VisionTransformer(args), val[:1])


def test_int8_model_keeps_the_state_dict_and_the_deploy_layout():
    for distilled in (False, True):
        args = tiny_args(distilled=distilled)
        fp32 = VisionTransformer(args)
        model = VisionTransformer(replace(args, q_format="PyTorchINT8"))
        int8.calibrate(model, [torch.randn(2, 3, 32, 32)])
        assert model.state_dict().keys() == fp32.state_dict().keys()
    plain = {k: v for k, v in model.state_dict().items() if "dist" not in k}
    assert deploy.to_deploy(plain).keys() == deploy.to_deploy(VisionTransformer(tiny_args()).state_dict()).keys()
    # the distillation token takes no part: its points saw nothing and stay uncalibrated
    assert {"round_dist", "round_head_dist", "head_dist.output"} <= set(int8.points(model)) - set(int8.qparams(model))
