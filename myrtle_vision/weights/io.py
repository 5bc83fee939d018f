"""Weights files on disk: atomic writes, ``weights_only`` reads of users' files, and the one way
this package says how a set of tensors does not fit a model (:func:`mismatch`)."""

from __future__ import annotations

import os
import pickletools  # reads a pickle's opcodes only: nothing is built, nothing is run
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import UserError, WriteFailed, reason
from ..files import discard, fsync_dir, temporary_name, write_atomic


def save_atomic(
    obj, path: str | Path, what: str = "checkpoint", intact: str = "the previous checkpoints are intact"
) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`myrtle_vision.files.write_atomic`).

    A crash at any moment leaves either the previous file or the new one under ``path``, never a
    partial one. A write that fails (full disk, no permission) removes the temporary file, leaves
    the previous file as it was, and raises :class:`~myrtle_vision.errors.WriteFailed` (exit 3)
    naming the path, the reason and ``intact``.
    """
    return write_atomic(path, lambda f: torch.save(obj, f), what, intact)


def link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` a second name for ``src`` (a hard link, else a copy), replacing it atomically."""
    tmp = temporary_name(dst)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        discard(tmp)
        raise WriteFailed(
            f"{dst}: cannot update it to point to {src.name} ({reason(e)}); {src} itself is complete"
        ) from None
    fsync_dir(dst.parent)


def load_file(path: Path, what: str):
    """``torch.load(weights_only=True)`` of a user's file; whatever goes wrong is a one-line UserError.

    A file that names something a weights file does not hold (a function to call, a class to build: what a
    file crafted to run code names) is refused, in a line naming it. torch's warnings about a file it does
    not read, and its advice to retry with weights_only off, are not passed on."""
    error = None
    with warnings.catch_warnings(record=True) as caught:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file can fail anywhere inside the unpickler
            error = e
    if error is None:
        for w in caught:  # a file that loads keeps torch's warnings
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        return obj
    # torch re-raises the weights-only reader's own error (the __context__) inside its advice
    inner = error.__context__ if str(error).startswith("Weights only load failed") and error.__context__ else error
    named = _refused_because(path, str(inner))
    if named:
        raise UserError(
            f"{path}: refused as a {what}: it names {named}, which a weights file does not hold; nothing in it was run"
        ) from None
    why = "torch's weights-only reader refused it" if inner is error and "weights_only" in str(error) else reason(inner)
    raise UserError(f"{path}: not a readable {what} ({why})") from None


def _refused_because(path: Path, message: str) -> str | None:
    """What a file torch's weights-only reader refused names that a weights file does not hold (a global's
    name when known), from the reader's error ``message``; None for a file that is merely unreadable."""

    def printable(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_.]{1,200}", name) else ascii(name)[:80]

    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return printable(found.group(1))
    if "unrecognized function" in message:
        return "a function to call"
    if message.startswith(("Can only create new object", "Can only build")):
        return "an object to build"
    if message.startswith("Unsupported operand"):  # a plain pickle of a protocol torch's reader does not read
        if zipfile.is_zipfile(path):
            return None
        pushed, memo = [], {}
        try:
            with open(path, "rb") as f:
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        return printable(arg.replace(" ", "."))
                    if op.name == "STACK_GLOBAL":
                        both = pushed[-2:]
                        named = len(both) == 2 and all(isinstance(s, str) for s in both)
                        return printable(".".join(both)) if named else "a global"
                    if op.name == "MEMOIZE" and pushed:
                        memo[len(memo)] = pushed[-1]
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and pushed:
                        memo[arg] = pushed[-1]
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif isinstance(arg, str):
                        pushed.append(arg)
        except Exception:  # not a pickle at all: unreadable
            return None
    return None


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


def mismatch(
    expected: dict[str, torch.Tensor],
    found: dict[str, torch.Tensor],
    ours: str = "the model",
    ignore=lambda name: False,
    limit: int = 3,
) -> list[str]:
    """How the tensors ``found`` (in a file) fail to fit ``expected`` (a model's): the entries of another shape,
    then the missing ones, then the unexpected ones (those ``ignore`` does not excuse), a phrase each. The one
    way this package says what does not fit; :func:`describe` joins the phrases into a line."""
    problems = [
        f"{k} has shape {tuple(found[k].shape)} ({ours} has {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ][:limit]
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
