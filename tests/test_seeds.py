"""train_seeds.py: one config over several seeds, each trained and tested as a user runs them, and the mean and
standard deviation of test top-1 against the seeds' checkpoints measured without the package."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import (
    CLASSES,
    assert_user_error,
    data_config,
    make_dataset,
    reference_logits,
    run_in_process,
    train_config,
)

from myrtle_vision.seeds import mean_std


@pytest.mark.slow
def test_seeds_are_trained_tested_summarised_and_not_run_again(tmp_path):
    dataset = make_dataset(tmp_path / "data", CLASSES)  # its own: the test changes a split file
    data_cfg = data_config(tmp_path / "data.json", dataset, len(CLASSES))
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "ignored",
        train={"epochs": 1, "lr": 2e-4, "min_lr": 1e-5, "warmup_lr": 1e-5},
    )
    out = tmp_path / "seeds"
    args = ("train_seeds.py", "-c", cfg, "--out", out, "--device", "cpu", "--seeds")
    proc = run_in_process(*args, "3", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "seeds.json").read_text())
    top1 = {}
    for seed in (3, 4):
        ckpt = summary["checkpoints"][str(seed)]
        assert ckpt.startswith(str(out / f"seed_{seed}"))
        seed_cfg = out / f"seed_{seed}.json"
        assert json.loads(seed_cfg.read_text())["train_config"]["seed"] == seed
        logits, labels = reference_logits(seed_cfg, ckpt)  # the checkpoint measured without the package
        top1[seed] = 100.0 * (logits.argmax(1) == labels).double().mean().item()
        assert summary["top1"][str(seed)] == pytest.approx(top1[seed])
    weights = [torch.load(summary["checkpoints"][s], weights_only=True)["model"] for s in ("3", "4")]
    assert not torch.equal(weights[0]["mlp_head.1.weight"], weights[1]["mlp_head.1.weight"])  # two seeds, two runs
    assert summary["top1_mean"] == pytest.approx(statistics.mean(top1.values()))
    assert summary["top1_std"] == pytest.approx(statistics.stdev(top1.values()))
    assert f"test top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f}%" in proc.stdout
    # again: nothing is trained again, the same summary
    runs = sorted(out.glob("seed_*/*"))
    again = run_in_process(*args, "3", "4")
    assert again.returncode == 0 and again.stdout.count("measured before") == 2
    assert sorted(out.glob("seed_*/*")) == runs
    assert json.loads((out / "seeds.json").read_text()) == summary
    # test-time augmentation: the runs are tested again, not trained again
    tta = run_in_process(*args, "3", "4", "--tta", "flip")
    assert tta.returncode == 0 and tta.stdout.count("trained before") == 2, tta.stdout
    assert sorted(out.glob("seed_*/*")) == runs
    assert json.loads((out / "seed_3.test.json").read_text())["views"] == 2
    args = (*args[:-1], "--tta", "flip", "--seeds")  # (from here on, tested with the flip too)
    # another split (a protocol that redraws it for each run): seed 4 is trained again on it
    split = dataset / "test_imagepaths.txt"
    split.write_text("\n".join(split.read_text().split()[:-2]) + "\n")
    redrawn = run_in_process(*args, "4")
    assert redrawn.returncode == 0 and "measured before" not in redrawn.stdout
    # --report summarises each seed on the split it was measured on, and trains nothing
    runs = sorted(out.glob("seed_*/*"))
    report = run_in_process(*args, "3", "4", "--report")
    assert report.returncode == 0 and report.stdout.count("measured before") == 2, report.stdout
    assert sorted(out.glob("seed_*/*")) == runs
    both = json.loads((out / "seeds.json").read_text())
    assert both["top1"]["3"] == summary["top1"]["3"] and both["splits"]["3"] != both["splits"]["4"]
    # a config that trains something else was not measured
    raw = json.loads(cfg.read_text())
    raw["train_config"]["lr"] = 1e-3
    cfg.write_text(json.dumps(raw))
    assert_user_error(run_in_process(*args, "3", "--report"), "--report: seed 3 has not been measured")


def test_the_spread_is_the_sample_standard_deviation():
    """n - 1 in the denominator, as papers report the spread of five runs; one run has none."""
    values = [81.0, 82.5, 80.25, 83.0, 81.75]
    mean = sum(values) / 5
    assert mean_std(values) == pytest.approx((mean, math.sqrt(sum((v - mean) ** 2 for v in values) / 4)))
    assert mean_std([80.0]) == (80.0, 0.0)


def test_bad_inputs_are_one_line_errors(tmp_path, data_cfg):
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "ignored")
    assert_user_error(run_in_process("train_seeds.py", "-c", cfg, "--seeds", "1", "1"), "--seeds 1 1", "different")
    assert_user_error(run_in_process("train_seeds.py", "-c", tmp_path / "none.json"), "none.json", "not found")
    (tmp_path / "file").write_text("")
    assert_user_error(run_in_process("train_seeds.py", "-c", cfg, "--out", tmp_path / "file"), "--out", "not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "seeds.json").write_text("{}")  # not a summary of ours
    assert_user_error(run_in_process("train_seeds.py", "-c", cfg, "--out", tmp_path / "out"), "seeds.json")
