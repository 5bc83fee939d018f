"""Datasets described by a data config: image lists, labels from class folders, transforms.

A dataset folder holds ``images/<class>/<file>``, ``label_map.json`` (class folder name -> id)
and one text file per split listing image paths relative to the folder. Everything that can be
checked without decoding images is checked when a split is opened, each problem a
:class:`~myrtle_vision.errors.UserError` naming the file.

Training randomness is a function of position, not history: the sampler gives every sample a
seed derived from (seed, epoch, index), and the dataset seeds torch with it before the random
transforms run. The augmentation of an image is therefore the same whichever worker loads it and
whether or not the run was interrupted and resumed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .config import DataConfig
from .errors import UserError, reason
from .transforms import BatchToFloat, build_transform, parse_ops

SPLITS = {"train": "train_files", "val": "valid_files", "test": "test_files"}


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (seed, stream, epoch, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def read_label_map(cfg: DataConfig) -> dict[str, int]:
    """Read and check ``label_map.json`` against ``number_of_classes``."""
    if not Path(cfg.dataset_path).is_dir():
        raise UserError(f"{cfg.dataset_path}: dataset folder not found (data config field dataset_path)")
    path = Path(cfg.dataset_path) / cfg.label_map
    try:
        label_map = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: label map not found (data config field label_map)") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text at all
        raise UserError(f"{path}: cannot read the label map: {e}") from None
    if not isinstance(label_map, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in label_map.values()):
        raise UserError(f"{path}: expected an object mapping class folder names to integer ids")
    if len(label_map) != cfg.number_of_classes:
        raise UserError(f"{path}: has {len(label_map)} classes but the data config's number_of_classes is {cfg.number_of_classes}")
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise UserError(f"{path}: class ids must be 0..{len(label_map) - 1}, each used once")
    return label_map


def class_names(label_map: dict[str, int]) -> list[str]:
    return [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


class ImageListDataset(Dataset):
    """The images listed in one split file, labelled by their class folder."""

    def __init__(self, root: str | Path, list_file: str, label_map: dict[str, int], transform=None, collate=None):
        self.root = Path(root)
        self.list_path = self.root / list_file
        self.transform = transform
        self.collate = collate or BatchToFloat()  # batches the images and finishes the transform
        self.paths, self.labels = self._read_list(label_map)

    def _read_list(self, label_map: dict[str, int]) -> tuple[list[str], list[int]]:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: dataset folder not found (data config field dataset_path)")
        try:
            lines = self.list_path.read_text().splitlines()
        except FileNotFoundError:
            raise UserError(f"{self.list_path}: split file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{self.list_path}: cannot read the split file ({reason(e)})") from None
        root = self.root.resolve()
        paths, labels, class_dirs = [], [], set()
        for lineno, line in enumerate(lines, 1):
            rel = line.strip()
            if not rel:
                continue
            where = f"{self.list_path}:{lineno}"
            full = (root / rel).resolve()
            if os.path.isabs(rel) or not full.is_relative_to(root):
                raise UserError(f"{where}: {rel} is outside the dataset folder {root}")
            if not full.is_file():
                raise UserError(f"{where}: {rel} does not exist")
            cls = full.parent.name
            if cls not in label_map:
                raise UserError(f"{where}: class folder {cls!r} of {rel} is not in the label map")
            paths.append(str(full))
            labels.append(label_map[cls])
            class_dirs.add(full.parent.parent)
        if not paths:
            raise UserError(f"{self.list_path}: the split lists no images")
        for parent in class_dirs:  # the folder of class folders must hold exactly the label map's classes
            on_disk = {d.name for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".")}
            extra, missing = sorted(on_disk - set(label_map)), sorted(set(label_map) - on_disk)
            if extra or missing:
                detail = "; ".join(filter(None, [extra and f"not in the label map: {', '.join(extra[:5])}",
                                                  missing and f"no folder for: {', '.join(missing[:5])}"]))
                raise UserError(f"{parent}: class folders disagree with the label map ({detail})")
        return paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")  # palette transparency needs RGBA first to composite sanely
                    background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                    return Image.alpha_composite(background, img).convert("RGB")
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"{path}: cannot read image: {e}") from None

    def __getitem__(self, key):
        """``key`` is an index, or (index, seed) to make the random transforms reproducible.

        Returns (uint8 image tensor, label); the loaders' ``collate`` makes float batches of them.
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self.load_image(index)
        if self.transform is not None:
            if seed is not None:
                torch.default_generator.manual_seed(seed)  # CPU generator only: torch.manual_seed costs ~100x more
            img = self.transform(img)
        return img, self.labels[index]


def open_split(cfg: DataConfig, split: str, label_map: dict[str, int] | None = None) -> ImageListDataset:
    """Open the ``train``, ``val`` or ``test`` split with its transforms."""
    label_map = label_map if label_map is not None else read_label_map(cfg)
    ops = cfg.transform_ops_train if split == "train" else cfg.transform_ops_val
    per_image, collate = build_transform(parse_ops(ops))
    return ImageListDataset(cfg.dataset_path, getattr(cfg, SPLITS[split]), label_map, per_image, collate)


class TrainPlan:
    """Which samples make up every micro-batch of every optimizer update of an epoch.

    The epoch's order is a permutation seeded by (seed, epoch). Updates take ``global_batch``
    samples each (the last one fewer when ``drop_last`` is false), split into micro-batches of at
    most ``local_batch``; ``rank``/``world_size`` give each process its share of every update.
    """

    def __init__(self, num_samples: int, global_batch: int, local_batch: int, seed: int, drop_last: bool,
                 rank: int = 0, world_size: int = 1):
        self.num_samples, self.global_batch, self.local_batch = num_samples, global_batch, local_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        full, rest = divmod(num_samples, global_batch)
        # A last, smaller update is kept unless drop_last, or it is too small to give every process a sample.
        self.updates_per_epoch = full + (1 if rest >= world_size and not drop_last else 0)
        if self.updates_per_epoch == 0:
            raise ValueError(f"{num_samples} samples make no update of {global_batch} with drop_last")

    def update(self, epoch: int, update: int) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of ``(index, sample seed)`` for one update of an epoch."""
        order = self._order(epoch)
        chunk = order[update * self.global_batch:(update + 1) * self.global_batch]
        mine = chunk[self.rank::self.world_size]
        keyed = [(int(i), derive_seed(self.seed, 1, epoch, int(i))) for i in mine]
        return [keyed[s:s + self.local_batch] for s in range(0, len(keyed), self.local_batch)]

    def num_micro_batches(self, update: int) -> int:
        """How many micro-batches this process runs for ``update`` (the same in every epoch)."""
        chunk = min(self.global_batch, self.num_samples - update * self.global_batch)
        mine = len(range(self.rank, chunk, self.world_size))
        return -(-mine // self.local_batch)

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached_epoch", None) != epoch:
            g = np.random.default_rng(derive_seed(self.seed, 0, epoch))
            self._cached_order, self._cached_epoch = g.permutation(self.num_samples), epoch
        return self._cached_order

    def batches(self, epoch: int, start_update: int = 0):
        """Every micro-batch of the epoch from ``start_update`` on, in order (for the loader)."""
        for u in range(start_update, self.updates_per_epoch):
            yield from self.update(epoch, u)


class EpochBatches:
    """A batch sampler over one epoch's plan (from ``start_update``); :meth:`set_epoch` moves it on,
    so that a loader with persistent workers serves every epoch."""

    def __init__(self, plan: TrainPlan, epoch: int, start_update: int):
        self.set_epoch(epoch, start_update)
        self.plan = plan

    def set_epoch(self, epoch: int, start_update: int = 0) -> None:
        self.epoch, self.start_update = epoch, start_update

    def __iter__(self):
        return self.plan.batches(self.epoch, self.start_update)


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader_kwargs(dataset, num_workers: int, pin_memory: bool, persistent: bool) -> dict:
    return dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None,
                prefetch_factor=4 if num_workers else None, persistent_workers=persistent and num_workers > 0,
                collate_fn=getattr(dataset, "collate", None))


def train_loader(dataset: Dataset, plan: TrainPlan, epoch: int, start_update: int, num_workers: int,
                 pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """The micro-batches of ``plan`` from ``(epoch, start_update)``. With ``persistent`` workers, move it to
    another epoch with ``loader.batch_sampler.set_epoch(...)`` before iterating it again."""
    return DataLoader(dataset, batch_sampler=EpochBatches(plan, epoch, start_update),
                      **_loader_kwargs(dataset, num_workers, pin_memory, persistent))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool = False, rank: int = 0,
                world_size: int = 1, persistent: bool = False) -> DataLoader:
    """Every sample once, in order, no batch dropped; with ``world_size`` processes, this process's
    share (samples ``rank``, ``rank + world_size``, ...), so that the shares cover the split exactly once."""
    kwargs = _loader_kwargs(dataset, num_workers, pin_memory, persistent)
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)


def stop_workers(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now, rather than when the loader is garbage-collected
    (the next iteration starts new ones)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None
