"""Number formats (FP16_16, FP16_32, BF16_32, TF32): rounding bit for bit, the wrapped Linear and LayerNorm,
straight-through gradients, the whole ViT against an independent reference; then test_quantize.py and
quantization-aware training, run as a user runs them. (INT8: tests/test_int8.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CLASSES,
    assert_user_error,
    data_config,
    near_tie_checkpoint,
    reference_forward,
    reference_logits,
    run_dir_of,
    run_in_process,
    run_script,
    scalars,
    train_config,
)
from PIL import Image
from qtorch.quant import float_quantize

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.models import build_model
from myrtle_vision.models.vit import VisionTransformer, ViTArgs
from myrtle_vision.quantization import (
    BF16,
    FP16,
    Q_FORMATS,
    TF32,
    QLayerNorm,
    QLinear,
    Round,
    arithmetic,
    round_nearest_even,
    round_qtorch,
)
from myrtle_vision.weights import deploy
from myrtle_vision.weights.io import save_atomic

DTYPES = {"FP16": (FP16, torch.float16), "BF16": (BF16, torch.bfloat16)}


def representable(dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, sorted, as FP32."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    return values[torch.isfinite(values)].unique()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))


@pytest.mark.parametrize("name", DTYPES)
def test_native_cast_equals_the_bitwise_simulation_bit_for_bit(name):
    fmt, dtype = DTYPES[name]
    values = representable(dtype)
    ties = ((values[1:].double() + values[:-1].double()) / 2).float()
    up, down = torch.full_like(ties, float("inf")), torch.full_like(ties, -float("inf"))
    random_bits = (
        torch.randint(-(2**31), 2**31 - 1, (1_000_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )  # every exponent, inf and NaN
    x = torch.cat(
        [
            values,
            ties,
            torch.nextafter(ties, up),
            torch.nextafter(ties, down),
            random_bits,
            torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 65519.99, 65520.0, 3.4e38]),
        ]
    )
    assert same_bits(round_nearest_even(x, fmt), x.to(dtype).float()).all()


def test_tf32_simulation_keeps_ten_mantissa_bits_and_rounds_ties_to_even():
    big = torch.finfo(torch.float32).max
    x = torch.tensor(
        [
            1 + 2**-11,
            1 + 3 * 2**-11,
            1 + 2**-11 + 2**-20,
            -(1 + 2**-11),  # ties, not a tie
            2**-130,
            2**-140,
            3 * 2**-137,
            big,
            -0.0,
        ]
    )  # subnormals, overflow
    expected = torch.tensor([1.0, 1 + 2**-9, 1 + 2**-10, -1.0, 2**-130, 0.0, 2**-135, float("inf"), -0.0])
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
    tie_to_odd[len(values) : len(values) + len(ties)] = (away.to(dtype).view(torch.int16) & 1).bool()
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


FORMS = {
    "FP32": (None, None),
    "FP16_16": (FP16, FP16),
    "FP16_32": (FP16, None),
    "TF32": (TF32, None),
    "BF16_32": (BF16, None),
}


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
        assert torch.equal(
            linear(x), F.linear(x.half().float(), linear.weight.half().float(), linear.bias.half().float())
        )


def test_gradients_pass_straight_through_the_rounding():
    x = torch.tensor([1 + 2**-11, 70000.0, -3.3], requires_grad=True)
    w = torch.tensor([2.0, 3.0, 5.0])
    (Round(FP16, "nearest_even")(x) * w).sum().backward()
    assert torch.equal(x.grad, w)  # even where rounding changed the value or overflowed


@pytest.mark.parametrize("q_format", ["FP16_16", "FP16_32", "BF16_32", "TF32"])
def test_every_parameter_of_a_quantized_vit_gets_a_gradient(q_format):
    torch.manual_seed(0)
    model = VisionTransformer(
        ViTArgs(
            image_size=16,
            patch_size=4,
            num_classes=5,
            embed_dim=32,
            depth=2,
            heads=2,
            mlp_dim=64,
            distilled=True,
            q_format=q_format,
        )
    )
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
    model = VisionTransformer(
        ViTArgs(
            image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, heads=2, mlp_dim=64, q_format="FP16_16"
        )
    )
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


@pytest.mark.parametrize("q_format", ["FP16_16", "FP16_32", "BF16_32", "TF32"])
def test_a_quantized_vit_computes_what_the_independent_reference_computes_in_its_format(q_format):
    """conftest.reference_forward rounds where docs/quantization.md's formats table says each format rounds. FP16_16
    rounds every result, so the model's logits equal the reference's bit for bit; the other formats keep some
    results in FP32, where another summation order can move a later rounding by one step: most logits are equal
    and the rest differ by far less than the format's own effect."""
    torch.manual_seed(0)
    # head_dim 64, as in every shipped size, so the reference's fixed 1/sqrt(64) applies
    args = ViTArgs(
        image_size=32, patch_size=8, num_classes=7, embed_dim=128, depth=2, heads=2, mlp_dim=96, q_format=q_format
    )
    model = VisionTransformer(args).eval()
    for p in model.parameters():  # make every tensor matter (init zeroes biases)
        p.data.normal_(0, 0.2)
    img = torch.randn(64, 3, 32, 32)
    named = deploy.to_deploy(model.state_dict())
    with torch.no_grad():
        out = model(img)
    ref = reference_forward(named, img, args.heads, args.patch_size, q_format=q_format)
    effect = (reference_forward(named, img, args.heads, args.patch_size) - ref).abs().mean().item()
    if q_format == "FP16_16":
        assert torch.equal(out, ref)
    assert (out == ref).float().mean() > 0.5 and (out - ref).abs().mean() < 0.2 * effect


# test_quantize.py and quantization-aware training, through the scripts

TRAIN = {"epochs": 6, "iters_per_checkpoint": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    """An FP32 run and an FP16_32 quantization-aware run of the same model on the same data."""
    tmp = tmp_path_factory.mktemp("quantize")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    out = {}
    for q_format in ("FP32", "FP16_32"):
        cfg = train_config(tmp / f"{q_format}.json", data_cfg, tmp / q_format, train=TRAIN, vit={"q_format": q_format})
        proc = run_script("train.py", "-c", cfg, check=True)
        out[q_format] = (cfg, run_dir_of(proc), proc)
    return tmp, data_cfg, out


@pytest.mark.slow
def test_post_training_quantization_of_an_fp32_checkpoint(runs, tmp_path):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    proc = run_script("test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--json", tmp_path / "q.json", check=True)
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["q_format"] == "FP16_32" and result["q_rounding"] == "nearest_even"  # the accelerator's, by default
    assert not result["quantized_ckpt"] and result["num_images"] == 15
    ref, targets = reference_logits(cfg, ckpt, "FP32")
    q, _ = reference_logits(cfg, ckpt, "FP16_32")
    top1 = lambda logits: 100.0 * (logits.argmax(1) == targets).float().mean().item()  # noqa: E731
    assert result["fp32"]["top1"] == pytest.approx(top1(ref)) and result["quantized"]["top1"] == pytest.approx(top1(q))
    assert result["max_logit_diff"] == pytest.approx((ref - q).abs().max().item(), rel=1e-3)  # FP32 sums, other order
    assert 0 < result["max_logit_diff"] < 0.05
    changed = (ref.argmax(1) != q.argmax(1)).sum().item()
    assert result["changed_predictions"] == changed
    assert result["unchanged_predictions"] == pytest.approx(100.0 * (15 - changed) / 15)
    for needle in (
        "FP32",
        "FP16_32",
        "top-1",
        "top-3",
        "predictions unchanged",
        "largest logit difference",
        "quantized after training",
    ):
        assert needle in proc.stdout


@pytest.mark.slow
def test_split_val_quantizes_over_the_validation_images(runs, tmp_path):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    proc = run_script(
        "test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--split", "val", "--json", tmp_path / "q.json", check=True
    )
    result = json.loads((tmp_path / "q.json").read_text())
    assert (result["split"], result["num_images"]) == ("val", 12)
    ref, targets = reference_logits(cfg, ckpt, "FP32", split="val")
    q, _ = reference_logits(cfg, ckpt, "FP16_32", split="val")
    assert result["fp32"]["top1"] == pytest.approx(100.0 * (ref.argmax(1) == targets).double().mean().item())
    assert result["quantized"]["top1"] == pytest.approx(100.0 * (q.argmax(1) == targets).double().mean().item())
    changed = (ref.argmax(1) != q.argmax(1)).sum().item()
    assert result["changed_predictions"] == changed and f"({changed} of 12 val images changed)" in proc.stdout


@pytest.mark.slow
def test_what_fp16_changes_per_class_and_image_by_image(runs, tmp_path):
    """The per-class tables of both models, both confusion matrices, and the list of changed predictions,
    against the independent computation in FP32 and FP16_16 (which the quantized ViT equals bit for bit)."""
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = near_tie_checkpoint(run_dir / "last.pt", tmp_path / "near_tie.pt")
    proc = run_script(
        "test_quantize.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        "--q_format",
        "FP16_16",
        "--split",
        "train",
        "--output-dir",
        tmp_path / "out",
        "--json",
        tmp_path / "q.json",
        check=True,
    )
    result = json.loads((tmp_path / "q.json").read_text())
    ref, targets = reference_logits(cfg, ckpt, "FP32", split="train")
    q, _ = reference_logits(cfg, ckpt, "FP16_16", split="train")
    changed = (ref.argmax(1) != q.argmax(1)).nonzero().flatten().tolist()
    assert len(changed) >= 3 and result["changed_predictions"] == len(changed)
    data = json.loads(Path(json.loads(cfg.read_text())["data_config_path"]).read_text())
    root = Path(data["dataset_path"])
    paths = [str((root / line).resolve()) for line in (root / data["train_files"]).read_text().split()]
    names = sorted(CLASSES)
    rows = json.loads((tmp_path / "out" / "changed_predictions.json").read_text())
    assert [r["path"] for r in rows] == [paths[i] for i in changed]
    for row, i in zip(rows, changed):
        assert (row["true_class"], row["fp32_prediction"], row["quantized_prediction"]) == (
            names[targets[i]],
            names[ref[i].argmax()],
            names[q[i].argmax()],
        )
        for model, logits in (("fp32", ref), ("quantized", q)):
            top2 = logits[i].topk(2).values
            assert row[f"{model}_margin"] == pytest.approx((top2[0] - top2[1]).item(), abs=1e-4)
    with open(tmp_path / "out" / "changed_predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [{k: (float(v) if k.endswith("margin") else v) for k, v in r.items()} for r in table] == rows
    # per class, both models: recall against the independent predictions, in the JSON and the printed table
    for model, logits in (("fp32", ref), ("quantized", q)):
        for c, name in enumerate(names):
            hits = ((logits.argmax(1) == c) & (targets == c)).sum().item()
            recall = 100 * hits / (targets == c).sum().item()
            assert result[model]["per_class"][name]["recall"] == pytest.approx(recall)
    line = next(line for line in proc.stdout.splitlines() if line.startswith(names[0] + " "))
    assert line.split()[1] == f"{result['fp32']['per_class'][names[0]]['recall']:.2f}"
    assert line.split()[4] == f"{result['quantized']['per_class'][names[0]]['recall']:.2f}"
    for label in ("FP32", "FP16_16"):
        assert Image.open(tmp_path / "out" / f"confusion_matrix_{label}.png").size[0] > 50


@pytest.mark.slow
@pytest.mark.parametrize("q_format", ["FP16_16", "BF16_32", "TF32"])
def test_other_formats_and_qtorch_rounding(runs, tmp_path, q_format):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    results = {}
    for rounding in ("nearest_even", "qtorch"):
        run_script(
            "test_quantize.py",
            "-c",
            cfg,
            "--checkpoint",
            ckpt,
            "--q_format",
            q_format,
            "--q_rounding",
            rounding,
            "--json",
            tmp_path / f"{rounding}.json",
            check=True,
        )
        results[rounding] = json.loads((tmp_path / f"{rounding}.json").read_text())
        assert results[rounding]["q_format"] == q_format and results[rounding]["q_rounding"] == rounding
        assert results[rounding]["max_logit_diff"] > 0
    ref, _ = reference_logits(cfg, ckpt, "FP32")
    q, _ = reference_logits(cfg, ckpt, q_format)
    assert results["nearest_even"]["max_logit_diff"] == pytest.approx((ref - q).abs().max().item(), rel=1e-3)


@pytest.mark.slow
def test_quantization_aware_training_learns_and_saves_the_deploy_layout(runs):
    _, _, out = runs
    cfg, run_dir, proc = out["FP16_32"]
    assert "quantization-aware training: the forward pass simulates FP16_32" in proc.stdout
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    ckpt = ckpt_io.load(run_dir / "last.pt")
    assert ckpt["quantization"] == {"q_format": "FP16_32", "q_rounding": "nearest_even"}
    fp32 = ckpt_io.load(out["FP32"][1] / "last.pt")
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in fp32["model"].items()}
    assert all(k in deploy.to_deploy(build_model(load_config(cfg)).state_dict()) for k in ckpt["model"])
    # the master weights are FP32; the forward pass rounded them
    assert any(not torch.equal(v, v.half().float()) for v in ckpt["model"].values())


@pytest.mark.slow
def test_qat_checkpoint_needs_quantized_ckpt_and_tests_in_its_format(runs, tmp_path):
    _, _, out = runs
    qat_cfg, qat_dir, _ = out["FP16_32"]
    fp32_cfg, fp32_dir, _ = out["FP32"]
    ckpt = qat_dir / "last.pt"
    assert_user_error(
        run_script("test_quantize.py", "-c", fp32_cfg, "--checkpoint", ckpt),
        str(ckpt),
        "quantization-aware training (q_format FP16_32)",
        "add --quantized_ckpt",
    )
    assert_user_error(
        run_script("test_quantize.py", "-c", fp32_cfg, "--checkpoint", fp32_dir / "last.pt", "--quantized_ckpt"),
        "FP32 checkpoint",
        "drop --quantized_ckpt",
    )
    # with an FP32 config the format comes from the checkpoint
    run_script(
        "test_quantize.py",
        "-c",
        fp32_cfg,
        "--checkpoint",
        ckpt,
        "--quantized_ckpt",
        "--json",
        tmp_path / "q.json",
        check=True,
    )
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["q_format"] == "FP16_32" and result["quantized_ckpt"]
    q, targets = reference_logits(qat_cfg, ckpt, "FP16_32")
    assert result["quantized"]["top1"] == pytest.approx(100.0 * (q.argmax(1) == targets).float().mean().item())
    # test.py with the QAT config evaluates in its arithmetic too
    proc = run_script("test.py", "-c", qat_cfg, "--checkpoint", ckpt, "--json", tmp_path / "t.json", check=True)
    assert "evaluating in FP16_32 arithmetic" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["top1"] == pytest.approx(result["quantized"]["top1"])


@pytest.mark.slow
def test_deit_checkpoint_quantizes_by_its_class_head(tmp_path, data_cfg):
    """A DeiT checkpoint (model + distillation entries) tests like a ViT: its class head."""
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"epochs": 1})
    run_dir = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    ckpt = ckpt_io.load(run_dir / "last.pt")
    ckpt["distillation"] = {
        "dist_token": torch.randn(1, 1, 32),
        "head_dist.weight": torch.randn(3, 32),
        "head_dist.bias": torch.randn(3),
    }
    deit = tmp_path / "deit.pt"
    save_atomic(ckpt, deit)
    plain, deit_out = tmp_path / "plain.json", tmp_path / "deit.json"
    run_script("test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", plain, check=True)
    proc = run_script("test_quantize.py", "-c", cfg, "--checkpoint", deit, "--json", deit_out, check=True)
    assert "DeiT: class head" in proc.stdout
    figures = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "output_dir"}  # noqa: E731
    assert figures(plain) == figures(deit_out)  # (each checkpoint's report goes beside it)


@pytest.mark.slow
def test_unknown_formats_are_one_line_errors(runs, tmp_path):
    _, data_cfg, out = runs
    cfg, run_dir, _ = out["FP32"]
    line = assert_user_error(
        run_in_process("test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--q_format", "FP8"),
        "--q_format 'FP8'",
    )
    assert "FP32, FP16_16, FP16_32, TF32, BF16_32, PyTorchINT8" in line
    assert_user_error(
        run_in_process(
            "test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--q_rounding", "stochastic"
        ),
        "--q_rounding 'stochastic'",
        "nearest_even, qtorch",
    )
    bad = train_config(tmp_path / "bad.json", data_cfg, tmp_path / "out", vit={"q_format": "FP16"})
    line = assert_user_error(run_in_process("train.py", "-c", bad), str(bad), "q_format", "did you mean")
    assert "FP16_16" in line and "BF16_32" in line
