"""The resumable train loader: a resumed run continues with exactly the next batch.

``ResumableLoader`` is deliberately *not* a ``torch.utils.data.DataLoader`` subclass: Lightning
re-creates DataLoaders to inject a ``DistributedSampler``, which would replace our sharding and
lose the position. Instead it is a plain iterable with ``__len__`` and
``state_dict``/``load_state_dict``, which Lightning (2.x) stores in the checkpoint under
``loops.fit_loop.state_dict.combined_loader`` and hands back on resume. How Lightning drives it:

* ``load_state_dict`` is called in ``FitLoop.setup_data`` *before* the first ``iter()``; ``iter()``
  is then called once per epoch (epoch 0 in ``setup_data``, later epochs in
  ``TrainingEpochLoop.on_run_start``, skipped for the epoch that is being resumed).
* Lightning also calls ``iter()`` once as a mere probe (``_check_dataloader_iterable``) and drops
  the result, so ``__iter__`` is a generator: nothing happens until the first ``next()``.
* Because ``__len__`` is known, Lightning does not prefetch; the count of batches yielded equals
  the count of batches trained on when a checkpoint is written. With a sized loader Lightning
  ends the epoch after ``len`` batches without asking for another, so the epoch rolls over on
  the next ``iter()`` (state ``batches_done == len``), not on ``StopIteration``.
* With ``limit_train_batches`` below ``len`` Lightning ends its epoch early; the next ``iter()``
  continues the same data epoch (nothing skipped or repeated), so our epoch lags Lightning's.

The state holds only ints, so ``torch.load(ckpt, weights_only=True)`` works, and it is the same on
every rank (rank is not part of it): Lightning saves rank 0's copy and loads it on all ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def data_shard(trainer) -> tuple[int, int]:
    """This process's data-parallel shard ``(rank, world)``: Lightning's ``distributed_sampler_kwargs``
    (ranks that split one sequence, lm.parallel.sequence, share a shard); ``(0, 1)`` without a trainer."""
    if trainer is None:
        return 0, 1
    kw = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return kw.get("rank", trainer.global_rank), kw.get("num_replicas", trainer.world_size)


def whole_batch(items: list) -> Any:
    """Collate of a ``ResumableLoader`` with ``batch_size=1`` over a dataset whose items already are
    whole batches (the segment-wise data modules): the one item, unchanged."""
    return items[0]


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation from ``torch.Generator().manual_seed(seed + epoch)``, sharded for data
    parallel: the permutation is truncated to a multiple of ``world_size * batch_size`` (drop_last,
    so every rank has the same number of full batches) and rank ``r`` takes every ``world_size``-th
    index starting at ``r``. Iterating yields the indices of the epoch set by ``set_epoch``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"data.batch_size: must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    @property
    def num_batches(self) -> int:
        """Full batches per epoch on each rank."""
        return self.num_samples // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, in consumption order."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        keep = self.num_batches * self.batch_size * self.world_size
        return order[:keep][self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch))


class ResumableLoader:
    """Iterable over batches of ``dataset`` whose position survives a checkpoint.

    Each ``iter()`` continues the current epoch from ``batches_done`` (or starts the next epoch if
    the current one is exhausted) with a fresh ``DataLoader`` over the remaining indices.
    ``state_dict()`` records the batches *yielded to the consumer*, not the ones worker processes
    have prefetched, so ``num_workers > 0`` resumes exactly too.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 collate_fn: Callable[[list], Any] | None = None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.sampler = ResumableSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed,
                                        rank=rank, world_size=world_size)
        self._epoch = 0
        self._batches_done = 0
        self._owner: object | None = None  # token of the generator allowed to advance the state

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_done(self) -> int:
        return self._batches_done

    def __len__(self) -> int:
        """Batches per epoch on this rank (the whole epoch, also when resuming mid-epoch: Lightning
        adds the batches it already ran in the resumed epoch to its own count)."""
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[Any]:
        # A generator: the body runs at the first next(), so Lightning's probing iter() is harmless.
        n = len(self)
        if n == 0:
            return
        self._owner = token = object()
        if self._batches_done >= n:  # previous epoch fully consumed: this iter() starts the next one
            self._epoch += 1
            self._batches_done = 0
        self.sampler.set_epoch(self._epoch)
        remaining = self.sampler.indices(self._epoch)[self._batches_done * self.batch_size :]
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=remaining, num_workers=self.num_workers,
            collate_fn=self.collate_fn, pin_memory=False, persistent_workers=False, drop_last=True,
        )
        for batch in loader:
            if self._owner is not token:  # a newer iter() or load_state_dict() took over
                return
            self._batches_done += 1  # counted at hand-over, not when a worker produced it
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done,
                "seed": self.sampler.seed, "world_size": self.sampler.world_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next ``iter()`` continue at the saved epoch and batch."""
        if int(state_dict["world_size"]) != self.sampler.world_size:
            raise ValueError(
                f"cannot resume the train loader saved with world_size={state_dict['world_size']} on"
                f" world_size={self.sampler.world_size}: the per-rank data order would change"
            )
        self._owner = None  # stop any live iterator: its position is no longer the truth
        self._epoch = int(state_dict["epoch"])
        self._batches_done = int(state_dict["batches_done"])
        self.sampler.seed = int(state_dict["seed"])  # the saved order wins over a changed config
