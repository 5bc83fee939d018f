"""train_seeds.py: one config over several seeds, each trained and tested as a user runs them, and the mean and
standard deviation of test top-1 against the seeds' checkpoints measured without the package."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import assert_user_error, reference_logits, run_in_process, train_config


@pytest.mark.slow
def test_seeds_are_trained_tested_summarised_and_not_run_again(tmp_path, data_cfg):
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "ignored", train={"epochs": 2})
    out = tmp_path / "seeds"
    args = ("train_seeds.py", "-c", cfg, "--seeds", "3", "11", "--out", out, "--device", "cpu")
    proc = run_in_process(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "seeds.json").read_text())
    top1 = {}
    for seed in (3, 11):
        ckpt = summary["checkpoints"][str(seed)]
        assert ckpt.startswith(str(out / f"seed_{seed}"))
        seed_cfg = out / f"seed_{seed}.json"
        assert json.loads(seed_cfg.read_text())["train_config"]["seed"] == seed
        logits, labels = reference_logits(seed_cfg, ckpt)  # the checkpoint measured without the package
        top1[seed] = 100.0 * (logits.argmax(1) == labels).double().mean().item()
        assert summary["top1"][str(seed)] == pytest.approx(top1[seed])
    assert top1[3] != top1[11]  # (so that the standard deviation below is not 0 by any formula)
    weights = [torch.load(summary["checkpoints"][s], weights_only=True)["model"] for s in ("3", "11")]
    assert not torch.equal(weights[0]["mlp_head.1.weight"], weights[1]["mlp_head.1.weight"])  # two seeds, two runs
    assert summary["top1_mean"] == pytest.approx(statistics.mean(top1.values()))
    assert summary["top1_std"] == pytest.approx(statistics.stdev(top1.values()))
    assert f"test top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f}%" in proc.stdout
    # again: nothing is trained again, the same summary
    runs = sorted(out.glob("seed_*/*"))
    again = run_in_process(*args)
    assert again.returncode == 0 and again.stdout.count("measured before") == 2
    assert sorted(out.glob("seed_*/*")) == runs
    assert json.loads((out / "seeds.json").read_text()) == summary
    # a config that trains something else is trained again
    raw = json.loads(cfg.read_text())
    raw["train_config"]["lr"] = 1e-3
    cfg.write_text(json.dumps(raw))
    changed = run_in_process(*args[:4], "3", *args[6:])
    assert changed.returncode == 0 and "measured before" not in changed.stdout, changed.stdout
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [3]


def test_bad_inputs_are_one_line_errors(tmp_path, data_cfg):
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "ignored")
    assert_user_error(run_in_process("train_seeds.py", "-c", cfg, "--seeds", "1", "1"), "--seeds 1 1", "different")
    assert_user_error(run_in_process("train_seeds.py", "-c", tmp_path / "none.json"), "none.json", "not found")
    (tmp_path / "file").write_text("")
    assert_user_error(run_in_process("train_seeds.py", "-c", cfg, "--out", tmp_path / "file"), "--out", "not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "seeds.json").write_text("{}")  # not a summary of ours
    assert_user_error(run_in_process("train_seeds.py", "-c", cfg, "--out", tmp_path / "out"), "seeds.json")
