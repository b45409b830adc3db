"""``SyntheticDataModule``: a registered synthetic task (``lm.data.synthetic``) as train and
evaluation loaders, one evaluation loader per sequence length (length generalisation).

The train loader is the resumable one of the text pipeline (``lm.data.loader.ResumableLoader``), so a
resumed run continues with exactly the next batch. Evaluation loaders are deterministic (the
first ``num_val`` samples of each length's own stream). ``val_names`` (``["L64", "L256", ...]``)
suffixes the logged keys: ``val/acc_L256`` is the accuracy on the answer positions of the
256-token evaluation set.
"""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch

from lm.data.loader import ResumableLoader, data_shard
from lm.data.synthetic import SyntheticDataset, build_task


class SyntheticDataModule(L.LightningDataModule):
    """Procedural, seeded task data (no files, no tokenizer).

    Args:
        task: a name of ``lm.data.synthetic.TASKS`` (``associative_recall``, ``mqar``,
            ``induction_heads``, ``selective_copying``, ``copy_at_distance``).
        task_options: keyword options of the task (e.g. ``{num_pairs: 8}``), checked at build time.
        eval_task_options: options of the evaluation sets, over ``task_options`` (None: the same);
            e.g. train induction heads with several queries per sequence, evaluate Mamba's one.
        seq_len: training sequence length (T).
        eval_seq_lens: sequence lengths of the evaluation sets (None: ``[seq_len]``).
        batch_size: samples per batch on each rank (training and evaluation).
        num_train: samples per training epoch (drawn from ``seed`` + index: an epoch is a fixed set).
        num_val: samples per evaluation set.
        seed: seed of the samples and of the per-epoch shuffle.
        vocab_size: task vocabulary; the model's ``vocab_size`` must be at least this.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, task: str = "associative_recall", task_options: Optional[dict[str, Any]] = None,
                 seq_len: int = 128, eval_seq_lens: Optional[list[int]] = None, batch_size: int = 32,
                 num_train: int = 100_000, num_val: int = 256, seed: int = 1234, vocab_size: int = 32,
                 num_workers: int = 0, eval_task_options: Optional[dict[str, Any]] = None):
        super().__init__()
        for key, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_train", num_train, 1),
                                ("num_val", num_val, 1), ("vocab_size", vocab_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{key}: must be an integer >= {low}, got {value!r}")
        eval_seq_lens = [seq_len] if eval_seq_lens is None else list(eval_seq_lens)
        if not eval_seq_lens or any(not isinstance(n, int) or n < 1 for n in eval_seq_lens):
            raise ValueError(f"data.eval_seq_lens: a non-empty list of positive integers, got {eval_seq_lens!r}")
        if len(set(eval_seq_lens)) != len(eval_seq_lens):
            raise ValueError(f"data.eval_seq_lens: lengths must be distinct, got {eval_seq_lens}")
        if num_train < batch_size:
            raise ValueError(f"data.num_train: {num_train} samples are fewer than one batch (batch_size={batch_size})")
        self.task_name, self.task_options = task, dict(task_options or {})
        self.eval_task_options = {**self.task_options, **(eval_task_options or {})}
        self.seq_len, self.eval_seq_lens, self.batch_size = seq_len, eval_seq_lens, batch_size
        self.num_train, self.num_val, self.seed, self._vocab_size = num_train, num_val, seed, vocab_size
        self.num_workers = num_workers
        # build every task now: bad options fail at parse/build time, naming the key
        self.train_task = build_task(task, seq_len, vocab_size, self.task_options)
        try:
            self.eval_tasks = [build_task(task, n, vocab_size, self.eval_task_options) for n in eval_seq_lens]
        except ValueError as err:  # name the key the user wrote
            key = str(err).split(":", 1)[0].removeprefix("data.task_options.")
            if key in (eval_task_options or {}):
                raise ValueError(str(err).replace("data.task_options.", "data.eval_task_options.", 1)) from None
            raise
        self.val_names = [f"L{n}" for n in eval_seq_lens]
        self.tokenizer = None  # no tokenizer: LanguageModel.setup skips its vocabulary check

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if getattr(self, "trainer", None) is not None else None
        model_vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        if model_vocab is not None and model_vocab < self._vocab_size:
            raise ValueError(f"model.config.vocab_size: {model_vocab} is smaller than the task's "
                             f"data.vocab_size={self._vocab_size}")

    def _rank_world(self) -> tuple[int, int]:
        return data_shard(getattr(self, "trainer", None))

    def train_dataset(self) -> SyntheticDataset:
        return SyntheticDataset(self.train_task, self.num_train, self.seed, "train")

    def eval_datasets(self, split: str = "val") -> list[SyntheticDataset]:
        return [SyntheticDataset(t, self.num_val, self.seed, split) for t in self.eval_tasks]

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._rank_world()
        if self.num_train < self.batch_size * world:
            raise ValueError(f"data.num_train: {self.num_train} samples are fewer than batch_size * world_size"
                             f" = {self.batch_size} * {world}")
        return ResumableLoader(self.train_dataset(), self.batch_size, shuffle=True, seed=self.seed,
                               rank=rank, world_size=world, num_workers=self.num_workers)

    def _eval_loaders(self, split: str) -> list[torch.utils.data.DataLoader]:
        return [torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False, drop_last=False,
                                            num_workers=self.num_workers) for ds in self.eval_datasets(split)]

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[torch.utils.data.DataLoader]:
        """``lm test`` scores fresh samples (a stream disjoint from validation) at every length."""
        return self._eval_loaders("test")
