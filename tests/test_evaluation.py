"""test.py (evaluation): every image of a split counted against an independent evaluation, reports, JSON,
confusion matrix, checkpoint checks."""

import json

import pytest
import torch
from conftest import (
    CLASSES,
    assert_user_error,
    data_config,
    reference_images,
    reference_logits,
    run_dir_of,
    run_in_process,
    run_script,
    train_config,
)
from PIL import Image

from myrtle_vision import checkpoint as ckpt_io


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("testscript")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(tmp / "train.json", data_cfg, tmp / "out", train={"epochs": 4, "local_batch_size": 4})
    return tmp, cfg, run_dir_of(run_script("train.py", "-c", cfg, check=True))


@pytest.mark.slow
def test_reports_every_test_image_and_writes_json_png_tensorboard(run):
    tmp, cfg, run_dir = run
    proc = run_script("test.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", tmp / "r.json", check=True)
    result = json.loads((tmp / "r.json").read_text())
    assert set(result) == {"split", "top1", "top5", "num_images", "per_class", "tta", "views"}
    assert (result["split"], result["tta"], result["views"]) == ("test", "none", 1)
    assert result["num_images"] == 15  # 15 images, batches of 4: the last partial batch counts
    assert set(result["per_class"]) == set(CLASSES)
    assert sum(c["support"] for c in result["per_class"].values()) == 15
    assert result["top5"] == 100.0  # 3 classes: top-5 is top-3, always right
    # the numbers agree with an evaluation written without the package: the checkpoint's deploy entry read
    # with torch.load, the test images read with PIL and normalized by hand, the ViT computed from its layout
    truth, preds = _independent_predictions(cfg, run_dir / "last.pt")
    top1 = 100 * sum(p == t for p, t in zip(preds, truth)) / len(truth)
    assert result["top1"] == pytest.approx(top1)
    for name, m in result["per_class"].items():
        c = CLASSES.index(name)
        hits = sum(p == t == c for p, t in zip(preds, truth))
        assert m["support"] == truth.count(c) == 5 and m["recall"] == pytest.approx(100 * hits / 5)
    assert "precision" in proc.stdout and f"top-1 {top1:.2f}%" in proc.stdout
    out = run_dir / "test_last"
    assert Image.open(out / "confusion_matrix.png").size[0] > 50
    assert list(out.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_split_val_evaluates_the_validation_images(run):
    tmp, cfg, run_dir = run
    proc = run_script(
        "test.py",
        "-c",
        cfg,
        "--checkpoint",
        run_dir / "last.pt",
        "--split",
        "val",
        "--json",
        tmp / "val.json",
        check=True,
    )
    result = json.loads((tmp / "val.json").read_text())
    assert (result["split"], result["num_images"]) == ("val", 12)  # 4 validation images of each of 3 classes
    assert all(c["support"] == 4 for c in result["per_class"].values())
    truth, preds = _independent_predictions(cfg, run_dir / "last.pt", "val")
    assert result["top1"] == pytest.approx(100 * sum(p == t for p, t in zip(preds, truth)) / len(truth))
    assert f"top-1 {result['top1']:.2f}%" in proc.stdout
    assert (run_dir / "val_last" / "confusion_matrix.png").exists()  # not over the test split's


@pytest.mark.slow
def test_the_training_split_is_evaluated_with_the_evaluation_transforms(run):
    """Its flips are training augmentation: evaluating it gives the plain images, the same every time."""
    from myrtle_vision.config import load_config
    from myrtle_vision.distributed import Processes
    from myrtle_vision.evaluation import split_loader

    tmp, cfg, _ = run
    c = load_config(cfg)
    assert "RandomHorizontalFlip" in c.data_config.transform_ops_train  # so training's pipeline would differ
    loader, _ = split_loader(c, Processes(), 4, 0, "train")
    images = torch.cat([x for x, _ in loader])
    expected, _ = reference_images(cfg, "train")
    assert images.shape == (24, 3, 32, 32) and torch.allclose(images, expected, atol=1e-6)
    run_script(
        "test.py",
        "-c",
        cfg,
        "--checkpoint",
        run[2] / "last.pt",
        "--split",
        "train",
        "--json",
        tmp / "train_split.json",
        check=True,
    )
    assert json.loads((tmp / "train_split.json").read_text())["num_images"] == 24


def _independent_predictions(cfg_path, checkpoint, split="test") -> tuple[list[int], list[int]]:
    """(true class, predicted class) of every image of a split, computed without the package."""
    logits, truth = reference_logits(cfg_path, checkpoint, split=split)
    return truth.tolist(), logits.argmax(1).tolist()


@pytest.mark.slow
def test_uses_the_configs_checkpoint_path_when_no_flag(run, tmp_path):
    tmp, cfg, run_dir = run
    raw = json.loads(cfg.read_text())
    raw["train_config"]["checkpoint_path"] = str(run_dir / "best.pt")
    with_ckpt = tmp_path / "c.json"
    with_ckpt.write_text(json.dumps(raw))
    proc = run_script("test.py", "-c", with_ckpt, "--json", tmp_path / "r.json", check=True)
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 15, proc.stdout


@pytest.mark.slow
def test_no_checkpoint_anywhere(run):
    _, cfg, _ = run
    assert_user_error(run_script("test.py", "-c", cfg), str(cfg), "checkpoint_path", "--checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize(
    "vit, needle",
    [
        ({"depth": 3}, "depth 2 (the config's model has 3)"),
        ({"embed_dim": 64, "mlp_dim": 64}, "pos_embedding has shape (1, 17, 32)"),
    ],
)
def test_checkpoint_that_does_not_fit_the_config(run, tmp_path, vit, needle):
    tmp, _, run_dir = run
    other = train_config(tmp_path / "other.json", tmp / "data.json", tmp_path / "out", vit=vit)
    assert_user_error(
        run_script("test.py", "-c", other, "--checkpoint", run_dir / "last.pt"),
        str(run_dir / "last.pt"),
        "does not fit",
        needle,
    )


@pytest.mark.slow
def test_unreadable_and_missing_checkpoints(run, tmp_path):
    _, cfg, _ = run
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    assert_user_error(
        run_in_process("test.py", "-c", cfg, "--checkpoint", junk), str(junk), "not a readable checkpoint"
    )
    assert_user_error(
        run_in_process("test.py", "-c", cfg, "--checkpoint", tmp_path / "gone.pt"), "gone.pt", "not found"
    )


@pytest.mark.slow
def test_earlier_release_checkpoint_loads(run, tmp_path):
    """Files of the earlier release hold {model, optimizer, lr_scheduler, iteration} only."""
    tmp, cfg, run_dir = run
    ckpt = ckpt_io.load(run_dir / "last.pt")
    old = {"model": ckpt["model"], "optimizer": {}, "lr_scheduler": {}, "iteration": 12}
    torch.save(old, tmp_path / "v1.pt")
    run_script("test.py", "-c", cfg, "--checkpoint", tmp_path / "v1.pt", "--json", tmp_path / "a.json", check=True)
    run_script("test.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", tmp_path / "b.json", check=True)
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
