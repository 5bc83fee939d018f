"""The users' six v1 configs train, and mean what they meant in the earlier release (v1.0.0).

The files are the users' own, with only paths and sizes changed for the test data. The deit configs
distil from a teacher file of the earlier release's format (a torchvision resnet50 state dict with a
45-way fc) at the path they name. Each meaning is checked against a direct computation, not against
the code under test: the peak learning rate (``lr * global_batch_size / 512``), plain cross entropy,
``alpha`` on the label term, a square ``Resize``, weight decay on the tokens, a cosine that spans
every epoch, and resuming an earlier-release checkpoint with its optimizer moments.
"""

import json
import math

import pytest
import torch
import torchvision
from conftest import FIXTURES, make_dataset, run_dir_of, run_script, scalars
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from myrtle_vision.checkpoint import load
from myrtle_vision.config import load_config
from myrtle_vision.data import open_split
from myrtle_vision.errors import UserError
from myrtle_vision.optim import LRSchedule
from myrtle_vision.prepare import RESISC45_CLASSES
from myrtle_vision.training import Trainer
from myrtle_vision.weights import deploy

V1 = FIXTURES / "v1-configs"
CPU = torch.device("cpu")
SMALL_VIT = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64}
_NORMALIZE = {"Mean": [0.485, 0.456, 0.406], "Std": [0.229, 0.224, 0.225]}
# the user's data config for the 3-class test dataset: the same ops, sized 32 instead of 224
SMALL_DATA = {
    "number_of_classes": 3,
    "transform_ops_train": {"RandomResizedCrop": 32, "RandomHorizontalFlip": None, "Normalize": _NORMALIZE},
    "transform_ops_val": {"Resize": 32, "CenterCrop": 32, "Normalize": _NORMALIZE},
}


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


def users_config(
    folder, name: str, dataset, teacher=None, train=None, vit=None, data=None, distiller=None, relative: bool = False
):
    """The user's ``train_configs/<name>.json`` and ``data_configs/data_config.json`` under ``folder``, with
    only the given fields changed (paths, sizes); returns the train config's path relative to ``folder``.
    Unless ``relative``, the data config and output paths are made absolute (for runs in this process)."""
    data_cfg = json.loads((V1 / "data_configs" / "data_config.json").read_text())
    data_cfg.update(dataset_path=str(dataset), **(data or {}))
    (folder / "data_configs").mkdir(exist_ok=True)
    (folder / "data_configs" / "data_config.json").write_text(json.dumps(data_cfg))
    cfg = json.loads((V1 / "train_configs" / f"{name}.json").read_text())
    if not relative:
        cfg["data_config_path"] = str(folder / cfg["data_config_path"])
        cfg["train_config"]["output_directory"] = str(folder / cfg["train_config"]["output_directory"])
    cfg["train_config"].update(train or {})
    cfg["vit_config"].update(vit or {})
    if "distiller_config" in cfg:
        cfg["distiller_config"].update(distiller or {})
        target = folder / cfg["distiller_config"]["teacher_weights_path"]
        if teacher is not None and not target.exists():
            target.symlink_to(teacher)
    (folder / "train_configs").mkdir(exist_ok=True)
    (folder / "train_configs" / f"{name}.json").write_text(json.dumps(cfg))
    return f"train_configs/{name}.json"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base"])
def test_v1_config_trains_a_few_steps_at_the_earlier_release_s_learning_rate(name, resisc_like, v1_teacher, tmp_path):
    # sizes changed for the test machine: 64x64 images (the generated ones' size), 16 patches of 16x16
    small_ops = {
        "transform_ops_train": {"RandomResizedCrop": 64, "RandomHorizontalFlip": None, "Normalize": _NORMALIZE},
        "transform_ops_val": {"Resize": 64, "CenterCrop": 64, "Normalize": _NORMALIZE},
    }
    cfg_path = users_config(
        tmp_path,
        name,
        resisc_like,
        v1_teacher,
        vit={"image_size": 64},
        data=small_ops,
        train={"epochs": 1, "local_batch_size": 1, "global_batch_size": 2},
        relative=True,
    )
    # run from the folder that holds data_configs/, as users do with their relative paths
    proc = run_script("train.py", "-c", cfg_path, cwd=tmp_path, check=True)
    run_dir = tmp_path / run_dir_of(proc)
    cfg = json.loads((tmp_path / cfg_path).read_text())
    tc = cfg["train_config"]
    assert run_dir.parent == tmp_path / tc["output_directory"]
    last = load(run_dir / "last.pt")
    assert last["iteration"] == 2
    dim = cfg["vit_config"]["embed_dim"]
    assert last["model"]["pos_embedding"].shape == (1, 17, dim) and last["model"]["mlp_head.1.weight"].shape == (
        45,
        dim,
    )
    # the earlier release's rule: the optimizer peaks at lr * global_batch_size / 512, after a linear warmup
    peak = tc["lr"] * 2 / 512
    assert (
        f"peak learning rate {peak:.4g} = train_config.lr {tc['lr']:g} x global_batch_size 2 / lr_base_size 512"
        in proc.stdout
    )
    assert scalars(run_dir, "train/peak_lr")[0][1] == pytest.approx(peak)
    warmup = round(tc["warmup_epochs"] * 2)  # 2 updates per epoch
    expected = [tc["warmup_lr"] + (peak - tc["warmup_lr"]) * k / warmup for k in range(2)]
    assert [v for _, v in scalars(run_dir, "train/lr")] == pytest.approx(expected, rel=1e-6)
    assert all(g["initial_lr"] == pytest.approx(peak) for g in last["optimizer"]["param_groups"])
    if name.startswith("deit"):
        assert (
            "distilling from resnet50 resnet50_resisc45_pyt_finetuned_weights.pth (soft, loss = 0.5 x cross "
            "entropy to the labels + 0.5 x distillation term (alpha weights the labels)"
        ) in proc.stdout
        assert last["distillation"]["head_dist.weight"].shape == (45, dim)
    else:
        assert "distillation" not in last


def _trainer(tmp_path, name, dataset, **changes) -> Trainer:
    """What ``train.py -c`` builds from the user's config (with only paths and sizes changed)."""
    cfg_path = users_config(tmp_path, name, dataset, **changes)
    return Trainer(load_config(tmp_path / cfg_path))


def _logits(n=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * 3, torch.randint(0, classes, (n,), generator=g)


def _plain_cross_entropy(logits, targets) -> float:
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        total += math.log(sum(math.exp(x) for x in row)) - row[t]
    return total / len(targets)


def _small():
    return {"vit": SMALL_VIT, "train": {"local_batch_size": 4, "global_batch_size": 8, "num_workers": 0}}


def test_no_label_smoothing_unless_the_config_sets_it(tmp_path, dataset):
    trainer = _trainer(tmp_path, "vit_tiny", dataset, **_small(), data=SMALL_DATA)
    logits, targets = _logits(classes=3)
    assert trainer.criterion(logits, targets).item() == pytest.approx(_plain_cross_entropy(logits, targets), rel=1e-6)


def test_alpha_weights_the_label_term(tmp_path, dataset):
    teacher = tmp_path / "t.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), teacher)
    trainer = _trainer(
        tmp_path,
        "deit_tiny",
        dataset,
        **_small(),
        distiller={"alpha": 0.2, "teacher_weights_path": str(teacher)},
        data=SMALL_DATA,
    )
    cls, y = _logits(classes=3, seed=1)
    dist, _ = _logits(classes=3, seed=2)
    teacher_logits, _ = _logits(classes=3, seed=3)
    T = 3.0
    kl = 0.0
    for d_row, t_row in zip(dist.tolist(), teacher_logits.tolist()):
        p_t = [math.exp(x / T) for x in t_row]
        p_s = [math.exp(x / T) for x in d_row]
        p_t, p_s = [x / sum(p_t) for x in p_t], [x / sum(p_s) for x in p_s]
        kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    expected = 0.2 * _plain_cross_entropy(cls, y) + 0.8 * T * T * kl / len(y)  # the earlier release's mix
    assert trainer.criterion(cls, dist, teacher_logits, y).item() == pytest.approx(expected, rel=1e-5)


def test_resize_n_is_square_and_shorter_side_keeps_the_aspect_ratio(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], counts=(1, 1, 1))
    img = Image.fromarray(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy())  # 48 high, 64 wide
    for path in root.glob("images/*/*.png"):
        img.save(path)
    users_config(tmp_path, "vit_tiny", root, data={"number_of_classes": 2})
    cfg = load_config(tmp_path / "train_configs" / "vit_tiny.json")
    # the user's validation ops, Resize 224 then CenterCrop 224: the whole image squeezed to 224x224
    got = open_split(cfg.data_config, "val")[0][0]
    assert got.shape == (3, 224, 224)
    direct = TF.resize(TF.pil_to_tensor(img), [224, 224])  # torchvision's own resize to (224, 224)
    assert (got.int() - direct.int()).abs().max() <= 1
    cfg.data_config.transform_ops_val = {"Resize": 32}
    assert open_split(cfg.data_config, "val")[0][0].shape == (3, 32, 32)
    cfg.data_config.transform_ops_val = {"Resize": {"shorter_side": 32}}
    assert open_split(cfg.data_config, "val")[0][0].shape == (3, 32, 42)


def _timm_weight_decay_groups(model: nn.Module, weight_decay: float) -> tuple[set, set]:
    """timm 0.5.4's add_weight_decay for a model without no_weight_decay(): names of (no decay, decay)."""
    no_decay = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    return no_decay, {n for n, _ in model.named_parameters()} - no_decay


@pytest.mark.parametrize("name", ["vit_tiny", "deit_tiny"])
def test_weight_decay_reaches_the_tokens_and_position_embedding_as_before(name, tmp_path, dataset):
    teacher = tmp_path / "t.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), teacher)
    trainer = _trainer(
        tmp_path, name, dataset, **_small(), distiller={"teacher_weights_path": str(teacher)}, data=SMALL_DATA
    )
    wd = {
        n: g["weight_decay"]
        for g in trainer.optimizer.param_groups
        for p in g["params"]
        for n, q in trainer.model.named_parameters()
        if p is q
    }
    no_decay, decay = _timm_weight_decay_groups(trainer.model, 0.05)
    assert {n for n, w in wd.items() if w == 0.05} == decay and {n for n, w in wd.items() if w == 0} == no_decay
    assert {"pos_embed", "cls_token"} <= decay and (name == "vit_tiny" or "dist_token" in decay)


def test_cosine_spans_every_epoch_whatever_cooldown_epochs_says(tmp_path, dataset):
    tc = load_config(tmp_path / users_config(tmp_path, "vit_tiny", dataset)).train_config  # the file as it is
    upe = 100
    assert tc.cooldown_epochs == 5 and tc.epochs == 300 and tc.peak_lr == 5e-4 * 64 / 512
    schedule = LRSchedule.from_config(tc, upe)
    total, warmup = 300 * upe, 5 * upe
    for update in (warmup, total // 2, total - 5 * upe, total - 1, total):
        t = (update - warmup) / (total - warmup)
        assert schedule(update) == pytest.approx(
            tc.min_lr + 0.5 * (tc.peak_lr - tc.min_lr) * (1 + math.cos(math.pi * t))
        )
    assert schedule(total - 5 * upe) > tc.min_lr * 1.001  # not yet at the floor 5 epochs before the end


@pytest.mark.slow
def test_a_pytorch_int8_config_trains_in_fp32_and_test_quantize_calibrates_int8(tmp_path, dataset):
    """As in the earlier release: q_format PyTorchINT8 trains in FP32, and test_quantize.py --calib_steps N
    quantizes to INT8 calibrated on N validation batches (figures against an independent INT8 ViT)."""
    from conftest import reference_logits
    from test_int8 import _check_int8_figures, _int8_reference_logits

    cfg = tmp_path / users_config(
        tmp_path,
        "vit_tiny",
        dataset,
        vit={**SMALL_VIT, "q_format": "PyTorchINT8"},
        train={"local_batch_size": 4, "global_batch_size": 8, "num_workers": 0, "epochs": 2},
        data=SMALL_DATA,
    )
    proc = run_script("train.py", "-c", cfg, check=True)
    assert "vit_config.q_format PyTorchINT8 is post-training quantization: training runs in FP32" in proc.stdout
    ckpt = tmp_path / run_dir_of(proc) / "last.pt"
    assert load(ckpt)["quantization"]["q_format"] == "FP32"
    proc = run_script(
        "test_quantize.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        "--calib_steps",
        2,
        "--json",
        tmp_path / "q.json",
        check=True,
    )
    result = json.loads((tmp_path / "q.json").read_text())
    assert (result["q_format"], result["calib_steps"], result["calib_images"]) == ("PyTorchINT8", 2, 8)
    fp32, targets = reference_logits(cfg, ckpt, "FP32")
    _check_int8_figures(result, fp32, _int8_reference_logits(cfg, ckpt, 2), targets)


# --- resuming an earlier-release checkpoint -----------------------------------------------------------
# The earlier release's modules, as its vit_pytorch/vit_pytorch.py and distill.py declare them
# (parameter-free stubs left out): the optimizer numbered its parameters in their named_parameters() order.


class _Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn


class _PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn


class _Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = dim_head * heads  # dim_head was 64 in every v1 config: 64 x heads = embed_dim
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))


class _FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )


class _Transformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_dim, dim_head):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                _Residual(_PreNorm(dim, _Attention(dim, heads, dim_head))),
                _Residual(_PreNorm(dim, _FeedForward(dim, mlp_dim))),
            )
            for _ in range(depth)
        )


class V1ViT(nn.Module):
    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, dim_head=64):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.patch_to_embedding = nn.Linear(3 * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(0.0)
        self.transformer = _Transformer(dim, depth, heads, mlp_dim, dim_head)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))


class V1DistillWrapper(nn.Module):
    def __init__(self, teacher, student, dim, num_classes):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.distillation_token = nn.Parameter(torch.randn(1, 1, dim))
        self.distill_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))


def test_the_earlier_release_s_module_tree_is_the_accelerator_layout():
    """The reconstruction above has the reference layout's names, shapes and order (its state_dict order)."""
    reference = json.loads((FIXTURES / "vit_tiny_checkpoint_layout.json").read_text())
    v1 = V1ViT(224, 16, 45, 192, 12, 3, 768)
    assert [(k, list(v.shape)) for k, v in v1.state_dict().items()] == list(reference.items())


def v1_checkpoint(path, distilled: bool, steps: int = 3, int_step: bool = True, weight_decay: float = 0.05):
    """An earlier-release checkpoint: the v1 modules trained ``steps`` AdamW updates on random gradients by an
    optimizer built as timm 0.5.4's create_optimizer built it. Returns (file, {deploy name: (param, state)})."""
    torch.manual_seed(5)
    vit = V1ViT(32, 8, 3, 32, 2, 2, 64, dim_head=16)  # SMALL_VIT, 3 classes; dim_head x heads = embed_dim
    teacher = nn.Linear(2, 2).requires_grad_(False)
    module = V1DistillWrapper(teacher, vit, 32, 3) if distilled else vit
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim == 1 or n.endswith(".bias")]
    decay = [p for n, p in named if not (p.ndim == 1 or n.endswith(".bias"))]
    groups = (
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
        if weight_decay
        else [{"params": [p for _, p in named]}]
    )
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)  # timm: each group says its own
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    if int_step:  # torch 1.11, which the earlier release pinned, kept "step" as an int
        for state in sd["state"].values():
            state["step"] = int(state["step"])
    torch.save(
        {"model": vit.state_dict(), "optimizer": sd, "lr_scheduler": {"t_initial": 300}, "iteration": steps}, path
    )
    prefix = "student." if distilled else ""
    return path, {n.removeprefix(prefix): (p.detach().clone(), opt.state[p]) for n, p in named}


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_earlier_release_checkpoint_resumes_with_its_moments(distilled, weight_decay, tmp_path, dataset):
    ckpt, v1 = v1_checkpoint(tmp_path / "vit_000003", distilled, weight_decay=weight_decay)
    teacher = tmp_path / "t.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), teacher)
    name = "deit_tiny" if distilled else "vit_tiny"
    trainer = _trainer(
        tmp_path,
        name,
        dataset,
        vit=SMALL_VIT,
        distiller={"teacher_weights_path": str(teacher)},
        train={
            "local_batch_size": 4,
            "global_batch_size": 8,
            "num_workers": 0,
            "weight_decay": weight_decay,
            "checkpoint_path": str(ckpt),
        },
        data=SMALL_DATA,
    )
    assert trainer.progress.iteration == 3
    upe = trainer.plan.updates_per_epoch  # 24 images in updates of 8
    assert (trainer.progress.epoch, trainer.progress.update_in_epoch) == (3 // upe, 3 % upe)
    assert trainer.optimizer.param_groups[-1]["lr"] == pytest.approx(trainer.schedule(3))
    restored = 0
    for ours, p in trainer.model.named_parameters():
        theirs = deploy.deploy_name(ours)
        if theirs is None:  # our distillation token and head: fresh, no state
            assert p not in trainer.optimizer.state
            continue
        weight, state = v1[theirs]
        assert torch.equal(p.detach(), weight)
        got = trainer.optimizer.state[p]
        assert torch.equal(got["exp_avg"], state["exp_avg"]) and torch.equal(got["exp_avg_sq"], state["exp_avg_sq"])
        assert float(got["step"]) == 3.0
        restored += 1
    assert restored == len(v1) - (5 if distilled else 0)


@pytest.mark.slow
def test_earlier_release_resume_runs_to_the_end_and_says_what_it_could_not_restore(tmp_path, dataset):
    ckpt, _ = v1_checkpoint(tmp_path / "vit_000003", distilled=True)
    teacher = tmp_path / "t.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), teacher)
    cfg_path = users_config(
        tmp_path,
        "deit_tiny",
        dataset,
        vit=SMALL_VIT,
        distiller={"teacher_weights_path": str(teacher)},
        train={
            "local_batch_size": 4,
            "global_batch_size": 8,
            "num_workers": 0,
            "epochs": 2,
            "checkpoint_path": str(ckpt),
        },
        data=SMALL_DATA,
    )
    proc = run_script("train.py", "-c", cfg_path, cwd=tmp_path, check=True)
    assert "checkpoint of the earlier release: resuming at iteration 3 (epoch 2, update 0 of 3)" in proc.stdout
    assert "the adamw state of its 30 ViT parameters" in proc.stdout  # 4 + 2 blocks x 11 + 4
    assert "distillation token and head, which start fresh (the earlier release did not save them" in proc.stdout
    last = load(tmp_path / run_dir_of(proc) / "last.pt")
    assert last["iteration"] == 6 and last["epoch"] == 2


def test_earlier_release_optimizer_that_does_not_fit_is_one_line(tmp_path, dataset):
    ckpt, _ = v1_checkpoint(tmp_path / "v1.pt", distilled=False)
    bad = torch.load(ckpt, weights_only=True)
    bad["optimizer"]["param_groups"][0]["params"].pop()  # one parameter short
    torch.save(bad, tmp_path / "short.pt")
    with pytest.raises(
        UserError, match="the optimizer holds 29 parameters; the earlier release's ViT of depth 2 has 30"
    ):
        _trainer(
            tmp_path,
            "vit_tiny",
            dataset,
            vit=SMALL_VIT,
            train={"local_batch_size": 4, "global_batch_size": 8, "checkpoint_path": str(tmp_path / "short.pt")},
            data=SMALL_DATA,
        )
    with pytest.raises(
        UserError,
        match=r"holds \['exp_avg', 'exp_avg_sq', 'step'\], not the \['momentum_buffer'\] of "
        "train_config.optimizer 'sgd'",
    ):
        _trainer(
            tmp_path,
            "vit_tiny",
            dataset,
            vit=SMALL_VIT,
            train={"local_batch_size": 4, "global_batch_size": 8, "checkpoint_path": str(ckpt), "optimizer": "sgd"},
            data=SMALL_DATA,
        )
