"""The ViT and the accelerator's checkpoint layout: names, shapes and semantics, both ways."""

import json

import pytest
import torch
from conftest import FIXTURES, reference_forward

from myrtle_vision.models.vit import VisionTransformer, ViTArgs
from myrtle_vision.optim import param_groups
from myrtle_vision.weights import deploy

TINY_45 = ViTArgs(image_size=224, patch_size=16, num_classes=45, embed_dim=192, depth=12, heads=3, mlp_dim=768)


def test_deploy_layout_matches_the_accelerators_vit_tiny_exactly():
    expected = json.loads((FIXTURES / "vit_tiny_checkpoint_layout.json").read_text())
    ours = deploy.to_deploy(VisionTransformer(TINY_45).state_dict())
    assert list(ours) == list(expected)  # same names, same order
    assert {k: list(v.shape) for k, v in ours.items()} == expected


def test_round_trip_both_ways_keeps_every_tensor():
    model = VisionTransformer(
        ViTArgs(image_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, heads=2, mlp_dim=48)
    )
    sd = model.state_dict()
    back = deploy.from_deploy(deploy.to_deploy(sd))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    named = deploy.to_deploy(sd)
    again = deploy.to_deploy(deploy.from_deploy(named))
    assert list(again) == list(named) and all(torch.equal(again[k], named[k]) for k in named)


def test_model_computes_what_the_deploy_layout_means():
    torch.manual_seed(0)
    # head_dim 64, as in every shipped size, so the reference's fixed 1/sqrt(64) applies
    args = ViTArgs(image_size=32, patch_size=8, num_classes=7, embed_dim=128, depth=2, heads=2, mlp_dim=96)
    model = VisionTransformer(args).eval()
    for p in model.parameters():  # make every tensor matter (init zeroes biases)
        p.data.normal_(0, 0.2)
    img = torch.randn(3, 3, 32, 32)
    named = deploy.to_deploy(model.state_dict())
    torch.testing.assert_close(
        model(img), reference_forward(named, img, args.heads, args.patch_size), rtol=1e-4, atol=1e-4
    )


def test_timm_style_init_and_weight_decay_groups():
    torch.manual_seed(0)
    model = VisionTransformer(TINY_45)
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001  # timm: trunc_normal_(std=.02)
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0) and torch.all(model.norm.weight == 1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {
        "cls_token",
        "pos_embed",
        "norm.weight",
        "head.bias",
        "blocks.0.norm1.weight",
        "blocks.0.attn.proj.bias",
    } <= no_decay_names
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("change", ["depth", "embed_dim", "classes"])
def test_mismatch_description_names_what_differs(change):
    base = dict(image_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, heads=2, mlp_dim=48)
    other = dict(base, **{"depth": {"depth": 3}, "embed_dim": {"embed_dim": 64}, "classes": {"num_classes": 4}}[change])
    expected = deploy.to_deploy(VisionTransformer(ViTArgs(**base)).state_dict())
    found = deploy.to_deploy(VisionTransformer(ViTArgs(**other)).state_dict())
    message = deploy.describe_mismatch(expected, found)
    assert message is not None
    assert {"depth": "depth 3", "embed_dim": "(1, 17, 64)", "classes": "mlp_head.1.weight has shape (4, 32)"}[
        change
    ] in message
    assert deploy.describe_mismatch(expected, expected) is None


def test_deit_student_class_head_is_the_deployed_plain_vit():
    """The distillation token never reaches the class path, so the accelerator runs what was trained."""
    from myrtle_vision.weights.deploy import model_entries

    args = ViTArgs(
        image_size=32, patch_size=8, num_classes=5, embed_dim=128, depth=3, heads=2, mlp_dim=48, distilled=True
    )
    torch.manual_seed(0)
    student = VisionTransformer(args).eval()
    for p in student.parameters():  # make every tensor matter (init zeroes biases)
        p.data.normal_(0, 0.2)
    entries = model_entries(student)
    assert set(entries) == {"model", "distillation"}
    assert set(entries["distillation"]) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    img = torch.randn(4, 3, 32, 32)
    class_logits, dist_logits = student.forward_heads(img)
    deployed = reference_forward(entries["model"], img, heads=2, patch=8)
    torch.testing.assert_close(class_logits, deployed, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student(img), deployed, rtol=1e-4, atol=1e-4)
    # the distillation head does depend on its token; the class head does not
    with torch.no_grad():
        student.dist_token.add_(torch.randn_like(student.dist_token))  # not uniform: LayerNorm removes that
    class_after, dist_after = student.forward_heads(img)
    torch.testing.assert_close(class_after, class_logits)
    assert (dist_after - dist_logits).abs().max() > 1e-3


def test_deit_student_trains_its_distillation_token_and_head():
    args = ViTArgs(
        image_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, heads=2, mlp_dim=48, distilled=True
    )
    student = VisionTransformer(args)
    class_logits, dist_logits = student.forward_heads(torch.randn(2, 3, 32, 32))
    (class_logits.sum() + dist_logits.sum()).backward()
    assert student.dist_token.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    groups = param_groups(student, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(student.dist_token) in no_decay and id(student.head_dist.weight) not in no_decay
