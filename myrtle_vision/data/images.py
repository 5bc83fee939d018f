"""Datasets described by a data config: image lists, labels from class folders, decoded images.

A dataset folder holds ``images/<class>/<file>``, ``label_map.json`` (class folder name -> id)
and one text file per split listing image paths relative to the folder. Everything that can be
checked without decoding images is checked when a split is opened, each problem a
:class:`~myrtle_vision.errors.UserError` naming the file. The images are decoded once into a cache
(:mod:`myrtle_vision.data.cache`) unless the data config says ``decode_cache: false``.

Training randomness is a function of position, not history: the sampler gives every sample a
seed derived from (seed, epoch, index) (and the copy or draw number when an epoch holds an image
more than once: see :class:`~myrtle_vision.data.plan.TrainPlan`), and the transforms draw from torch seeded with it (see
:mod:`myrtle_vision.data.augment`). The augmentation of an image is therefore the same whichever
worker loads it, wherever it is applied, and whether or not the run was interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import UserError, reason
from .augment import Pipeline, TransformFailed, pipeline_for
from .cache import DecodedImages, default_cache_dir

SPLITS = {"train": "train_files", "val": "valid_files", "test": "test_files"}


def read_label_map(cfg: DataConfig) -> dict[str, int]:
    """Read and check ``label_map.json`` against ``number_of_classes``."""
    if not Path(cfg.dataset_path).is_dir():
        raise UserError(f"{cfg.path}: dataset_path: {cfg.dataset_path}: dataset folder not found")
    path = Path(cfg.dataset_path) / cfg.label_map
    field = f"{cfg.path}: label_map: {path}"
    try:
        label_map = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{field}: label map not found") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text at all
        raise UserError(f"{field}: cannot read the label map: {reason(e)}") from None
    except RecursionError:
        raise UserError(f"{field}: cannot read the label map: nested too deeply") from None
    if not isinstance(label_map, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in label_map.values()
    ):
        raise UserError(f"{field}: expected an object mapping class folder names to integer ids")
    if len(label_map) != cfg.number_of_classes:
        raise UserError(
            f"{path}: has {len(label_map)} classes but {cfg.path}: number_of_classes is {cfg.number_of_classes}"
        )
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise UserError(f"{field}: class ids must be 0..{len(label_map) - 1}, each used once")
    return label_map


def _shown(rel: str, limit: int = 120) -> str:
    """A split file's line for a message: as written, or its start when it is long."""
    return rel if len(rel) <= limit else f"{rel[:limit]}... ({len(rel)} characters)"


def class_names(label_map: dict[str, int]) -> list[str]:
    return [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


# Pillow's modes of one 16-bit channel (PNG, TIFF, PGM with more than 8 bits); "I" (32-bit integers) is 16-bit
# content when PNG or PGM/PPM made it (older Pillows open 16-bit PNGs as "I"; PGM scales to 0..65535 in "I")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
SIXTEEN_BIT_IN_I = ("PNG", "PPM")
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def read_rgb(path: str | Path, data: bytes | None = None) -> Image.Image:
    """An image file decoded as RGB (from ``data``, its bytes, when given); a file that is not a readable
    image is a UserError naming it.

    Any mode is converted. Transparency (an alpha channel, or a palette's or a colour's transparency) is
    composited on black: each channel times alpha / 255, rounded to nearest. 16-bit images keep their high
    byte (``value >> 8``), as Pillow itself reads 16-bit RGB, RGBA and grey-with-alpha PNGs, so a grey picture
    gives the same pixels whichever of those it was saved as (and an 8-bit image widened to 16 bits, v * 257,
    comes back exactly). 32-bit integer (mode I, other than PNG's and PGM's 16-bit content) and floating-point
    (mode F) images have no range to scale from, and are refused."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            if img.mode in SIXTEEN_BIT or (img.mode == "I" and img.format in SIXTEEN_BIT_IN_I):
                levels = np.asarray(img)  # uint16 in the file's byte order, or int32 in 0..65535
                return Image.fromarray((levels >> 8).astype(np.uint8)).convert("RGB")
            if img.mode in ("I", "F"):
                kind = "32-bit integer" if img.mode == "I" else "floating-point"
                raise UserError(
                    f"{path}: cannot read image: {kind} pixels (mode {img.mode}) have no standard range "
                    "to scale to 8 bits; save it with 8 or 16 bits per channel"
                )
            if img.mode in ALPHA or "transparency" in img.info:
                img = img.convert("RGBA")  # a palette's or a colour's transparency becomes alpha first
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                return Image.alpha_composite(background, img).convert("RGB")  # = round(c * alpha / 255)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image: {e}") from None


class ImageListDataset(Dataset):
    """The images listed in one split file, labelled by their class folder, with the split's ``pipeline``
    (its transform ops, per image or for a whole batch: see :mod:`myrtle_vision.data.augment`).

    With a ``cache_dir`` the images are decoded once into a memory-mapped cache there; without, each is
    decoded whenever it is read.
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str,
        label_map: dict[str, int],
        pipeline: Pipeline | None = None,
        cache_dir: Path | None = None,
        cache_field: str = "cache_dir",
        source: str = "the data config",
        ops_field: str = "the transform ops",
    ):
        self.root, self.source = Path(root), source  # source: which config (and field) named this split file
        self.ops_field = ops_field  # which config field holds the pipeline's ops, for its errors
        self.list_path = self.root / list_file
        self.pipeline = pipeline
        self.paths, self.labels = self._read_list(label_map)
        self.decoded = (
            DecodedImages(self.list_path, self.paths, self.decode, cache_dir, cache_field, list_bytes=self._list_bytes)
            if cache_dir is not None
            else None
        )

    @property
    def collate(self):
        """How the loaders batch this dataset's samples (the pipeline's, or plain stacking)."""
        return self.pipeline.collate if self.pipeline is not None else None

    def _read_list(self, label_map: dict[str, int]) -> tuple[list[str], list[int]]:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: dataset folder not found ({self.source})")
        try:
            self._list_bytes = self.list_path.read_bytes()
            lines = self._list_bytes.decode().splitlines()
        except FileNotFoundError:
            raise UserError(f"{self.list_path}: split file not found ({self.source})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{self.list_path}: cannot read the split file ({reason(e)}; {self.source})") from None
        root = self.root.resolve()
        paths, labels, class_dirs = [], [], set()
        for lineno, line in enumerate(lines, 1):
            rel = line.strip()
            if not rel:
                continue
            where = f"{self.list_path}:{lineno}"
            if "\0" in rel:
                raise UserError(f"{where}: the line holds a NUL byte, which no file name can")
            try:
                full = (root / rel).resolve()
                if os.path.isabs(rel) or not full.is_relative_to(root):
                    raise UserError(f"{where}: {_shown(rel)} is outside the dataset folder {root}")
                if not full.is_file():
                    raise UserError(f"{where}: {_shown(rel)} does not exist")
            except (OSError, ValueError) as e:  # a name too long for the file system, say
                raise UserError(
                    f"{where}: cannot use the line ({len(rel)} characters) as an image path: {reason(e)}"
                ) from None
            cls = full.parent.name
            if cls not in label_map:
                raise UserError(f"{where}: class folder {cls!r} of {_shown(rel)} is not in the label map")
            paths.append(str(full))
            labels.append(label_map[cls])
            class_dirs.add(full.parent.parent)
        if not paths:
            raise UserError(f"{self.list_path}: the split lists no images")
        for parent in class_dirs:  # the folder of class folders must hold exactly the label map's classes
            on_disk = {d.name for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".")}
            extra, missing = sorted(on_disk - set(label_map)), sorted(set(label_map) - on_disk)
            if extra or missing:
                detail = "; ".join(
                    filter(
                        None,
                        [
                            extra and f"not in the label map: {', '.join(extra[:5])}",
                            missing and f"no folder for: {', '.join(missing[:5])}",
                        ],
                    )
                )
                raise UserError(f"{parent}: class folders disagree with the label map ({detail})")
        return paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int, data: bytes | None = None) -> Image.Image:
        """Image ``index`` decoded from its file (or from ``data``, its bytes), as RGB (see :func:`read_rgb`)."""
        return read_rgb(self.paths[index], data)

    def decode(self, index: int, data: bytes | None = None) -> np.ndarray:
        """Image ``index`` decoded from its file (or from ``data``, its bytes): uint8 (height, width, 3)."""
        return np.asarray(self.load_image(index, data))

    def image(self, index: int) -> torch.Tensor:
        """Image ``index``: uint8 (3, height, width), from the cache when there is one."""
        if self.decoded is not None:
            return self.decoded[index]
        return torch.from_numpy(self.decode(index).copy()).permute(2, 0, 1)

    def output_size(self, index: int) -> tuple[int, int]:
        """(height, width) that the split's transforms give image ``index`` (the random numbers they draw
        for it are not taken from anyone's stream)."""
        if self.pipeline is None:
            return tuple(self.image(index).shape[-2:])
        with torch.random.fork_rng(devices=[]), self._naming(index):
            return self.pipeline.output_size(self.image(index))

    @contextlib.contextmanager
    def _naming(self, index: int):
        """An op that cannot transform image ``index`` becomes a UserError naming the field, the op and the image."""
        try:
            yield
        except TransformFailed as e:
            raise UserError(f"{self.ops_field}.{e.op}: {self.paths[index]}: {e.problem}") from None

    def __getitem__(self, key):
        """``key`` is an index, or (index, seed) to make the random transforms reproducible.

        Returns (what the pipeline makes of the image, label): a transformed uint8 image, or the
        decoded image and its transform parameters when the batch is transformed on its device.
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self.image(index)
        if self.pipeline is not None:
            with self._naming(index):
                img = self.pipeline.sample(img, seed)
        return img, self.labels[index]


def open_split(
    cfg: DataConfig,
    split: str,
    label_map: dict[str, int] | None = None,
    device: torch.device | None = None,
    *,
    evaluation: bool = False,
) -> ImageListDataset:
    """Open the ``train``, ``val`` or ``test`` split with its transforms, for batches used on ``device``
    (where the transforms run depends on it and ``augment_on``; None: as for the CPU). The training split
    has the training transforms unless ``evaluation`` (then every split has ``transform_ops_val``)."""
    label_map = label_map if label_map is not None else read_label_map(cfg)
    field = "transform_ops_train" if split == "train" and not evaluation else "transform_ops_val"
    pipeline = pipeline_for(getattr(cfg, field), cfg.augment_on, device or torch.device("cpu"))
    cache = None
    if cfg.decode_cache:
        cache = Path(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_cache_dir()
    return ImageListDataset(
        cfg.dataset_path,
        getattr(cfg, SPLITS[split]),
        label_map,
        pipeline=pipeline,
        cache_dir=cache,
        cache_field=f"{cfg.path}: cache_dir",
        source=f"{cfg.path}: {SPLITS[split]}",
        ops_field=f"{cfg.path}: {field}",
    )


class ImageFiles(Dataset):
    """Unlabelled image files (for predictions), with an evaluation pipeline that must give ``size`` x ``size``
    images. A sample is (what the pipeline makes of the image, its index); a file that cannot be read, or that
    the pipeline does not bring to the size, is left out of its batch, and the batch says why: each batch is
    (the pipeline's batch or None, [(index, reason), ...])."""

    def __init__(self, paths: list[str], pipeline: Pipeline, size: int, ops_field: str = "transform_ops_val"):
        self.paths, self.size, self.ops_field = paths, size, ops_field
        self.pipeline = _Readable(pipeline)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def collate(self):
        return self.pipeline.collate

    def __getitem__(self, index: int):
        try:
            img = torch.from_numpy(np.asarray(read_rgb(self.paths[index])).copy()).permute(2, 0, 1)
        except UserError as e:
            return None, index, str(e).split(": ", 1)[1]
        inner = self.pipeline.inner
        try:
            with torch.random.fork_rng(devices=[]):
                height, width = inner.output_size(img)
            if (height, width) != (self.size, self.size):
                return (
                    None,
                    index,
                    (
                        f"{self.ops_field} makes it {height}x{width}, the model takes "
                        f"{self.size}x{self.size} (add a Resize or CenterCrop)"
                    ),
                )
            return inner.sample(img, None), index, None
        except TransformFailed as e:
            return None, index, f"{self.ops_field}.{e.op}: {e.problem}"


class _Readable:
    """A pipeline's collate and finish over the samples that could be read; the others travel as reasons."""

    def __init__(self, inner: Pipeline):
        self.inner = inner

    def collate(self, samples: list):
        good = [(sample, index) for sample, index, reason in samples if reason is None]
        failed = [(index, reason) for _, index, reason in samples if reason is not None]
        return (self.inner.collate(good) if good else None), failed

    def finish(self, batch, device: torch.device):
        inner, failed = batch
        return (self.inner.finish(inner, device) if inner is not None else None), failed
