"""Checkpoints of the earlier release (v1.0.0): resuming them with their optimizer state.

Its checkpoint held ``{"model", "optimizer", "lr_scheduler", "iteration"}``. ``model`` is the ViT in
the deploy layout (see :mod:`myrtle_vision.weights.deploy`), which loads as it is. ``optimizer`` is a torch
optimizer state dict, which names no parameters: its state is keyed by each parameter's position in
the optimizer's groups. Those positions follow from how the earlier release built the optimizer:

- timm 0.5.4's ``create_optimizer`` over a module: the parameters in ``named_parameters()`` order,
  split (when ``weight_decay`` is not 0) into ``[no decay, decay]``, where "no decay" is every
  parameter with one dimension or a name ending in ``.bias`` (its ViT listed no other exceptions);
- the module was the ViT for a ``vit_*`` config. ``named_parameters()`` visits a module's own
  parameters before its children's, so the order is ``pos_embedding, cls_token``, then
  ``patch_to_embedding``, every block (attention: norm, ``to_qkv``, ``to_out.0``; MLP: norm,
  ``net.0``, ``net.3``) and ``mlp_head``: the deploy layout's own order;
- for a ``deit_*`` config it was the distillation wrapper: its ``distillation_token`` first, then
  the frozen teacher (skipped: no gradient), the ViT, and its distillation head ``distill_mlp``
  (a LayerNorm and a Linear). The wrapper was not saved: only the ViT is in ``model``, so the
  distillation token and head cannot be restored, and their optimizer state is dropped.

:func:`optimizer_state_by_name` undoes that numbering, so the moments can be put on our parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .weights import deploy

DISTILLATION = [
    "distillation_token",
    "distill_mlp.0.weight",
    "distill_mlp.0.bias",
    "distill_mlp.1.weight",
    "distill_mlp.1.bias",
]  # the earlier release's DeiT wrapper, in its order (token first, head last)


def vit_parameter_order(depth: int) -> list[str]:
    """The earlier release's ViT parameters (deploy-layout names) in ``named_parameters()`` order."""
    names = ["pos_embedding", "cls_token", "patch_to_embedding.weight", "patch_to_embedding.bias"]
    for i in range(depth):
        attn, mlp = f"transformer.layers.{i}.0.fn.", f"transformer.layers.{i}.1.fn."
        names += [
            f"{attn}norm.weight",
            f"{attn}norm.bias",
            f"{attn}fn.to_qkv.weight",
            f"{attn}fn.to_out.0.weight",
            f"{attn}fn.to_out.0.bias",
            f"{mlp}norm.weight",
            f"{mlp}norm.bias",
            f"{mlp}fn.net.0.weight",
            f"{mlp}fn.net.0.bias",
            f"{mlp}fn.net.3.weight",
            f"{mlp}fn.net.3.bias",
        ]
    return names + ["mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"]


def parameter_order(depth: int, distilled: bool) -> list[str]:
    """What the earlier release's optimizer was built over: the ViT, or (DeiT) its distillation wrapper."""
    vit = vit_parameter_order(depth)
    return [DISTILLATION[0], *vit, *DISTILLATION[1:]] if distilled else vit


def timm_groups(names: list[str], ndims: dict[str, int], split: bool) -> list[list[str]]:
    """timm 0.5.4's ``create_optimizer`` grouping: ``[no decay, decay]``, or (``weight_decay`` 0) one group."""
    if not split:
        return [list(names)]
    no_decay = [n for n in names if ndims[n] == 1 or n.endswith(".bias")]
    return [no_decay, [n for n in names if n not in set(no_decay)]]


def _shapes(model_entry: dict[str, torch.Tensor], distilled: bool) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model_entry.items()}
    if distilled:
        dim, classes = shapes["cls_token"][-1], shapes["mlp_head.1.weight"][0]
        shapes.update(
            {
                "distillation_token": (1, 1, dim),
                "distill_mlp.0.weight": (dim,),
                "distill_mlp.0.bias": (dim,),
                "distill_mlp.1.weight": (classes, dim),
                "distill_mlp.1.bias": (classes,),
            }
        )
    return shapes


def optimizer_state_by_name(ckpt: dict, path: Path) -> tuple[dict[str, dict], bool]:
    """(per-parameter optimizer state keyed by deploy-layout name, whether it was a DeiT run).

    The DeiT wrapper's own entries keep the earlier release's names (``distillation_token``,
    ``distill_mlp.*``). Anything that does not fit that numbering is a one-line UserError.
    """
    model, opt = ckpt["model"], ckpt.get("optimizer")
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    state = opt.get("state") if isinstance(opt, dict) else None
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise UserError(f"{path}: the earlier release's 'optimizer' entry is not an optimizer state dict")
    ids = [i for g in groups for i in g["params"]]
    depth = len({k.split(".")[2] for k in model if k.startswith("transformer.layers.")})
    fits = {len(parameter_order(depth, d)): d for d in (False, True)}
    if len(ids) not in fits or any("to_qkv.bias" in k for k in model):
        raise UserError(
            f"{path}: the optimizer holds {len(ids)} parameters; the earlier release's ViT of depth {depth} "
            f"has {len(parameter_order(depth, False))} ({len(parameter_order(depth, True))} with DeiT's "
            "distillation token and head), so its state cannot be matched to the weights"
        )
    distilled = fits[len(ids)]
    names = parameter_order(depth, distilled)
    shapes = _shapes(model, distilled)
    expected = timm_groups(names, {n: len(s) for n, s in shapes.items()}, split=len(groups) > 1)
    if [len(g["params"]) for g in groups] != [len(g) for g in expected]:
        raise UserError(
            f"{path}: the optimizer's groups hold {[len(g['params']) for g in groups]} parameters; the "
            f"earlier release (timm's weight-decay grouping) would give {[len(g) for g in expected]}"
        )
    by_name = {}
    for group, group_names in zip(groups, expected):
        for index, name in zip(group["params"], group_names):
            entry = state.get(index)
            if entry is None:  # never stepped
                continue
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != shapes[name]:
                    raise UserError(
                        f"{path}: optimizer state {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)}, but the earlier release's parameter order puts {name} "
                        f"{shapes[name]} there"
                    )
            by_name[name] = entry
    return by_name, distilled


def convert_state(entry: dict, optimizer: str, path: Path, name: str) -> dict:
    """One parameter's state in torch's current form (``step`` a float tensor); its keys must be those of
    ``optimizer`` (``train_config.optimizer``)."""
    needed = {"sgd": {"momentum_buffer"}}.get(optimizer, {"step", "exp_avg", "exp_avg_sq"})
    if not needed <= set(entry):
        raise UserError(
            f"{path}: the optimizer state of {name} holds {sorted(entry)}, not the {sorted(needed)} of "
            f"train_config.optimizer {optimizer!r}; set optimizer to the one the run was trained with"
        )
    out = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}
    if "step" in out:
        out["step"] = torch.tensor(float(out["step"]), dtype=torch.float32)
    return out


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, by_name: dict[str, dict], optimizer_kind: str, path: Path
) -> list[str]:
    """Put the earlier release's per-parameter state on ``model``'s parameters in ``optimizer``; returns the
    names (ours) of the parameters that got state."""
    ours = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    restored = []
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            theirs = deploy.deploy_name(ours[id(p)])
            if theirs is not None and theirs in by_name:
                sd["state"][index] = convert_state(by_name[theirs], optimizer_kind, path, theirs)
                restored.append(ours[id(p)])
            index += 1
    optimizer.load_state_dict(sd)
    return restored
