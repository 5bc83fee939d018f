"""Weights files on disk: atomic writes, ``weights_only`` reads of users' files, and the one way
this package says how a set of tensors does not fit a model (:func:`mismatch`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import TrainingStopped, UserError, reason


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


def _listed(names: list[str], limit: int) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], ours: str = "the model",
             ignore=lambda name: False, limit: int = 3) -> list[str]:
    """How the tensors ``found`` (in a file) fail to fit ``expected`` (a model's): the entries of another shape,
    then the missing ones, then the unexpected ones (those ``ignore`` does not excuse), a phrase each. The one
    way this package says what does not fit; :func:`describe` joins the phrases into a line."""
    problems = [f"{k} has shape {tuple(found[k].shape)} ({ours} has {tuple(v.shape)})"
                for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)][:limit]
    missing = [k for k in expected if k not in found and not ignore(k)]
    unexpected = [k for k in found if k not in expected and not ignore(k)]
    if missing:
        problems.append(f"missing {_listed(missing, limit)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected, limit)}")
    return problems


def describe(problems: list[str], limit: int = 4) -> str | None:
    """The phrases of :func:`mismatch` (and any others) as one line, or None when there are none."""
    return "; ".join(problems[:limit]) + ("; ..." if len(problems) > limit else "") if problems else None
