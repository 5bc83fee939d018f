"""Every file this tool writes for its user (checkpoints, reports, CSVs, deploy files): checked before long
work starts, written atomically, and never written over a file the user had unless they asked.

:func:`check_output` and :func:`check_folder` run before the work: a path that is a folder, a folder that
cannot be created or written, or an existing file this tool did not write is a one-line
:class:`~myrtle_vision.errors.UserError` (exit 2) naming the flag or field, before any time is spent.
:func:`write_atomic` writes to a temporary file in the same folder, flushes it to disk and renames it over
the path, so a reader (or a crash, a full disk, a file-size limit) sees the previous file or the new one,
never part of one; a write that fails is :class:`~myrtle_vision.errors.WriteFailed` (exit 3), and cleaning
up its temporary file never hides why it failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import UserError, WriteFailed, reason

Data = bytes | str | Callable[[BinaryIO], None]


def temporary_name(path: Path) -> Path:
    """Where :func:`write_atomic` writes ``path`` first (``.NAME.tmpPID``, which
    :func:`remove_stale_temporaries` recognises)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def discard(path: Path) -> None:
    """Remove ``path`` if it is there; a failure to (a read-only file system) is ignored, since the caller is
    already reporting the error that matters."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_dir(folder: Path) -> None:
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


def write_staged(path: str | Path, data: Data, what: str = "file", intact: str | None = None) -> Path:
    """The first half of :func:`write_atomic`: ``data`` written and flushed to disk in a temporary file beside
    ``path``, which is returned (to check before :func:`publish` puts it in place, or to :func:`discard`)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError, ValueError) as e:  # torch's archive writer reports a failed write as RuntimeError
        discard(tmp)
        raise WriteFailed(
            f"{path}: cannot write the {what} ({reason(e)}); " + (intact or f"nothing was written over {path.name}")
        ) from None
    except BaseException:  # Ctrl-C, or a bug in ``data``: no temporary file left behind either
        discard(tmp)
        raise
    return tmp


def publish(tmp: Path, path: str | Path, what: str = "file", intact: str | None = None) -> Path:
    """The second half of :func:`write_atomic`: rename the written temporary file over ``path``."""
    path = Path(path)
    try:
        os.replace(tmp, path)
    except OSError as e:
        discard(tmp)
        raise WriteFailed(
            f"{path}: cannot write the {what} ({reason(e)}); " + (intact or f"nothing was written over {path.name}")
        ) from None
    fsync_dir(path.parent)
    return path


def write_atomic(path: str | Path, data: Data, what: str = "file", intact: str | None = None) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path`` atomically.

    A write that fails (full disk, file-size limit, permission taken away) removes the temporary file,
    leaves whatever was at ``path`` as it was, and raises WriteFailed naming the path, the ``what`` and the
    reason, followed by ``intact`` (default: that the earlier file, if any, is unchanged)."""
    return publish(write_staged(path, data, what, intact), path, what, intact)


def write_json(path: str | Path, obj, what: str = "report") -> Path:
    return write_atomic(path, json.dumps(obj, indent=2) + "\n", what)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a crash interrupted (``.NAME.tmpPID``)."""
    for tmp in folder.glob(".*.tmp*"):
        discard(tmp)


def check_folder(folder: str | Path, where: str) -> Path:
    """Before long work: ``folder`` is (or is now made) a folder a file can be created in, found out by
    creating and removing one; otherwise a UserError starting with ``where`` (the flag or field)."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{where}: {folder}: is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check")
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise UserError(f"{where}: {folder}: cannot write there ({reason(e)})") from None
    return folder


def check_output(
    path: str | Path, where: str, *, ours: Callable[[Path], bool] | None = None, force: bool = False, what: str = "file"
) -> Path:
    """Before long work: ``path`` can be written. It must not be a folder, its folder must be writable
    (:func:`check_folder`), and an existing file is replaced only when ``force`` or when ``ours(path)`` says
    this tool wrote it (an earlier run's output); otherwise a UserError starting with ``where``."""
    path = Path(path)
    try:
        is_dir, exists = path.is_dir(), path.exists() or path.is_symlink()
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: {path}: cannot write there ({reason(e)})") from None
    if is_dir:
        raise UserError(f"{where}: {path}: is a folder; name the {what} to write")
    check_folder(path.parent, where)
    if exists and not force and not (ours is not None and _safely(ours, path)):
        raise UserError(
            f"{where}: {path}: already exists and is not a {what} this tool wrote; choose another "
            "name, remove it, or pass --force to replace it"
        )
    return path


def _safely(test: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(test(path))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def described_by(sidecar: Path, *keys: str) -> Callable[[Path], bool]:
    """An ``ours`` test for :func:`check_output`: the file is the one its JSON ``sidecar`` (written by this tool
    beside it) describes, by the sha256 under ``keys`` (nested; default ``"sha256"``)."""
    *nesting, last = keys or ("sha256",)

    def test(path: Path) -> bool:
        info = json.loads(sidecar.read_text())
        for key in nesting:
            info = info.get(key) if isinstance(info, dict) else None
        return isinstance(info, dict) and info.get(last) == sha256(path)

    return test


def json_with(*keys: str) -> Callable[[Path], bool]:
    """An ``ours`` test for :func:`check_output`: the file is a JSON object with all of ``keys`` (a report
    this tool wrote)."""

    def test(path: Path) -> bool:
        obj = json.loads(path.read_text())
        return isinstance(obj, dict) and all(k in obj for k in keys)

    return test
