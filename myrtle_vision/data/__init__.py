"""The data a run reads: split lists and labels (:mod:`.images`), the decoded-image cache
(:mod:`.cache`), where and how the transform ops run (:mod:`.augment`), the training plan
(:mod:`.plan`) and the loaders that put finished batches on the training device (:mod:`.loaders`)."""

from .images import SPLITS, ImageListDataset, class_names, open_split, read_label_map
from .loaders import Loader, eval_loader, resolve_workers, stop_workers, train_loader
from .plan import EpochBatches, TrainPlan, derive_seed

__all__ = [
    "SPLITS",
    "EpochBatches",
    "ImageListDataset",
    "Loader",
    "TrainPlan",
    "class_names",
    "resolve_workers",
    "derive_seed",
    "eval_loader",
    "open_split",
    "read_label_map",
    "stop_workers",
    "train_loader",
]
