"""Teacher models: loading the earlier release's files, ImageNet weights from the cache only, the CLI."""

import hashlib
import json

import pytest
import torch
import torchvision
from conftest import assert_user_error, data_config, run_in_process, run_script

from myrtle_vision.errors import UserError
from myrtle_vision.models.cnn import load_teacher, replace_classifier, starting_model


def test_earlier_release_resnet50_teacher_file_loads_as_it_is(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet50(num_classes=45).eval()
    torch.save(original.state_dict(), tmp_path / "resnet50_resisc45_pyt_finetuned_weights.pth")
    teacher = load_teacher("resnet50", 45, tmp_path / "resnet50_resisc45_pyt_finetuned_weights.pth")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(img), original(img), rtol=0, atol=0)
    # saved from DataParallel/DistributedDataParallel: "module." prefixes
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, tmp_path / "ddp.pth")
    with torch.no_grad():
        torch.testing.assert_close(load_teacher("resnet50", 45, tmp_path / "ddp.pth")(img), original(img))


def test_teacher_from_a_training_checkpoint_or_safetensors(tmp_path):
    """The same reader as pretrained weights: a state dict under "model" beside other entries, or safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).eval()
    state = original.state_dict()
    torch.save({"model": state, "optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "checkpoint.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "teacher.safetensors")
    img = torch.randn(2, 3, 32, 32)
    for name in ("checkpoint.pth", "teacher.safetensors"):
        with torch.no_grad():
            torch.testing.assert_close(
                load_teacher("resnet18", 10, tmp_path / name)(img), original(img), rtol=0, atol=0
            )


def test_unknown_architecture_suggests_a_name(tmp_path):
    with pytest.raises(
        UserError, match="'resnet19' is not a torchvision classification model.*did you mean 'resnet18'"
    ):
        load_teacher("resnet19", 3, tmp_path / "x.pth")


def test_imagenet_weights_come_from_torchvisions_cache_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="no ImageNet weights for resnet18 on this machine and nothing is downloaded"):
        starting_model("resnet18", 3, "imagenet")
    imagenet = torchvision.models.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache / "resnet18-f37072fd.pth")  # torchvision's file name for these weights
    model, origin = starting_model("resnet18", 3, "imagenet")
    assert str(cache / "resnet18-f37072fd.pth") in origin
    assert model.fc.out_features == 3 and model.fc.in_features == 512
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1"])
def test_classifier_replacement_for_other_architectures(name, tmp_path):
    source = torchvision.models.get_model(name)  # 1000 classes
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model, _ = starting_model(name, 7, str(tmp_path / "w.pth"))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    replace_classifier(model, 4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_a_finetuned_file_can_be_the_starting_point(tmp_path):
    before = torchvision.models.get_model("resnet18", num_classes=3)
    torch.save(before.state_dict(), tmp_path / "w.pth")
    same, _ = starting_model("resnet18", 3, str(tmp_path / "w.pth"))
    assert torch.equal(same.fc.weight, before.fc.weight)  # same classes: the classifier is kept


@pytest.mark.slow
def test_cli_finetunes_and_keeps_the_best_validation_weights(tmp_path, dataset):
    data_cfg = data_config(tmp_path / "data.json", dataset, 3)
    out = tmp_path / "t" / "teacher.pth"
    proc = run_script(
        "finetune_teacher.py",
        "--data-config",
        data_cfg,
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--optimizer",
        "adamw",
        "--image-size",
        "48",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--output-path",
        out,
        check=True,
    )
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["parameters"]["image_size"] == 48 and len(info["history"]) == 2
    assert f"saved to {out}" in proc.stdout and "test top-1" in proc.stdout
    teacher = load_teacher("resnet18", 3, out)
    assert teacher(torch.randn(1, 3, 48, 48)).shape == (1, 3)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, dataset, monkeypatch):
    data_cfg = data_config(tmp_path / "data.json", dataset, 3)
    env_home = tmp_path / "empty_torch_home"
    monkeypatch.setenv("TORCH_HOME", str(env_home))
    proc = run_in_process("finetune_teacher.py", "--data-config", data_cfg, "--model", "resnet18", "--batch-size", "8")
    assert_user_error(proc, "weights", "no ImageNet weights for resnet18", "set weights to None")
    proc = run_in_process("finetune_teacher.py", "--data-config", data_cfg, "--batch-size", "0")
    assert_user_error(proc, "finetune_teacher.py arguments", "batch_size", "at least 1")
    proc = run_in_process("finetune_teacher.py", "--data-config", tmp_path / "nope.json", "--weights", "none")
    assert_user_error(proc, "nope.json", "file not found")
    proc = run_in_process("finetune_teacher.py", "--data-config", data_cfg, "--weights", "none")
    assert_user_error(proc, "finetune_teacher.py arguments: batch_size", "more than the 24 training images")


@pytest.mark.slow
def test_output_path_is_checked_before_finetuning_and_never_replaces_a_users_file(tmp_path, dataset):
    from conftest import run_script_read_only

    data_cfg = data_config(tmp_path / "data.json", dataset, 3)
    args = [
        "--data-config",
        data_cfg,
        "--model",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    folder = tmp_path / "a_folder.pth"
    folder.mkdir()
    line = assert_user_error(
        run_script("finetune_teacher.py", *args, "--output-path", folder), "output_path", str(folder), "is a folder"
    )
    assert "checkpoints" not in line
    locked = tmp_path / "locked"
    locked.mkdir()
    proc = run_script_read_only(locked, "finetune_teacher.py", *args, "--output-path", locked / "t.pth")
    assert_user_error(proc, "output_path", str(locked), "cannot write there")
    assert "finetuning" not in proc.stdout and list(locked.iterdir()) == []
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"the user's own weights")
    assert_user_error(
        run_script("finetune_teacher.py", *args, "--output-path", mine), str(mine), "already exists", "--force"
    )
    assert mine.read_bytes() == b"the user's own weights" and not mine.with_suffix(".json").exists()
    # an earlier finetuning's output (its JSON's sha256 matches) is replaced; the user's only with --force
    out = tmp_path / "teacher.pth"
    for _ in range(2):
        run_script("finetune_teacher.py", *args, "--output-path", out, check=True)
        info = json.loads(out.with_suffix(".json").read_text())
        assert info["finished"] and info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # a JSON from before the sha256 was recorded: the files are an earlier finetuning's if it names this output
    older = {k: v for k, v in info.items() if k not in ("sha256", "finished")}
    out.with_suffix(".json").write_text(json.dumps({**older, "output_path": str(tmp_path / "elsewhere.pth")}))
    assert_user_error(run_script("finetune_teacher.py", *args, "--output-path", out), str(out), "already exists")
    out.with_suffix(".json").write_text(json.dumps(older))
    run_script("finetune_teacher.py", *args, "--output-path", out, check=True)
    run_script("finetune_teacher.py", *args, "--output-path", mine, "--force", check=True)
    assert load_teacher("mobilenet_v3_small", 3, mine) is not None
