"""The benchmark scripts run end to end and report every measurement. Their speed is never asserted
here (the machines are noisy); the figures live in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, data_config, make_dataset, script_env, train_config

RUN = {"epochs": 1, "local_batch_size": 4, "global_batch_size": 4, "num_workers": 0}


def _run(*args) -> str:
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600, env=script_env()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _ratios(table: str) -> list[float]:
    return [float(x) for x in re.findall(r"\*\*([0-9.]+)x\*\*", table)]


@pytest.mark.slow
def test_vs_timm_measures_ours_and_timm_end_to_end_and_the_loader():
    out = _run(
        "benchmarks/vs_timm.py",
        "--models",
        "tiny",
        "--settings",
        "fp32",
        "bf16",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--images-per-class",
        "2",
        "--e2e-epochs",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--no-write",
    )
    assert re.search(r"Measured matmul rates: fp32 \*\*\d+ GFLOP/s\*\*, bf16 \*\*\d+ GFLOP/s\*\*", out)
    rows = {
        tuple(c.strip() for c in line.split("|")[2:4]): line
        for line in out.splitlines()
        if line.startswith("| ViT-Tiny |") and line.count("|") == 9
    }
    assert set(rows) == {("fp32", "training"), ("fp32", "inference"), ("bf16", "training")}
    # the shares of the matmul rate (of the setting's precision) are percentages of real FLOP counts
    assert all(re.search(r"\| \d+% \| \d+% \|$", row) for row in rows.values())
    # end to end: train.py itself, its logged images/s after the first epoch, beside the model-only rate
    assert re.search(r"^\| ViT-Tiny \| (fp32|bf16) \| [0-9.]+ \| [0-9.]+ \| \*\*[0-9.]+x\*\* \|$", out, re.M)
    assert "median of the images/s logged for its 22 updates after its first epoch" in out  # 90 images, batches of 4
    # the loader alone, with the default workers (this process's CPUs), the transforms in them on the CPU
    workers = len(os.sched_getaffinity(0))
    assert re.search(rf"^\| {workers} \| loader workers \| \d+ \| [0-9.]+ \| \*\*[0-9.]+x\*\* \|$", out, re.M)
    ratios = _ratios(out)
    assert len(ratios) == 3 + 1 + 1 and all(r > 0 for r in ratios)


@pytest.mark.slow
def test_quantized_eval_reports_every_format(tmp_path):
    dataset = make_dataset(tmp_path / "data", ["a", "b"], counts=(4, 2, 6))
    cfg = train_config(
        tmp_path / "t.json",
        data_config(tmp_path / "d.json", dataset, 2),
        tmp_path / "out",
        train=RUN,
        vit={"image_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
    )
    out = _run("benchmarks/quantized_eval.py", "-c", cfg, "--repeats", "1", "--no-write")
    assert "12 images" in out
    for fmt in ("FP32", "FP16_32", "BF16_32", "TF32", "FP16_16"):
        assert re.search(rf"\| model only \| {fmt} \|", out)
    assert re.search(r"\| evaluation \(data \+ model\) \| FP16_32 \| [0-9.]+ \| \d+ \| [0-9.]+x \|", out)


@pytest.mark.slow
def test_einops_layouts_times_both_variants_of_the_same_model():
    out = _run(
        "benchmarks/einops_layouts.py", "--image-size", "32", "--batch-size", "2", "--repeats", "1", "--no-write"
    )
    assert re.search(r"^\| ViT-Tiny \| training step \| [0-9.]+ \| [0-9.]+ \| \*\*[0-9.]+x\*\* \|$", out, re.M)
    assert re.search(r"^\| ViT-Tiny \| inference \| [0-9.]+ \| [0-9.]+ \| \*\*[0-9.]+x\*\* \|$", out, re.M)


@pytest.mark.slow
def test_recipe_ablation_trains_and_tests_each_variant_at_each_seed(tmp_path):
    data = data_config(tmp_path / "d.json", make_dataset(tmp_path / "data", ["a", "b", "c"]), 3)
    base = train_config(tmp_path / "vit.json", data, tmp_path / "out", train=RUN)
    out = _run(
        "benchmarks/recipe_ablation.py",
        "--models",
        "vit",
        "--vit-config",
        base,
        "--seeds",
        "2",
        "--variants",
        "without",
        "no_mixup",
        "--out",
        tmp_path / "runs",
        "--no-write",
    )
    rows = [line for line in out.splitlines() if line.startswith("| vit |")]
    assert [row.split("|")[2].strip() for row in rows[:2]] == ["without", "no_mixup"]
    for variant in ("without", "no_mixup"):  # test.py's figure of each run, as its JSON has it
        top1 = json.loads((tmp_path / "runs" / f"vit_{variant}_2.result.json").read_text())["top1"]
        assert f"| vit | {variant} | {top1:.2f} (seed 2) | {top1:.2f}% |" in out
    # the variant without mixup has the rest of the recipe; "without" has none of it
    recipe = json.loads((tmp_path / "runs" / "vit_no_mixup_2.json").read_text())
    assert recipe["train_config"]["mixup"] == 0 and recipe["train_config"]["cutmix"] > 0
    assert recipe["vit_config"]["drop_path"] > 0 and recipe["train_config"]["seed"] == 2
    plain = json.loads((tmp_path / "runs" / "vit_without_2.json").read_text())
    assert "cutmix" not in plain["train_config"] and plain["train_config"]["seed"] == 2
    # in pieces: --resume reuses a run measured on the same config, and runs one whose config changed
    runs = lambda: sorted(p.name for p in (tmp_path / "runs").glob("*/*"))  # noqa: E731
    before = runs()
    assert len(before) == 2
    measured = tmp_path / "runs" / "vit_no_mixup_2.measured.json"
    stale = json.loads(measured.read_text())
    stale["config"]["train_config"]["cutmix"] = 0.5  # as if measured with another recipe
    measured.write_text(json.dumps(stale))
    again = _run(
        "benchmarks/recipe_ablation.py",
        "--models",
        "vit",
        "--vit-config",
        base,
        "--seeds",
        "2",
        "--variants",
        "without",
        "no_mixup",
        "--out",
        tmp_path / "runs",
        "--no-write",
        "--resume",
    )
    assert "vit_without_2: measured before" in again and "vit_no_mixup_2: measured before" not in again
    after = runs()
    assert len(after) == 3 and set(before) < set(after)
    top1 = json.loads((tmp_path / "runs" / "vit_without_2.result.json").read_text())["top1"]
    assert f"| vit | without | {top1:.2f} (seed 2) | {top1:.2f}% |" in again
    # --report runs nothing: the rows list the seeds measured so far
    report = _run(
        "benchmarks/recipe_ablation.py",
        "--models",
        "vit",
        "--vit-config",
        base,
        "--seeds",
        "2",
        "3",
        "--variants",
        "without",
        "with",
        "--out",
        tmp_path / "runs",
        "--no-write",
        "--report",
    )
    assert runs() == after and f"| vit | without | {top1:.2f} (seed 2) | {top1:.2f}% |" in report
    assert "| vit | with |" not in report


def test_recipe_ablation_s_without_turns_off_what_the_base_config_switches_on(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from recipe_ablation import RECIPE_TRAIN, variant_config

    base = tmp_path / "vit.json"
    base.write_text(json.dumps({"train_config": {"epochs": 2, **RECIPE_TRAIN}, "vit_config": {"drop_path": 0.1}}))
    cfg = json.loads(variant_config(base, "vit", "without", 4, tmp_path).read_text())
    tc = cfg["train_config"]
    assert (tc["mixup"], tc["cutmix"], tc["random_erasing"], tc["repeated_augmentation"], tc["ema_decay"]) == (
        0,
        0,
        0,
        1,
        None,
    )
    assert cfg["vit_config"]["drop_path"] == 0 and tc["epochs"] == 2 and tc["seed"] == 4


def test_recipe_ablation_reuses_a_run_whose_config_means_the_same(tmp_path):
    """A base config that spells out a switch's off value (the demo configs once they carry the recipe) makes
    the same "without" run as one that leaves it out, so --resume and --report still find that run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from recipe_ablation import measured_before, variant_config

    data = data_config(tmp_path / "d.json", make_dataset(tmp_path / "data", ["a", "b"], counts=(2, 1, 1)), 2)
    plain = train_config(tmp_path / "plain.json", data, tmp_path / "out")
    (tmp_path / "runs").mkdir()
    cfg = variant_config(plain, "vit", "without", 1, tmp_path / "runs")
    measured = cfg.with_suffix(".measured.json")
    measured.write_text(json.dumps({"top1": 50.0, "config": json.loads(cfg.read_text())}))
    spelled = train_config(
        tmp_path / "spelled.json",
        data,
        tmp_path / "out",
        train={
            "mixup": 0.8,
            "cutmix": 1.0,
            "random_erasing": 0.25,
            "ema_decay": 0.995,
            "epochs_per_val": 5,
        },  # validating less often trains the same weights
        vit={"drop_path": 0.1},
    )
    again = variant_config(spelled, "vit", "without", 1, tmp_path / "runs")
    assert again == cfg and json.loads(again.read_text()) != json.loads(measured.read_text())["config"]
    assert measured_before(again)["top1"] == 50.0
    changed = json.loads(again.read_text())
    changed["train_config"]["label_smoothing"] = 0.2  # another run
    again.write_text(json.dumps(changed))
    assert measured_before(again) is None
