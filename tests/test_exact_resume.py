"""The bit-exact resume guarantee, all of it: interrupted and resumed runs end bit-identical to uninterrupted
ones on CPU. In process: a ViT, a DeiT student and a quantization-aware run, with and without gradient
accumulation and loader workers; a run with repeated augmentation, class-balanced draws and class weights; a
DeiT run with every random switch on, resumed with every global random generator set to an arbitrary state
(checkpoints hold no random state: none is needed). Through train.py: a mid-epoch checkpoint and a
SIGTERM/SIGINT with accumulation, dropout, random augmentation, workers and clipping; DeiT (hard), QAT
(FP16_32), bf16 autocast, and a DeiT run (soft) with every switch of DeiT's recipe on (MixUp, CutMix, random
erasing, stochastic depth, the weight average, repeated augmentation, class weights, the class-balanced
sampler, quarter turns and transposes); the transforms run on the device."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    CLASSES,
    REPO,
    assert_user_error,
    data_config,
    make_dataset,
    run_dir_of,
    run_script,
    script_env,
    train_config,
)

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.training import Interrupted, Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=len(CLASSES)).state_dict(), path)
    return path


def _sections(kind: str, teacher) -> dict:
    vit = {"dropout": 0.1, "emb_dropout": 0.1}
    if kind == "qat":
        return {"vit": dict(vit, q_format="FP16_16")}
    if kind == "deit":
        return {
            "vit": vit,
            "distiller_config": {
                "teacher_model": "mobilenet_v3_small",
                "alpha": 0.5,
                "teacher_weights_path": str(teacher),
            },
        }
    return {"vit": vit}


def _scramble_global_generators(seed: int) -> None:
    """Every global random generator (torch's CPU one and every CUDA device's, Python's, NumPy's) put in an
    arbitrary state that has nothing to do with any run's seed."""
    torch.manual_seed(seed)  # (CUDA's too, when there is one)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.rand(seed % 7 + 1), random.random(), np.random.rand(seed % 5 + 1)  # not at a freshly seeded state


def _fit(cfg_path, stop_after: int | None = None, scramble: int | None = None) -> Trainer:
    """Train to the end, or until a SIGTERM sent to this process after update ``stop_after``. With ``scramble``,
    the global generators are scrambled before the trainer is made (and resumes) and again just before it trains."""
    if scramble is not None:
        _scramble_global_generators(scramble)
    trainer = Trainer(load_config(cfg_path))
    if scramble is not None:
        _scramble_global_generators(scramble + 1)
    if stop_after is not None:
        update = trainer.train_update

        def update_then_signal(batches, u, *rest):
            result = update(batches, u, *rest)
            if trainer.progress.iteration + 1 == stop_after:  # the update just done
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        trainer.train_update = update_then_signal
        with pytest.raises(Interrupted):
            trainer.fit()
    else:
        trainer.fit()
    return trainer


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("accumulate", [False, True], ids=["one micro-batch", "accumulation"])
@pytest.mark.parametrize("kind", ["vit", "deit", "qat"])
def test_an_interrupted_and_resumed_run_ends_bit_identical(kind, accumulate, workers, tmp_path, data_cfg, teacher):
    # 24 training images, updates of 8: 3 per epoch, 6 in all; interrupted after update 4 (mid-epoch 2)
    train = {
        "epochs": 2,
        "global_batch_size": 8,
        "local_batch_size": 4 if accumulate else 8,
        "num_workers": workers,
        "iters_per_checkpoint": 100,
        "iters_per_val": 2,
    }
    a = _assert_resumed_run_ends_bit_identical(tmp_path, data_cfg, train, _sections(kind, teacher))
    assert (kind == "deit") == ("distillation" in a)


def test_sampling_switches_resume_bit_identical(tmp_path):
    """Repeated augmentation, class-balanced draws and balanced class weights, on a 8:8:2 training split."""
    ds = make_dataset(tmp_path / "ds", CLASSES)
    listed = (ds / "train_imagepaths.txt").read_text().split()
    foxes = [p for p in listed if "/fox/" in p]
    (ds / "train_imagepaths.txt").write_text("\n".join([p for p in listed if p not in foxes] + foxes[:2]) + "\n")
    data_cfg = data_config(tmp_path / "d.json", ds, 3)
    # 18 training images, updates of 6 in micro-batches of 3: 3 per epoch, 6 in all; interrupted after update 4
    train = {
        "epochs": 2,
        "global_batch_size": 6,
        "local_batch_size": 3,
        "iters_per_checkpoint": 100,
        "iters_per_val": 2,
        "repeated_augmentation": 3,
        "class_balanced_sampler": True,
        "class_weights": "balanced",
    }
    _assert_resumed_run_ends_bit_identical(tmp_path, data_cfg, train, {"vit": {"dropout": 0.1}})


def _assert_resumed_run_ends_bit_identical(
    tmp_path, data_cfg, train: dict, sections: dict, scramble=None, before_resuming=None
) -> dict:
    """Train 6 updates whole, and again interrupted after update 4 and resumed (the global generators scrambled
    first with ``scramble``; ``before_resuming`` given the checkpoint's path first); the two end with the same
    weights, optimizer state and schedule. Returns the final state."""
    whole = _fit(train_config(tmp_path / "whole.json", data_cfg, tmp_path / "whole", train=train, **sections))
    first = _fit(
        train_config(tmp_path / "first.json", data_cfg, tmp_path / "split", train=train, **sections), stop_after=4
    )
    saved = first.run_dir / "last.pt"
    assert ckpt_io.load(saved)["iteration"] == 4
    if before_resuming is not None:
        before_resuming(saved)
    rest = _fit(
        train_config(
            tmp_path / "rest.json",
            data_cfg,
            tmp_path / "split",
            train=dict(train, checkpoint_path=str(saved)),
            **sections,
        ),
        scramble=scramble,
    )
    assert rest.progress.iteration == whole.progress.iteration == 6
    a, b = whole.state(), rest.state()
    for entry in ("model", "distillation", "raw_weights"):
        assert a.get(entry, {}).keys() == b.get(entry, {}).keys()
        for k, v in a.get(entry, {}).items():
            assert torch.equal(v, b[entry][k]), f"{entry}.{k}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, va in a["optimizer"]["state"].items():
        vb = b["optimizer"]["state"][k]
        assert va.keys() == vb.keys() and all(torch.equal(va[s], vb[s]) for s in va), k
    assert a["lr_scheduler"] == b["lr_scheduler"]
    return a


ALL_RANDOM_OPS = {
    "RandomResizedCrop": {"size": 32, "scale": [0.5, 1.0]},
    "RandomHorizontalFlip": None,
    "RandomVerticalFlip": 0.5,
    "RandomRotation90": None,
    "RandomTranspose": None,
    "RandAugment": {"num_ops": 2, "magnitude": 9},
    "ColorJitter": 0.3,
    "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3},
}


def _with_an_earlier_versions_rng_entry(path) -> None:
    """Give the checkpoint the ``rng`` entry that checkpoints written before it was dropped hold."""
    ckpt = torch.load(path, weights_only=True)
    assert "rng" not in ckpt  # no random state is written any more
    np_state = np.random.get_state()
    ckpt["rng"] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    torch.save(ckpt, path)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_needs_no_random_state_whatever_the_global_generators_hold(workers, tmp_path, dataset, teacher):
    """Checkpoints hold no random state and resuming restores none (see myrtle_vision.checkpoint): every random
    draw of training is seeded by its place in the run. So a resumed run with every global generator (torch's
    CPU and CUDA ones, Python's, NumPy's) set to an arbitrary state just before it resumes, and again just
    before it trains, still ends bit-identical to the run never interrupted, with every random switch on: a
    DeiT (soft) with dropout, stochastic depth, MixUp, CutMix, random erasing, the weight average, repeated
    augmentation, class-balanced draws, every random per-image op, accumulation, and loader workers or none.
    An unseeded draw anywhere in training (a new op, a mixing draw, a dropout mask, a worker's seed) breaks
    this. The checkpoint resumed from carries an earlier version's ``rng`` entry, which is read past."""
    data_cfg = data_config(tmp_path / "d.json", dataset, len(CLASSES), train_ops=ALL_RANDOM_OPS)
    # 24 training images, updates of 8 in micro-batches of 4: 3 per epoch, 6 in all; interrupted after update 4
    train = dict(
        RECIPE,
        epochs=2,
        global_batch_size=8,
        local_batch_size=4,
        num_workers=workers,
        iters_per_checkpoint=100,
        iters_per_val=2,
        clip_grad=1.0,
    )
    sections = {
        "vit": {"dropout": 0.1, "emb_dropout": 0.1, "drop_path": 0.2},
        "distiller_config": {
            "teacher_model": "mobilenet_v3_small",
            "teacher_weights_path": str(teacher),
            "distillation_type": "soft",
        },
    }
    final = _assert_resumed_run_ends_bit_identical(
        tmp_path,
        data_cfg,
        train,
        sections,
        scramble=20240611 + workers,
        before_resuming=_with_an_earlier_versions_rng_entry,
    )
    assert "rng" not in final and final["deployed"] == "ema" and "distillation" in final


# --- through train.py ------------------------------------------------------------------------------


def _weights(path) -> dict:
    return ckpt_io.load(path)["model"]


def _assert_same_weights(a, b):
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


HARD_RUN = {
    "epochs": 3,
    "local_batch_size": 2,
    "global_batch_size": 6,
    "iters_per_checkpoint": 2,
    "num_workers": 2,
    "clip_grad": 0.5,
    "keep_checkpoints": None,
    "label_smoothing": 0.1,
}
HARD_OPS = {
    "RandomResizedCrop": {"size": 32, "scale": [0.5, 1.0]},
    "RandomHorizontalFlip": None,
    "RandAugment": {"num_ops": 2, "magnitude": 9},
    "ColorJitter": 0.3,
    "Normalize": {"Mean": [0.5, 0.5, 0.5], "Std": [0.25, 0.25, 0.25]},
}


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory, dataset):
    """Accumulation over 3 micro-batches, dropout, random augmentation, 2 workers, clipping."""
    tmp = tmp_path_factory.mktemp("hard")
    data_cfg = data_config(tmp / "data.json", dataset, 3, train_ops=HARD_OPS)
    vit = {"dropout": 0.1, "emb_dropout": 0.1}
    cfg = train_config(tmp / "train.json", data_cfg, tmp / "out", train=HARD_RUN, vit=vit)
    run_dir = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    reference = _weights(run_dir / "checkpoint_0000012.pt")  # read now: resuming rewrites the file
    return tmp, data_cfg, vit, run_dir, reference


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_is_bit_exact(hard_run):
    tmp, data_cfg, vit, run_dir, reference = hard_run
    # 24 images / 6 = 4 updates per epoch; iteration 6 is in the middle of the second epoch
    mid = run_dir / "checkpoint_0000006.pt"
    assert ckpt_io.load(mid)["update_in_epoch"] == 2
    cfg = train_config(
        tmp / "resume.json", data_cfg, tmp / "out", train=dict(HARD_RUN, checkpoint_path=str(mid)), vit=vit
    )
    proc = run_script("train.py", "-c", cfg, check=True)
    assert "resuming from" in proc.stdout and run_dir_of(proc) == run_dir
    _assert_same_weights(_weights(run_dir / "last.pt"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_that_resumes_bit_exactly(hard_run, signum, tmp_path):
    tmp, data_cfg, vit, _, reference = hard_run
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train=HARD_RUN, vit=vit)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-c", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("training on"):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    stdout = "".join(lines) + out
    assert proc.returncode == 128 + signum, stdout + err
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(signum).name}; checkpoint saved to" in stdout
    run_dir = run_dir_of(subprocess.CompletedProcess([], 0, stdout, err))
    saved = ckpt_io.load(run_dir / "last.pt")
    assert 1 <= saved["iteration"] < 12
    resume = train_config(
        tmp_path / "r.json",
        data_cfg,
        tmp_path / "out",
        train=dict(HARD_RUN, checkpoint_path=str(run_dir / "last.pt")),
        vit=vit,
    )
    run_script("train.py", "-c", resume, check=True)
    _assert_same_weights(_weights(run_dir / "last.pt"), reference)


RESUME_RUN = {
    "epochs": 2,
    "local_batch_size": 2,
    "global_batch_size": 6,
    "iters_per_checkpoint": 2,
    "num_workers": 2,
    "clip_grad": 0.5,
    "keep_checkpoints": None,
    "label_smoothing": 0.1,
}


def _variant(kind: str, teacher) -> dict:
    """train_config keyword sections for one kind of run."""
    vit = {"dropout": 0.1, "emb_dropout": 0.1}
    if kind.startswith("deit"):
        return {
            "vit": vit,
            "distiller_config": {
                "teacher_model": "mobilenet_v3_small",
                "alpha": 0.5,
                "teacher_weights_path": str(teacher),
                "distillation_type": kind.split("-")[1],
            },
        }
    if kind.startswith("qat"):
        return {"vit": dict(vit, q_format=kind.split("-")[1])}
    if kind == "recipe":  # every switch of DeiT's recipe on, in a DeiT run (the data ops: see the test)
        return {
            "vit": dict(vit, drop_path=0.2),
            "train": dict(RESUME_RUN, **RECIPE),
            "distiller_config": {"teacher_model": "mobilenet_v3_small", "teacher_weights_path": str(teacher)},
        }
    return {"vit": vit, "train": dict(RESUME_RUN, precision="bf16")}


RECIPE = {
    "mixup": 0.8,
    "cutmix": 1.0,
    "mixup_prob": 0.9,
    "random_erasing": 0.5,
    "ema_decay": 0.9,
    "repeated_augmentation": 3,
    "class_weights": "balanced",
    "class_balanced_sampler": True,
}
RECIPE_OPS = {
    "RandomRotation90": None,
    "RandomTranspose": None,
    "RandomHorizontalFlip": None,
    "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3},
}


# (soft distillation: the recipe's run; QAT in FP16_16: the in-process test above)
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deit-hard", "qat-FP16_32", "bf16", "recipe"])
def test_train_py_resumed_mid_epoch_ends_bit_identical(kind, tmp_path, data_cfg, dataset, teacher):
    sections = _variant(kind, teacher)
    if kind == "recipe":  # quarter turns and transposes too
        data_cfg = data_config(tmp_path / "d.json", dataset, len(CLASSES), train_ops=RECIPE_OPS)
    train = sections.pop("train", RESUME_RUN)
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train=train, **sections)
    run_dir = run_dir_of(run_script("train.py", "-c", cfg, check=True))
    reference = ckpt_io.load(run_dir / "last.pt")
    mid = run_dir / "checkpoint_0000006.pt"  # 4 updates per epoch: in the middle of the second
    resume = train_config(
        tmp_path / "r.json", data_cfg, tmp_path / "out", train=dict(train, checkpoint_path=str(mid)), **sections
    )
    run_script("train.py", "-c", resume, check=True)
    final = ckpt_io.load(run_dir / "last.pt")
    assert final["iteration"] == reference["iteration"] == 8
    for entry in ("model", "distillation", "raw_weights"):
        assert (
            (entry in reference)
            == (entry in final)
            == (entry == "model" or kind.startswith(("deit", "recipe")) and entry == "distillation" or kind == "recipe")
        )
        for k, v in reference.get(entry, {}).items():
            assert torch.equal(final[entry][k], v), f"{entry}.{k} differs after resume"
    assert final.get("ema", {}).get("n_averaged") == reference.get("ema", {}).get("n_averaged")
    if kind.startswith("qat"):  # resuming in another number format is refused
        other = train_config(
            tmp_path / "o.json",
            data_cfg,
            tmp_path / "out",
            train=dict(train, checkpoint_path=str(mid)),
            vit=dict(sections["vit"], q_format="FP32"),
        )
        assert_user_error(
            run_script("train.py", "-c", other),
            str(mid),
            f"trained with q_format {kind[4:]}",
            "vit_config.q_format FP32",
        )


@pytest.mark.slow
def test_training_on_device_batches_resumes_bit_exactly(tmp_path, dataset):
    """A run whose training transforms run on the device (here the CPU), with loader workers, resumed from
    a mid-epoch checkpoint, ends with the weights of the run never interrupted."""
    ops = {
        "RandomResizedCrop": {"size": 32, "scale": [0.5, 1.0]},
        "RandomHorizontalFlip": None,
        "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3},
    }
    data = data_config(tmp_path / "d.json", dataset, 3, train_ops=ops, augment_on="device")
    train = {"epochs": 2, "num_workers": 2, "iters_per_checkpoint": 2, "keep_checkpoints": None}
    whole = run_dir_of(
        run_script("train.py", "-c", train_config(tmp_path / "a.json", data, tmp_path / "a", train=train), check=True)
    )
    expected = torch.load(whole / "last.pt", weights_only=True)["model"]
    proc = run_script(
        "train.py",
        "-c",
        train_config(
            tmp_path / "b.json",
            data,
            tmp_path / "a",
            train=dict(train, checkpoint_path=str(whole / "checkpoint_0000002.pt")),
        ),
        check=True,
    )
    assert "resuming from" in proc.stdout and "at iteration 2" in proc.stdout
    resumed = torch.load(whole / "last.pt", weights_only=True)
    assert resumed["iteration"] == 6
    assert all(torch.equal(expected[k], resumed["model"][k]) for k in expected)
