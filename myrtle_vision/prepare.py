"""Put datasets into the layout the data configs expect.

The layout: ``<root>/images/<class>/<file>``, ``<root>/label_map.json`` (class -> id, classes in
sorted order) and ``train_imagepaths.txt``, ``val_imagepaths.txt``, ``test_imagepaths.txt`` listing
paths relative to ``<root>``. Every preparation checks everything before it changes anything, and
running it again on a prepared folder changes nothing.

NWPU-RESISC45 (:func:`prepare_resisc45`) and any folder-per-class dataset (:func:`prepare_folders`) share one
path: find the class folders (at the top of the folder or under ``images/``), list their images, split them by
a protocol (:mod:`myrtle_vision.splits`), check that every file to be replaced is ours, move the class folders
under ``images/`` (all or nothing) and write the index files and ``split_protocol.json``, which says which
protocol made the split files and holds their sha256 (so that a later run with another protocol knows them as
its own to replace).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError, reason
from .files import check_output, described_by, fsync_dir, json_with, write_atomic
from .splits import EARLIER_SPLIT, SPLIT_NAMES, Protocol, split_classes, split_earlier

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
RESISC45_SPLIT = EARLIER_SPLIT  # per class, by sorted file name: train, validation, test
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")  # a folder-per-class dataset's images, any case
PROTOCOL_FILE = "split_protocol.json"
# the transforms data_configs/data_config.json gives NWPU-RESISC45, for the data config prepare_folders writes
USUAL_TRANSFORMS = {
    "transform_ops_train": {
        "RandomResizedCrop": 224,
        "RandomHorizontalFlip": None,
        "Normalize": {"Mean": [0.485, 0.456, 0.406], "Std": [0.229, 0.224, 0.225]},
    },
    "transform_ops_val": {
        "Resize": 224,
        "CenterCrop": 224,
        "Normalize": {"Mean": [0.485, 0.456, 0.406], "Std": [0.229, 0.224, 0.225]},
    },
}

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


@dataclass(frozen=True)
class _Kind:
    """What a preparation expects of its dataset."""

    name: str  # for split_protocol.json
    script: str  # for the message of a move that stopped part-way
    classes: tuple[str, ...] | None = None  # exactly these class folders (None: any)
    per_class: int | None = None  # exactly this many .jpg images in each, nothing else (None: any images)
    missing: str = "folder not found"  # what a missing dataset folder's message adds


RESISC45 = _Kind(
    "NWPU-RESISC45",
    "prepare_resisc45.py",
    tuple(RESISC45_CLASSES),
    sum(RESISC45_SPLIT),
    "folder not found (extract NWPU-RESISC45.rar here, or pass its path)",
)
FOLDERS = _Kind("folder-per-class", "prepare_folders.py")


def _find_classes(root: Path, images: Path, known: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Every class folder, at the top of ``root`` or under ``images/`` (a move that stopped part-way leaves
    some in each), checked: each class exactly once, and with ``known``, only those classes and none missing."""
    if images.exists() and not images.is_dir():
        raise UserError(f"{images}: is a file; the class folders go in a folder of that name")
    top = {p.name: p for p in _visible(root) if p.is_dir() and p.name != "images"}
    under = {p.name: p for p in _visible(images) if p.is_dir()} if images.is_dir() else {}
    if known is not None:
        for place, found in ((root, top), (images, under)):
            unexpected = sorted(set(found) - set(known))
            if unexpected:
                raise UserError(f"{place}: unexpected folder {unexpected[0]!r}: not a NWPU-RESISC45 class")
    both = sorted(set(top) & set(under))
    if both:
        more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
        raise UserError(
            f"{root}: class {both[0]!r} is both at the top and under images/{more}; keep one copy of "
            "each class, then run again"
        )
    if known is None:
        if len(top) + len(under) < 2:
            raise UserError(
                f"{root}: found {_plural(len(top) + len(under), 'class folder')}; a dataset needs at least 2, "
                "one folder per class, at the top of the folder or under images/"
            )
        return {**under, **top}
    missing = sorted(set(known) - set(top) - set(under))
    if missing:
        source = root if top else images
        raise UserError(
            f"{source}: incomplete: no folder for {len(missing)} classes ({', '.join(missing[:3])}, ...)"
            if len(missing) > 3
            else f"{source}: incomplete: no folder for {', '.join(missing)}"
        )
    return {**under, **top}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _listable(path: Path) -> None:
    """A file name a split file can hold, one per line: UTF-8, no line break, no space at either end."""
    name = path.name
    try:
        name.encode()
    except UnicodeEncodeError:
        raise UserError(f"{path!r}: the file name is not UTF-8, which the split files are; rename it") from None
    if name != name.strip() or "\n" in name or "\r" in name:
        raise UserError(
            f"{path!r}: a file name with a line break or a space at either end cannot be a line of a split "
            "file; rename it"
        )


def _class_images(folder: Path, kind: _Kind) -> tuple[list[str], list[str]]:
    """(the images' file names, the names of the other entries, which are skipped) of a class folder; hidden
    entries are ignored. NWPU-RESISC45's folders hold exactly 700 .jpg files and nothing else."""
    entries = _visible(folder)
    if kind.per_class is not None:
        odd = [p.name for p in entries if not (p.is_file() and p.suffix.lower() == ".jpg")]
        if odd:
            raise UserError(f"{folder}: unexpected entry {odd[0]!r} (expected only .jpg images)")
        if len(entries) != kind.per_class:
            raise UserError(f"{folder}: has {len(entries)} images, expected {kind.per_class}")
        images, skipped = entries, []
    else:
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [p.name for p in entries if p not in images]
        if not images:
            folders = sum(p.is_dir() for p in entries)
            hint = (
                f"; it holds {_plural(folders, 'folder')}: if they are the classes, pass {folder} itself as the "
                "dataset folder"
                if folders
                else ""
            )
            raise UserError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)}){hint}")
    for p in images:
        _listable(p)
    return [p.name for p in images], skipped


def _move_under(images: Path, folders: list[Path], kind: _Kind = RESISC45, total: int = 45) -> None:
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
            _move_back(images, moved, made, problem, kind, total)
            raise UserError(f"{problem}; nothing was changed") from None
        moved.append(folder)
    fsync_dir(images)
    fsync_dir(images.parent)


def _move_back(images: Path, moved: list[Path], made: bool, problem: str, kind: _Kind, total: int) -> None:
    """Undo :func:`_move_under`'s moves, newest first. If one cannot be undone, stop there with a UserError
    (``problem``, then what failed and how to finish: a run that finds the classes split between the two
    places finishes the move)."""
    for done in reversed(moved):
        try:
            os.rename(images / done.name, done)
        except OSError as e:
            under = sum(p.is_dir() for p in images.iterdir())
            raise UserError(
                f"{problem}, and moving {done.name} back failed too ({reason(e)}): {under} of the {total} "
                "class folders are under images/ and the others at the top; once the cause is fixed, "
                f"run {kind.script} again: it finishes the move"
            ) from None
    if made:
        try:
            images.rmdir()
        except OSError:
            pass


@dataclass
class Prepared:
    """What a preparation did: the split it made, what it skipped and what it wrote."""

    root: Path
    protocol: Protocol
    per_class: dict[str, dict[str, int]]  # class -> split -> images
    skipped: list[str] = field(default_factory=list)  # entries of class folders that are not images
    written: list[str] = field(default_factory=list)  # the files written (unchanged ones are not)
    data_config: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {split: sum(c[split] for c in self.per_class.values()) for split in SPLIT_NAMES}

    def lines(self, folder: str, label_map: bool = False) -> list[str]:
        """The summary a script prints: the counts, the protocol, the per-class counts (once, when every class
        has the same), the label map, what was skipped and what was written."""
        n = self.counts
        out = [
            f"{folder}: ready: {n['train']} train, {n['val']} validation, {n['test']} test images",
            f"protocol: {self.protocol.describe()}",
        ]
        shapes = {tuple(c.values()) for c in self.per_class.values()}
        if len(shapes) == 1:
            train, val, test = shapes.pop()
            out.append(
                f"per class: {train} train, {val} validation, {test} test (each of the {len(self.per_class)} classes)"
            )
        else:
            out.append("per class: train / validation / test")
            out += [f"  {cls}: {c['train']} / {c['val']} / {c['test']}" for cls, c in self.per_class.items()]
        if label_map:
            out.append("label map (label_map.json): " + ", ".join(f"{cls} {i}" for i, cls in enumerate(self.per_class)))
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            out.append(f"skipped {len(self.skipped)} entries of class folders that are not images: {shown}")
        out.append(f"wrote: {', '.join(self.written)}" if self.written else "wrote nothing: already prepared so")
        return out


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ours(root: Path, name: str, also: dict[str, str]) -> bool:
    """Whether ``root/name`` is a file this tool wrote: split_protocol.json as we write it, or an index file
    that split_protocol.json describes by its sha256 (or whose text is ``also[name]``: what an earlier version,
    which wrote no split_protocol.json, wrote)."""
    path = root / name
    test = (
        json_with("protocol", "files") if name == PROTOCOL_FILE else described_by(root / PROTOCOL_FILE, "files", name)
    )

    def safely(check) -> bool:
        try:
            return bool(check())
        except (OSError, ValueError, RecursionError):  # no split_protocol.json, not JSON, not text: not ours
            return False

    return safely(lambda: test(path)) or (name in also and safely(lambda: path.read_text() == also[name]))


def data_config_text(dataset_path: str, number_of_classes: int) -> str:
    """A data config for a prepared folder, with the users' usual transforms (as data_configs/data_config.json)."""
    cfg = {
        "dataset_path": dataset_path,
        "train_files": SPLIT_FILES["train"],
        "valid_files": SPLIT_FILES["val"],
        "test_files": SPLIT_FILES["test"],
        "label_map": "label_map.json",
        "number_of_classes": number_of_classes,
        **USUAL_TRANSFORMS,
    }
    return json.dumps(cfg, indent=4) + "\n"


def _prepare(
    root: str | Path,
    kind: _Kind,
    protocol: Protocol,
    force: bool = False,
    data_config: str | Path | None = None,
) -> Prepared:
    """The one path of :func:`prepare_resisc45` and :func:`prepare_folders`."""
    given = str(root)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: {kind.missing}")
    images = root / "images"
    folders = _find_classes(root, images, kind.classes)
    files: dict[str, list[str]] = {}
    skipped: list[str] = []
    for cls in sorted(folders):
        files[cls], odd = _class_images(folders[cls], kind)
        skipped += [f"images/{cls}/{name}" for name in odd]
    by_class = split_classes(files, protocol, str(images))
    splits = {
        split: [f"images/{cls}/{n}" for cls in sorted(by_class) for n in by_class[cls][split]] for split in SPLIT_NAMES
    }
    per_class = {cls: {split: len(by_class[cls][split]) for split in SPLIT_NAMES} for cls in sorted(by_class)}
    texts = index_files(list(files), splits)
    record = {
        "dataset": kind.name,
        **protocol.record(),
        "classes": len(files),
        "images": {split: len(names) for split, names in splits.items()},
        "per_class": per_class,
        "skipped": len(skipped),
        "files": {name: _sha256_text(text) for name, text in texts.items()},
    }
    texts[PROTOCOL_FILE] = json.dumps(record, indent=2) + "\n"
    index = {name: text for name, text in texts.items() if not _unchanged(root / name, text)}
    # What an earlier version wrote (no split_protocol.json then): NWPU-RESISC45's earlier split.
    earlier = {}
    if kind.classes is not None and any(name != PROTOCOL_FILE for name in index):
        by_earlier = split_earlier(files)
        earlier = index_files(
            list(files),
            {s: [f"images/{c}/{n}" for c in sorted(by_earlier) for n in by_earlier[c][s]] for s in SPLIT_NAMES},
        )
    for name in index:
        path = root / name
        if not force and (path.exists() or path.is_symlink()) and not _ours(root, name, earlier):
            raise UserError(
                f"{path}: already exists and is not a file this tool wrote ({PROTOCOL_FILE} does not describe "
                "it); remove it, or pass --force to replace it; nothing was changed"
            )
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
    config_text = None
    if data_config is not None:
        config_text = data_config_text(given, len(files))
        if _unchanged(Path(data_config), config_text):
            config_text = None
        else:
            check_output(data_config, "--data-config", force=force, what="data config")
    if to_move:
        _move_under(images, to_move, kind, len(folders))
    for name, text in index.items():  # after the move: the lists name images/<class>/<file>; the protocol last
        write_atomic(root / name, text, "index file")
    written = list(index)
    if config_text is not None:
        write_atomic(data_config, config_text, "data config")
        written.append(str(data_config))
    return Prepared(root, protocol, per_class, skipped, written, Path(data_config) if data_config else None)


def prepare_resisc45(root: str | Path, protocol: Protocol = Protocol("earlier"), force: bool = False) -> Prepared:
    """Lay out an extracted NWPU-RESISC45 folder and split it by ``protocol`` (default: the earlier release's
    489/71/140 per class).

    Everything is checked before anything changes. Moving the class folders under ``images/`` is all or
    nothing: a folder that cannot be moved (EBUSY, no permission) moves the others back. A move that still
    stopped part-way (a kill, or a move back that failed too) leaves some classes under ``images/`` and the
    rest at the top; run again, and it finishes the move. Index files are replaced only when they are ours
    (split_protocol.json describes them, or they hold the earlier split) or ``force``."""
    return _prepare(root, RESISC45, protocol, force)


def prepare_folders(
    root: str | Path, protocol: Protocol, force: bool = False, data_config: str | Path | None = None
) -> Prepared:
    """Lay out any folder-per-class dataset as :func:`prepare_resisc45` does NWPU-RESISC45: the class folders are
    the folders at its top (or under ``images/``), the label map their names sorted; the images, .jpg .jpeg .png
    .tif .tiff in any case; other entries of a class folder are skipped (and counted), hidden ones ignored. With
    ``data_config``, a data config for it is written there too (an existing file that differs only with
    ``force``)."""
    return _prepare(root, FOLDERS, protocol, force, data_config)


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
