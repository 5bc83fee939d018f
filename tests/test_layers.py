"""test_quantize.py --per-layer: every rounding point's range against the format and what rounding it costs,
against independent computations (an overflow planted in one layer, conftest.reference_forward with one tensor
rounded by hand, test_quantize.py's own figures), and its bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    CLASSES,
    assert_user_error,
    data_config,
    make_dataset,
    near_tie_checkpoint,
    reference_images,
    reference_vit,
    run_dir_of,
    run_in_process,
    run_script,
    train_config,
)

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.reports.layers import point_name, rounding_points, set_rounded

TEST_IMAGES = 15  # the tiny dataset's test split, all of it
FLOAT_FIGURES = ("overflow", "subnormal", "to_zero", "rel_error_all", "alone_kl", "all_but_kl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-block ViT trained a little (FP32), its config and its last checkpoint."""
    tmp = tmp_path_factory.mktemp("layers")
    dataset = make_dataset(tmp / "data", CLASSES)
    data_cfg = data_config(tmp / "data.json", dataset, len(CLASSES))
    cfg = train_config(tmp / "t.json", data_cfg, tmp / "out", train={"epochs": 3}, vit={"depth": 3})
    return cfg, run_dir_of(run_script("train.py", "-c", cfg, check=True)) / "last.pt"


def report(cfg, ckpt, out, *args) -> dict:
    """The per-layer report on every test image, in this process, on the CPU; its JSON."""
    proc = run_in_process(
        "test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--per-layer", "--split", "test", "--device", "cpu",
        "--per-layer-images", TEST_IMAGES, "--output-dir", out, "--json", out / "report.json", *args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "report.json").read_text())
    assert result == json.loads((out / "layers.json").read_text())
    assert (out / "layers.png").stat().st_size > 0 and (out / "layers.csv").read_text().count("\n") == 1 + len(
        result["layers"]
    )
    return result | {"stdout": proc.stdout}


def by_name(result: dict) -> dict:
    return {row["point"]: row for row in result["layers"]}


def test_point_names_say_where_the_point_is():
    assert point_name("blocks.7.mlp.fc1.round_input") == "block 7 mlp fc1 input"
    assert point_name("blocks.11.mlp.fc2.round_params") == "block 11 mlp fc2 weights"
    assert point_name("blocks.3.attn.round_scores") == "block 3 attention scores"
    assert point_name("norm.round_input") == "final norm input"
    assert point_name("patch_embed.proj.weight_quant") == "patch embedding weights"
    assert point_name("round_head") == "head input"


@pytest.mark.slow
def test_an_overflowing_layer_is_named_with_what_lies_downstream_and_nothing_upstream(run, tmp_path):
    """Block 1's second MLP layer scaled so that its output, and only it and what follows, exceeds FP16's
    largest value (65504) on the test images, ten times over, while its weights stay below it."""
    cfg, ckpt = run
    raw = ckpt_io.load(ckpt)
    images = reference_images(cfg, "test")[0]
    mlp = "transformer.layers.1.1.fn.fn.net"

    def peak(layer: str) -> float:  # the largest magnitude of block 1's fc1 or fc2 output in FP32 on the images
        model = ckpt_io.ready_model(load_config(cfg), raw, ckpt)
        seen = []
        getattr(model.blocks[1].mlp, layer).register_forward_hook(lambda m, a, out: seen.append(out.abs().max()))
        with torch.no_grad():
            model(images)
        return seen[0].item()

    # fc1's output to 2^14 (well within FP16), then fc2's to ten times FP16's largest value
    for index, layer, target in ((0, "fc1", 2.0**14), (3, "fc2", 10 * 65504.0)):
        scale = target / peak(layer)
        for name in (f"{mlp}.{index}.weight", f"{mlp}.{index}.bias"):
            raw["model"][name] = raw["model"][name] * scale
        assert raw["model"][f"{mlp}.{index}.weight"].abs().max() < 65504  # the weights themselves fit
    big = tmp_path / "big.pt"
    torch.save(raw, big)

    for rounding, largest in (("nearest_even", 65504.0), ("qtorch", 131008.0)):  # to infinity; saturating
        result = report(cfg, big, tmp_path / rounding, "--q_format", "FP16_16", "--q_rounding", rounding)
        rows = result["layers"]
        first = next(i for i, r in enumerate(rows) if r["overflow"])
        assert rows[first]["point"] == "block 1 mlp fc2 output", (rounding, rows[first])
        assert all(r["overflow"] == 0 for r in rows[:first])  # nothing upstream
        named = by_name(result)
        for downstream in ("block 1 mlp residual add", "block 2 norm1 input"):
            assert named[downstream]["overflow"] > 0, (rounding, downstream)
        weights, out = named["block 1 mlp fc2 weights"], named["block 1 mlp fc2 output"]
        assert weights["overflow"] == 0 and weights["max_abs"] < 65504
        assert out["max_abs"] == pytest.approx(10 * 65504, rel=1e-3) and out["format_max"] == largest
        assert by_name(result)["block 1 mlp fc1 output"]["max_abs"] == pytest.approx(2.0**14, rel=1e-3)
        assert out["headroom_bits"] == pytest.approx(math.log2(largest / out["max_abs"]))
        assert "overflow FP16_16, the first along the depth block 1 mlp fc2 output" in result["summary"]
        assert result["summary"] in result["stdout"]
    # FP16_32 rounds no layer's output: the overflow shows at the next rounding point, block 2's first norm input
    rows = report(cfg, big, tmp_path / "fp16_32", "--q_format", "FP16_32")["layers"]
    assert next(r for r in rows if r["overflow"])["point"] == "block 2 norm1 input"


# our point names and the layout's names of the tensors they round
LAYOUT = {
    "patch embedding input": ("patch_to_embedding", "input"),
    "block 0 attention qkv weights": ("transformer.layers.0.0.fn.fn.to_qkv", "weights"),
    "block 1 norm2 input": ("transformer.layers.1.1.fn.norm", "input"),
    "block 2 mlp fc2 input": ("transformer.layers.2.1.fn.fn.net.3", "input"),
    "final norm input": ("mlp_head.0", "input"),
    "head input": ("mlp_head.1", "input"),
    "head weights": ("mlp_head.1", "weights"),
}


@pytest.mark.slow
def test_each_points_sensitivity_is_the_reference_forward_pass_with_that_tensor_alone_rounded(run, tmp_path):
    """(b), against conftest.reference_forward with one tensor rounded by hand; logits near ties (the class head
    squeezed near 100, where FP16 steps by 1/16, its biases between those steps), so that rounding the head's
    weights changes predictions."""
    cfg, ckpt = run
    near = near_tie_checkpoint(ckpt, tmp_path / "near.pt")
    raw = torch.load(near, map_location="cpu", weights_only=True)
    raw["model"]["mlp_head.1.bias"] = 100 + torch.tensor([0.02, 0.05, 0.09])  # FP16: 100, 100.0625, 100.0625
    torch.save(raw, near)
    result = report(cfg, near, tmp_path / "out", "--q_format", "FP16_32")
    images, labels = reference_images(cfg, "test")
    labels = torch.tensor(labels)
    vit = reference_vit(cfg, near)

    def logits(only=None):
        return vit(images, only=only).double()

    fp32 = logits()
    top1 = lambda x: 100.0 * (x.argmax(1) == labels).double().mean().item()  # noqa: E731
    named, moved = by_name(result), 0
    assert result["fp32_top1"] == pytest.approx(top1(fp32))
    for point, only in LAYOUT.items():
        alone = logits(only)
        kl = (fp32.softmax(1) * (fp32.log_softmax(1) - alone.log_softmax(1))).sum(1).mean().item()
        row = named[point]
        assert row["alone_kl"] == pytest.approx(kl, rel=0.02, abs=1e-12), point
        assert row["alone_changed"] == (alone.argmax(1) != fp32.argmax(1)).sum().item(), point
        assert row["alone_top1_change"] == pytest.approx(top1(alone) - top1(fp32)), point
        moved += row["alone_changed"]
    assert moved > 0  # the test can tell a change from none
    assert named["head weights"]["alone_kl"] > 100 * named["patch embedding input"]["alone_kl"]


@pytest.mark.slow
@pytest.mark.parametrize("q_format", ["FP16_32", "FP16_16", "PyTorchINT8"])
def test_every_point_rounded_is_what_test_quantize_py_measures(run, tmp_path, q_format):
    cfg, ckpt = run
    near = near_tie_checkpoint(ckpt, tmp_path / "near.pt")
    result = report(cfg, near, tmp_path / "layers", "--q_format", q_format)
    proc = run_in_process(
        "test_quantize.py", "-c", cfg, "--checkpoint", near, "--q_format", q_format, "--device", "cpu",
        "--output-dir", tmp_path / "plain", "--json", tmp_path / "plain.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert result["num_images"] == plain["num_images"] == TEST_IMAGES
    assert result["all_rounded_top1"] == pytest.approx(plain["quantized"]["top1"])
    assert result["fp32_top1"] == pytest.approx(plain["fp32"]["top1"])
    assert result["all_rounded_changed"] == plain["changed_predictions"]
    # the same logits, in batches of another size (so FP32 sums may differ in their last bits)
    assert result["all_rounded_max_logit_diff"] == pytest.approx(plain["max_logit_diff"], rel=1e-3)
    assert result["points"] == len(result["layers"]) > 20


def test_with_every_point_rounded_the_model_is_the_quantized_model_bit_for_bit(run):
    """The report's switches: every point rounded is the model test_quantize.py builds in the format; none is
    the FP32 model (FP16_32 computes attention as FP32 does)."""
    cfg, ckpt = run
    config, raw = load_config(cfg), ckpt_io.load(ckpt)
    images = reference_images(cfg, "test")[0]
    fp32 = ckpt_io.ready_model(config, raw, ckpt)
    quantized = ckpt_io.ready_model(config, raw, ckpt, q_format="FP16_32")
    switched = ckpt_io.ready_model(config, raw, ckpt, q_format="FP16_32")
    points = rounding_points(switched)
    assert [p.name for p in points][:3] == ["patch embedding input", "patch embedding weights", "block 0 norm1 input"]
    with torch.no_grad():
        set_rounded(points, "all")
        assert torch.equal(switched(images), quantized(images))
        set_rounded(points, set())
        assert torch.equal(switched(images), fp32(images))
        assert not torch.equal(quantized(images), fp32(images))


@pytest.mark.slow
def test_in_fp32_every_figure_is_zero(run, tmp_path):
    cfg, ckpt = run
    result = report(cfg, ckpt, tmp_path / "out", "--q_format", "FP32")
    assert result["all_rounded_changed"] == 0 and result["all_rounded_kl"] == 0
    assert result["all_rounded_top1"] == result["fp32_top1"] and len(result["layers"]) > 20
    for row in result["layers"]:
        assert all(row[k] == 0 for k in FLOAT_FIGURES), row
        assert row["alone_top1_change"] == row["all_but_top1_change"] == 0
        assert row["format_max"] == torch.finfo(torch.float32).max
    assert result["summary"].startswith("no point overflows FP32")


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    cfg, ckpt = run
    args = ("test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--per-layer", "--device", "cpu")
    assert_user_error(run_in_process(*args, "--q_format", "FP8"), "--q_format 'FP8'", "FP16_32")
    assert_user_error(run_in_process(*args, "--per-layer-images", "0"), "--per-layer-images 0", "at least 1")
    raw = json.loads(cfg.read_text())
    data = json.loads(open(raw["data_config_path"]).read())
    empty = tmp_path / "empty_val.txt"
    empty.write_text("")
    data["valid_files"] = str(empty)
    (tmp_path / "data.json").write_text(json.dumps(data))
    raw["data_config_path"] = str(tmp_path / "data.json")
    (tmp_path / "t.json").write_text(json.dumps(raw))
    line = assert_user_error(
        run_in_process("test_quantize.py", "-c", tmp_path / "t.json", "--checkpoint", ckpt, "--per-layer"), "empty"
    )
    assert "empty_val.txt" in line


@pytest.mark.slow
def test_a_deit_checkpoint_is_reported_by_its_class_head_and_a_qat_one_in_its_format(run, tmp_path):
    cfg, ckpt = run
    raw = ckpt_io.load(ckpt)
    raw["distillation"] = {
        "dist_token": torch.randn(1, 1, 32),
        "head_dist.weight": torch.randn(3, 32),
        "head_dist.bias": torch.randn(3),
    }
    deit = tmp_path / "deit.pt"
    torch.save(raw, deit)
    plain, student = report(cfg, ckpt, tmp_path / "plain"), report(cfg, deit, tmp_path / "deit")
    assert "DeiT: class head" in student["stdout"] and "distillation" not in " ".join(by_name(student))
    drop = ("stdout", "output_dir")
    assert {k: v for k, v in plain.items() if k not in drop} == {k: v for k, v in student.items() if k not in drop}
    # quantization-aware training in FP16_32: reported in that format, as test_quantize.py --quantized_ckpt tests it
    qat_cfg = train_config(
        tmp_path / "qat.json", json.loads(cfg.read_text())["data_config_path"], tmp_path / "qat",
        train={"epochs": 2}, vit={"depth": 3, "q_format": "FP16_32"},
    )  # fmt: skip
    qat = run_dir_of(run_script("train.py", "-c", qat_cfg, check=True)) / "last.pt"
    assert_user_error(
        run_in_process("test_quantize.py", "-c", qat_cfg, "--checkpoint", qat, "--per-layer"), "--quantized_ckpt"
    )
    result = report(qat_cfg, qat, tmp_path / "qat_layers", "--quantized_ckpt")
    proc = run_in_process(
        "test_quantize.py", "-c", qat_cfg, "--checkpoint", qat, "--quantized_ckpt", "--device", "cpu",
        "--output-dir", tmp_path / "qat_plain", "--json", tmp_path / "qat_plain.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plain = json.loads((tmp_path / "qat_plain.json").read_text())
    assert result["q_format"] == plain["q_format"] == "FP16_32" and result["quantized_ckpt"]
    assert result["all_rounded_top1"] == pytest.approx(plain["quantized"]["top1"])
    assert result["all_rounded_max_logit_diff"] == pytest.approx(plain["max_logit_diff"], rel=1e-3)
