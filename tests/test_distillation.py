"""DeiT: the distillation loss against a direct computation on fixed logits; then end to end, the teacher notebook
run headless, distillation training, resume, test.py, errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import (
    CLASSES,
    REPO,
    assert_user_error,
    data_config,
    reference_images,
    run_dir_of,
    run_in_process,
    run_script,
    script_env,
    train_config,
)
from torch import nn

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.distributed import Processes
from myrtle_vision.evaluation import split_accuracy
from myrtle_vision.losses import DistillationLoss
from myrtle_vision.models import build_model
from myrtle_vision.weights import deploy

# The loss, on fixed logits


def _logits():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(6, 5, generator=g) * 3,
        torch.randn(6, 5, generator=g) * 3,
        torch.randn(6, 5, generator=g) * 3,
        torch.tensor([0, 1, 2, 3, 4, 0]),
    )


def _log_softmax(row, T):
    m = max(x / T for x in row)
    z = math.log(sum(math.exp(x / T - m) for x in row)) + m
    return [x / T - z for x in row]


def _cross_entropy(logits, targets):
    return sum(-_log_softmax(row, 1.0)[t] for row, t in zip(logits.tolist(), targets.tolist())) / len(targets)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 3.0, 10.0])
def test_soft_loss_matches_direct_computation(alpha, T):
    cls, dist, teacher, y = _logits()
    kl = 0.0
    for d_row, t_row in zip(dist.tolist(), teacher.tolist()):
        log_p_t, log_p_s = _log_softmax(t_row, T), _log_softmax(d_row, T)
        kl += sum(math.exp(a) * (a - b) for a, b in zip(log_p_t, log_p_s))
    expected = alpha * _cross_entropy(cls, y) + (1 - alpha) * T * T * kl / len(y)  # alpha weights the labels
    loss = DistillationLoss(nn.CrossEntropyLoss(), "soft", alpha, T)(cls, dist, teacher, y)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 4.0])  # hard distillation ignores the temperature
def test_hard_loss_matches_direct_computation(alpha, T):
    cls, dist, teacher, y = _logits()
    teacher_labels = teacher.argmax(dim=1)
    assert not torch.equal(teacher_labels, y)  # so that the two terms really differ
    expected = alpha * _cross_entropy(cls, y) + (1 - alpha) * _cross_entropy(dist, teacher_labels)
    loss = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha, T)(cls, dist, teacher, y)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_only_the_student():
    cls, dist, teacher, y = _logits()
    cls, dist, teacher = cls.requires_grad_(), dist.requires_grad_(), teacher.requires_grad_()
    DistillationLoss(nn.CrossEntropyLoss(), "soft", 0.5, 3.0)(cls, dist, teacher, y).backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0
    assert teacher.grad is None


def test_soft_term_is_zero_when_student_matches_teacher():
    _, _, teacher, y = _logits()
    loss = DistillationLoss(nn.CrossEntropyLoss(), "soft", 0.0, 3.0)(teacher, teacher.clone(), teacher, y)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_label_smoothing_applies_to_the_class_head_only():
    cls, dist, teacher, y = _logits()
    smooth = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=0.1), "hard", 0.5)
    plain = DistillationLoss(nn.CrossEntropyLoss(), "hard", 0.5)
    diff = smooth(cls, dist, teacher, y) - plain(cls, dist, teacher, y)
    expected = 0.5 * (nn.CrossEntropyLoss(label_smoothing=0.1)(cls, y) - nn.CrossEntropyLoss()(cls, y))
    assert diff.item() == pytest.approx(expected.item(), rel=1e-5)


# End to end

TEACHER = "mobilenet_v3_small"


def _distiller(teacher_path, **extra):
    return {"distiller_config": {"teacher_model": TEACHER, "teacher_weights_path": str(teacher_path), **extra}}


def _execute_notebook(folder, parameters: str) -> subprocess.CompletedProcess:
    """The notebook with its parameters cell replaced, executed headless by nbconvert in ``folder``."""
    import nbformat

    nb = nbformat.read(REPO / "Finetune_CNN_Resisc45.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and nb.cells.index(params[0]) == 1  # the first code cell
    params[0].source = parameters
    nbformat.write(nb, folder / "teacher.ipynb")
    env = script_env()
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--ExecutePreprocessor.timeout=600",
            str(folder / "teacher.ipynb"),
            "--output",
            "executed.ipynb",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _parameters(data_cfg, output, epochs=3):
    return "\n".join(
        [
            f"data_config = {str(data_cfg)!r}",
            f"model = {TEACHER!r}",
            "weights = None",
            "image_size = None",
            f"epochs = {epochs}",
            "batch_size = 8",
            "lr = 0.01",
            f"output_path = {str(output)!r}",
            "optimizer = 'adamw'",
            "weight_decay = 0.01",
            "num_workers = 0",
            "device = 'cpu'",
        ]
    )


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory, dataset):
    """The notebook, its parameters cell set for the tiny dataset, executed headless by nbconvert."""
    import nbformat

    tmp = tmp_path_factory.mktemp("notebook")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    proc = _execute_notebook(tmp, _parameters(data_cfg, tmp / "teacher" / "small.pth"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, nbformat.read(tmp / "executed.ipynb", as_version=4), tmp / "teacher" / "small.pth"


@pytest.mark.slow
def test_notebook_reports_a_bad_parameter_in_one_line(tmp_path, data_cfg):
    proc = _execute_notebook(tmp_path, _parameters(data_cfg, tmp_path / "t.pth", epochs=0))
    assert proc.returncode != 0
    assert "SystemExit" in proc.stderr and "error: notebook parameters: epochs: must be at least 1" in proc.stderr
    assert "myrtle_vision/" not in proc.stderr  # no traceback into the package, just the message


@pytest.mark.slow
def test_notebook_finetunes_plots_and_reports_test_accuracy(notebook_run):
    _, executed, teacher_path = notebook_run
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no loss/accuracy plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "from scratch" in text and "test top-1" in text
    sidecar = json.loads(teacher_path.with_suffix(".json").read_text())
    assert [h["epoch"] for h in sidecar["history"]] == [1, 2, 3]
    assert sidecar["parameters"]["model"] == TEACHER
    assert sidecar["best_val_top1"] == max(h["val_top1"] for h in sidecar["history"])
    assert f"test top-1 {sidecar['test_top1']:.2f}%" in text
    # the file is a plain torchvision state dict, as the earlier release wrote teacher files
    state = torch.load(teacher_path, weights_only=True)
    torchvision.models.get_model(TEACHER, num_classes=3).load_state_dict(state)


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory, dataset, notebook_run):
    tmp = tmp_path_factory.mktemp("deit")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(
        tmp / "deit.json",
        data_cfg,
        tmp / "out",
        train={"epochs": 8, "iters_per_checkpoint": 3},
        **_distiller(notebook_run[2], distillation_type="soft", temperature=2.0),
    )
    proc = run_script("train.py", "-c", cfg, "--device", "cpu", check=True)
    return tmp, cfg, proc, run_dir_of(proc)


@pytest.mark.slow
def test_deit_run_learns_with_the_notebooks_teacher(deit_run):
    from conftest import scalars

    _, _, proc, run_dir = deit_run
    assert (
        f"distilling from {TEACHER}" in proc.stdout
        and "soft, loss = 0.5 x cross entropy to the labels + 0.5 x distillation term" in proc.stdout
    )
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert len(losses) == 8 * 3
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
    assert scalars(run_dir, "val/top1_average_heads")


@pytest.mark.slow
def test_deit_checkpoint_keeps_the_deploy_entry_a_plain_vit(deit_run):
    _, cfg, _, run_dir = deit_run
    ckpt = ckpt_io.load(run_dir / "last.pt")
    plain = deploy.to_deploy(build_model(load_config(cfg), distilled=False).state_dict())
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert set(ckpt["distillation"]) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert ckpt["distillation"]["head_dist.weight"].shape == (3, 32)
    assert ckpt["config"]["distiller_config"]["teacher_model"] == TEACHER


@pytest.mark.slow
def test_test_script_reports_class_head_and_averaged_heads(deit_run):
    tmp, cfg, _, run_dir = deit_run
    proc = run_script("test.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--json", tmp / "r.json", check=True)
    result = json.loads((tmp / "r.json").read_text())
    assert set(result["average_heads"]) == {"top1", "top5"}
    assert "average of the class and distillation heads" in proc.stdout
    # the class-head figure is what the accelerator sees: the deploy entry alone, as a plain ViT
    c = load_config(cfg)
    plain = build_model(c, distilled=False)
    plain.load_state_dict(deploy.from_deploy(ckpt_io.load(run_dir / "last.pt")["model"]))
    acc, avg, _ = split_accuracy(plain, c, Processes(), 4, 0)
    assert avg is None and result["top1"] == pytest.approx(acc.top1)
    assert f"top-1 {result['average_heads']['top1']:.2f}%" in proc.stdout


@pytest.mark.slow
def test_test_script_tests_the_configs_teacher(deit_run, notebook_run, tmp_path, data_cfg):
    """test.py --teacher (the earlier release's test_cnn.py): the teacher file against torchvision's model run by
    hand on the hand-normalized test images."""
    tmp, cfg, _, _ = deit_run
    proc = run_script("test.py", "-c", cfg, "--teacher", "--json", tmp_path / "t.json", check=True)
    result = json.loads((tmp_path / "t.json").read_text())
    assert (result["split"], result["num_images"], result["teacher_model"]) == ("test", 15, TEACHER)
    assert result["weights_path"] == str(notebook_run[2])
    net = torchvision.models.get_model(TEACHER, num_classes=3)
    net.load_state_dict(torch.load(notebook_run[2], weights_only=True))
    images, truth = reference_images(cfg)
    with torch.no_grad():
        preds = net.eval()(images).argmax(1)
    top1 = 100 * (preds == torch.tensor(truth)).double().mean().item()
    assert result["top1"] == pytest.approx(top1) and f"top-1 {top1:.2f}%" in proc.stdout
    for name, c in zip(sorted(CLASSES), range(3)):
        hits = ((preds == c) & (torch.tensor(truth) == c)).sum().item()
        assert result["per_class"][name]["recall"] == pytest.approx(100 * hits / truth.count(c))
    assert (notebook_run[2].parent / "test_small" / "confusion_matrix.png").exists()
    # another file, another split
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.get_model(TEACHER, num_classes=3).state_dict(), other)
    run_script("test.py", "-c", cfg, "--teacher", other, "--split", "val", "--json", tmp_path / "o.json", check=True)
    result = json.loads((tmp_path / "o.json").read_text())
    assert (result["split"], result["num_images"], result["weights_path"]) == ("val", 12, str(other))
    # mistakes
    plain = train_config(tmp_path / "vit.json", data_cfg, tmp_path / "out")
    assert_user_error(run_script("test.py", "-c", plain, "--teacher"), str(plain), "distiller_config")
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.get_model(TEACHER, num_classes=5).state_dict(), wrong)
    assert_user_error(run_script("test.py", "-c", cfg, "--teacher", wrong), f"--teacher {wrong}", "5-class")
    both = run_script("test.py", "-c", cfg, "--teacher", "--checkpoint", "x.pt")
    assert both.returncode == 2 and "give one of them" in both.stderr


@pytest.mark.slow
def test_export_of_a_deit_checkpoint_is_the_class_head_s_plain_vit(deit_run, tmp_path):
    _, cfg, _, run_dir = deit_run
    run_script(
        "export.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", "--output", tmp_path / "deit.pt", check=True
    )
    exported = torch.load(tmp_path / "deit.pt", weights_only=True)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert set(exported) == {"model"} and list(exported["model"]) == list(ckpt["model"])
    assert not any(k.startswith(("dist_token", "head_dist")) for k in exported["model"])
    assert all(torch.equal(exported["model"][k], v) for k, v in ckpt["model"].items())
    assert json.loads((tmp_path / "deit.json").read_text())["check"]["max_logit_diff"] == 0


@pytest.mark.slow
def test_a_plain_vit_config_tests_a_deit_checkpoint_too(deit_run, tmp_path, data_cfg):
    tmp, _, _, run_dir = deit_run
    cfg = train_config(tmp_path / "vit.json", data_cfg, tmp_path / "out")
    proc = run_script("test.py", "-c", cfg, "--checkpoint", run_dir / "last.pt", check=True)
    assert "average of the class and distillation heads" in proc.stdout


@pytest.mark.slow
def test_resuming_a_deit_run_without_its_distiller_config_is_an_error(deit_run, tmp_path, data_cfg):
    _, _, _, run_dir = deit_run
    cfg = train_config(
        tmp_path / "vit.json", data_cfg, tmp_path / "out", train={"checkpoint_path": str(run_dir / "last.pt")}
    )
    assert_user_error(run_in_process("train.py", "-c", cfg), str(run_dir / "last.pt"), "no distiller_config")


def _bad_teacher_files(tmp_path):
    wrong_classes = tmp_path / "wrong_classes.pth"
    torch.save(torchvision.models.get_model(TEACHER, num_classes=45).state_dict(), wrong_classes)
    wrong_arch = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.get_model("resnet18", num_classes=3).state_dict(), wrong_arch)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a weights file")
    return {
        "missing": (tmp_path / "nowhere.pth", "file not found"),
        "garbage": (garbage, "not a readable weights file"),
        "classes": (wrong_classes, f"does not fit teacher_model '{TEACHER}' with 3 classes (it holds a 45-class"),
        "architecture": (wrong_arch, f"it is not a {TEACHER}"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "garbage", "classes", "architecture"])
def test_bad_teacher_file_is_a_one_line_error(case, tmp_path, data_cfg):
    path, message = _bad_teacher_files(tmp_path)[case]
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", **_distiller(path))
    assert_user_error(
        run_in_process("train.py", "-c", cfg), str(tmp_path / "t.json"), "teacher_weights_path", str(path), message
    )


@pytest.mark.slow
def test_deit_config_cannot_resume_a_vit_checkpoint(tmp_path, data_cfg, notebook_run):
    vit_cfg = train_config(tmp_path / "vit.json", data_cfg, tmp_path / "out", train={"epochs": 1})
    last = run_dir_of(run_script("train.py", "-c", vit_cfg, check=True)) / "last.pt"
    cfg = train_config(
        tmp_path / "deit.json",
        data_cfg,
        tmp_path / "out",
        train={"checkpoint_path": str(last)},
        **_distiller(notebook_run[2]),
    )
    assert_user_error(run_script("train.py", "-c", cfg), str(last), "trained without a teacher")


@pytest.mark.parametrize("size", [None, 48])
def test_the_teacher_sees_the_batches_at_teacher_image_size(size, tmp_path, data_cfg, notebook_run):
    """A teacher finetuned at another image_size (the notebook's parameter) is fed batches resized to it."""
    from myrtle_vision.training import Trainer

    cfg = train_config(
        tmp_path / "t.json", data_cfg, tmp_path / "out", **_distiller(notebook_run[2], teacher_image_size=size)
    )
    trainer = Trainer(load_config(cfg))
    seen = []
    trainer.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    loss, images, _ = trainer.train_update(iter(trainer.train_loader), 0)
    assert seen and set(seen) == {(size or 32, size or 32)}  # the student's image_size is 32
    assert images == 8 and torch.isfinite(torch.tensor(loss))
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert not any(m.training for m in trainer.teacher.modules())  # eval mode: batch norm statistics stay as finetuned
