"""train.py end to end on a small generated dataset: learning, checkpoints and their rotation, gradient
accumulation, validation, and train_config.precision (bf16 autocast on CPU, torch.compile, refused combinations).
(Resuming, bit-exactly: tests/test_exact_resume.py.)"""

import json
import time

import pytest
import torch
from conftest import assert_user_error, run_dir_of, run_in_process, run_script, scalars, train_config

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.checkpoint import load
from myrtle_vision.weights import deploy


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """One ordinary run: 10 epochs of 3 updates; checkpoints every 2 updates, validation every 4."""
    from conftest import data_config

    tmp = tmp_path_factory.mktemp("trained")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(
        tmp / "train.json",
        data_cfg,
        tmp / "out",
        train={"epochs": 10, "iters_per_checkpoint": 2, "iters_per_val": 4, "keep_checkpoints": 3},
    )
    proc = run_script("train.py", "-c", cfg, "--device", "cpu", check=True)
    return proc, run_dir_of(proc), cfg


@pytest.mark.slow
def test_training_learns(trained):
    proc, run_dir, _ = trained
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert len(losses) == 10 * 3
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    top1 = [v for _, v in scalars(run_dir, "val/top1")]
    assert top1[-1] == 100.0, top1  # the classes are easy; a working trainer separates them


@pytest.mark.slow
def test_tensorboard_scalars_and_lr_schedule(trained):
    _, run_dir, _ = trained
    lrs = scalars(run_dir, "train/lr")
    assert [s for s, _ in lrs] == list(range(1, 31))
    values = [v for _, v in lrs]
    # warmup_lr 1e-4 -> lr 3e-3 over the first epoch (3 updates), then cosine down to min_lr 1e-4
    assert values[0] == pytest.approx(1e-4) and values[3] == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(values[3:], values[4:])) and values[-1] > 1e-4
    for tag in ("train/images_per_sec", "val/loss", "val/top5"):
        assert scalars(run_dir, tag)
    # validation every 4 updates and at every epoch end (3, 6, 9 ...), never twice for one update
    expected = sorted(set(range(4, 31, 4)) | set(range(3, 31, 3)))
    assert [s for s, _ in scalars(run_dir, "val/top1")] == expected


def test_checkpoints_hold_everything_and_rotate(trained):
    _, run_dir, cfg_path = trained
    names = sorted(p.name for p in run_dir.glob("*.pt"))
    # every 2 updates and at the end (30); only the 3 newest periodic ones are kept
    assert names == ["best.pt", "checkpoint_0000026.pt", "checkpoint_0000028.pt", "checkpoint_0000030.pt", "last.pt"]
    last = load(run_dir / "last.pt")
    assert {"model", "optimizer", "lr_scheduler", "iteration", "epoch", "config", "best_val_top1"} <= set(last)
    assert "rng" not in last  # resuming needs no random state (test_exact_resume.py)
    assert last["iteration"] == 30 and last["epoch"] == 10 and last["best_val_top1"] == 100.0
    assert next(iter(last["model"])) == "pos_embedding" and "transformer.layers.1.1.fn.fn.net.3.weight" in last["model"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved == last["config"]
    assert saved["train_config"]["lr"] == 3e-3 and saved["data_config"]["number_of_classes"] == 3
    assert saved["train_config"]["label_smoothing"] == 0.0  # defaults are filled in
    best = load(run_dir / "best.pt")
    assert best["best_val_top1"] == 100.0 and best["iteration"] <= 30
    assert not list(run_dir.glob(".*tmp*"))  # no temporary files left behind


def _final_weights(run_dir):
    return load(run_dir / "last.pt")["model"]


def _assert_same_weights(a, b):
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path, data_cfg):
    """global 12 as 6 micro-batches of 2 gives the weights of one batch of 12 (dropout off)."""
    runs = {}
    for local in (2, 12):
        cfg = train_config(
            tmp_path / f"t{local}.json",
            data_cfg,
            tmp_path / f"out{local}",
            train={"epochs": 2, "local_batch_size": local, "global_batch_size": 12},
        )
        runs[local] = _final_weights(run_dir_of(run_script("train.py", "-c", cfg, check=True)))
    for k in runs[2]:
        torch.testing.assert_close(runs[2][k], runs[12][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sgd_step_scheduler_and_no_drop_last_take_effect(tmp_path, data_cfg):
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "out",
        train={
            "optimizer": "sgd",
            "momentum": 0.8,
            "scheduler": "step",
            "decay_epochs": 1,
            "decay_rate": 0.5,
            "warmup_epochs": 0,
            "epochs": 3,
            "global_batch_size": 16,
            "local_batch_size": 8,
            "drop_last_batch": False,
            "min_lr": 0.0,
        },
    )
    run_dir = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    last = load(run_dir / "last.pt")
    group = last["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.8 and "betas" not in group
    assert last["iteration"] == 6  # 24 images in updates of 16: 2 per epoch when the last is kept
    lrs = [v for _, v in scalars(run_dir, "train/lr")]
    assert lrs == pytest.approx([3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4, 7.5e-4])


def test_deploy_entry_loads_into_a_fresh_model(trained):
    from myrtle_vision.config import load_config
    from myrtle_vision.models import build_model

    _, run_dir, cfg = trained
    ckpt = load(run_dir / "last.pt")
    model = build_model(load_config(cfg))
    model.load_state_dict(deploy.from_deploy(ckpt["model"]))
    _assert_same_weights(deploy.to_deploy(model.state_dict()), ckpt["model"])


@pytest.mark.slow
def test_corrupt_image_during_training_names_the_file(tmp_path):
    from conftest import CLASSES, data_config, make_dataset

    ds = make_dataset(tmp_path / "ds", CLASSES)
    victim = ds / "images" / "dog" / "dog_003.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data_cfg = data_config(tmp_path / "data.json", ds, 3)
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"num_workers": 2})
    assert_user_error(run_script("train.py", "-c", cfg), str(victim), "cannot read image")


@pytest.mark.slow
def test_cuda_request_without_cuda_is_a_user_error(tmp_path, data_cfg):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out")
    assert_user_error(run_script("train.py", "-c", cfg, "--device", "cuda"), "--device cuda")


@pytest.mark.slow
def test_runs_never_overwrite_each_other(tmp_path, data_cfg):
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"epochs": 1})
    first = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    time.sleep(0.01)
    second = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    assert first != second and (first / "last.pt").exists() and (second / "last.pt").exists()


@pytest.mark.slow
def test_an_error_mid_run_keeps_the_last_completed_update(tmp_path):
    from conftest import CLASSES, data_config, make_dataset

    from myrtle_vision.data import TrainPlan

    ds = make_dataset(tmp_path / "ds", CLASSES)
    listed = (ds / "train_imagepaths.txt").read_text().split()
    # the default test run: 24 images, updates of 8 in micro-batches of 4, seed 7; spoil an image of update 2
    victim = (
        ds / listed[TrainPlan(24, global_batch=8, local_batch=4, seed=7, drop_last=True).micro_batches(0, 1)[0][0][0]]
    )
    victim.write_bytes(b"not an image at all")
    # decoded as it is read (no cache, which would find the image at start): the error comes mid-run
    cfg = train_config(
        tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3, decode_cache=False), tmp_path / "out"
    )
    proc = run_script("train.py", "-c", cfg)
    assert_user_error(proc, str(victim), "cannot read image")
    assert "stopped by an error; iteration 1 saved to" in proc.stdout
    assert load(run_dir_of(proc) / "last.pt")["iteration"] == 1


# train_config.precision

RUN = {"epochs": 6, "iters_per_checkpoint": 3}


@pytest.mark.slow
def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path, data_cfg):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = train_config(
            tmp_path / f"{precision}.json", data_cfg, tmp_path / precision, train=dict(RUN, precision=precision)
        )
        runs[precision] = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    losses = [v for _, v in scalars(runs["bf16"], "train/loss")]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    fp32, bf16 = (ckpt_io.load(runs[p] / "last.pt")["model"] for p in ("fp32", "bf16"))
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast really changed the arithmetic
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the weights stay FP32
    # (that it resumes bit-exactly: tests/test_exact_resume.py)


@pytest.mark.slow
def test_fp16_without_cuda_and_precision_with_qat_are_refused(tmp_path, data_cfg):
    cfg = train_config(tmp_path / "fp16.json", data_cfg, tmp_path / "out", train={"precision": "fp16"})
    assert_user_error(run_in_process("train.py", "-c", cfg, "--device", "cpu"), str(cfg), "precision fp16 needs CUDA")
    cfg = train_config(
        tmp_path / "qat.json", data_cfg, tmp_path / "out", train={"precision": "bf16"}, vit={"q_format": "FP16_32"}
    )
    assert_user_error(
        run_in_process("train.py", "-c", cfg), str(cfg), "train_config.precision: bf16", "q_format FP16_32"
    )
    cfg = train_config(tmp_path / "bad.json", data_cfg, tmp_path / "out", train={"precision": "half"})
    assert_user_error(run_in_process("train.py", "-c", cfg), str(cfg), "precision", "fp32, bf16, fp16")


@pytest.mark.slow
def test_compiled_training_learns_what_eager_training_does(tmp_path, data_cfg):
    runs = {}
    for compiled in (False, True):
        cfg = train_config(
            tmp_path / f"{compiled}.json",
            data_cfg,
            tmp_path / str(compiled),
            train=dict(RUN, epochs=3, compile=compiled),
        )
        runs[compiled] = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    eager, compiled = (ckpt_io.load(runs[c] / "last.pt")["model"] for c in (False, True))
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert 0 < worst < 1e-3, worst  # really compiled: fused kernels round differently, but train the same
    losses = [v for _, v in scalars(runs[True], "train/loss")]
    assert losses[-1] < losses[0]


# train_config.class_weights


def _imbalanced(tmp_path, keep: dict[str, int]):
    """A data config whose training split keeps the first ``keep[class]`` images of each class."""
    from conftest import CLASSES, data_config, make_dataset

    ds = make_dataset(tmp_path / "ds", CLASSES)
    listed = (ds / "train_imagepaths.txt").read_text().split()
    kept = [p for c, n in keep.items() for p in [q for q in listed if q.split("/")[1] == c][:n]]
    (ds / "train_imagepaths.txt").write_text("\n".join(kept) + "\n")
    return data_config(tmp_path / "d.json", ds, 3)


def _weighted_cross_entropy(logits, targets, weights, smoothing):
    """torch's per-image weighted cross entropy with label smoothing, written out, averaged over the images."""
    nll = -logits.log_softmax(1)
    per_image = (1 - smoothing) * weights[targets] * nll[torch.arange(len(targets)), targets]
    return (per_image + smoothing / len(weights) * (nll * weights).sum(1)).mean()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=3).state_dict(), path)
    return path


@pytest.mark.parametrize("deit", [False, True], ids=["vit", "deit"])
def test_balanced_class_weights_weight_the_class_heads_cross_entropy(tmp_path, capsys, deit, teacher):
    from myrtle_vision.config import load_config
    from myrtle_vision.training import Trainer

    data = _imbalanced(tmp_path, {"cat": 8, "dog": 4, "fox": 2})
    sections = (
        {
            "distiller_config": {
                "teacher_model": "mobilenet_v3_small",
                "alpha": 0.3,
                "teacher_weights_path": str(teacher),
            }
        }
        if deit
        else {}
    )
    cfg = train_config(
        tmp_path / "t.json",
        data,
        tmp_path / "out",
        train={"class_weights": "balanced", "label_smoothing": 0.1},
        **sections,
    )
    trainer = Trainer(load_config(cfg))
    # scikit-learn's "balanced": N / (classes x count), counted here on the split file
    names = [line.split("/")[1] for line in (tmp_path / "ds" / "train_imagepaths.txt").read_text().split()]
    expected = torch.tensor([len(names) / (3 * names.count(c)) for c in ("cat", "dog", "fox")])
    torch.testing.assert_close(trainer.class_weights, expected)
    assert (
        'class weights (train_config.class_weights "balanced"): cat 0.5833, dog 1.167, fox 2.333'
        in capsys.readouterr().out
    )
    torch.manual_seed(1)
    logits, dist, teacher_logits = torch.randn(3, 6, 3).unbind(0)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    weighted = _weighted_cross_entropy(logits, targets, expected, 0.1)
    if not deit:
        torch.testing.assert_close(trainer.criterion(logits, targets), weighted)
        return
    # DeiT: only the class head's term is weighted; the soft distillation term, written out, is not
    t = 3.0
    p_teacher = (teacher_logits / t).softmax(1)
    kl = (p_teacher * (p_teacher.log() - (dist / t).log_softmax(1))).sum(1).mean() * t * t
    torch.testing.assert_close(trainer.criterion(logits, dist, teacher_logits, targets), 0.3 * weighted + 0.7 * kl)


@pytest.mark.slow
def test_a_class_of_weight_0_is_never_learned(tmp_path, data_cfg):
    from conftest import reference_logits

    cfg = train_config(
        tmp_path / "t.json", data_cfg, tmp_path / "out", train={"epochs": 6, "class_weights": [1, 1.5, 0]}
    )
    proc = run_script("train.py", "-c", cfg, check=True)
    assert "class weights (train_config.class_weights [1, 1.5, 0]): cat 1, dog 1.5, fox 0" in proc.stdout
    # the last weights' predictions on the test split, computed without the package
    logits, labels = reference_logits(cfg, run_dir_of(proc) / "last.pt")
    predicted = logits.argmax(1)
    assert not (predicted == 2).any(), predicted  # fox (weight 0): its logit is only ever pushed down
    assert (predicted[labels != 2] == labels[labels != 2]).float().mean() > 0.8, (predicted, labels)


@pytest.mark.slow
def test_balanced_weights_need_every_class_in_the_training_split(tmp_path):
    data = _imbalanced(tmp_path, {"cat": 8, "dog": 8})
    cfg = train_config(tmp_path / "t.json", data, tmp_path / "out", train={"class_weights": "balanced"})
    assert_user_error(
        run_script("train.py", "-c", cfg), str(cfg), "train_config.class_weights", "'fox'", "train_imagepaths.txt"
    )
