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

from .errors import UserError

SPLIT_FILES = {"train": "train_imagepaths.txt", "val": "val_imagepaths.txt", "test": "test_imagepaths.txt",
               "extra": "extra_imagepaths.txt"}  # extra: training images left out of train (Fashion-MNIST only)

RESISC45_CLASSES = (
    "airplane airport baseball_diamond basketball_court beach bridge chaparral church circular_farmland cloud "
    "commercial_area dense_residential desert forest freeway golf_course ground_track_field harbor industrial_area "
    "intersection island lake meadow medium_residential mobile_home_park mountain overpass palace parking_lot railway "
    "railway_station rectangular_farmland river roundabout runway sea_ice ship snowberg sparse_residential stadium "
    "storage_tank tennis_court terrace thermal_power_station wetland"
).split()
RESISC45_SPLIT = (489, 71, 140)  # per class, by sorted file name: train, validation, test

FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle_boot"]
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                       "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_index(root: Path, classes: list[str], splits: dict[str, list[str]]) -> None:
    """Write label_map.json (sorted classes -> 0..n-1) and one file per split."""
    label_map = {name: i for i, name in enumerate(sorted(classes))}
    _write_if_changed(root / "label_map.json", json.dumps(label_map, indent=2) + "\n")
    for split, names in splits.items():
        _write_if_changed(root / SPLIT_FILES[split], "".join(f"{n}\n" for n in names))


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def prepare_resisc45(root: str | Path) -> dict[str, int]:
    """Lay out an extracted NWPU-RESISC45 folder; returns the number of images per split."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found (extract NWPU-RESISC45.rar here, or pass its path)")
    images = root / "images"
    top_classes = [p for p in _visible(root) if p.is_dir() and p.name != "images"]
    if images.is_dir() and top_classes:
        raise UserError(f"{root}: has both images/ and class folders at the top ({top_classes[0].name}, ...); "
                        "keep one of them")
    source = images if images.is_dir() else root
    found = [p for p in _visible(source) if p.is_dir()]
    names = {p.name for p in found}
    unexpected, missing = sorted(names - set(RESISC45_CLASSES)), sorted(set(RESISC45_CLASSES) - names)
    if unexpected:
        raise UserError(f"{source}: unexpected folder {unexpected[0]!r}: not a NWPU-RESISC45 class")
    if missing:
        raise UserError(f"{source}: incomplete: no folder for {len(missing)} classes ({', '.join(missing[:3])}, ...)"
                        if len(missing) > 3 else f"{source}: incomplete: no folder for {', '.join(missing)}")
    per_class = sum(RESISC45_SPLIT)
    files: dict[str, list[str]] = {}
    for folder in found:
        entries = _visible(folder)
        odd = [p.name for p in entries if not (p.is_file() and p.suffix.lower() == ".jpg")]
        if odd:
            raise UserError(f"{folder}: unexpected entry {odd[0]!r} (expected only .jpg images)")
        if len(entries) != per_class:
            raise UserError(f"{folder}: has {len(entries)} images, expected {per_class}")
        files[folder.name] = [p.name for p in entries]
    if source is root:  # everything checked: now move the class folders under images/
        images.mkdir()
        for folder in found:
            folder.rename(images / folder.name)
    n_train, n_val, _ = RESISC45_SPLIT
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for cls in sorted(files):
        paths = [f"images/{cls}/{name}" for name in files[cls]]
        splits["train"] += paths[:n_train]
        splits["val"] += paths[n_train:n_train + n_val]
        splits["test"] += paths[n_train + n_val:]
    write_index(root, list(files), splits)
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
    raise UserError(f"{src}: {name}[.gz] not found (install the Debian package dataset-fashion-mnist, "
                    "or pass a folder holding the four Fashion-MNIST IDX files)")


def prepare_fashion_mnist(src: str | Path, out: str | Path, val_per_class: int = 500,
                          train_per_class: int | None = None) -> dict[str, int]:
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
    for cls in FASHION_MNIST_CLASSES:
        (out / "images" / cls).mkdir(parents=True, exist_ok=True)
    for rel, i, part in todo:
        path = out / rel
        if not path.is_file():
            tmp = path.with_name(f".{path.name}")
            Image.fromarray(arrays[f"{part}_images"][i]).save(tmp, format="PNG")
            os.replace(tmp, path)
    for split in splits:
        splits[split].sort()
    if not splits["extra"]:
        del splits["extra"]
        (out / SPLIT_FILES["extra"]).unlink(missing_ok=True)  # from an earlier run with --train-per-class
    write_index(out, FASHION_MNIST_CLASSES, splits)
    return {k: len(v) for k, v in splits.items()}
