"""Interrupted and resumed runs end bit-identical to uninterrupted ones on CPU: for a ViT, a DeiT
student and a quantization-aware run, with and without gradient accumulation and loader workers."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torchvision
from conftest import CLASSES, train_config

from myrtle_vision.config import load_config
from myrtle_vision.training import Interrupted, Trainer

from myrtle_vision import checkpoint as ckpt_io


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
        return {"vit": vit, "distiller_config": {"teacher_model": "mobilenet_v3_small", "alpha": 0.5,
                                                 "teacher_weights_path": str(teacher)}}
    return {"vit": vit}


def _fit(cfg_path, stop_after: int | None = None) -> Trainer:
    """Train to the end, or until a SIGTERM sent to this process after update ``stop_after``."""
    trainer = Trainer(load_config(cfg_path))
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
    train = {"epochs": 2, "global_batch_size": 8, "local_batch_size": 4 if accumulate else 8, "num_workers": workers,
             "iters_per_checkpoint": 100, "iters_per_val": 2}
    sections = _sections(kind, teacher)
    whole = _fit(train_config(tmp_path / "whole.json", data_cfg, tmp_path / "whole", train=train, **sections))
    first = _fit(train_config(tmp_path / "first.json", data_cfg, tmp_path / "split", train=train, **sections),
                 stop_after=4)
    saved = first.run_dir / "last.pt"
    assert ckpt_io.load(saved)["iteration"] == 4
    rest = _fit(train_config(tmp_path / "rest.json", data_cfg, tmp_path / "split",
                             train=dict(train, checkpoint_path=str(saved)), **sections))
    assert rest.progress.iteration == whole.progress.iteration == 6
    a, b = whole.state(), rest.state()
    for entry in ("model", "distillation"):
        assert a.get(entry, {}).keys() == b.get(entry, {}).keys()
        for k, v in a.get(entry, {}).items():
            assert torch.equal(v, b[entry][k]), f"{entry}.{k}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, va in a["optimizer"]["state"].items():
        vb = b["optimizer"]["state"][k]
        assert va.keys() == vb.keys() and all(torch.equal(va[s], vb[s]) for s in va), k
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert (kind == "deit") == ("distillation" in a)
