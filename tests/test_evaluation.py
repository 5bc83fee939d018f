"""test.py (evaluation): every test image counted against an independent evaluation, reports, JSON, confusion
matrix, checkpoint checks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, assert_user_error, data_config, reference_forward, run_dir_of, run_script, train_config
from PIL import Image

from myrtle_vision import checkpoint as ckpt_io


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("testscript")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(tmp / "train.json", data_cfg, tmp / "out", train={"epochs": 4, "local_batch_size": 4})
    return tmp, cfg, run_dir_of(run_script("train.py", "-c", cfg, check=True))


def test_reports_every_test_image_and_writes_json_png_tensorboard(run):
    tmp, cfg, run_dir = run
    proc = run_script("test.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", tmp / "r.json", check=True)
    result = json.loads((tmp / "r.json").read_text())
    assert set(result) == {"top1", "top5", "num_images", "per_class"}
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


def _independent_predictions(cfg_path, checkpoint) -> tuple[list[int], list[int]]:
    """(true class, predicted class) of every test image, computed without the package."""
    cfg = json.loads(cfg_path.read_text())
    data = json.loads(open(cfg["data_config_path"]).read())
    root, vit = Path(data["dataset_path"]), cfg["vit_config"]
    label_map = json.loads((root / data["label_map"]).read_text())
    mean, std = (torch.tensor(data["transform_ops_val"]["Normalize"][k]).view(3, 1, 1) for k in ("Mean", "Std"))
    assert list(data["transform_ops_val"]) == ["Normalize"]  # the whole evaluation pipeline, done below
    truth, images = [], []
    for line in (root / data["test_files"]).read_text().split():
        pixels = np.asarray(Image.open(root / line).convert("RGB"), dtype=np.float32) / 255
        images.append((torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std)
        truth.append(label_map[Path(line).parent.name])
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    logits = reference_forward(weights, torch.stack(images), vit["heads"], vit["patch_size"],
                               head_dim_scale=vit["embed_dim"] // vit["heads"])
    return truth, logits.argmax(1).tolist()


def test_uses_the_configs_checkpoint_path_when_no_flag(run, tmp_path):
    tmp, cfg, run_dir = run
    raw = json.loads(cfg.read_text())
    raw["train_config"]["checkpoint_path"] = str(run_dir / "best.pt")
    with_ckpt = tmp_path / "c.json"
    with_ckpt.write_text(json.dumps(raw))
    proc = run_script("test.py", "-c", with_ckpt, "--json", tmp_path / "r.json", check=True)
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 15, proc.stdout


def test_no_checkpoint_anywhere(run):
    _, cfg, _ = run
    assert_user_error(run_script("test.py", "-c", cfg), str(cfg), "checkpoint_path", "--checkpoint")


@pytest.mark.parametrize("vit, needle", [({"depth": 3}, "depth 2 (the config's model has 3)"),
                                         ({"embed_dim": 64, "mlp_dim": 64}, "pos_embedding has shape (1, 17, 32)")])
def test_checkpoint_that_does_not_fit_the_config(run, tmp_path, vit, needle):
    tmp, _, run_dir = run
    other = train_config(tmp_path / "other.json", tmp / "data.json", tmp_path / "out", vit=vit)
    assert_user_error(run_script("test.py", "-c", other, "--checkpoint", run_dir / "last.pt"),
                      str(run_dir / "last.pt"), "does not fit", needle)


def test_unreadable_and_missing_checkpoints(run, tmp_path):
    _, cfg, _ = run
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    assert_user_error(run_script("test.py", "-c", cfg, "--checkpoint", junk), str(junk), "not a readable checkpoint")
    assert_user_error(run_script("test.py", "-c", cfg, "--checkpoint", tmp_path / "gone.pt"), "gone.pt", "not found")


def test_earlier_release_checkpoint_loads(run, tmp_path):
    """Files of the earlier release hold {model, optimizer, lr_scheduler, iteration} only."""
    tmp, cfg, run_dir = run
    ckpt = ckpt_io.load(run_dir / "last.pt")
    old = {"model": ckpt["model"], "optimizer": {}, "lr_scheduler": {}, "iteration": 12}
    torch.save(old, tmp_path / "v1.pt")
    run_script("test.py", "-c", cfg, "--checkpoint", tmp_path / "v1.pt", "--json", tmp_path / "a.json", check=True)
    run_script("test.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", tmp_path / "b.json", check=True)
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
