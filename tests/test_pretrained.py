"""Pretrained weights from timm, DeiT and torchvision files: converted into our ViT, they compute what
the source model computes; they train; their checkpoints keep the deploy layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLASSES, assert_user_error, run_dir_of, run_in_process, run_script, train_config
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn

from myrtle_vision.checkpoint import load
from myrtle_vision.models import VisionTransformer, ViTArgs
from myrtle_vision.weights import deploy
from myrtle_vision.weights.foreign import load_pretrained

SIZES = {"tiny": (192, 3), "small": (384, 6)}


def _ours(image_size, patch, dim, heads, depth, mlp, classes, **kw) -> VisionTransformer:
    torch.manual_seed(1)
    args = ViTArgs(
        image_size=image_size,
        patch_size=patch,
        embed_dim=dim,
        heads=heads,
        depth=depth,
        mlp_dim=mlp,
        num_classes=classes,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        **kw,
    )
    return VisionTransformer(args).eval()


def _random_timm(img: int, dim: int, heads: int, depth: int = 12, classes: int = 45) -> TimmViT:
    torch.manual_seed(0)
    model = TimmViT(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=classes)
    with torch.no_grad():  # timm zero-initialises some tensors; make every one count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("image_size", [224, 160], ids=["same grid", "resized position embedding"])
def test_a_timm_vit_converted_gives_timm_logits(size, image_size, tmp_path):
    dim, heads = SIZES[size]
    source = _random_timm(224, dim, heads)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    ours = _ours(image_size, 16, dim, heads, 12, 4 * dim, 45)
    assert load_pretrained(ours, path, "timm", "test") == []
    # timm's own way of loading the same file at this image size (it resizes the position embedding too)
    reference = TimmViT(img_size=image_size, patch_size=16, embed_dim=dim, depth=12, num_heads=heads, num_classes=45)
    reference.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True), reference))
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected, got = reference.eval()(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.1  # the logits are not trivially small


@pytest.mark.parametrize("image_size", [32, 48], ids=["same grid", "resized position embedding"])
def test_a_torchvision_vit_converted_gives_torchvision_logits(image_size, tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
    from torchvision.models.vision_transformer import interpolate_embeddings

    def torchvision_vit(size):
        return TorchvisionViT(
            image_size=size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
        )

    torch.manual_seed(0)
    source = torchvision_vit(32)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    ours = _ours(image_size, 8, 32, 2, 2, 64, 3)
    assert load_pretrained(ours, path, "torchvision", "test") == []
    # torchvision's own way of using the file at this image size
    reference = torchvision_vit(image_size)
    reference.load_state_dict(interpolate_embeddings(image_size, 8, torch.load(path, weights_only=True)))
    x = torch.randn(4, 3, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_deit_release_file_brings_its_distillation_token_and_head(tmp_path):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    source = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    torch.save({"model": source.state_dict()}, tmp_path / "deit.pth")  # as Facebook's release wraps it
    ours = _ours(32, 8, 32, 2, 2, 128, 3, distilled=True)
    assert load_pretrained(ours, tmp_path / "deit.pth", "deit", "test") == []
    sd = source.state_dict()
    torch.testing.assert_close(ours.dist_token, sd["dist_token"] + sd["pos_embed"][:, 1:2])
    torch.testing.assert_close(ours.head_dist.weight, sd["head_dist.weight"])
    torch.testing.assert_close(ours.pos_embed, torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], 1))
    plain = _ours(32, 8, 32, 2, 2, 128, 3)  # a plain ViT config takes the same file without the distillation parts
    assert load_pretrained(plain, tmp_path / "deit.pth", "deit", "test") == []
    torch.testing.assert_close(plain.pos_embed, ours.pos_embed)
    torch.testing.assert_close(plain.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_another_class_count_replaces_the_classifier(tmp_path):
    torch.save(_random_timm(32, 32, 2, depth=1, classes=1000).state_dict(), tmp_path / "timm.pth")
    ours = _ours(32, 16, 32, 2, 1, 128, 3)
    head = ours.head.weight.clone()
    assert load_pretrained(ours, tmp_path / "timm.pth", "timm", "test") == ["head"]
    assert torch.equal(ours.head.weight, head)


def _finetune_config(tmp_path, data_cfg, weights, fmt="timm", **vit):
    vit = {
        "image_size": 32,
        "patch_size": 16,
        "embed_dim": 32,
        "heads": 2,
        "depth": 1,
        "mlp_dim": 128,
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
        "pretrained_weights": str(weights),
        "pretrained_format": fmt,
        **vit,
    }
    return train_config(
        tmp_path / "t.json", data_cfg, tmp_path / "out", vit=vit, train={"epochs": 2, "layer_decay": 0.75, "lr": 1e-3}
    )


@pytest.mark.slow
def test_finetuning_from_a_timm_file_trains_and_keeps_the_deploy_layout(tmp_path, data_cfg):
    source = _random_timm(32, 32, 2, depth=1, classes=len(CLASSES))
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    proc = run_script("train.py", "-c", _finetune_config(tmp_path, data_cfg, tmp_path / "timm.pth"), check=True)
    assert "starting from timm weights" in proc.stdout
    ckpt = load(run_dir_of(proc) / "last.pt")
    names = set(ckpt["model"])
    assert "transformer.layers.0.0.fn.fn.to_qkv.bias" in names  # qkv biases: the layout gains these entries
    assert names - {"transformer.layers.0.0.fn.fn.to_qkv.bias"} == set(
        deploy.to_deploy(
            {k: v for k, v in _ours(32, 16, 32, 2, 1, 128, 3).state_dict().items() if k != "blocks.0.attn.qkv.bias"}
        )
    )
    start = deploy.to_deploy({k: v for k, v in _ours(32, 16, 32, 2, 1, 128, 3).state_dict().items()})
    assert set(start) == names
    # it started from the file: after 2 epochs at a small lr the blocks are still close to it
    converted = _ours(32, 16, 32, 2, 1, 128, len(CLASSES))
    load_pretrained(converted, tmp_path / "timm.pth", "timm", "test")
    w0 = converted.blocks[0].mlp.fc1.weight
    w1 = ckpt["model"]["transformer.layers.0.1.fn.fn.net.0.weight"]
    assert (w1 - w0).norm() < 0.5 * w0.norm()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "wrong format",
        "wrong size",
        "qkv bias off",
        "no class token",
        "layer scale",
        "no class position",
        "flat position embedding",
        "corrupt safetensors",
    ],
)
def test_bad_pretrained_files_are_one_line_errors(case, tmp_path, data_cfg):
    state = _random_timm(32, 32, 2, depth=1, classes=3).state_dict()
    torch.save(state, tmp_path / "timm.pth")
    weights, vit, needles = tmp_path / "timm.pth", {}, []
    if case == "no class token":
        del state["cls_token"]
        needles = ["it has no cls_token"]
    elif case == "layer scale":
        state["blocks.0.ls1.gamma"] = torch.ones(32)
        needles = ["no place for: blocks.0.ls1.gamma"]
    elif case == "no class position":
        state["pos_embed"] = state["pos_embed"][:, 1:]
        needles = ["no position for the class token"]
    elif case == "flat position embedding":
        state["pos_embed"] = state["pos_embed"][0]
        needles = ["position embedding (5, 32): expected (1, 1 + patches, 32)"]
    elif case == "corrupt safetensors":
        weights = tmp_path / "model.safetensors"
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        needles = ["not a readable safetensors file"]
    torch.save(state, tmp_path / "timm.pth")
    if case == "missing":
        weights, needles = tmp_path / "none.pth", ["file not found"]
    elif case == "wrong format":
        vit, needles = (
            {"pretrained_format": "torchvision"},
            ["not a torchvision ViT state dict: no conv_proj.weight", "set pretrained_format to 'timm' or 'deit'"],
        )
    elif case == "wrong size":
        vit, needles = {"embed_dim": 64, "heads": 2}, ["patch embedding is (32, 3, 16, 16)", "embed_dim 64"]
    elif case == "qkv bias off":
        vit, needles = {"qkv_bias": False}, ["set vit_config.qkv_bias to true"]
    cfg = _finetune_config(tmp_path, data_cfg, weights, **vit)
    assert_user_error(run_in_process("train.py", "-c", cfg), "pretrained_weights", str(weights), *needles)


def test_a_safetensors_file_loads_like_the_pth(tmp_path):
    from safetensors.torch import save_file

    source = _random_timm(32, 32, 2, depth=1, classes=3)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    torch.save(source.state_dict(), tmp_path / "model.pth")
    a, b = _ours(32, 16, 32, 2, 1, 128, 3), _ours(32, 16, 32, 2, 1, 128, 3)
    load_pretrained(a, tmp_path / "model.safetensors", "timm", "test")
    load_pretrained(b, tmp_path / "model.pth", "timm", "test")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_layer_decay_scales_each_layer_s_learning_rate_through_the_schedule(tmp_path, data_cfg):
    from myrtle_vision.config import load_config
    from myrtle_vision.optim import LRSchedule, build_scheduler, optimizer_for

    cfg = load_config(
        train_config(
            tmp_path / "t.json",
            data_cfg,
            tmp_path / "out",
            vit={"depth": 2},
            train={"layer_decay": 0.5, "lr": 1e-3, "warmup_epochs": 0},
        )
    )
    model = VisionTransformer(ViTArgs.from_config(cfg.vit_config, 3))
    opt = optimizer_for(model, cfg.train_config)
    sched = build_scheduler(opt, LRSchedule.from_config(cfg.train_config, 10))
    lr_of = {name: g for g in opt.param_groups for p in g["params"] for name, q in model.named_parameters() if p is q}
    for _ in range(3):  # through the cosine schedule the ratios hold
        now = opt.param_groups[-1]["lr"]
        assert lr_of["head.weight"]["lr"] == pytest.approx(now) and lr_of["norm.bias"]["lr"] == pytest.approx(now)
        assert lr_of["blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(now * 0.5)
        assert lr_of["blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(now * 0.25)
        assert lr_of["patch_embed.proj.weight"]["lr"] == pytest.approx(now * 0.125)
        assert lr_of["pos_embed"]["lr"] == pytest.approx(now * 0.125) and lr_of["pos_embed"]["weight_decay"] == 0
        assert lr_of["blocks.0.attn.qkv.weight"]["weight_decay"] == cfg.train_config.weight_decay
        opt.step()
        sched.step()
    assert opt.param_groups[-1]["lr"] < 1e-3  # the schedule moved


@pytest.mark.parametrize("name", ["vit_tiny_finetune", "deit_tiny_finetune"])
def test_the_finetune_configs_load_with_finetuning_defaults(name):
    from conftest import REPO

    from myrtle_vision.config import load_config

    cfg = load_config(REPO / "train_configs" / f"{name}.json")
    vc, tc = cfg.vit_config, cfg.train_config
    assert vc.qkv_bias and vc.layer_norm_eps == 1e-6 and vc.pretrained_weights
    assert vc.pretrained_format == ("deit" if name.startswith("deit") else "timm")
    assert tc.layer_decay == 0.75 and tc.peak_lr <= 1e-4
    assert (cfg.distiller_config is not None) == name.startswith("deit")


@pytest.mark.slow
def test_a_checkpoint_and_a_config_that_disagree_on_qkv_bias_is_a_one_line_error(tmp_path, data_cfg):
    torch.save(_random_timm(32, 32, 2, depth=1, classes=len(CLASSES)).state_dict(), tmp_path / "timm.pth")
    cfg = _finetune_config(tmp_path, data_cfg, tmp_path / "timm.pth")
    proc = run_script("train.py", "-c", cfg, check=True)
    from conftest import scalars

    peak = max(v for _, v in scalars(run_dir_of(proc), "train/lr"))
    assert peak == pytest.approx(1e-3)  # the logged lr is the full one (heads'), not a decayed group's
    ckpt = run_dir_of(proc) / "last.pt"
    raw = json.loads(cfg.read_text())
    raw["vit_config"]["qkv_bias"] = False
    cfg.write_text(json.dumps(raw))
    assert_user_error(
        run_in_process("test.py", "-c", cfg, "--checkpoint", ckpt),
        str(ckpt),
        "unexpected",
        "to_qkv.bias",
        "set it to true",
    )
    raw["vit_config"]["qkv_bias"] = True
    raw["train_config"].update(checkpoint_path=str(ckpt), layer_decay=0.5, epochs=3)
    cfg.write_text(json.dumps(raw))
    assert_user_error(run_in_process("train.py", "-c", cfg), str(ckpt), "layer_decay")
