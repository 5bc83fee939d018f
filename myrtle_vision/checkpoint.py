"""Checkpoint files: atomic writes, ``weights_only`` loads, the model entry in the deploy layout.

A training checkpoint is a dict::

    format          "myrtle_vision/1"
    model           the ViT in the accelerator's layout (see myrtle_vision.layout)
    distillation    DeiT runs only: {"dist_token", "head_dist.weight", "head_dist.bias"}, kept
                    apart so that ``model`` stays exactly what the accelerator imports
    quantization    {"q_format", "q_rounding"} the model was trained with ("FP32" unless it was
                    quantization-aware training); ``model`` always holds the FP32 master weights
    optimizer       optimizer state dict
    lr_scheduler    scheduler state dict
    iteration       optimizer updates done
    epoch           epochs completed; update_in_epoch: updates done in the current epoch
    best_val_top1   best validation top-1 so far (percent)
    rng             torch (CPU and CUDA), Python and NumPy random states
    config          the resolved train config, data config inline

The earlier release's files (``model``, ``optimizer``, ``lr_scheduler``, ``iteration``) load too; a
training run resumes them with their optimizer state (see :mod:`myrtle_vision.earlier_release`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import layout
from .errors import TrainingStopped, UserError, reason

FORMAT = "myrtle_vision/1"


def save_atomic(obj, path: str | Path) -> Path:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one under ``path``, never a
    partial one. A write that fails (full disk, no permission) removes the temporary file, leaves
    the previous file as it was, and raises :class:`TrainingStopped` naming the path and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch's archive writer reports a failed write as a RuntimeError
        raise TrainingStopped(f"{path}: cannot write the checkpoint ({reason(e)}); "
                              "the previous checkpoints are intact") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut (where the file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` a second name for ``src`` (a hard link, else a copy), replacing it atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except OSError as e:
        raise TrainingStopped(f"{dst}: cannot update it to point to {src.name} ({reason(e)}); "
                              f"{src} itself is complete") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a crash interrupted (``.NAME.tmpPID``)."""
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def load_file(path: Path, what: str):
    """``torch.load(weights_only=True)`` of a user's file; whatever goes wrong is a one-line UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file can fail anywhere inside the unpickler
        raise UserError(f"{path}: not a readable {what} ({reason(e)})") from None


WRAPPERS = ("model", "state_dict", "model_ema")  # how training scripts (DeiT's, timm's, ours) nest a state dict


def read_state_dict(path: str | Path, what: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a user's weights file (a teacher, pretrained weights), named as the file names them.

    ``.safetensors`` is read as such (tensors only, no pickle); anything else with ``weights_only``.
    A state dict nested under one of :data:`WRAPPERS`, or as the only entry, is taken out, and
    DataParallel's ``module.`` prefixes are dropped. Problems are one-line errors starting with ``where``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: {path}: file not found")
    if path.suffix == ".safetensors":  # timm's hub format
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            obj = load_safetensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{where}: {path}: not a readable safetensors file ({e})") from None
    else:
        try:
            obj = load_file(path, what)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    if isinstance(obj, dict):
        nested = [obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)]
        if not nested and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            nested = list(obj.values())
        obj = nested[0] if nested else obj
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{where}: {path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    ckpt = load_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a checkpoint of this tool (no 'model' entry)")
    return ckpt


DISTILLATION_PREFIXES = ("dist_token", "head_dist.")


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(plain ViT entries, distillation token and head entries) of a model state dict."""
    plain = {k: v for k, v in state.items() if not k.startswith(DISTILLATION_PREFIXES)}
    return plain, {k: v for k, v in state.items() if k.startswith(DISTILLATION_PREFIXES)}


def model_entries(model: nn.Module) -> dict:
    """The checkpoint entries that hold ``model``: ``model`` (deploy layout) and, for DeiT, ``distillation``."""
    plain, dist = _split({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return {"model": layout.to_deploy(plain), **({"distillation": dist} if dist else {})}


def has_distillation(ckpt: dict) -> bool:
    return isinstance(ckpt.get("distillation"), dict)


def load_model_weights(model: nn.Module, ckpt: dict, path, require_distillation: bool = True) -> None:
    """Put the checkpoint's weights into ``model``, or say exactly what differs.

    A distilled model takes its distillation token and head from the ``distillation`` entry; when
    the checkpoint has none and ``require_distillation`` is false they keep their initial values.
    """
    plain, dist = _split(model.state_dict())
    expected = layout.to_deploy(plain)
    mismatch = layout.describe_mismatch(expected, ckpt["model"])
    if mismatch:
        raise UserError(f"{path}: checkpoint does not fit the config's model: {mismatch}")
    weights = layout.from_deploy(ckpt["model"], str(path))
    if dist:
        if has_distillation(ckpt):
            found = ckpt["distillation"]
            bad = [k for k in dist if k not in found or tuple(found[k].shape) != tuple(dist[k].shape)]
            if bad:
                raise UserError(f"{path}: distillation entry does not fit the config's model ({', '.join(bad)})")
            weights.update({k: found[k] for k in dist})
        elif require_distillation:
            raise UserError(f"{path}: checkpoint of a ViT trained without a teacher, but the config has a "
                            "distiller_config (its distillation token and head are missing)")
        else:
            weights.update(dist)
    model.load_state_dict(weights)


def trained_format(ckpt: dict) -> tuple[str, str]:
    """(q_format, q_rounding) of the arithmetic the checkpoint was trained in; FP32 for older files."""
    q = ckpt.get("quantization")
    q = q if isinstance(q, dict) else {}
    return str(q.get("q_format", "FP32")), str(q.get("q_rounding", "nearest_even"))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
