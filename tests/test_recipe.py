"""DeiT's data-efficient recipe: each switch changes what it should and nothing else. MixUp/CutMix targets
against the mixed pixels, random erasing's boxes, stochastic depth (the identity in evaluation, rising
linearly over the blocks), the weight average (EMA) against a direct computation, which weights the
checkpoint deploys and best.pt follows, the teacher seeing the mixed images, and the switches' errors.
(Bit-exact resume with every switch on: tests/test_exact_resume.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, assert_user_error, run_dir_of, run_in_process, run_script, scalars, train_config

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.data.batch_augment import BatchAugment
from myrtle_vision.errors import ConfigError
from myrtle_vision.models.vit import VisionTransformer, ViTArgs
from myrtle_vision.training import Trainer
from myrtle_vision.weights import deploy

C = 5


def _constant_batch(B: int = 8, H: int = 16, W: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Image b is the constant 10 * (b + 1) (so every pixel says whose it is); label b % C."""
    images = torch.arange(1, B + 1, dtype=torch.float32).mul(10).view(B, 1, 1, 1).expand(B, 3, H, W).clone()
    return images, torch.arange(B) % C


def _expected_targets(share_own: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft targets: each image's own label weighted by the share of it that is its own, the rest to the label
    of the image it was mixed with (the previous one in the batch, as torchvision pairs them)."""
    onehot = torch.eye(C)[labels]
    return share_own[:, None] * onehot + (1 - share_own[:, None]) * onehot.roll(1, 0)


def test_cutmix_targets_sum_to_one_and_match_the_pasted_area():
    augment = BatchAugment(C, cutmix=1.0)
    seen_areas = set()
    for seed in range(20):
        torch.manual_seed(seed)
        images, labels = _constant_batch()
        mixed, targets = augment(images.clone(), labels)
        own = images[:, :1, :1, :1]
        share_own = (mixed == own).float().mean(dim=(1, 2, 3))  # counted from the pixels
        from_previous = (mixed == own.roll(1, 0)).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(share_own + from_previous, torch.ones(8))  # one box, pasted from the previous
        assert (share_own == share_own[0]).all()  # the same box for the whole batch
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        torch.testing.assert_close(targets, _expected_targets(share_own, labels))
        seen_areas.add(round(share_own[0].item(), 4))
    assert len(seen_areas) > 10  # the box's size is drawn


def test_mixup_targets_sum_to_one_and_match_the_blend():
    augment = BatchAugment(C, mixup=0.8)
    for seed in range(10):
        torch.manual_seed(seed)
        images, labels = _constant_batch()
        mixed, targets = augment(images.clone(), labels)
        own = images[:, 0, 0, 0]
        # every pixel is lam * own + (1 - lam) * previous: solve for lam from the pixels
        lam = (mixed[:, 0, 0, 0] - own.roll(1, 0)) / (own - own.roll(1, 0))
        assert torch.allclose(mixed, mixed[:, :, :1, :1].expand_as(mixed))
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        torch.testing.assert_close(targets, _expected_targets(lam, labels), atol=1e-5, rtol=1e-5)


def test_mix_prob_and_the_switch_between_mixup_and_cutmix():
    augment = BatchAugment(C, mixup=0.8, cutmix=1.0, mix_prob=0.5, switch_prob=0.25)
    kinds = {"none": 0, "mixup": 0, "cutmix": 0}
    for seed in range(600):
        torch.manual_seed(seed)
        images, labels = _constant_batch(B=4, H=8, W=8)
        mixed, targets = augment(images.clone(), labels)
        if torch.equal(mixed, images):
            kinds["none"] += 1
            assert torch.equal(targets, torch.eye(C)[labels])  # one-hot: a batch left unmixed
        elif ((mixed == images[:, :1, :1, :1]) | (mixed == images[:, :1, :1, :1].roll(1, 0))).all():
            kinds["cutmix"] += 1
        else:
            kinds["mixup"] += 1
    # 300 of 600 mixed; of those, a quarter CutMix (binomial tolerances, about 4 standard deviations)
    assert abs(kinds["none"] - 300) < 50 and abs(kinds["cutmix"] - 75) < 35, kinds


def test_a_batch_s_draw_is_a_function_of_the_seed():
    augment = BatchAugment(C, mixup=0.8, cutmix=1.0, erase_prob=0.5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % C
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(augment(images.clone(), labels))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_random_erasing_fills_one_box_of_noise_per_erased_image():
    augment = BatchAugment(C, erase_prob=0.5)
    erased, fractions = 0, []
    for seed in range(50):
        torch.manual_seed(seed)
        images = torch.full((8, 3, 32, 24), 7.0)
        out, labels = augment(images, torch.zeros(8, dtype=torch.long))
        assert labels.dtype == torch.long  # targets untouched without mixing
        for img in out:
            changed = (img != 7.0).all(0)  # noise never hits 7.0 exactly
            if not changed.any():
                continue
            erased += 1
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            assert box.all() and changed.sum() == box.numel()  # one solid rectangle, the same in every channel
            assert (img[:, ~changed] == 7.0).all()
            fractions.append(box.numel() / changed.numel())
    assert abs(erased - 200) < 45, erased  # probability 0.5 per image, 400 images
    # torchvision's (and timm's) box: 2% to 1/3 of the image (after rounding its sides)
    assert 0.015 < min(fractions) and max(fractions) < 0.36
    noise = torch.cat([out[i][:, (out[i] != 7.0).all(0)].flatten() for i in range(8)])
    if noise.numel() > 200:
        assert abs(noise.mean()) < 0.25 and abs(noise.std() - 1) < 0.25  # N(0, 1), as after Normalize


def test_stochastic_depth_is_the_identity_in_evaluation_and_rises_linearly_over_the_blocks():
    kw = dict(image_size=16, patch_size=4, num_classes=C, embed_dim=32, depth=5, heads=2, mlp_dim=64)
    plain, deep = VisionTransformer(ViTArgs(**kw)), VisionTransformer(ViTArgs(**kw, drop_path=0.4))
    assert list(plain.state_dict()) == list(deep.state_dict())  # no parameters: the deploy layout is unchanged
    deep.load_state_dict(plain.state_dict())
    rates = [[m.p for m in (b.drop_path1, b.drop_path2)] for b in deep.blocks]
    assert rates == [[pytest.approx(0.4 * i / 4)] * 2 for i in range(5)]  # 0 for the first block, 0.4 for the last
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), deep.eval()(x))
        torch.manual_seed(0)
        trained = deep.train()(x)
        assert not torch.equal(trained, plain.train()(x))
        # per image: the last block's two branches each kept (scaled by 1 / 0.6) or dropped
        torch.manual_seed(0)
        assert torch.equal(deep(x), trained)


def _ema_run(tmp_path, data_cfg, **train):
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "out",
        train=dict(
            {
                "epochs": 2,
                "iters_per_checkpoint": 1,
                "iters_per_val": 3,
                "keep_checkpoints": None,
                "ema_decay": 0.75,
                "lr": 1e-2,
            },
            **train,
        ),
    )
    proc = run_script("train.py", "-c", cfg, check=True)
    run_dir = run_dir_of(proc)
    return cfg, run_dir, proc, [ckpt_io.load(run_dir / f"checkpoint_{i:07d}.pt") for i in range(1, 7)]


def _raw_and_average(ckpt: dict) -> tuple[dict, dict]:
    """The trained weights and their average, both in the deploy layout, wherever the checkpoint keeps them."""
    if ckpt["deployed"] == "ema":
        return deploy.to_deploy(ckpt["raw_weights"]), ckpt["model"]
    return ckpt["model"], deploy.to_deploy(ckpt["ema"]["weights"])


@pytest.mark.slow
@pytest.mark.parametrize("every, deployed", [(1, "raw"), (2, "ema")])
def test_the_weight_average_is_a_direct_computation_over_the_updates(every, deployed, tmp_path, data_cfg):
    """After updates 1..6 (a checkpoint each): the average starts from the weights after its first update and
    then moves (1 - decay) of the way to the weights at each update it is updated at (every ``every``)."""
    _, _, _, ckpts = _ema_run(tmp_path, data_cfg, ema_every=every, ema_deploy=deployed == "ema")
    expected = None
    for i, ckpt in enumerate(ckpts, start=1):
        raw, average = _raw_and_average(ckpt)
        assert ckpt["deployed"] == deployed and ckpt["ema"]["decay"] == 0.75
        if i % every == 0:
            expected = dict(raw) if expected is None else {k: 0.75 * expected[k] + 0.25 * raw[k] for k in raw}
        assert ckpt["ema"]["n_averaged"] == i // every
        if expected is None:
            continue  # not yet averaged: the average still holds the initial weights
        for k in raw:
            torch.testing.assert_close(average[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(average["mlp_head.1.weight"], raw["mlp_head.1.weight"]) or i == every


@pytest.mark.slow
def test_validating_every_few_epochs_trains_the_same_weights(tmp_path, data_cfg):
    """epochs_per_val only thins the epoch-end validations (the last epoch always validates): with every switch
    of the recipe drawing random numbers, the weights and their average end bit-identical."""
    runs = {}
    for every in (1, 2):
        cfg = train_config(
            tmp_path / f"t{every}.json",
            data_cfg,
            tmp_path / f"out{every}",
            train={
                "epochs": 3,
                "iters_per_val": 1000,
                "epochs_per_val": every,
                "mixup": 0.8,
                "cutmix": 1.0,
                "random_erasing": 0.25,
                "ema_decay": 0.9,
            },
            vit={"drop_path": 0.2},
        )
        run_dir = run_dir_of(run_script("train.py", "-c", cfg, check=True))
        runs[every] = ckpt_io.load(run_dir / "last.pt"), [step for step, _ in scalars(run_dir, "val_ema/top1")]
    (every_epoch, at_1), (every_other, at_2) = runs[1], runs[2]
    u = at_1[0]  # updates per epoch
    assert at_1 == [u, 2 * u, 3 * u] and at_2 == [2 * u, 3 * u]
    for entry in ("model", "raw_weights"):
        assert every_epoch[entry].keys() == every_other[entry].keys()
        for k in every_epoch[entry]:
            assert torch.equal(every_epoch[entry][k], every_other[entry][k]), (entry, k)


@pytest.mark.slow
def test_best_pt_follows_the_deployed_weights_and_test_py_says_which(tmp_path, data_cfg):
    # a slow average (it stays near the weights after the first update) whose best differs from the raw weights'
    cfg, run_dir, proc, ckpts = _ema_run(tmp_path, data_cfg, ema_deploy=True, iters_per_val=1, ema_decay=0.95)
    assert "weight average (EMA 0.95)" in proc.stdout and "best top-1 " in proc.stdout
    val, val_ema = scalars(run_dir, "val/top1"), scalars(run_dir, "val_ema/top1")
    assert [s for s, _ in val] == [s for s, _ in val_ema] == list(range(1, 7))
    first_best = lambda vals: max(vals, key=lambda sv: (sv[1], -sv[0]))  # noqa: E731
    assert first_best(val) != first_best(val_ema), (val, val_ema)  # so that following the other would show
    best = ckpt_io.load(run_dir / "best.pt")
    # best.pt is the first validation with the highest top-1 of the weight average, whatever the raw weights did
    expected = first_best(val_ema)
    assert best["iteration"] == expected[0] and best["best_val_top1"] == pytest.approx(expected[1])
    for k, v in ckpts[best["iteration"] - 1]["model"].items():
        assert torch.equal(best["model"][k], v)
    # the deploy entry keeps the accelerator's layout: the same names and shapes as a run without the average
    assert {k: v.shape for k, v in best["model"].items()} == {
        k: v.shape for k, v in _raw_and_average(ckpts[0])[0].items()
    }
    out = run_script(
        "test.py", "-c", cfg, "--checkpoint", run_dir / "best.pt", "--json", tmp_path / "r.json", check=True
    )
    assert "testing the weight average (EMA decay 0.95" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["weights"] == "ema"
    out = run_script("test_quantize.py", "-c", cfg, "--checkpoint", run_dir / "best.pt", check=True)
    assert "testing the weight average" in out.stdout
    # resuming with another ema_decay setting is refused, naming both files
    # resuming without the average is refused, naming the checkpoint and the field
    other = train_config(
        tmp_path / "o.json",
        data_cfg,
        tmp_path / "out",
        train={"ema_decay": None, "checkpoint_path": str(run_dir / "last.pt")},
    )
    assert_user_error(run_script("train.py", "-c", other), str(run_dir / "last.pt"), "ema_decay null")


def test_with_distillation_the_teacher_sees_the_mixed_images(tmp_path, data_cfg):
    import torchvision

    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=len(CLASSES)).state_dict(), teacher)
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "out",
        train={"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.5, "local_batch_size": 8},
        distiller_config={
            "teacher_model": "mobilenet_v3_small",
            "teacher_weights_path": str(teacher),
            "distillation_type": "hard",
        },
    )
    trainer = Trainer(load_config(cfg))
    seen, student_saw = [], []
    teacher_module = trainer.teacher
    trainer.teacher = lambda images: seen.append(images.clone()) or teacher_module(images)
    forward = trainer.step_module.forward
    trainer.step_module.forward = lambda images: student_saw.append(images.clone()) or forward(images)
    batches = iter(trainer.train_loader)
    images, labels = next(iter(trainer.train_loader))  # the same first batch, as the loader gives it
    trainer.train_update(batches, 0)
    assert len(seen) == 1 and torch.equal(seen[0], student_saw[0])
    assert not torch.equal(seen[0], images)  # mixed (and erased)


@pytest.mark.slow
def test_the_users_configs_keep_every_switch_off_and_bad_values_are_one_line_errors(tmp_path, data_cfg, monkeypatch):
    from conftest import FIXTURES

    monkeypatch.chdir(FIXTURES / "v1-configs")  # their data_config_path is relative to the working directory
    users = sorted(Path("train_configs").glob("*.json"))
    assert len(users) == 6
    for path in users:
        cfg = load_config(path)
        tc = cfg.train_config
        assert cfg.vit_config.drop_path == 0, path
        assert (tc.mixup, tc.cutmix, tc.random_erasing, tc.ema_decay) == (0, 0, 0, None), path
    bad = [
        ({"mixup": -1}, "train_config.mixup", "must be in [0, 100]"),
        ({"random_erasing": 1.5}, "train_config.random_erasing", "probability"),
        ({"mixup_switch_prob": -0.1}, "train_config.mixup_switch_prob", "probability"),
        ({"ema_decay": 1.0}, "train_config.ema_decay", "(0, 1)"),
        ({"ema_every": 0}, "train_config.ema_every", "at least 1"),
    ]
    for train, field, needle in bad:
        path = train_config(tmp_path / "bad.json", data_cfg, tmp_path / "out", train=train)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert e.value.field == field and needle in str(e.value) and str(path) in str(e.value)
    cfg = train_config(tmp_path / "bad.json", data_cfg, tmp_path / "out", vit={"drop_path": 1.0})
    assert_user_error(run_in_process("train.py", "-c", cfg), str(cfg), "vit_config.drop_path", "[0, 1)")
