"""Which images make up every micro-batch of every update: a function of (seed, epoch, update) alone."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (seed, stream, epoch, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class TrainPlan:
    """Which samples make up every micro-batch of every optimizer update of an epoch.

    The epoch's order is a permutation seeded by (seed, epoch). Updates take ``global_batch``
    samples each (the last one fewer when ``drop_last`` is false), split into micro-batches of at
    most ``local_batch``; ``rank``/``world_size`` give each process its share of every update.
    """

    def __init__(self, num_samples: int, *, global_batch: int, local_batch: int, seed: int, drop_last: bool,
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
