"""test_quantize.py and quantization-aware training, run as a user runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (REFERENCE_ROUNDING, assert_user_error, data_config, reference_forward, reference_images,
                      run_dir_of, run_script, train_config)
from test_distributed import torchrun
from test_int8 import Int8Reference
from test_train import scalars

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.weights.io import save_atomic
from myrtle_vision.weights import deploy
from myrtle_vision.config import load_config
from myrtle_vision.models import build_model

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


def _logits(cfg_path, ckpt_path, q_format):
    """Without the package: the test images read and normalized by hand, the checkpoint's deploy entry read with
    torch.load, and the ViT computed from its layout in ``q_format`` (conftest.reference_forward)."""
    images, labels = reference_images(cfg_path)
    vit = json.loads(cfg_path.read_text())["vit_config"]
    weights = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
    logits = reference_forward(weights, images, vit["heads"], vit["patch_size"],
                               head_dim_scale=vit["embed_dim"] // vit["heads"], q_format=q_format)
    return logits, torch.tensor(labels)


def test_post_training_quantization_of_an_fp32_checkpoint(runs, tmp_path):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    proc = run_script("test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--json", tmp_path / "q.json", check=True)
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["q_format"] == "FP16_32" and result["q_rounding"] == "nearest_even"  # the accelerator's, by default
    assert not result["quantized_ckpt"] and result["num_images"] == 15
    ref, targets = _logits(cfg, ckpt, "FP32")
    q, _ = _logits(cfg, ckpt, "FP16_32")
    top1 = lambda logits: 100.0 * (logits.argmax(1) == targets).float().mean().item()  # noqa: E731
    assert result["fp32"]["top1"] == pytest.approx(top1(ref)) and result["quantized"]["top1"] == pytest.approx(top1(q))
    assert result["max_logit_diff"] == pytest.approx((ref - q).abs().max().item(), rel=1e-3)  # FP32 sums, other order
    assert 0 < result["max_logit_diff"] < 0.05
    changed = (ref.argmax(1) != q.argmax(1)).sum().item()
    assert result["changed_predictions"] == changed
    assert result["unchanged_predictions"] == pytest.approx(100.0 * (15 - changed) / 15)
    for needle in ("FP32", "FP16_32", "top-1", "top-3", "predictions unchanged", "largest logit difference",
                   "quantized after training"):
        assert needle in proc.stdout


@pytest.mark.parametrize("q_format", ["FP16_16", "BF16_32", "TF32"])
def test_other_formats_and_qtorch_rounding(runs, tmp_path, q_format):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    results = {}
    for rounding in ("nearest_even", "qtorch"):
        run_script("test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--q_format", q_format, "--q_rounding", rounding,
                   "--json", tmp_path / f"{rounding}.json", check=True)
        results[rounding] = json.loads((tmp_path / f"{rounding}.json").read_text())
        assert results[rounding]["q_format"] == q_format and results[rounding]["q_rounding"] == rounding
        assert results[rounding]["max_logit_diff"] > 0
    if q_format in REFERENCE_ROUNDING:  # (the reference does not compute FP16_16, which rounds every tensor)
        ref, _ = _logits(cfg, ckpt, "FP32")
        q, _ = _logits(cfg, ckpt, q_format)
        assert results["nearest_even"]["max_logit_diff"] == pytest.approx((ref - q).abs().max().item(), rel=1e-3)


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


def test_qat_checkpoint_needs_quantized_ckpt_and_tests_in_its_format(runs, tmp_path):
    _, _, out = runs
    qat_cfg, qat_dir, _ = out["FP16_32"]
    fp32_cfg, fp32_dir, _ = out["FP32"]
    ckpt = qat_dir / "last.pt"
    assert_user_error(run_script("test_quantize.py", "-c", fp32_cfg, "--checkpoint", ckpt), str(ckpt),
                      "quantization-aware training (q_format FP16_32)", "add --quantized_ckpt")
    assert_user_error(run_script("test_quantize.py", "-c", fp32_cfg, "--checkpoint", fp32_dir / "last.pt",
                                 "--quantized_ckpt"), "FP32 checkpoint", "drop --quantized_ckpt")
    # with an FP32 config the format comes from the checkpoint
    run_script("test_quantize.py", "-c", fp32_cfg, "--checkpoint", ckpt, "--quantized_ckpt", "--json",
               tmp_path / "q.json", check=True)
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["q_format"] == "FP16_32" and result["quantized_ckpt"]
    q, targets = _logits(qat_cfg, ckpt, "FP16_32")
    assert result["quantized"]["top1"] == pytest.approx(100.0 * (q.argmax(1) == targets).float().mean().item())
    # test.py with the QAT config evaluates in its arithmetic too
    proc = run_script("test.py", "-c", qat_cfg, "--checkpoint", ckpt, "--json", tmp_path / "t.json", check=True)
    assert "evaluating in FP16_32 arithmetic" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["top1"] == pytest.approx(result["quantized"]["top1"])


def test_deit_checkpoint_quantizes_by_its_class_head(tmp_path, data_cfg):
    """A DeiT checkpoint (model + distillation entries) tests like a ViT: its class head."""
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"epochs": 1})
    run_dir = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    ckpt = ckpt_io.load(run_dir / "last.pt")
    ckpt["distillation"] = {"dist_token": torch.randn(1, 1, 32), "head_dist.weight": torch.randn(3, 32),
                            "head_dist.bias": torch.randn(3)}
    deit = tmp_path / "deit.pt"
    save_atomic(ckpt, deit)
    plain, deit_out = tmp_path / "plain.json", tmp_path / "deit.json"
    run_script("test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", plain, check=True)
    proc = run_script("test_quantize.py", "-c", cfg, "--checkpoint", deit, "--json", deit_out, check=True)
    assert "DeiT: class head" in proc.stdout
    assert json.loads(plain.read_text()) == json.loads(deit_out.read_text())


def test_unknown_formats_are_one_line_errors(runs, tmp_path):
    _, data_cfg, out = runs
    cfg, run_dir, _ = out["FP32"]
    line = assert_user_error(run_script("test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "last.pt",
                                        "--q_format", "FP8"), "--q_format 'FP8'")
    assert "FP32, FP16_16, FP16_32, TF32, BF16_32, PyTorchINT8" in line
    assert_user_error(run_script("test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "last.pt",
                                 "--q_rounding", "stochastic"), "--q_rounding 'stochastic'", "nearest_even, qtorch")
    bad = train_config(tmp_path / "bad.json", data_cfg, tmp_path / "out", vit={"q_format": "FP16"})
    line = assert_user_error(run_script("train.py", "-c", bad), str(bad), "q_format", "did you mean")
    assert "FP16_16" in line and "BF16_32" in line


# The deploy layout's names in our modules' (the README's table, "Checkpoint contents"), written out here
# again so that the reference below reads a checkpoint without the package.
_DEPLOY_TO_OURS = [
    (r"pos_embedding", "pos_embed"), (r"cls_token", "cls_token"),
    (r"patch_to_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"mlp_head\.0\.(weight|bias)", r"norm.\1"), (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
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
    args = SimpleNamespace(patch_size=vit["patch_size"], depth=vit["depth"], heads=vit["heads"],
                           layer_norm_eps=vit.get("layer_norm_eps", 1e-5))
    reference = Int8Reference({_ours(k): v for k, v in weights.items()}, args, per_channel)
    val, _ = reference_images(cfg_path, "val")
    reference.calibrate(val[i:i + batch] for i in range(0, min(len(val), calib_steps * batch), batch))
    test, _ = reference_images(cfg_path)
    return reference(test)


def _check_int8_figures(result: dict, fp32: torch.Tensor, quantized: torch.Tensor, targets: torch.Tensor) -> None:
    """test_quantize.py's INT8 figures are those of the reference logits ``quantized``."""
    top1 = 100.0 * (quantized.argmax(1) == targets).float().mean().item()
    assert result["quantized"]["top1"] == pytest.approx(top1)
    tol = 1e-5 * fp32.abs().max().item()
    assert result["max_logit_diff"] == pytest.approx((fp32 - quantized).abs().max().item(), abs=tol)
    assert result["changed_predictions"] == (fp32.argmax(1) != quantized.argmax(1)).sum().item()


def test_int8_post_training_quantization_as_the_earlier_release(runs, tmp_path):
    _, _, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    run_script("test.py", "-c", cfg, "--checkpoint", ckpt, "--json", tmp_path / "t.json", "--output-dir",
               tmp_path / "t", check=True)
    tested = json.loads((tmp_path / "t.json").read_text())
    fp32, targets = _logits(cfg, ckpt, "FP32")
    diffs = set()
    for steps, scheme in ((1, "per_tensor"), (2, "per_tensor"), (2, "per_channel")):
        path = tmp_path / f"{steps}_{scheme}.json"
        flags = ["--per_channel"] if scheme == "per_channel" else []
        proc = run_script("test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--q_format", "PyTorchINT8",
                          "--calib_steps", steps, *flags, "--json", path, check=True)
        result = json.loads(path.read_text())
        assert result["q_format"] == "PyTorchINT8" and result["q_rounding"] is None and not result["quantized_ckpt"]
        assert (result["calib_steps"], result["calib_images"], result["int8_weights"]) == (steps, 4 * steps, scheme)
        assert result["fp32"] == {"top1": tested["top1"], "top5": tested["top5"]} and result["num_images"] == 15
        _check_int8_figures(result, fp32, _int8_reference_logits(cfg, ckpt, steps, scheme == "per_channel"), targets)
        assert 0 < result["max_logit_diff"] < 1
        diffs.add(result["max_logit_diff"])
        for needle in (f"testing in PyTorchINT8 ({scheme.replace('_', '-')} int8 weights",
                       f"calibrating on the first {steps} validation batches ({4 * steps} images", "PyTorchINT8",
                       "predictions unchanged", "largest logit difference"):
            assert needle in proc.stdout
    assert len(diffs) == 3  # the calibration batches and the weight scheme each change the result


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
    fp32, targets = _logits(cfg, ckpt, "FP32")
    _check_int8_figures(result, fp32, _int8_reference_logits(cfg, ckpt, 3), targets)
    proc = run_script("test.py", "-c", cfg, "--checkpoint", ckpt, "--json", tmp_path / "t.json", "--output-dir",
                      tmp_path / "t", check=True)
    assert "evaluating in FP32" in proc.stdout and f"test_quantize.py -c {cfg}" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["top1"] == result["fp32"]["top1"]


def test_int8_flag_errors(runs, tmp_path):
    _, data_cfg, out = runs
    cfg, run_dir, _ = out["FP32"]
    ckpt = run_dir / "last.pt"
    args = ("test_quantize.py", "-c", cfg, "--checkpoint", ckpt)
    assert_user_error(run_script(*args, "--q_format", "PyTorchINT8", "--calib_steps", "0"), "--calib_steps 0",
                      "at least 1")
    # with an FP32 config the format is FP16_32, which has nothing to calibrate: the earlier release's
    # --calib_steps is accepted, and said to be unused, naming the format tested
    proc = run_script(*args, "--calib_steps", "10", "--per_channel", "--json", tmp_path / "fp16.json", check=True)
    assert "--calib_steps and --per_channel unused: testing FP16_32" in proc.stdout
    assert json.loads((tmp_path / "fp16.json").read_text())["q_format"] == "FP16_32"
    assert_user_error(run_script(*args, "--q_format", "PyTorchINT8", "--q_rounding", "qtorch"), "--q_rounding qtorch",
                      "not to PyTorchINT8")
    int8_cfg = train_config(tmp_path / "int8.json", data_cfg, tmp_path / "out", vit={"q_format": "PyTorchINT8"})
    assert_user_error(run_script("test_quantize.py", "-c", int8_cfg, "--checkpoint", ckpt, "--quantized_ckpt"),
                      str(ckpt), "FP32 checkpoint", "drop --quantized_ckpt",
                      "PyTorchINT8 is post-training quantization")


def test_int8_in_two_processes_calibrates_as_one(runs, tmp_path):
    """Both processes calibrate on the same first batches of the whole validation split, so they
    quantize with the same scales, and the figures are one process's."""
    _, data_cfg, out = runs
    _, run_dir, _ = out["FP32"]
    cfg = train_config(tmp_path / "d.json", data_cfg, tmp_path / "out", train=dict(TRAIN, distributed=True),
                       vit={"q_format": "PyTorchINT8"})
    args = ("-c", cfg, "--checkpoint", run_dir / "last.pt", "--calib_steps", 2, "--device", "cpu")
    run_script("test_quantize.py", *args, "--json", tmp_path / "one.json", check=True)
    two = torchrun(*args, "--json", tmp_path / "two.json", script="test_quantize.py")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (b["calib_steps"], b["calib_images"], b["num_images"]) == (2, 8, 15)
    assert b["max_logit_diff"] == pytest.approx(a["max_logit_diff"], rel=1e-5)
    assert {k: v for k, v in a.items() if k != "max_logit_diff"} == {k: v for k, v in b.items() if k != "max_logit_diff"}
    assert two.stdout.count("calibrating on the first 2 validation batches") == 1  # rank 0 alone prints
