"""Which images make up every micro-batch of every update: a function of (seed, epoch, update) alone
(and, for class-balanced draws, of the training labels), so that a resumed run sees what it would have.

The random streams (the second number given to :func:`derive_seed`): 0, each epoch's permutation;
1, each sample's augmentation; 2, dropout (the trainer's); 3, each epoch's class-balanced draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (seed, stream, epoch, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def class_balanced_probabilities(labels: Sequence[int]) -> np.ndarray:
    """Each sample's probability of being drawn: proportional to 1 / (the samples of its class), so that
    each class present is drawn equally often."""
    labels = np.asarray(labels, dtype=np.int64)
    weights = 1.0 / np.bincount(labels)[labels]
    return weights / weights.sum()


class TrainPlan:
    """Which samples make up every micro-batch of every optimizer update of an epoch.

    The epoch's order is a permutation seeded by (seed, epoch). Updates take ``global_batch``
    samples each (the last one fewer when ``drop_last`` is false), split into micro-batches of at
    most ``local_batch``; ``rank``/``world_size`` give each process its share of every update
    (positions ``rank``, ``rank + world_size``, ... of the update's chunk of the order).

    Two options change what the order holds, never its length (``num_samples`` positions, so the
    updates per epoch and the learning-rate schedule stay as they are):

    - ``balance_labels`` (the label of every sample): the epoch draws ``num_samples`` samples with
      replacement, each with probability proportional to 1 / (the number of samples of its class),
      seeded by (seed, epoch), as torch's ``WeightedRandomSampler`` would; every class comes up
      about equally often.
    - ``repeats`` k > 1 (DeiT's repeated augmentation): each sample of the permutation (or of the
      draws) comes k times in a row, and the epoch is the first ``num_samples`` positions of that
      stream: about num_samples / k distinct samples, each seen k times. Consecutive positions go to
      different processes, so with ``world_size`` >= k the copies are trained on by different
      processes, each with its own augmentation (the copy number is in its sample seed).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch: int,
        local_batch: int,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        repeats: int = 1,
        balance_labels: Sequence[int] | None = None,
    ):
        self.num_samples, self.global_batch, self.local_batch = num_samples, global_batch, local_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, not {repeats}")
        self.repeats = repeats
        self.draw_probabilities = None if balance_labels is None else class_balanced_probabilities(balance_labels)
        if self.draw_probabilities is not None and len(self.draw_probabilities) != num_samples:
            raise ValueError(f"{len(self.draw_probabilities)} labels for {num_samples} samples")
        full, rest = divmod(num_samples, global_batch)
        # A last, smaller update is kept unless drop_last, or it is too small to give every process a sample.
        self.updates_per_epoch = full + (1 if rest >= world_size and not drop_last else 0)
        if self.updates_per_epoch == 0:
            raise ValueError(f"{num_samples} samples make no update of {global_batch} with drop_last")

    def micro_batches(self, epoch: int, update: int) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of ``(index, sample seed)`` for one update of an epoch."""
        order = self._order(epoch)
        start = update * self.global_batch
        mine = range(start + self.rank, min(start + self.global_batch, self.num_samples), self.world_size)
        keyed = [(int(order[p]), self.sample_seed(epoch, p, int(order[p]))) for p in mine]
        return [keyed[s : s + self.local_batch] for s in range(0, len(keyed), self.local_batch)]

    def sample_seed(self, epoch: int, position: int, index: int) -> int:
        """The seed of the augmentation of sample ``index`` at ``position`` of the epoch's order.

        Plain plans keep the derivation of every earlier run, (seed, 1, epoch, index). A repeated
        sample adds its copy number, so that its copies are augmented differently; a class-balanced
        draw adds its draw number, since one image may be drawn more than once in an epoch."""
        key = [self.seed, 1, epoch, index]
        draw, copy = divmod(position, self.repeats)
        if self.repeats > 1:
            key.append(copy)
        if self.draw_probabilities is not None:
            key.append(draw)
        return derive_seed(*key)

    def num_micro_batches(self, update: int) -> int:
        """How many micro-batches this process runs for ``update`` (the same in every epoch)."""
        chunk = min(self.global_batch, self.num_samples - update * self.global_batch)
        mine = len(range(self.rank, chunk, self.world_size))
        return -(-mine // self.local_batch)

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's ``num_samples`` indices: the draws, each repeated ``repeats`` times, cut to length."""
        if getattr(self, "_cached_epoch", None) != epoch:
            draws = self._draws(epoch)
            if self.repeats > 1:
                draws = draws[np.arange(self.num_samples) // self.repeats]
            self._cached_order, self._cached_epoch = draws, epoch
        return self._cached_order

    def _draws(self, epoch: int) -> np.ndarray:
        """A permutation of the samples seeded by (seed, epoch), or, class-balanced, as many draws with replacement."""
        if self.draw_probabilities is None:
            return np.random.default_rng(derive_seed(self.seed, 0, epoch)).permutation(self.num_samples)
        g = np.random.default_rng(derive_seed(self.seed, 3, epoch))
        return g.choice(self.num_samples, size=self.num_samples, replace=True, p=self.draw_probabilities)

    def batches(self, epoch: int, start_update: int = 0):
        """Every micro-batch of the epoch from ``start_update`` on, in order (for the loader)."""
        for u in range(start_update, self.updates_per_epoch):
            yield from self.micro_batches(epoch, u)


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
