"""torchrun with Gloo on CPU: two processes train what one does, count each sample once, and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CLASSES,
    REPO,
    data_config,
    make_dataset,
    near_tie_checkpoint,
    run_dir_of,
    run_script,
    scalars,
    script_env,
    train_config,
)

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.data import eval_loader, open_split
from myrtle_vision.evaluation import evaluate
from myrtle_vision.models import build_model
from myrtle_vision.weights.deploy import load_model_weights

# 24 training images, 8 per update: 3 updates per epoch. 15 validation images: 8 and 7 per process.
RUN = {
    "epochs": 3,
    "local_batch_size": 4,
    "global_batch_size": 8,
    "iters_per_checkpoint": 2,
    "iters_per_val": 4,
    "keep_checkpoints": None,
    "distributed": True,
    "num_workers": 1,
}


def torchrun(
    *args, script: str = "train.py", nproc: int = 2, timeout: float = 600, env: dict | None = None, launcher: tuple = ()
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc [launcher...] script args...``"""
    env = script_env(OMP_NUM_THREADS="1", **(env or {}))  # Gloo on the CPU, on any machine
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *map(str, launcher),
            str(REPO / script),
            *map(str, args),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    dataset = make_dataset(tmp / "data", CLASSES, counts=(8, 5, 5))
    data_cfg = data_config(tmp / "data.json", dataset, len(CLASSES))
    one_cfg = train_config(tmp / "one.json", data_cfg, tmp / "one", train=RUN)
    one = run_script("train.py", "-c", one_cfg, check=True)
    two_cfg = train_config(tmp / "two.json", data_cfg, tmp / "two", train=RUN)
    two = torchrun("-c", two_cfg)
    assert two.returncode == 0, two.stdout + two.stderr
    return tmp, data_cfg, (one_cfg, run_dir_of(one)), (two_cfg, run_dir_of(two), two)


def _assert_close(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.mark.slow
def test_two_processes_with_half_the_batch_each_train_what_one_process_does(runs):
    _, _, (_, one_dir), (_, two_dir, _) = runs
    one, two = ckpt_io.load(one_dir / "last.pt"), ckpt_io.load(two_dir / "last.pt")
    assert one["iteration"] == two["iteration"] == 9
    _assert_close(one["model"], two["model"])
    assert not all(torch.equal(one["model"][k], two["model"][k]) for k in one["model"])  # really two computations
    # the logged training loss is the mean over all 8 images of each update, in both
    for (s1, l1), (s2, l2) in zip(scalars(one_dir, "train/loss"), scalars(two_dir, "train/loss")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


@pytest.mark.slow
def test_validation_counts_every_image_once(runs):
    _, _, _, (cfg_path, run_dir, _) = runs
    cfg = load_config(cfg_path)
    model = build_model(cfg)
    load_model_weights(model, ckpt_io.load(run_dir / "last.pt"), run_dir / "last.pt")
    val = open_split(cfg.data_config, "val")
    assert len(val) == 15
    acc = evaluate(model, eval_loader(val, 4, 0), len(CLASSES))  # one process, every image
    step, top1 = scalars(run_dir, "val/top1")[-1]
    _, loss = scalars(run_dir, "val/loss")[-1]
    assert step == 9 and top1 == pytest.approx(acc.top1) and loss == pytest.approx(acc.loss, rel=1e-5)
    # 15 images: a top-1 that is not a multiple of 1/15 would mean an image counted twice or dropped
    assert round(top1 * 15 / 100, 4) == round(top1 * 15 / 100)


def test_rank_zero_alone_writes(runs):
    tmp, _, _, (_, run_dir, proc) = runs
    assert [p.name for p in (tmp / "two").iterdir()] == [run_dir.name]  # one run directory, not one per process
    assert sorted(p.name for p in run_dir.glob("checkpoint_*.pt")) == [
        f"checkpoint_{i:07d}.pt" for i in (2, 4, 6, 8, 9)
    ]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("val loss") == 3 + 2
    assert "training on cpu in 2 processes" in proc.stdout


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    _, data_cfg, _, (_, two_dir, _) = runs
    mid = two_dir / "checkpoint_0000004.pt"
    copy = tmp_path / "mid"  # resume outside the run's folder, which must stay as it is for the other tests
    copy.mkdir()
    (copy / "mid.pt").write_bytes(mid.read_bytes())
    cfg = train_config(
        tmp_path / "resume.json", data_cfg, tmp_path / "out", train=dict(RUN, checkpoint_path=str(copy / "mid.pt"))
    )
    proc = run_script("train.py", "-c", cfg, check=True)
    assert "resuming from" in proc.stdout
    _assert_close(ckpt_io.load(run_dir_of(proc) / "last.pt")["model"], ckpt_io.load(two_dir / "last.pt")["model"])


@pytest.mark.slow
def test_torchrun_with_distributed_false_is_refused(runs, tmp_path):
    _, data_cfg, _, _ = runs
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train=dict(RUN, distributed=False))
    proc = torchrun("-c", cfg)
    assert proc.returncode != 0
    assert f"error: {cfg}: train_config.distributed is false, but torchrun started 2 processes" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_deit_trains_in_two_processes_as_in_one(runs, tmp_path):
    """The DeiT student (both heads through DistributedDataParallel) with a teacher in each process."""
    import torchvision

    _, data_cfg, _, _ = runs
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=len(CLASSES)).state_dict(), teacher)
    deit = {
        "distiller_config": {
            "teacher_model": "mobilenet_v3_small",
            "teacher_weights_path": str(teacher),
            "distillation_type": "hard",
            "alpha": 0.5,
        }
    }
    train = dict(RUN, epochs=1)
    one = run_script(
        "train.py",
        "-c",
        train_config(tmp_path / "one.json", data_cfg, tmp_path / "one", train=train, **deit),
        check=True,
    )
    proc = torchrun("-c", train_config(tmp_path / "two.json", data_cfg, tmp_path / "two", train=train, **deit))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = ckpt_io.load(run_dir_of(one) / "last.pt"), ckpt_io.load(run_dir_of(proc) / "last.pt")
    _assert_close(a["model"], b["model"])
    _assert_close(a["distillation"], b["distillation"])


@pytest.mark.slow
def test_test_py_in_two_processes_counts_every_test_image_once(runs, tmp_path):
    _, _, _, (cfg, run_dir, _) = runs
    ckpt = run_dir / "checkpoint_0000004.pt"
    args = ("-c", cfg, "--checkpoint", ckpt)
    one = run_script("test.py", *args, "--json", tmp_path / "one.json", "--output-dir", tmp_path / "one", check=True)
    two = torchrun(*args, "--json", tmp_path / "two.json", "--output-dir", tmp_path / "two", script="test.py")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_images"] == b["num_images"] == 15  # split 8 and 7 between the processes
    assert a == b  # sums of counts: exactly equal, per class too
    assert two.stdout.count("confusion matrix:") == 1 and (tmp_path / "two" / "confusion_matrix.png").is_file()
    assert two.stdout.count("top-1") == one.stdout.count("top-1")  # rank 0 alone prints


@pytest.mark.slow
def test_predict_py_in_two_processes_writes_what_one_does(runs, tmp_path):
    import csv

    _, data_cfg, _, (cfg, run_dir, _) = runs
    folder = tmp_path / "images"
    shutil.copytree(Path(json.loads(data_cfg.read_text())["dataset_path"]) / "images", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    args = ("-c", cfg, "--checkpoint", run_dir / "last.pt", folder, "--q_format", "FP16_32", "--batch-size", "4")
    run_script("predict.py", *args, "--output", tmp_path / "one.csv", check=True)
    two = torchrun(*args, "--output", tmp_path / "two.csv", script="predict.py")
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("images predicted") == 1  # rank 0 alone writes and says so
    one, both = ([row for row in csv.DictReader(open(tmp_path / f"{n}.csv", newline=""))] for n in ("one", "two"))
    assert len(one) == len(both) == len(list(folder.rglob("*.png"))) and [r["path"] for r in one] == [
        r["path"] for r in both
    ]
    for r, s in zip(one, both):
        assert (r["top1"], r["FP16_32_top1"], r["error"]) == (s["top1"], s["FP16_32_top1"], s["error"])
        if not r["error"]:
            assert float(r["prob1"]) == pytest.approx(float(s["prob1"]), abs=2e-6)
    assert sum(bool(r["error"]) for r in both) == 1


@pytest.mark.slow
def test_test_quantize_py_in_two_processes_counts_every_test_image_once(runs, tmp_path):
    _, _, _, (cfg, run_dir, _) = runs
    # logits near ties, so that FP16 changes predictions in both processes' shares
    ckpt = near_tie_checkpoint(run_dir / "checkpoint_0000004.pt", tmp_path / "near_tie.pt")
    args = ("-c", cfg, "--checkpoint", ckpt, "--q_format", "FP16_16")
    run_script("test_quantize.py", *args, "--json", tmp_path / "one.json", "--output-dir", tmp_path / "one", check=True)
    two = torchrun(*args, "--json", tmp_path / "two.json", "--output-dir", tmp_path / "two", script="test_quantize.py")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_images"] == b["num_images"] == 15
    assert a["changed_predictions"] == b["changed_predictions"] >= 2
    # the same images listed, in split order, from both shares (images 0, 2, ... on one process, 1, 3, ... on the other)
    one, both = (json.loads((tmp_path / n / "changed_predictions.json").read_text()) for n in ("one", "two"))
    assert [r["path"] for r in one] == [r["path"] for r in both] and len(one) == a["changed_predictions"]
    data = json.loads(Path(json.loads(cfg.read_text())["data_config_path"]).read_text())
    root = Path(data["dataset_path"])
    order = [str((root / line).resolve()) for line in (root / data["test_files"]).read_text().split()]
    assert {order.index(r["path"]) % 2 for r in both} == {0, 1}  # some from each process's share
    for r, s in zip(one, both):
        assert r["fp32_margin"] == pytest.approx(s["fp32_margin"], abs=1e-4)
    assert (a["fp32"], a["quantized"]) == (b["fp32"], b["quantized"])
    # the largest difference is taken over both processes' shares (batches differ, so the logits may by an ulp)
    assert b["max_logit_diff"] == pytest.approx(a["max_logit_diff"], rel=1e-3) and a["max_logit_diff"] > 0
    assert two.stdout.count("predictions unchanged") == 1


@pytest.mark.slow
def test_a_checkpoint_write_failing_on_rank_zero_stops_every_process(runs, tmp_path):
    """Rank 0 alone writes; when it cannot, every process stops on its own, with the one line and exit status 3.

    torchrun looks at its processes only every 5 seconds here, and stops the others once one has failed:
    a process left waiting for rank 0 would be stopped by torchrun (no line, killed by a signal) rather
    than stop by itself. Each process's stderr goes to its own file, so each must hold the line."""
    from test_faults import INJECT

    _, data_cfg, _, _ = runs
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train=RUN)
    logs = tmp_path / "logs"
    proc = torchrun(
        "-c",
        cfg,
        timeout=300,
        env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "FAIL_SAVE_FROM": "1", "FAIL_KIND": "full"},
        launcher=("--monitor-interval", 5, "--redirects", 3, "--log-dir", logs),
    )
    assert proc.returncode != 0
    stderr_of = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    assert sorted(stderr_of) == [0, 1], proc.stderr
    for rank, err in stderr_of.items():
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (rank, err)
        assert re.fullmatch(
            r"error: \S+/checkpoint_0000002\.pt: cannot write the checkpoint \(No space left on "
            r"device\); the previous checkpoints are intact",
            lines[0],
        ), (rank, lines[0])
    # torchrun's report: both processes exited with status 3 (none was stopped by a signal)
    report = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert sorted(report) == [("0", "3"), ("1", "3")], proc.stderr


# --- train.py starts the processes itself, as the earlier release did -------------------------------------


def _cfg(distributed: bool):
    from types import SimpleNamespace

    return SimpleNamespace(path="c.json", train_config=SimpleNamespace(distributed=distributed))


def test_how_many_processes_train_py_starts(monkeypatch):
    from myrtle_vision.distributed import processes_to_start
    from myrtle_vision.errors import UserError

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert processes_to_start(_cfg(True), cuda, gpu_count=4) == 4  # every visible GPU, one process each
    assert processes_to_start(_cfg(True), cuda, gpu_count=1) == 1
    assert processes_to_start(_cfg(False), cuda, gpu_count=4) == 1  # as the earlier release: one GPU
    assert processes_to_start(_cfg(True), cpu, gpu_count=4) == 1  # the CPU counts as one device
    assert processes_to_start(_cfg(True), cuda, requested=2, gpu_count=4) == 2
    assert processes_to_start(_cfg(True), cpu, requested=3, gpu_count=0) == 3  # Gloo on CPU, on request
    for kwargs, message in (
        ({"requested": 5, "gpu_count": 4}, "this machine has 4 GPU"),
        ({"requested": 0, "gpu_count": 4}, "must be at least 1"),
    ):
        with pytest.raises(UserError, match=message):
            processes_to_start(_cfg(True), cuda, **kwargs)
    with pytest.raises(UserError, match="c.json: train_config.distributed is false; set it to true"):
        processes_to_start(_cfg(False), cpu, requested=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by torchrun: each process just trains
    assert processes_to_start(_cfg(True), cuda, gpu_count=4) == 1
    with pytest.raises(UserError, match="torchrun already started the processes"):
        processes_to_start(_cfg(True), cpu, requested=2)


@pytest.mark.slow
def test_train_py_starts_its_processes_as_torchrun_does(runs):
    """``train.py --nproc_per_node 2`` (on GPUs: one per visible GPU by default) goes through PyTorch's launcher
    and trains exactly what ``torchrun --standalone --nproc_per_node=2`` trains."""
    _, _, _, (two_cfg, two_dir, _) = runs
    proc = run_script(
        "train.py", "-c", two_cfg, "--device", "cpu", "--nproc_per_node", "2", env={"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "starting 2 processes on cpu with PyTorch's launcher (as torchrun --standalone --nproc_per_node=2)"
        in proc.stdout
    )
    assert "training on cpu in 2 processes" in proc.stdout
    mine, theirs = ckpt_io.load(run_dir_of(proc) / "last.pt"), ckpt_io.load(two_dir / "last.pt")
    assert mine["iteration"] == theirs["iteration"] == 9
    for k in theirs["model"]:
        assert torch.equal(mine["model"][k], theirs["model"][k]), k


@pytest.mark.slow
def test_a_user_error_in_the_started_processes_is_their_exit_status(runs, tmp_path):
    _, data_cfg, _, _ = runs
    cfg = train_config(
        tmp_path / "t.json", data_cfg, tmp_path / "out", train=dict(RUN, checkpoint_path=str(tmp_path / "gone.pt"))
    )
    proc = run_script("train.py", "-c", cfg, "--device", "cpu", "--nproc_per_node", "2", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert f"error: {cfg}: train_config.checkpoint_path: {tmp_path / 'gone.pt'}: checkpoint not found" in proc.stderr


@pytest.mark.slow
def test_the_per_layer_report_in_two_processes_is_what_one_process_measures(runs, tmp_path):
    """Each process measures its share of the images; the counts, histograms and sums are added up."""
    _, _, _, (cfg, run_dir, _) = runs
    ckpt = near_tie_checkpoint(run_dir / "checkpoint_0000004.pt", tmp_path / "near_tie.pt")
    args = ("-c", cfg, "--checkpoint", ckpt, "--q_format", "FP16_16", "--per-layer", "--per-layer-images", "11")
    run_script("test_quantize.py", *args, "--json", tmp_path / "one.json", "--output-dir", tmp_path / "one", check=True)
    two = torchrun(*args, "--json", tmp_path / "two.json", "--output-dir", tmp_path / "two", script="test_quantize.py")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_images"] == b["num_images"] == 11  # 6 on one process, 5 on the other
    assert a["all_rounded_changed"] == b["all_rounded_changed"] and a["fp32_top1"] == b["fp32_top1"]
    exact = ("point", "values", "overflow", "subnormal", "to_zero", "alone_changed", "all_but_changed", "p99_9_abs")
    for x, y in zip(a["layers"], b["layers"], strict=True):
        assert {k: x[k] for k in exact} == {k: y[k] for k in exact}
        for k in ("max_abs", "min_nonzero_abs", "rel_error_all", "alone_kl", "all_but_kl"):
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-12), (x["point"], k)
    assert two.stdout.count("the most sensitive is") == 1
