"""INT8 post-training quantization (PyTorchINT8): the model's logits against an independent
quantize-dequantize ViT written from the state dict, the scales against torch's observers and
quantized tensors (what the earlier release used), calibration on exactly the first batches, and the
errors of a model used uncalibrated; then test_quantize.py's INT8, run as a user runs it, against that
reference read straight off the checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_user_error,
    data_config,
    reference_images,
    reference_logits,
    run_dir_of,
    run_in_process,
    run_script,
    train_config,
)
from test_distributed import torchrun
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from myrtle_vision import int8
from myrtle_vision.config import load_config
from myrtle_vision.distributed import Processes
from myrtle_vision.evaluation import split_loader
from myrtle_vision.models.vit import VisionTransformer, ViTArgs
from myrtle_vision.reports.quantize import calibrate_on_validation
from myrtle_vision.weights import deploy

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
    defaults = dict(
        image_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, heads=2, mlp_dim=64, qkv_bias=True
    )
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
    per_block = [
        "norm1.output",
        "attn.qkv.output",
        "attn.round_out",
        "attn.proj.output",
        "round_add1",
        "norm2.output",
        "mlp.fc1.output",
        "mlp.round_act",
        "mlp.fc2.output",
        "round_add2",
    ]
    return {
        "patch_embed.round_in",
        "patch_embed.proj.output",
        "round_cls",
        "round_cat",
        "round_pos",
        "round_pos_add",
        "round_head",
        "head.output",
    } | {f"blocks.{i}.{p}" for i in range(depth) for p in per_block}


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
    cases = [
        torch.randn(500, generator=g) * 3 + 1,
        torch.rand(300, generator=g) + 2,
        -torch.rand(300, generator=g) - 1,
        torch.zeros(10),
        torch.full((5,), 1e-9),
        torch.randn(4, 100, generator=g) * 1e3,
    ]
    for x in cases:
        observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
        observer(x[: len(x) // 2]), observer(x[len(x) // 2 :])  # the range over two batches
        scale, zero_point = observer.calculate_qparams()
        point = int8.FakeQuant()
        point.start_calibration()
        point(x[: len(x) // 2]), point(x[len(x) // 2 :])
        point.freeze()
        assert point.scale.item() == scale.item() and point.zero_point.item() == zero_point.item()
        real = torch.quantize_per_tensor(x, scale.item(), int(zero_point), torch.quint8).dequantize()
        assert torch.equal(point(x), real)
    w = torch.randn(24, 40, generator=g) * torch.logspace(-2, 1, 24).unsqueeze(1)
    observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, reduce_range=False)
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    assert int8.weight_scale(w, per_channel=False).item() == scale.item() and zero_point.item() == 0
    assert torch.equal(
        int8.fake_quantize_weight(w, per_channel=False),
        torch.quantize_per_tensor(w, scale.item(), 0, torch.qint8).dequantize(),
    )
    observer = PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, reduce_range=False
    )
    observer(w)
    scales, zero_points = observer.calculate_qparams()
    assert torch.equal(int8.weight_scale(w, per_channel=True), scales) and not zero_points.any()
    assert torch.equal(
        int8.fake_quantize_weight(w, per_channel=True),
        torch.quantize_per_channel(w, scales.double(), zero_points, 0, torch.qint8).dequantize(),
    )


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


# test_quantize.py --q_format PyTorchINT8, through the script

TRAIN = {"epochs": 6, "iters_per_checkpoint": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    """An FP32 run to quantize."""
    tmp = tmp_path_factory.mktemp("int8")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(tmp / "FP32.json", data_cfg, tmp / "FP32", train=TRAIN)
    proc = run_script("train.py", "-c", cfg, check=True)
    return tmp, data_cfg, {"FP32": (cfg, run_dir_of(proc), proc)}


# The deploy layout's names in our modules' (docs/deployment.md's table, "Checkpoint contents"), written out here
# again so that the reference below reads a checkpoint without the package.
_DEPLOY_TO_OURS = [
    (r"pos_embedding", "pos_embed"),
    (r"cls_token", "cls_token"),
    (r"patch_to_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]


def _ours(name: str) -> str:
    for pattern, replacement in _DEPLOY_TO_OURS:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(name)


def _int8_reference_logits(cfg_path, ckpt_path, calib_steps: int, per_channel: bool = False) -> torch.Tensor:
    """Without the package: test_int8's reference INT8 ViT on the checkpoint's deploy entry (read with
    torch.load), calibrated on the first ``calib_steps`` validation batches of the config's batch size and
    run on the test images, both read and normalized by hand (conftest.reference_images)."""
    cfg = json.loads(Path(cfg_path).read_text())
    vit, batch = cfg["vit_config"], cfg["train_config"]["local_batch_size"]
    weights = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
    args = SimpleNamespace(
        patch_size=vit["patch_size"],
        depth=vit["depth"],
        heads=vit["heads"],
        layer_norm_eps=vit.get("layer_norm_eps", 1e-5),
    )
    reference = Int8Reference({_ours(k): v for k, v in weights.items()}, args, per_channel)
    val, _ = reference_images(cfg_path, "val")
    reference.calibrate(val[i : i + batch] for i in range(0, min(len(val), calib_steps * batch), batch))
    test, _ = reference_images(cfg_path)
    return reference(test)


def _check_int8_figures(result: dict, fp32: torch.Tensor, quantized: torch.Tensor, targets: torch.Tensor) -> None:
    """test_quantize.py's INT8 figures are those of the reference logits ``quantized``."""
    top1 = 100.0 * (quantized.argmax(1) == targets).float().mean().item()
    assert result["quantized"]["top1"] == pytest.approx(top1)
    tol = 1e-5 * fp32.abs().max().item()
    assert result["max_logit_diff"] == pytest.approx((fp32 - quantized).abs().max().item(), abs=tol)
    assert result["changed_predictions"] == (fp32.argmax(1) != quantized.argmax(1)).sum().item()


@pytest.mark.slow
def test_int8_post_training_quantization_as_the_earlier_release(runs, tmp_path):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    run_script(
        "test.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        "--json",
        tmp_path / "t.json",
        "--output-dir",
        tmp_path / "t",
        check=True,
    )
    tested = json.loads((tmp_path / "t.json").read_text())
    fp32, targets = reference_logits(cfg, ckpt, "FP32")
    diffs = set()
    for steps, scheme in ((1, "per_tensor"), (2, "per_tensor"), (2, "per_channel")):
        path = tmp_path / f"{steps}_{scheme}.json"
        flags = ["--per_channel"] if scheme == "per_channel" else []
        proc = run_script(
            "test_quantize.py",
            "-c",
            cfg,
            "--checkpoint",
            ckpt,
            "--q_format",
            "PyTorchINT8",
            "--calib_steps",
            steps,
            *flags,
            "--json",
            path,
            check=True,
        )
        result = json.loads(path.read_text())
        assert result["q_format"] == "PyTorchINT8" and result["q_rounding"] is None and not result["quantized_ckpt"]
        assert (result["calib_steps"], result["calib_images"], result["int8_weights"]) == (steps, 4 * steps, scheme)
        assert result["fp32"] == {k: tested[k] for k in ("top1", "top5", "per_class")} and result["num_images"] == 15
        _check_int8_figures(result, fp32, _int8_reference_logits(cfg, ckpt, steps, scheme == "per_channel"), targets)
        assert 0 < result["max_logit_diff"] < 1
        diffs.add(result["max_logit_diff"])
        for needle in (
            f"testing in PyTorchINT8 ({scheme.replace('_', '-')} int8 weights",
            f"calibrating on the first {steps} validation batches ({4 * steps} images",
            "PyTorchINT8",
            "predictions unchanged",
            "largest logit difference",
        ):
            assert needle in proc.stdout
    assert len(diffs) == 3  # the calibration batches and the weight scheme each change the result


@pytest.mark.slow
def test_a_pytorch_int8_config_quantizes_with_no_flag_and_test_py_says_it_is_fp32(runs, tmp_path):
    _, data_cfg, out = runs
    _, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    cfg = train_config(tmp_path / "int8.json", data_cfg, tmp_path / "out", train=TRAIN, vit={"q_format": "PyTorchINT8"})
    proc = run_script("test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--json", tmp_path / "q.json", check=True)
    result = json.loads((tmp_path / "q.json").read_text())
    # 10 batches by default; the split has 3 (12 images, batch 4): all are used, and that is said
    assert (result["q_format"], result["calib_steps"], result["calib_images"]) == ("PyTorchINT8", 3, 12)
    assert "calibrating on all 3 validation batches (12 images" in proc.stdout and "--calib_steps 10" in proc.stdout
    fp32, targets = reference_logits(cfg, ckpt, "FP32")
    _check_int8_figures(result, fp32, _int8_reference_logits(cfg, ckpt, 3), targets)
    proc = run_script(
        "test.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        "--json",
        tmp_path / "t.json",
        "--output-dir",
        tmp_path / "t",
        check=True,
    )
    assert "evaluating in FP32" in proc.stdout and f"test_quantize.py -c {cfg}" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["top1"] == result["fp32"]["top1"]


@pytest.mark.slow
def test_int8_flag_errors(runs, tmp_path):
    _, data_cfg, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    args = ("test_quantize.py", "-c", cfg, "--checkpoint", ckpt)
    assert_user_error(
        run_in_process(*args, "--q_format", "PyTorchINT8", "--calib_steps", "0"), "--calib_steps 0", "at least 1"
    )
    # with an FP32 config the format is FP16_32, which has nothing to calibrate: the earlier release's
    # --calib_steps is accepted, and said to be unused, naming the format tested
    proc = run_script(*args, "--calib_steps", "10", "--per_channel", "--json", tmp_path / "fp16.json", check=True)
    assert "--calib_steps and --per_channel unused: testing FP16_32" in proc.stdout
    assert json.loads((tmp_path / "fp16.json").read_text())["q_format"] == "FP16_32"
    assert_user_error(
        run_in_process(*args, "--q_format", "PyTorchINT8", "--q_rounding", "qtorch"),
        "--q_rounding qtorch",
        "not to PyTorchINT8",
    )
    int8_cfg = train_config(tmp_path / "int8.json", data_cfg, tmp_path / "out", vit={"q_format": "PyTorchINT8"})
    assert_user_error(
        run_in_process("test_quantize.py", "-c", int8_cfg, "--checkpoint", ckpt, "--quantized_ckpt"),
        str(ckpt),
        "FP32 checkpoint",
        "drop --quantized_ckpt",
        "PyTorchINT8 is post-training quantization",
    )


@pytest.mark.slow
def test_int8_in_two_processes_calibrates_as_one(runs, tmp_path):
    """Both processes calibrate on the same first batches of the whole validation split, so they
    quantize with the same scales, and the figures are one process's."""
    _, data_cfg, out = runs
    _, run_dir, _ = out["FP32"]
    cfg = train_config(
        tmp_path / "d.json",
        data_cfg,
        tmp_path / "out",
        train=dict(TRAIN, distributed=True),
        vit={"q_format": "PyTorchINT8"},
    )
    args = ("-c", cfg, "--checkpoint", run_dir / "last.pt", "--calib_steps", 2, "--device", "cpu")
    run_script("test_quantize.py", *args, "--json", tmp_path / "one.json", check=True)
    two = torchrun(*args, "--json", tmp_path / "two.json", script="test_quantize.py")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (b["calib_steps"], b["calib_images"], b["num_images"]) == (2, 8, 15)
    assert b["max_logit_diff"] == pytest.approx(a["max_logit_diff"], rel=1e-5)
    assert {k: v for k, v in a.items() if k != "max_logit_diff"} == {
        k: v for k, v in b.items() if k != "max_logit_diff"
    }
    assert two.stdout.count("calibrating on the first 2 validation batches") == 1  # rank 0 alone prints
