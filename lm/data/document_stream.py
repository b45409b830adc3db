"""Text documents streamed segment by segment: the Memorizing-Transformer LM (``knn_memory`` mixer).

Wu et al. 2022 (Sec. 3) train on long documents cut into segments: each batch row reads one
document after another, segment after segment, and a row's kNN memory holds the (key, value) pairs
of its document's earlier segments; it is cleared when the row starts a new document. Packed
samples (``TextDataModule``) cannot do this: a sample is a random window of the corpus, so no row
continues from the previous batch.

``DocumentStreamDataModule`` is ``TextDataModule``'s pipeline (sources, split, BPE tokenizer, the
cached EOS-separated token streams) with another layout. A document is ``[EOS] + tokens + [EOS]``
(the leading EOS is the start token that predicts its first token, as in the packed stream), cut
into segments of ``seq_len`` inputs; the last segment is padded (input EOS, label ignored). The
documents, in a seeded order, go one at a time to the row with the fewest segments so far (rows
of ``world * batch_size``, rank ``r`` reads rows ``r*B .. r*B+B-1``), so rows end within a document
of each other; an epoch is the length of the shortest row (the rest of the longer rows is cut).
Batch ``t`` is segment ``t`` of every row: ``input_ids``/``labels`` ``[B, S]`` and ``reset`` ``[B]``
(the row starts a document at this segment). ``on_after_batch_transfer`` pops ``reset`` and clears
those rows' memories (``lm.mixers.knn_memory.reset_memories``) before the step. Every epoch reads
the same layout; the train loader is resumable like the packed one (a resumed run continues at
the next segment; the memory, a cache that is not checkpointed, starts empty and fills again).

Validation streams the held-out documents the same way (``val_batches`` segments per row, at
most), starting with empty memories (the mixer clears them on every train/eval switch), so
``val/loss`` is the loss of reading those documents in order with the memory the model has built.

Legend: B rows per rank, S segment length (``seq_len``), N segments per row in an epoch.
"""
from __future__ import annotations

import heapq

import numpy as np
import torch
from torch.utils.data import DataLoader

from lm.data.loader import ResumableLoader, whole_batch
from lm.data.packing import MappedStream
from lm.data.synthetic import IGNORE_INDEX
from lm.data.text import TextDataModule


def document_spans(stream: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every document in an EOS-separated stream, its EOS included (``end`` is
    one past it); empty documents (two EOS in a row) are skipped."""
    ends = np.flatnonzero(stream == eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e - s > 1]


def layout_rows(spans: list[tuple[int, int]], segment_len: int, num_rows: int, seed: int) -> np.ndarray:
    """Segments of each row in reading order: ``[rows, N, 2]`` of (document index, token offset in the
    document's inputs), ``N`` the shortest row's length. Documents go, in a seeded order, to the row
    with the fewest segments so far."""
    order = np.random.default_rng(seed).permutation(len(spans))
    rows: list[list[tuple[int, int]]] = [[] for _ in range(num_rows)]
    heap = [(0, r) for r in range(num_rows)]  # (segments so far, row)
    for d in order:
        n_inputs = spans[d][1] - spans[d][0]  # [EOS] + tokens (the final EOS is only a label)
        n_segments = -(-n_inputs // segment_len)
        count, r = heapq.heappop(heap)
        rows[r].extend((int(d), j * segment_len) for j in range(n_segments))
        heapq.heappush(heap, (count + n_segments, r))
    n = min(len(row) for row in rows)
    return np.array([row[:n] for row in rows], dtype=np.int64).reshape(num_rows, n, 2)


class DocumentSegments(MappedStream):
    """Item ``t``: segment ``t`` of each of the rows ``rows_RN2`` (a rank's slice of ``layout_rows``)."""

    def __init__(self, path: str, spans: list[tuple[int, int]], rows_RN2: np.ndarray, segment_len: int,
                 eos_id: int, num_steps: int | None = None):
        self.path, self.spans, self.rows, self.S, self.eos_id = path, spans, rows_RN2, segment_len, eos_id
        self.num_steps = rows_RN2.shape[1] if num_steps is None else min(num_steps, rows_RN2.shape[1])

    def __len__(self) -> int:
        return self.num_steps

    def _segment(self, doc: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.spans[doc]
        seq = np.concatenate([[self.eos_id], self.stream[start:end]]).astype(np.int64)  # inputs + 1
        ids = np.full(self.S, self.eos_id, dtype=np.int64)
        labels = np.full(self.S, IGNORE_INDEX, dtype=np.int64)
        chunk = seq[offset:offset + self.S + 1]
        ids[:len(chunk) - 1], labels[:len(chunk) - 1] = chunk[:-1], chunk[1:]
        return ids, labels

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        if not 0 <= t < self.num_steps:
            raise IndexError(t)
        segs = [self._segment(int(doc), int(off)) for doc, off in self.rows[:, t]]
        return {"input_ids": torch.from_numpy(np.stack([s[0] for s in segs])),
                "labels": torch.from_numpy(np.stack([s[1] for s in segs])),
                "reset": torch.from_numpy(self.rows[:, t, 1] == 0)}


class StreamLoader(ResumableLoader):
    """The resumable loader over a rank's ``DocumentSegments`` (every rank reads every step: the
    rows are sharded, not the steps). Its state records the world size and seed the layout was made
    for, and a resume with another is refused: the rows would be different streams."""

    def __init__(self, segments: DocumentSegments, world_size: int, seed: int, *, num_workers: int = 0):
        super().__init__(segments, 1, shuffle=False, seed=seed, num_workers=num_workers, collate_fn=whole_batch)
        self.layout_world = world_size

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "world_size": self.layout_world}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if int(state_dict["world_size"]) != self.layout_world:
            raise ValueError(f"cannot resume the document streams laid out for world_size={state_dict['world_size']}"
                             f" on world_size={self.layout_world}: every row would read other documents")
        if int(state_dict["seed"]) != self.sampler.seed:
            raise ValueError(f"data.seed: the checkpoint's document streams were laid out with seed "
                             f"{state_dict['seed']}, not {self.sampler.seed}: every row would read other documents")
        super().load_state_dict({**state_dict, "world_size": 1})


class DocumentStreamDataModule(TextDataModule):
    """``TextDataModule`` read as per-row document streams for the kNN memory (see the module doc).

    Takes ``TextDataModule``'s arguments; ``seq_len`` is the segment length, ``batch_size`` the
    rows (one document stream and one memory row each) per rank, ``val_batches`` caps the
    validation segments per row, ``seed`` orders the documents.
    """

    _streams: dict[str, tuple[str, list[tuple[int, int]]]] | None = None  # split -> (stream file, spans)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self._streams is None:
            self._streams = {split: (ds.path, document_spans(ds.stream, self.eos_id))
                             for split, ds in (("train", self.train_dataset), ("validation", self.val_dataset))}

    def _segments(self, split: str, num_steps: int | None = None) -> DocumentSegments:
        self._require_setup()
        rank, world = self._rank_world()
        path, spans = self._streams[split]
        rows = world * self.batch_size
        if len(spans) < rows:
            raise ValueError(f"data.batch_size: the {split} split has {len(spans)} documents, fewer than the "
                             f"{rows} streams of batch_size * world_size = {self.batch_size} * {world}")
        layout = layout_rows(spans, self.seq_len, rows, self.seed + (split == "validation"))
        mine = layout[rank * self.batch_size:(rank + 1) * self.batch_size]
        return DocumentSegments(path, spans, mine, self.seq_len, self.eos_id, num_steps)

    def train_dataloader(self) -> StreamLoader:
        """Step after step in order (no shuffle: the rows are streams), resumable mid-epoch."""
        return StreamLoader(self._segments("train"), self._rank_world()[1], self.seed, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._segments("validation", self.val_batches), batch_size=None, shuffle=False,
                          num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Rows that start a document at this segment: clear their kNN memories."""
        reset = batch.pop("reset", None)
        trainer = getattr(self, "trainer", None)
        if reset is not None and trainer is not None and bool(reset.any()):
            from lm.mixers.knn_memory import reset_memories

            reset_memories(trainer.lightning_module, None if bool(reset.all()) else reset)
        return batch
