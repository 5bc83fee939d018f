"""Loaders: the micro-batches of a training plan, or every image of a split once, finished on the
training device.

Each loader wraps a torch ``DataLoader`` whose workers read the decoded images and do the
per-image work (see :mod:`myrtle_vision.data.augment`), and finishes each batch where it will be
used: it moves the batch to the device (from pinned memory, without blocking, on CUDA) and, when
the split's transforms run on the device, transforms the whole batch there. Whoever iterates a
loader gets ``(float images, labels)`` on the device, ready for the model.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .plan import EpochBatches, TrainPlan


def default_workers() -> int:
    """Loader workers when the config does not say: this process's share of the CPUs it may use (torchrun's
    ``LOCAL_WORLD_SIZE`` processes share this machine's)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_workers(*given: int | None) -> int:
    """Loader workers: the first of ``given`` that is set (a flag, then the config's ``num_workers``), else
    :func:`default_workers`."""
    for n in given:
        if n is not None:
            return n
    return default_workers()


def _worker_init(main_pid: int, _worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != main_pid:
        # Started by the fork server, this worker's parent is the server, and torch's own check (is my parent
        # still there?) watches the server, which lives as long as its workers do: a training process killed
        # outright (SIGKILL, the out-of-memory killer) would leave both behind for ever. Watch the process
        # that owns the loader instead, and go with it.
        threading.Thread(target=_exit_when_gone, args=(main_pid,), daemon=True, name="watch-main").start()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's (the pid was reused): ours is gone
        return True
    try:  # killed but not yet reaped by its parent: a zombie
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _exit_when_gone(pid: int, interval: float = 1.0) -> None:
    while not _gone(pid):
        time.sleep(interval)
    os._exit(0)


def _worker_context():
    """How loader workers start: from a fork server, not by forking this process.

    By the time a loader starts its workers this process has threads (Gloo's, the queue feeders of
    the loaders already running), and a process forked from one with threads can wait forever on a
    lock that another thread held at the fork: under torchrun, one validation loader worker in some
    tens of runs did. The fork server is a fresh process with one thread; it imports the script and
    this package once (``set_forkserver_preload``), so each worker it forks starts at once. Where
    there is no fork server (Windows), the platform's default."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __package__])  # read when the server starts: first use
    return context


def _to(batch, device: torch.device):
    """Tensors (alone or in a tuple or list) on ``device``; from pinned memory on CUDA, without waiting."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    return type(batch)(_to(x, device) for x in batch)


class Loader:
    """A DataLoader whose batches are finished on ``device`` (see the module docstring)."""

    def __init__(self, loader: DataLoader, device: torch.device, finish=None):
        self.loader, self.device, self._finish = loader, device, finish

    def __iter__(self):
        for batch in self.loader:
            yield self.finish(batch)

    def finish(self, batch):
        """One batch from the workers, on the device and transformed: (images, labels) for our datasets."""
        if self._finish is not None:
            return self._finish(batch, self.device)
        return _to(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler


def _loader_kwargs(dataset, num_workers: int, device: torch.device, persistent: bool) -> dict:
    return dict(
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        multiprocessing_context=_worker_context() if num_workers else None,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=persistent and num_workers > 0,
        collate_fn=getattr(dataset, "collate", None),
    )


def _finish_of(dataset):
    pipeline = getattr(dataset, "pipeline", None)
    return pipeline.finish if pipeline is not None else None


def train_loader(
    dataset: Dataset,
    plan: TrainPlan,
    *,
    epoch: int,
    start_update: int = 0,
    num_workers: int,
    device: torch.device = torch.device("cpu"),
    persistent: bool = False,
) -> Loader:
    """The micro-batches of ``plan`` from ``(epoch, start_update)``. With ``persistent`` workers, move it to
    another epoch with ``loader.batch_sampler.set_epoch(...)`` before iterating it again."""
    loader = DataLoader(
        dataset,
        batch_sampler=EpochBatches(plan, epoch, start_update),
        **_loader_kwargs(dataset, num_workers, device, persistent),
    )
    return Loader(loader, device, _finish_of(dataset))


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    *,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world_size: int = 1,
    persistent: bool = False,
) -> Loader:
    """Every sample once, in order, no batch dropped; with ``world_size`` processes, this process's
    share (samples ``rank``, ``rank + world_size``, ...), so that the shares cover the split exactly once."""
    kwargs = _loader_kwargs(dataset, num_workers, device, persistent)
    finish = _finish_of(dataset)
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return Loader(DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs), device, finish)


def stop_workers(loader: Loader | DataLoader) -> None:
    """Stop a loader's persistent workers now, rather than when the loader is garbage-collected
    (the next iteration starts new ones)."""
    loader = getattr(loader, "loader", loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None
