"""Put datasets into the layout the data configs expect.

The layout: ``<root>/images/<class>/<file>``, ``<root>/label_map.json`` (class -> id, classes in
sorted order) and ``train_imagepaths.txt``, ``val_imagepaths.txt``, ``test_imagepaths.txt`` listing
paths relative to ``<root>``. Both preparations check everything before they change anything,
and running them again on a prepared folder changes nothing.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import UserError, reason
from .files import fsync_dir, write_atomic

SPLIT_FILES = {
    "train": "train_imagepaths.txt",
    "val": "val_imagepaths.txt",
    "test": "test_imagepaths.txt",
    "extra": "extra_imagepaths.txt",
}  # extra: training images left out of train (Fashion-MNIST only)

RESISC45_CLASSES = (
    "airplane airport baseball_diamond basketball_court beach bridge chaparral church circular_farmland cloud "
    "commercial_area dense_residential desert forest freeway golf_course ground_track_field harbor industrial_area "
    "intersection island lake meadow medium_residential mobile_home_park mountain overpass palace parking_lot railway "
    "railway_station rectangular_farmland river roundabout runway sea_ice ship snowberg sparse_residential stadium "
    "storage_tank tennis_court terrace thermal_power_station wetland"
).split()
RESISC45_SPLIT = (489, 71, 140)  # per class, by sorted file name: train, validation, test

FASHION_MNIST_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def _unchanged(path: Path, text: str) -> bool:
    try:
        return path.is_file() and path.read_text() == text
    except (OSError, ValueError):  # unreadable, or not UTF-8 text: write it again
        return False


def index_files(classes: list[str], splits: dict[str, list[str]]) -> dict[str, str]:
    """The text of label_map.json (sorted classes -> 0..n-1) and of one file per split, by file name."""
    label_map = {name: i for i, name in enumerate(sorted(classes))}
    files = {"label_map.json": json.dumps(label_map, indent=2) + "\n"}
    for split, names in splits.items():
        files[SPLIT_FILES[split]] = "".join(f"{n}\n" for n in names)
    return files


def write_index(root: Path, classes: list[str], splits: dict[str, list[str]]) -> None:
    """Write label_map.json (sorted classes -> 0..n-1) and one file per split, each atomically, and only
    those whose text changed."""
    for name, text in index_files(classes, splits).items():
        if not _unchanged(root / name, text):
            write_atomic(root / name, text, "index file")


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _not_writable(folder: Path) -> str | None:
    """Why entries cannot be created, removed or renamed in ``folder`` (None: they can)."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def _find_classes(root: Path, images: Path) -> dict[str, Path]:
    """Every class folder, at the top of ``root`` or under ``images/`` (a move that stopped part-way leaves
    some in each), checked: only the 45 classes, each exactly once, none missing."""
    if images.exists() and not images.is_dir():
        raise UserError(f"{images}: is a file; the class folders go in a folder of that name")
    top = {p.name: p for p in _visible(root) if p.is_dir() and p.name != "images"}
    under = {p.name: p for p in _visible(images) if p.is_dir()} if images.is_dir() else {}
    for place, found in ((root, top), (images, under)):
        unexpected = sorted(set(found) - set(RESISC45_CLASSES))
        if unexpected:
            raise UserError(f"{place}: unexpected folder {unexpected[0]!r}: not a NWPU-RESISC45 class")
    both = sorted(set(top) & set(under))
    if both:
        more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
        raise UserError(
            f"{root}: class {both[0]!r} is both at the top and under images/{more}; keep one copy of "
            "each class, then run again"
        )
    missing = sorted(set(RESISC45_CLASSES) - set(top) - set(under))
    if missing:
        source = root if top else images
        raise UserError(
            f"{source}: incomplete: no folder for {len(missing)} classes ({', '.join(missing[:3])}, ...)"
            if len(missing) > 3
            else f"{source}: incomplete: no folder for {', '.join(missing)}"
        )
    return {**under, **top}


def _move_under(images: Path, folders: list[Path]) -> None:
    """Move ``folders`` into ``images`` (made if need be), all or none: on a failure, move back the ones
    moved and remove ``images`` if it was made here, then raise a UserError naming the folder and why."""
    made = not images.is_dir()
    if made:
        try:
            images.mkdir()
        except OSError as e:
            raise UserError(f"{images}: cannot create it ({reason(e)}); nothing was changed") from None
    moved: list[Path] = []
    for folder in folders:
        try:
            os.rename(folder, images / folder.name)
        except OSError as e:
            problem = f"{folder}: cannot move it to {images}/ ({reason(e)})"
            _move_back(images, moved, made, problem)
            raise UserError(f"{problem}; nothing was changed") from None
        moved.append(folder)
    fsync_dir(images)
    fsync_dir(images.parent)


def _move_back(images: Path, moved: list[Path], made: bool, problem: str) -> None:
    """Undo :func:`_move_under`'s moves, newest first. If one cannot be undone, stop there with a UserError
    (``problem``, then what failed and how to finish: a run that finds the classes split between the two
    places finishes the move)."""
    for done in reversed(moved):
        try:
            os.rename(images / done.name, done)
        except OSError as e:
            under = sum(p.is_dir() for p in images.iterdir())
            raise UserError(
                f"{problem}, and moving {done.name} back failed too ({reason(e)}): {under} of the 45 "
                "class folders are under images/ and the others at the top; once the cause is fixed, "
                "run prepare_resisc45.py again: it finishes the move"
            ) from None
    if made:
        try:
            images.rmdir()
        except OSError:
            pass


def prepare_resisc45(root: str | Path) -> dict[str, int]:
    """Lay out an extracted NWPU-RESISC45 folder; returns the number of images per split.

    Everything is checked before anything changes. Moving the class folders under ``images/`` is all or
    nothing: a folder that cannot be moved (EBUSY, no permission) moves the others back. A move that still
    stopped part-way (a kill, or a move back that failed too) leaves some classes under ``images/`` and the
    rest at the top; run again, and it finishes the move."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found (extract NWPU-RESISC45.rar here, or pass its path)")
    images = root / "images"
    folders = _find_classes(root, images)
    per_class = sum(RESISC45_SPLIT)
    files: dict[str, list[str]] = {}
    for cls in sorted(folders):
        folder = folders[cls]
        entries = _visible(folder)
        odd = [p.name for p in entries if not (p.is_file() and p.suffix.lower() == ".jpg")]
        if odd:
            raise UserError(f"{folder}: unexpected entry {odd[0]!r} (expected only .jpg images)")
        if len(entries) != per_class:
            raise UserError(f"{folder}: has {len(entries)} images, expected {per_class}")
        files[cls] = [p.name for p in entries]
    n_train, n_val, _ = RESISC45_SPLIT
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for cls in sorted(files):
        paths = [f"images/{cls}/{name}" for name in files[cls]]
        splits["train"] += paths[:n_train]
        splits["val"] += paths[n_train : n_train + n_val]
        splits["test"] += paths[n_train + n_val :]
    index = {name: text for name, text in index_files(list(files), splits).items() if not _unchanged(root / name, text)}
    to_move = [folders[cls] for cls in sorted(folders) if folders[cls].parent == root]
    # Everything checked: now the folders this will change must be writable (a directory moved to another
    # folder needs write permission itself, for its ".." entry), or nothing is touched.
    must_write = [root] if index or to_move else []
    if to_move:
        must_write += ([images] if images.is_dir() else []) + to_move
    for folder in must_write:
        why = _not_writable(folder)
        if why is not None:
            raise UserError(f"{folder}: cannot write in this folder ({why}); nothing was changed")
    if to_move:
        _move_under(images, to_move)
    for name, text in index.items():  # after the move: the lists name images/<class>/<file>
        write_atomic(root / name, text, "index file")
    return {k: len(v) for k, v in splits.items()}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype != 0x08:
                raise UserError(f"{path}: not an unsigned-byte IDX file")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, struct.error, EOFError) as e:
        raise UserError(f"{path}: cannot read IDX file: {e}") from None
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path}: truncated: expected {int(np.prod(shape))} bytes of data, found {data.size}")
    return data.reshape(shape)


def _find_idx(src: Path, name: str) -> Path:
    for candidate in (src / name, src / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{src}: {name}[.gz] not found (install the Debian package dataset-fashion-mnist, "
        "or pass a folder holding the four Fashion-MNIST IDX files)"
    )


def prepare_fashion_mnist(
    src: str | Path, out: str | Path, val_per_class: int = 500, train_per_class: int | None = None
) -> dict[str, int]:
    """Write Fashion-MNIST as PNG files in the Resisc45 layout.

    Validation is the last ``val_per_class`` training images of each class (held out of
    training); training is the rest, or the first ``train_per_class`` of them, and then the
    training images left out are listed as ``extra`` (the demo teacher's pretraining set, which the
    students never see); test is the official test set. Only listed images are written. Returns
    the number of images per split.
    """
    from PIL import Image

    src, out = Path(src), Path(out)
    arrays = {key: read_idx(_find_idx(src, name)) for key, name in FASHION_MNIST_FILES.items()}
    for part in ("train", "test"):
        if len(arrays[f"{part}_images"]) != len(arrays[f"{part}_labels"]) or arrays[f"{part}_labels"].max() > 9:
            raise UserError(f"{src}: {part} images and labels do not match")
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": [], "extra": []}
    todo = []
    for part in ("train", "test"):
        labels = arrays[f"{part}_labels"]
        for cls_id, cls in enumerate(FASHION_MNIST_CLASSES):
            idx = np.flatnonzero(labels == cls_id)
            paths = [f"images/{cls}/{part}_{i:05d}.png" for i in idx]
            if part == "test":
                splits["test"] += paths
            else:
                train = paths[:-val_per_class]
                keep = len(train) if train_per_class is None else train_per_class
                splits["train"] += train[:keep]
                splits["extra"] += train[keep:]
                splits["val"] += paths[-val_per_class:]
            todo += list(zip(paths, idx, [part] * len(idx)))
    try:
        for cls in FASHION_MNIST_CLASSES:
            (out / "images" / cls).mkdir(parents=True, exist_ok=True)
        for rel, i, part in todo:
            path = out / rel
            if not path.is_file():  # each image whole or not there: a run stopped part-way is finished by a re-run
                tmp = path.with_name(f".{path.name}")
                Image.fromarray(arrays[f"{part}_images"][i]).save(tmp, format="PNG")
                os.replace(tmp, path)
        if not splits["extra"]:
            (out / SPLIT_FILES["extra"]).unlink(missing_ok=True)  # from an earlier run with --train-per-class
    except OSError as e:
        raise UserError(
            f"{out}: cannot write the dataset there ({reason(e)}); the images written so far are "
            "whole, and running again finishes the job"
        ) from None
    for split in splits:
        splits[split].sort()
    if not splits["extra"]:
        del splits["extra"]
    write_index(out, FASHION_MNIST_CLASSES, splits)
    return {k: len(v) for k, v in splits.items()}
