"""Start from pretrained weights on disk: timm's ``VisionTransformer``, Facebook's DeiT release, or
torchvision's ``vit_*`` models, converted into our :class:`~myrtle_vision.models.vit.VisionTransformer`.

Nothing is downloaded: the file is read with ``torch.load(weights_only=True)``. The conversion is
one function per source, at the edge, into timm's names (which our modules use), then one
function that fits those tensors to the model being built:

- the patch embedding's convolution ``(D, C, p, p)`` becomes our Linear over patches flattened as
  (row, column, channel): the same function, the weight permuted;
- the position embedding is resized by bicubic interpolation of its grid when the image size gives
  another grid, as the source library resizes its own (the class token's position kept);
- the classifier is replaced (freshly initialised) when ``number_of_classes`` differs;
- a distilled DeiT checkpoint brings its distillation token and head. Our distillation token has no
  position embedding (see :mod:`myrtle_vision.models.vit`), so its learnt position is added into
  the token itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .io import describe, mismatch, read_state_dict


def read_timm_state_dict(path: str | Path, fmt: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a pretrained file, in timm's names."""
    raw = read_state_dict(path, f"{fmt} weights file", where)
    expected = (
        ("conv_proj.weight", "encoder.pos_embedding")
        if fmt == "torchvision"
        else ("patch_embed.proj.weight", "pos_embed")
    )
    if not all(k in raw for k in expected):
        found = (
            "torchvision"
            if "conv_proj.weight" in raw
            else "timm' or 'deit"
            if "patch_embed.proj.weight" in raw
            else None
        )
        hint = f" (it looks like a {found} file: set pretrained_format to '{found}')" if found else ""
        raise UserError(f"{where}: {path}: not a {fmt} ViT state dict: no {' or '.join(expected)}{hint}")
    return _from_torchvision(raw) if fmt == "torchvision" else raw


_TORCHVISION = [
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"class_token", "cls_token"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
]


def _from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ``VisionTransformer`` names in timm's (its attention packs q, k, v like timm's qkv);
    names it does not know are kept, so that they are reported rather than dropped."""
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in _TORCHVISION:
            if re.fullmatch(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        out[name] = tensor
    return out


# What a plain ViT file holds, in timm's names; anything else (layer scale, register tokens, a
# pre-norm, pooling heads) would make the model compute something else, so it is refused.
_KNOWN = re.compile(
    r"(patch_embed\.proj\.(weight|bias)|cls_token|dist_token|pos_embed|norm\.(weight|bias)"
    r"|head(_dist)?\.(weight|bias)|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    r"\.(weight|bias))"
)


def resize_grid(pos: torch.Tensor, grid: int, fmt: str = "timm") -> torch.Tensor:
    """A ``(1, n*n, D)`` grid of position embeddings resampled to ``(1, grid*grid, D)``, bicubic, the way
    the source library resizes its own: timm antialiased with align_corners off, torchvision with it on."""
    old = round(pos.shape[1] ** 0.5)
    if old * old != pos.shape[1]:
        raise ValueError(f"{pos.shape[1]} positions are not a square grid")
    if old == grid:
        return pos
    dim = pos.shape[-1]
    image = pos.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    if fmt == "torchvision":
        image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=True)
    else:
        image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)


def load_pretrained(model: nn.Module, path: str | Path, fmt: str, where: str) -> list[str]:
    """Fill ``model`` (one of ours, freshly built) from a pretrained file; returns what was left as initialised."""
    state = read_timm_state_dict(path, fmt, where)
    theirs = f"{where}: {path}"
    _check_plain_vit(state, model.args, theirs)
    converted, fresh = _to_our_vit(state, model.args, fmt)
    excused = {f"{h}.{p}" for h in fresh for p in ("weight", "bias")} | {"dist_token"}
    problem = describe(mismatch(model.state_dict(), converted, "this model", ignore=excused.__contains__))
    if problem:
        raise UserError(
            f"{theirs}: does not fit vit_config's model: {problem} (check vit_config's embed_dim, heads and mlp_dim)"
        )
    model.load_state_dict(converted, strict=False)
    return fresh


def _check_plain_vit(state: dict[str, torch.Tensor], args, theirs: str) -> None:
    """The file is a plain ViT (nothing that would change what the model computes) of vit_config's patch
    embedding, depth and attention biases, with a position embedding we can resize."""
    unknown = sorted(k for k in state if not _KNOWN.fullmatch(k))
    if unknown:
        raise UserError(
            f"{theirs}: entries a plain ViT has no place for: {', '.join(unknown[:3])}"
            + (" ..." if len(unknown) > 3 else "")
            + " (layer scale, register tokens, a pre-norm or a "
            "pooling head would change what the model computes)"
        )
    for key in ("patch_embed.proj.bias", "cls_token"):
        if key not in state:
            raise UserError(f"{theirs}: it has no {key}")
    weight = state["patch_embed.proj.weight"]
    if (
        weight.ndim != 4
        or weight.shape[0] != args.embed_dim
        or tuple(weight.shape[1:]) != (args.in_chans, args.patch_size, args.patch_size)
    ):
        raise UserError(
            f"{theirs}: its patch embedding is {tuple(weight.shape)} (embed_dim, channels, patch, patch), "
            f"but vit_config has embed_dim {args.embed_dim} and patch_size {args.patch_size}"
        )
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth != args.depth:
        raise UserError(f"{theirs}: it has {depth} blocks, but vit_config has depth {args.depth}")
    if "blocks.0.attn.qkv.bias" in state and not args.qkv_bias:
        raise UserError(f"{theirs}: its attention has qkv biases; set vit_config.qkv_bias to true")
    prefix = 2 if "dist_token" in state else 1
    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != args.embed_dim or pos.shape[1] <= prefix:
        raise UserError(
            f"{theirs}: position embedding {tuple(pos.shape)}: expected (1, {prefix} + patches, {args.embed_dim})"
        )
    n = pos.shape[1] - prefix
    if round(n**0.5) ** 2 != n:
        square = round(pos.shape[1] ** 0.5) ** 2 == pos.shape[1]
        raise UserError(
            f"{theirs}: position embedding {tuple(pos.shape)}: "
            + (
                "no position for the class token (timm's no_embed_class, as DeiT III): not supported"
                if square
                else f"{n} patch positions are not a square grid"
            )
        )


def _to_our_vit(state: dict[str, torch.Tensor], args, fmt: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checked plain-ViT state (timm's names) as our model's tensors; and the heads (and distillation token)
    left as initialised: not in the file, or for another class count."""
    prefix = 2 if "dist_token" in state else 1
    weight, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    patches = resize_grid(pos[:, prefix:], args.image_size // args.patch_size, fmt)
    converted = {
        "patch_embed.proj.weight": weight.permute(0, 2, 3, 1).reshape(args.embed_dim, -1),  # (row, col, channel)
        "patch_embed.proj.bias": state["patch_embed.proj.bias"],
        "cls_token": state["cls_token"],
        "pos_embed": torch.cat([pos[:, :1], patches], dim=1),
        **{k: v for k, v in state.items() if k.startswith(("blocks.", "norm."))},
    }
    if args.distilled and "dist_token" in state:
        converted["dist_token"] = state["dist_token"] + pos[:, 1:2]  # ours has no position: fold it in
    fresh = []
    for head in ("head", "head_dist") if args.distilled else ("head",):
        if f"{head}.bias" in state and state.get(f"{head}.weight", torch.empty(0)).shape == (
            args.num_classes,
            args.embed_dim,
        ):
            converted[f"{head}.weight"], converted[f"{head}.bias"] = state[f"{head}.weight"], state[f"{head}.bias"]
        else:
            fresh.append(head)  # another class count: the classifier is replaced
    if args.distilled and "dist_token" not in converted:
        fresh.append("dist_token")
    return converted, fresh
