"""The users' six v1 configs train, shrunk only in dataset path, batch size and epochs.

The deit configs distil from a teacher file of the earlier release's format (a torchvision
resnet50 state dict with a 45-way fc) at the path they name.
"""

import json

import pytest
import torch
import torchvision
from conftest import FIXTURES, make_dataset, run_dir_of, run_script

from myrtle_vision.checkpoint import load
from myrtle_vision.prepare import RESISC45_CLASSES

V1 = FIXTURES / "v1-configs"


@pytest.fixture(scope="module")
def resisc_like(tmp_path_factory):
    """45 classes of 64x64 images; the splits list a few of them."""
    root = make_dataset(tmp_path_factory.mktemp("v1") / "NWPU-RESISC45", RESISC45_CLASSES, counts=(1, 1, 1), size=64)
    for split, keep in (("train", 4), ("val", 3), ("test", 3)):
        path = root / f"{split}_imagepaths.txt"
        path.write_text("\n".join(path.read_text().split()[:keep]) + "\n")
    return root


@pytest.fixture(scope="module")
def v1_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "resnet50_resisc45_pyt_finetuned_weights.pth"
    torch.save(torchvision.models.resnet50(num_classes=45).state_dict(), path)
    return path


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base"])
def test_v1_config_trains_a_few_steps(name, resisc_like, v1_teacher, tmp_path):
    data = json.loads((V1 / "data_configs" / "data_config.json").read_text())
    data["dataset_path"] = str(resisc_like)
    (tmp_path / "data_configs").mkdir()
    (tmp_path / "data_configs" / "data_config.json").write_text(json.dumps(data))
    cfg = json.loads((V1 / "train_configs" / f"{name}.json").read_text())
    cfg["train_config"].update(epochs=1, local_batch_size=1, global_batch_size=2)
    (tmp_path / "train_configs").mkdir()
    if "distiller_config" in cfg:
        (tmp_path / cfg["distiller_config"]["teacher_weights_path"]).symlink_to(v1_teacher)
    (tmp_path / "train_configs" / f"{name}.json").write_text(json.dumps(cfg))
    # run from the folder that holds data_configs/, as users do with their relative paths
    proc = run_script("train.py", "-c", f"train_configs/{name}.json", cwd=tmp_path, check=True)
    run_dir = tmp_path / run_dir_of(proc)
    assert run_dir.parent == tmp_path / cfg["train_config"]["output_directory"]
    last = load(run_dir / "last.pt")
    assert last["iteration"] == 2
    dim = cfg["vit_config"]["embed_dim"]
    assert last["model"]["pos_embedding"].shape == (1, 197, dim) and last["model"]["mlp_head.1.weight"].shape == (45, dim)
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    if name.startswith("deit"):
        assert "distilling from resnet50 resnet50_resisc45_pyt_finetuned_weights.pth (soft, alpha 0.5" in proc.stdout
        assert last["distillation"]["head_dist.weight"].shape == (45, dim)
    else:
        assert "distillation" not in last
