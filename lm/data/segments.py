"""Segment-wise documents for the Memorizing-Transformer kNN memory (``knn_memory`` mixer).

The kNN memory (Wu et al. 2022) is trained the paper's way: a document is cut into segments of
``segment_len`` tokens run one after another. The model attends locally inside a segment only;
anything earlier is reachable only through the memory of the previous segments' (key, value)
pairs, so the memory's FIFO size is the model's reach.

Task (``SegmentRecallDataModule``): cross-segment associative recall. A document with gap ``g``
is ``g + 1`` segments: segment 0 opens with ``num_pairs`` facts ``k v`` (distinct keys), segments
``1..g-1`` are distractor tokens, and segment ``g`` opens with the ``num_pairs`` queries ``k v``
in a random order (the value is teacher-forced in the input; the label at the key position is its
value, as in MQAR). The rest of each segment is distractor tokens (their own token range, so
they never look like keys). The facts sit ``g * segment_len`` tokens before the query segment's
start: a memory of ``memory_size`` tokens holds them iff ``g * segment_len <= memory_size``;
beyond, accuracy falls to chance (``1 / num_values``). Evaluation sets are named ``dist<d>``
with ``d = g * segment_len``, and ``val/acc_dist<d>`` compares directly to ``memory_size``.

Feeding: every batch holds ``batch_size`` fresh documents with one gap (training cycles through
``train_gaps`` batch by batch). Item ``i`` is the scored last segment (``input_ids``/``labels``
``[B, S]``) plus its earlier segments (``context_ids`` ``[B, g * S]``). The
``on_after_batch_transfer`` hook pops the context, clears the memories
(``lm.mixers.knn_memory.reset_memories``: a new document in every row) and runs the earlier
segments through the model one at a time without gradients, which writes their (key, value) pairs
to the memory; the training/validation step then runs the query segment. This is segment-wise
training (Wu et al. 2022, Sec. 3) with the unscored segments' backward skipped: they carry no
labels and the memory is non-differentiable, so the gradients are those of streaming the
document. It also keeps every batch scored (a stream of unaligned documents has batches with no
query at all, i.e. no loss), and the memory's batch rows fixed.

Legend: B batch rows (documents), S segment length, P fact pairs, g gap in segments.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lm.data.loader import ResumableLoader, data_shard, whole_batch
from lm.data.synthetic import IGNORE_INDEX, SPLITS

_KEY = "data"


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{_KEY}.{name}: must be an integer >= {low}, got {value!r}")
    return int(value)


class SegmentDocuments(Dataset):
    """Item ``i``: ``B`` documents with gap ``gaps[i % len(gaps)]``, each drawn from
    ``default_rng([seed, split, i, row])`` (reproducible from the index alone): the query segment
    ``input_ids``/``labels`` ``[B, S]`` and the earlier segments ``context_ids`` ``[B, g * S]``."""

    def __init__(self, *, num_batches: int, batch_size: int, gaps: list[int], segment_len: int,
                 num_pairs: int, num_keys: int, num_values: int, vocab_size: int, seed: int, split: str,
                 row_offset: int = 0):
        self.num_batches, self.B, self.gaps, self.S = num_batches, batch_size, gaps, segment_len
        self.P, self.K, self.V, self.vocab = num_pairs, num_keys, num_values, vocab_size
        self.seed, self.split, self.row_offset = seed, SPLITS[split], row_offset
        self.filler_lo = 2 + num_keys + num_values  # distractor tokens: [filler_lo, vocab)

    def __len__(self) -> int:
        return self.num_batches

    def document(self, i: int, row: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        """One document of ``(g + 1) * S`` tokens: ids and labels (scored only at the queries)."""
        rng = np.random.default_rng([self.seed, self.split, i, self.row_offset + row])
        S, P = self.S, self.P
        keys = rng.choice(self.K, P, replace=False) + 2
        values = rng.integers(0, self.V, P) + 2 + self.K
        order = rng.permutation(P)
        ids = rng.integers(self.filler_lo, self.vocab, (g + 1) * S)
        labels = np.full((g + 1) * S, IGNORE_INDEX)
        ids[0:2 * P:2], ids[1:2 * P:2] = keys, values  # the facts open segment 0
        q = g * S if g else 2 * P  # the queries open segment g (gap 0: right after the facts)
        ids[q:q + 2 * P:2], ids[q + 1:q + 2 * P:2] = keys[order], values[order]
        labels[q:q + 2 * P:2] = values[order]
        return ids, labels

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_batches:
            raise IndexError(i)
        g = self.gaps[i % len(self.gaps)]
        docs = [self.document(int(i), r, g) for r in range(self.B)]
        ids = torch.from_numpy(np.stack([d[0] for d in docs]).astype(np.int64))
        labels = torch.from_numpy(np.stack([d[1] for d in docs]).astype(np.int64))
        q = g * self.S
        return {"input_ids": ids[:, q:], "labels": labels[:, q:], "context_ids": ids[:, :q]}  # g = 0: no context


class SegmentRecallDataModule(L.LightningDataModule):
    """Cross-segment associative recall for the kNN memory, fed segment by segment.

    Args:
        segment_len: tokens per segment (the model's ``max_seq_len`` and local attention span).
        num_pairs: facts per document (and queries in its last segment); ``2 * num_pairs <= segment_len``.
        num_keys, num_values: key and value token ranges (``[2, 2+K)``, ``[2+K, 2+K+V)``); the rest of
            ``vocab_size`` are distractor tokens (at least one).
        train_gaps: gaps (segments from facts to queries) of the training batches, one per batch in turn;
            gap 0 puts the queries right after the facts in one segment: local recall, which trains
            the key/value projections the memory reuses (its stored pairs are detached, so the
            cross-segment queries alone train only the queries and the gate).
        eval_gaps: one evaluation set per gap, named ``dist<gap * segment_len>``.
        batch_size: documents per batch (one memory row each).
        num_train: training batches (steps) per epoch; num_val: evaluation batches per set.
        seed: seed of every document.
    """

    def __init__(self, segment_len: int = 32, num_pairs: int = 8, num_keys: int = 16, num_values: int = 16,
                 vocab_size: int = 48, train_gaps: Optional[list[int]] = None,
                 eval_gaps: Optional[list[int]] = None, batch_size: int = 16, num_train: int = 100_000,
                 num_val: int = 32, seed: int = 1234):
        super().__init__()
        self.segment_len = _check_int("segment_len", segment_len, 2)
        self.num_pairs = _check_int("num_pairs", num_pairs, 1)
        self.num_keys = _check_int("num_keys", num_keys, 1)
        self.num_values = _check_int("num_values", num_values, 1)
        self._vocab_size = _check_int("vocab_size", vocab_size, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_train = _check_int("num_train", num_train, 1)
        self.num_val = _check_int("num_val", num_val, 1)
        self.seed = int(seed)
        if 2 * self.num_pairs > self.segment_len:
            raise ValueError(f"{_KEY}.num_pairs: {num_pairs} pairs need segment_len >= {2 * num_pairs}, got {segment_len}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"{_KEY}.num_pairs: {num_pairs} distinct keys need num_keys >= {num_pairs}, got {num_keys}")
        if 2 + self.num_keys + self.num_values >= self._vocab_size:
            raise ValueError(f"{_KEY}.vocab_size: needs room for distractors: > 2 + num_keys + num_values = "
                             f"{2 + self.num_keys + self.num_values}, got {vocab_size}")
        self.train_gaps = self._gaps("train_gaps", [1] if train_gaps is None else train_gaps, low=0)
        self.eval_gaps = self._gaps("eval_gaps", [g for g in self.train_gaps if g] or [1] if eval_gaps is None
                                    else eval_gaps, low=1)
        if 0 in self.train_gaps and 4 * self.num_pairs > self.segment_len:
            raise ValueError(f"{_KEY}.train_gaps: gap 0 (facts and queries in one segment) needs segment_len >= "
                             f"4 * num_pairs = {4 * self.num_pairs}, got {self.segment_len}")
        if len(set(self.eval_gaps)) != len(self.eval_gaps):
            raise ValueError(f"{_KEY}.eval_gaps: gaps must be distinct, got {self.eval_gaps}")
        self.val_names = [f"dist{g * self.segment_len}" for g in self.eval_gaps]
        self.tokenizer = None

    @staticmethod
    def _gaps(name: str, gaps, low: int) -> list[int]:
        gaps = list(gaps)
        if not gaps:
            raise ValueError(f"{_KEY}.{name}: a non-empty list of integers >= {low}, got {gaps!r}")
        return [_check_int(f"{name}[{i}]", g, low) for i, g in enumerate(gaps)]

    def _documents(self, num_batches: int, gaps: list[int], split: str, rank: int = 0) -> SegmentDocuments:
        return SegmentDocuments(num_batches=num_batches, batch_size=self.batch_size, gaps=gaps,
                              segment_len=self.segment_len, num_pairs=self.num_pairs, num_keys=self.num_keys,
                              num_values=self.num_values, vocab_size=self._vocab_size, seed=self.seed,
                              split=split, row_offset=rank * self.batch_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if getattr(self, "trainer", None) is not None else None
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg.vocab_size < self._vocab_size:
            raise ValueError(f"model.config.vocab_size: {cfg.vocab_size} is smaller than data.vocab_size={self._vocab_size}")
        if cfg is not None and cfg.max_seq_len < self.segment_len:
            raise ValueError(f"model.config.max_seq_len: {cfg.max_seq_len} is shorter than data.segment_len={self.segment_len}")

    def _rank(self) -> int:
        return data_shard(getattr(self, "trainer", None))[0]  # ranks splitting one sequence share rows

    def _loader(self, ds: SegmentDocuments) -> DataLoader:
        # items are whole batches (batch_size=None): drawn from their index, no shuffle needed
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def train_dataloader(self) -> ResumableLoader:
        """Item after item, resumable mid-epoch (its position travels in the checkpoint). Every
        rank walks the same item indices; its documents differ through ``row_offset``."""
        return ResumableLoader(self._documents(self.num_train, self.train_gaps, "train", self._rank()), 1,
                               shuffle=False, seed=self.seed, collate_fn=whole_batch)

    def _eval(self, split: str) -> list[DataLoader]:
        return [self._loader(self._documents(self.num_val, [g], split, self._rank())) for g in self.eval_gaps]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval("test")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """New documents in every row: clear the memories, then write the earlier segments to them."""
        context = batch.pop("context_ids", None)
        trainer = getattr(self, "trainer", None)
        if context is None or trainer is None:
            return batch
        from lm.mixers.knn_memory import reset_memories

        model = trainer.lightning_module.model
        if reset_memories(model) and context.shape[1]:  # no memory layer: earlier segments cannot matter
            with torch.no_grad():
                for seg in context.split(self.segment_len, dim=1):
                    model(seg)
        return batch
