"""Data-parallel processes started by torchrun: set-up, tear-down, and the few collectives we use.

``torchrun --nproc_per_node=N train.py -c CONFIG`` starts N copies of the script with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in the environment; :func:`session`
turns that into a process group (NCCL on CUDA, Gloo on CPU) and a device per process. Without
torchrun it is one process and every collective here is a no-op, so the same code serves both.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Processes:
    """This process among the run's processes, and its device. ``Processes(device=d)``: one process on ``d``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes (in place, and returned)."""
        if self.enabled:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device)
            tensor.copy_(on_device.to(tensor.device))
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The largest ``tensor`` over all processes, elementwise (in place, and returned)."""
        if self.enabled:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
            tensor.copy_(on_device.to(tensor.device))
        return tensor

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def on_main(self, work):
        """``work()`` on rank 0 alone (a write, a check of where it will write), its result on every process. A
        UserError it raises is raised on every process, so none is left waiting in a collective for a rank
        that has stopped."""
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except UserError as e:
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def launched_processes() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_to_start(cfg, device: torch.device, requested: int | None = None, gpu_count: int | None = None) -> int:
    """How many processes ``train.py`` starts itself (1: it just runs).

    As in the earlier release, a config with ``train_config.distributed`` true trains on every visible
    GPU: one process per GPU when there are several, unless torchrun already started the processes.
    ``requested`` (``--nproc_per_node``) chooses the count instead, on CPU (Gloo) too.
    """
    where = f"{cfg.path}: train_config.distributed"
    if requested is not None:
        if requested < 1:
            raise UserError(f"--nproc_per_node {requested}: must be at least 1")
        if launched_processes() > 1:
            raise UserError("--nproc_per_node: torchrun already started the processes; give one or the other")
        if requested > 1 and not cfg.train_config.distributed:
            raise UserError(f"{where} is false; set it to true to train in {requested} processes")
        gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
        if device.type == "cuda" and requested > gpus:
            raise UserError(
                f"--nproc_per_node {requested}: this machine has {gpus} GPU(s); one process per GPU at most"
            )
        return requested
    if launched_processes() > 1 or device.type != "cuda":
        return 1
    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    return gpus if cfg.train_config.distributed and gpus > 1 else 1


def launch(nproc: int, script: str, args: list[str]) -> int:
    """Run ``script args`` in ``nproc`` processes on this machine with PyTorch's own launcher, exactly as
    ``torchrun --standalone --nproc_per_node=nproc script args`` does; wait for them and return the exit
    status (the first failing process's; each process reports its own error)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", script, *args]))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as e:  # Ctrl-C or SIGTERM: the launcher passed it on to every process, which saved
        return 128 + int(e.sigval)
    return 0


@contextmanager
def session(cfg, device: torch.device):
    """The process group for this run, if torchrun started several processes; torn down on exit.

    ``device`` is the user's choice (cpu or cuda); with CUDA each process takes the GPU of its
    ``LOCAL_RANK``. The backend is ``dist_config.dist_backend`` on CUDA (NCCL by default) and
    Gloo on CPU, where NCCL cannot run.
    """
    world = launched_processes()
    if world == 1:
        yield Processes(device=device)
        return
    if not cfg.train_config.distributed:
        raise UserError(
            f"{cfg.path}: train_config.distributed is false, but torchrun started {world} processes; "
            "set it to true or launch one process"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s); "
                "start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = cfg.dist_config.dist_backend
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield Processes(rank, world, local_rank, device)
    finally:
        dist.destroy_process_group()
