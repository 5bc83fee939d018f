"""Split protocols: which images of a folder-per-class dataset train, validate and test.

Three protocols, each giving, per class, the file names of each split (every image in exactly one):

- ``earlier``: the earlier release's NWPU-RESISC45 split: per class, by sorted file name, the first 489
  images train, the next 71 validate and the last 140 test.
- ``fraction``: a training fraction of each class (Cheng et al. 2017 report NWPU-RESISC45 with 10% and 20%),
  the rest of the class the test split. Each class's images, in sorted file-name order, are shuffled by a
  generator seeded with (seed, the CRC-32 of the class name), so a class's split depends on the seed and on
  nothing else in the dataset. The first ``round(train_fraction * n)`` images are the training share, the rest
  test; the validation split is the first ``round(val_fraction * share)`` images of the share, the rest of the
  share train. Rounding is half up, on the fractions as written in decimal (exact: ``0.1 * 700`` is 70). With
  one seed, a larger fraction's share holds a smaller one's, and the test split does not depend on
  ``val_fraction``.
- ``lists``: three published lists (TorchGeo's ``resisc45-train.txt``, ``-val.txt``, ``-test.txt``, Neumann et al.
  2019's 60/20/20), one image file name per line, matched by name against the images in the class folders.

:func:`add_protocol_arguments` and :func:`protocol_from_args` are the command-line flags of the dataset scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import UserError, reason

SPLIT_NAMES = ("train", "val", "test")
EARLIER_SPLIT = (489, 71, 140)  # NWPU-RESISC45, per class, by sorted file name: train, validation, test


@dataclass(frozen=True)
class Protocol:
    kind: str  # "earlier", "fraction" or "lists"
    train_fraction: Fraction | None = None  # fraction: the training share (validation included) of each class
    val_fraction: Fraction | None = None  # fraction: the validation part of the training share
    seed: int = 0
    lists: tuple[Path, Path, Path] | None = None  # lists: train, val, test

    def describe(self) -> str:
        """One line saying what the protocol is."""
        if self.kind == "earlier":
            train, val, test = EARLIER_SPLIT
            return (
                f"the earlier release's split: per class, by sorted file name, the first {train} images train, "
                f"the next {val} validate, the last {test} test"
            )
        if self.kind == "fraction":
            return (
                f"per class, shuffled with seed {self.seed}: {_percent(self.train_fraction)} train and validate "
                f"({_percent(self.val_fraction)} of that share validates), the rest test"
            )
        train, val, test = self.lists
        return f"the split lists {train}, {val} and {test}, matched by file name"

    def record(self) -> dict:
        """What split_protocol.json says of the protocol."""
        if self.kind == "earlier":
            train, val, test = EARLIER_SPLIT
            return {"protocol": "earlier", "split": f"per class, by sorted file name: {train} / {val} / {test}"}
        if self.kind == "fraction":
            return {
                "protocol": "fraction",
                "train_fraction": float(self.train_fraction),
                "val_fraction": float(self.val_fraction),
                "seed": self.seed,
                "rounding": "per class of n images: share = round(train_fraction * n), val = "
                "round(val_fraction * share), train = share - val, test = n - share; half up",
            }
        return {
            "protocol": "lists",
            "lists": {
                split: {"path": str(path), "sha256": _sha256_or_none(path)}
                for split, path in zip(SPLIT_NAMES, self.lists)
            },
        }


def _percent(f: Fraction) -> str:
    return f"{float(f) * 100:g}%"


def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _images(n: int) -> str:
    return "1 image gives" if n == 1 else f"{n} images give"


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def fraction_counts(n: int, train_fraction: Fraction, val_fraction: Fraction) -> tuple[int, int, int]:
    """(train, val, test) of a class of ``n`` images under the fraction protocol (see the module's docstring)."""
    share = round_half_up(train_fraction * n)
    val = round_half_up(val_fraction * share)
    return share - val, val, n - share


def class_seed(seed: int, cls: str) -> list[int]:
    return [seed, zlib.crc32(cls.encode("utf-8", "surrogateescape"))]


def split_by_fraction(
    files: dict[str, list[str]], train_fraction: Fraction, val_fraction: Fraction, seed: int, shown: str = "images"
) -> dict[str, dict[str, list[str]]]:
    """{class: {split: file names}} under the fraction protocol; ``files`` holds each class's file names. A class
    that would have no training or no test image, and a validation split empty in every class, are UserErrors
    (``shown``: the folder of class folders, for their messages)."""
    out: dict[str, dict[str, list[str]]] = {}
    for cls in sorted(files):
        names = sorted(files[cls])
        n_train, n_val, n_test = fraction_counts(len(names), train_fraction, val_fraction)
        if n_train < 1 or n_test < 1:
            raise UserError(
                f"{shown}/{cls}: {_images(len(names))} {n_train} train, {n_val} validation and {n_test} test "
                f"with --train-fraction {float(train_fraction):g} and --val-fraction {float(val_fraction):g}; every "
                "class needs at least one training and one test image"
            )
        order = np.random.default_rng(class_seed(seed, cls)).permutation(len(names))
        shuffled = [names[i] for i in order]
        out[cls] = {
            "val": sorted(shuffled[:n_val]),
            "train": sorted(shuffled[n_val : n_val + n_train]),
            "test": sorted(shuffled[n_val + n_train :]),
        }
    if files and not any(split["val"] for split in out.values()):
        raise UserError(
            f"{shown}: --val-fraction {float(val_fraction):g} leaves no class a validation image; raise it "
            "(train.py validates on that split)"
        )
    return out


def split_earlier(files: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """{class: {split: file names}} under the earlier release's split (each class already checked to hold 700)."""
    n_train, n_val, _ = EARLIER_SPLIT
    out = {}
    for cls in sorted(files):
        names = sorted(files[cls])
        out[cls] = {"train": names[:n_train], "val": names[n_train : n_train + n_val], "test": names[n_train + n_val :]}
    return out


def read_list(path: Path) -> list[tuple[int, str]]:
    """(line number, entry) of each non-blank line of a split list."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # a byte-order mark is not part of the first name
    except FileNotFoundError:
        raise UserError(f"{path}: split list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the split list ({reason(e)})") from None
    entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not entries:
        raise UserError(f"{path}: the split list names no images")
    return entries


def split_by_lists(
    files: dict[str, list[str]], lists: tuple[Path, Path, Path], shown: str = "images"
) -> dict[str, dict[str, list[str]]]:
    """{class: {split: file names}} from three split lists (train, val, test). A line is an image's file name
    (``airplane_001.jpg``), or a path whose last two parts are its class folder and file name
    (``images/airplane/airplane_001.jpg``, as our own split files write it). Each image must be in exactly one
    list: a line naming no image, a name that two classes hold, an image listed twice, and an image in no list
    are UserErrors naming the list (and line) and the image; ``shown`` is the folder of class folders, for
    those messages."""
    by_name: dict[str, list[str]] = {}
    for cls in sorted(files):
        for name in files[cls]:
            by_name.setdefault(name, []).append(cls)
    where: dict[tuple[str, str], tuple[Path, int]] = {}
    out: dict[str, dict[str, list[str]]] = {cls: {s: [] for s in SPLIT_NAMES} for cls in files}
    for split, path in zip(SPLIT_NAMES, lists):
        for lineno, entry in read_list(path):
            at = f"{path}:{lineno}"
            parts = [part for part in entry.split("/") if part]
            if len(parts) >= 2:  # CLASS/NAME, perhaps after more folders
                cls, name = parts[-2:]
                if cls not in by_name.get(name, []):
                    raise UserError(f"{at}: {entry}: listed but there is no such image ({shown}/{cls}/{name})")
            else:
                name = parts[0] if parts else entry
                holders = by_name.get(name, [])
                if not holders:
                    raise UserError(f"{at}: {entry}: listed but no class folder in {shown} holds an image of that name")
                if len(holders) > 1:
                    raise UserError(
                        f"{at}: {entry}: ambiguous: classes {holders[0]!r} and {holders[1]!r} both hold an image of "
                        f"that name; write the line as CLASS/{name}"
                    )
                cls = holders[0]
            if (cls, name) in where:
                first, first_line = where[cls, name]
                raise UserError(f"{at}: {entry}: already listed at {first}:{first_line}; an image belongs to one split")
            where[cls, name] = (path, lineno)
            out[cls][split].append(name)
    for cls in sorted(files):
        for name in sorted(files[cls]):
            if (cls, name) not in where:
                raise UserError(
                    f"{shown}/{cls}/{name}: an image in none of the split lists ({', '.join(map(str, lists))})"
                )
    return {cls: {s: sorted(names) for s, names in splits.items()} for cls, splits in out.items()}


def split_classes(files: dict[str, list[str]], protocol: Protocol, shown: str = "images"):
    """{class: {split: file names}} under ``protocol`` (``shown``: the folder of class folders, for messages)."""
    if protocol.kind == "earlier":
        return split_earlier(files)
    if protocol.kind == "fraction":
        return split_by_fraction(files, protocol.train_fraction, protocol.val_fraction, protocol.seed, shown)
    return split_by_lists(files, protocol.lists, shown)


# --- the flags -----------------------------------------------------------------------------------------------------


def add_protocol_arguments(p: argparse.ArgumentParser, *, train: str | None, val: str, default: str) -> None:
    """--train-fraction, --val-fraction, --seed and --split-lists. ``train``: --train-fraction's default (None: the
    earlier release's split is the default protocol); ``val``: --val-fraction's; ``default``: the default protocol,
    for --help."""
    g = p.add_argument_group("split protocol", f"default: {default}")
    g.add_argument(
        "--train-fraction",
        metavar="F",
        help="a fraction in (0, 1) of each class for training, validation included (0.1 and 0.2: Cheng et al. "
        "2017's protocols); the rest of each class is the test split. Per class of n images, round(F * n), half up"
        + (f" (default: {train})" if train else ""),
    )
    g.add_argument(
        "--val-fraction",
        metavar="V",
        help=f"the part of the training share that validates, in (0, 1) (default: {val}); the papers' protocol "
        "has no validation split, so the test figure is the one to compare with them",
    )
    g.add_argument("--seed", type=int, help="seeds each class's shuffle for --train-fraction (default: 0)")
    g.add_argument(
        "--split-lists",
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help="three published split lists, one image file name per line (e.g. TorchGeo's resisc45-train.txt, "
        "resisc45-val.txt, resisc45-test.txt: Neumann et al. 2019's 60/20/20); every image must be in exactly one",
    )


def _fraction(flag: str, text: str) -> Fraction:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or not 0 < value < 1:
        raise UserError(f"{flag}: expected a number between 0 and 1 (both excluded), got {text!r}")
    return value


def protocol_from_args(args: argparse.Namespace, *, train: str | None, val: str) -> Protocol:
    """The protocol the flags ask for (``train``, ``val``: the defaults given to :func:`add_protocol_arguments`);
    a combination that makes no sense is a UserError naming the flags."""
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed: must be 0 or more, got {args.seed}")
    if args.split_lists:
        given = [f for f, v in (("--train-fraction", args.train_fraction), ("--val-fraction", args.val_fraction)) if v]
        given += ["--seed"] if args.seed is not None else []
        if given:
            raise UserError(f"--split-lists: cannot be combined with {given[0]} (the lists are the whole split)")
        return Protocol("lists", lists=tuple(Path(p) for p in args.split_lists))
    if args.train_fraction is None and train is None:
        for flag, value in (("--val-fraction", args.val_fraction), ("--seed", args.seed)):
            if value is not None:
                raise UserError(
                    f"{flag}: only with --train-fraction (the default split is the earlier release's 489/71/140)"
                )
        return Protocol("earlier")
    return Protocol(
        "fraction",
        train_fraction=_fraction("--train-fraction", args.train_fraction or train),
        val_fraction=_fraction("--val-fraction", args.val_fraction or val),
        seed=args.seed or 0,
    )
