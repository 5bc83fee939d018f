"""The accelerator's checkpoint layout: the only module that knows its parameter names.

A checkpoint's ``"model"`` entry holds the ViT in the names, shapes and semantics of the earlier
release (``patch_to_embedding``, ``transformer.layers.i.0.fn.fn.to_qkv``, ``mlp_head.1``, ...),
which the accelerator's importer reads. Our modules use timm's names. Every tensor maps one to
one with the same shape and meaning, so the conversion is a renaming:

===============================================  ==============================
deploy layout                                    ``VisionTransformer``
===============================================  ==============================
``pos_embedding``                                ``pos_embed``
``cls_token``                                    ``cls_token``
``patch_to_embedding.{weight,bias}``             ``patch_embed.proj.*``
``transformer.layers.i.0.fn.norm.*``             ``blocks.i.norm1.*``
``transformer.layers.i.0.fn.fn.to_qkv.weight``   ``blocks.i.attn.qkv.weight``
``transformer.layers.i.0.fn.fn.to_qkv.bias``     ``blocks.i.attn.qkv.bias`` (``qkv_bias`` only)
``transformer.layers.i.0.fn.fn.to_out.0.*``      ``blocks.i.attn.proj.*``
``transformer.layers.i.1.fn.norm.*``             ``blocks.i.norm2.*``
``transformer.layers.i.1.fn.fn.net.0.*``         ``blocks.i.mlp.fc1.*``
``transformer.layers.i.1.fn.fn.net.3.*``         ``blocks.i.mlp.fc2.*``
``mlp_head.0.*``                                 ``norm.*``
``mlp_head.1.*``                                 ``head.*``
===============================================  ==============================
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UserError
from .io import describe, mismatch

# (deploy-name pattern, module-name pattern); "{i}" stands for the block index.
_NAMES = [
    ("pos_embedding", "pos_embed"),
    ("cls_token", "cls_token"),
    ("patch_to_embedding.{p}", "patch_embed.proj.{p}"),
    ("transformer.layers.{i}.0.fn.norm.{p}", "blocks.{i}.norm1.{p}"),
    ("transformer.layers.{i}.0.fn.fn.to_qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("transformer.layers.{i}.0.fn.fn.to_out.0.{p}", "blocks.{i}.attn.proj.{p}"),
    ("transformer.layers.{i}.1.fn.norm.{p}", "blocks.{i}.norm2.{p}"),
    ("transformer.layers.{i}.1.fn.fn.net.0.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("transformer.layers.{i}.1.fn.fn.net.3.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("mlp_head.0.{p}", "norm.{p}"),
    ("mlp_head.1.{p}", "head.{p}"),
]


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex + "$")


_TO_MODULE = [(_compile(d), m) for d, m in _NAMES]
_TO_DEPLOY = [(_compile(m), d) for d, m in _NAMES]


def _rename(name: str, table) -> str | None:
    for regex, target in table:
        match = regex.match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def deploy_name(name: str) -> str | None:
    """The deploy-layout name of one of our ViT's tensors; None for the distillation token and head."""
    return _rename(name, _TO_DEPLOY)


def to_deploy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT's state dict -> the accelerator's layout (plain ViT entries only)."""
    out = {}
    for name, tensor in state_dict.items():
        new = _rename(name, _TO_DEPLOY)
        if new is None:
            raise KeyError(f"{name} has no place in the deploy layout")
        out[new] = tensor
    return out


def from_deploy(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The accelerator's layout -> our ViT's state dict names."""
    out = {}
    for name, tensor in state_dict.items():
        new = _rename(name, _TO_MODULE)
        if new is None:
            raise UserError(f"{source}: model entry {name!r} is not part of the ViT checkpoint layout")
        out[new] = tensor
    return out


def describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """One line saying how ``found`` (deploy names) differs from ``expected``, or None if it fits: the
    depth first when it differs (rather than every block's entries), and what a qkv_bias difference means."""
    depth = lambda sd: len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})  # noqa: E731
    problems, same_depth = [], depth(expected) == depth(found)
    if not same_depth:
        problems.append(f"depth {depth(found)} (the config's model has {depth(expected)})")
    problems += mismatch(
        expected, found, "the config's model", ignore=lambda n: not same_depth and n.startswith("transformer.layers.")
    )
    if any(n.endswith("to_qkv.bias") for n in expected if n not in found):
        problems.append("the config has qkv_bias true; the checkpoint was trained without")
    if any(n.endswith("to_qkv.bias") for n in found if n not in expected):
        problems.append("the checkpoint was trained with qkv_bias; set it to true in the config")
    return describe(problems)


DISTILLATION_PREFIXES = ("dist_token", "head_dist.")


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(plain ViT entries, distillation token and head entries) of a model state dict."""
    plain = {k: v for k, v in state.items() if not k.startswith(DISTILLATION_PREFIXES)}
    return plain, {k: v for k, v in state.items() if k.startswith(DISTILLATION_PREFIXES)}


def model_entries(model: nn.Module) -> dict:
    """The checkpoint entries that hold ``model``: ``model`` (deploy layout) and, for DeiT, ``distillation``."""
    plain, distill = _split({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return {"model": to_deploy(plain), **({"distillation": distill} if distill else {})}


def has_distillation(ckpt: dict) -> bool:
    return isinstance(ckpt.get("distillation"), dict)


def load_model_weights(model: nn.Module, ckpt: dict, path, require_distillation: bool = True) -> None:
    """Put the checkpoint's weights into ``model``, or say exactly what differs.

    A distilled model takes its distillation token and head from the ``distillation`` entry; when
    the checkpoint has none and ``require_distillation`` is false they keep their initial values.
    """
    plain, distill = _split(model.state_dict())
    expected = to_deploy(plain)
    problem = describe_mismatch(expected, ckpt["model"])
    if problem:
        raise UserError(f"{path}: checkpoint does not fit the config's model: {problem}")
    weights = from_deploy(ckpt["model"], str(path))
    if distill:
        if has_distillation(ckpt):
            found = ckpt["distillation"]
            problem = describe(mismatch(distill, found, "the config's model"))
            if problem:
                raise UserError(f"{path}: distillation entry does not fit the config's model ({problem})")
            weights.update({k: found[k] for k in distill})
        elif require_distillation:
            raise UserError(
                f"{path}: checkpoint of a ViT trained without a teacher, but the config has a "
                "distiller_config (its distillation token and head are missing)"
            )
        else:
            weights.update(distill)
    model.load_state_dict(weights)
