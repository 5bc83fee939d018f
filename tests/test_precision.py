"""train_config.precision: bf16 autocast on CPU trains, resumes bit-exactly, and bad combinations are refused."""

from __future__ import annotations

import torch
from conftest import assert_user_error, run_dir_of, run_script, train_config
from conftest import scalars

from myrtle_vision import checkpoint as ckpt_io

RUN = {"epochs": 6, "iters_per_checkpoint": 3}


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path, data_cfg):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = train_config(tmp_path / f"{precision}.json", data_cfg, tmp_path / precision,
                           train=dict(RUN, precision=precision))
        runs[precision] = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    losses = [v for _, v in scalars(runs["bf16"], "train/loss")]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    fp32, bf16 = (ckpt_io.load(runs[p] / "last.pt")["model"] for p in ("fp32", "bf16"))
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast really changed the arithmetic
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the weights stay FP32
    # (that it resumes bit-exactly: tests/test_exact_resume.py)


def test_fp16_without_cuda_and_precision_with_qat_are_refused(tmp_path, data_cfg):
    cfg = train_config(tmp_path / "fp16.json", data_cfg, tmp_path / "out", train={"precision": "fp16"})
    assert_user_error(run_script("train.py", "-c", cfg, "--device", "cpu"), str(cfg), "precision fp16 needs CUDA")
    cfg = train_config(tmp_path / "qat.json", data_cfg, tmp_path / "out", train={"precision": "bf16"},
                       vit={"q_format": "FP16_32"})
    assert_user_error(run_script("train.py", "-c", cfg), str(cfg), "train_config.precision: bf16", "q_format FP16_32")
    cfg = train_config(tmp_path / "bad.json", data_cfg, tmp_path / "out", train={"precision": "half"})
    assert_user_error(run_script("train.py", "-c", cfg), str(cfg), "precision", "fp32, bf16, fp16")


def test_compiled_training_learns_what_eager_training_does(tmp_path, data_cfg):
    runs = {}
    for compiled in (False, True):
        cfg = train_config(tmp_path / f"{compiled}.json", data_cfg, tmp_path / str(compiled),
                           train=dict(RUN, epochs=3, compile=compiled))
        runs[compiled] = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    eager, compiled = (ckpt_io.load(runs[c] / "last.pt")["model"] for c in (False, True))
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert 0 < worst < 1e-3, worst  # really compiled: fused kernels round differently, but train the same
    losses = [v for _, v in scalars(runs[True], "train/loss")]
    assert losses[-1] < losses[0]
