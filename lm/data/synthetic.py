"""Procedural synthetic tasks for token mixers: recall, induction, selective copying, copying.

Each task is a registered class (``TASKS``, names used as ``data.task`` in a recipe) whose
``sample(rng)`` draws one sequence as ``(input_ids_T, labels_T)`` int64 arrays: ``labels`` is -100
everywhere except the answer positions, where it holds the token the model must predict *at that
position* (the LM loss does not shift: ``labels[t]`` scores ``logits[t]``). Accuracy on the answer
positions is the metric (``val/acc`` of ``LanguageModel``).

``SyntheticDataset`` is map-style: sample ``i`` is drawn from ``numpy.random.default_rng([seed,
split, seq_len, i])``, so every sample is reproducible from its index alone (resumable loaders,
any number of workers, any world size) and train / validation / each evaluation length draw from
disjoint streams.

Vocabulary layout shared by all tasks: token 0 is the blank / noise / padding token, token 1 the
task's marker (trigger, separator or copy cue) where it has one; the content tokens follow.
Legend: T sequence length, V vocabulary size, K keys, P key-value pairs, N tokens to copy.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch.utils.data import Dataset

from lm.registry import Registry

IGNORE_INDEX = -100
BLANK, MARKER = 0, 1
TASKS = Registry("task")
_KEY = "data.task_options"


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


def _positive_int(value, key: str) -> int:
    _require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0, key,
             f"must be a positive integer, got {value!r}")
    return int(value)


class SyntheticTask(ABC):
    """Base: a seeded generator of ``(input_ids_T, labels_T)`` for a fixed ``seq_len`` and ``vocab_size``."""

    def __init__(self, seq_len: int, vocab_size: int):
        self.seq_len = _positive_int(seq_len, "data.seq_len")
        self.vocab_size = _positive_int(vocab_size, "data.vocab_size")

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One sample: ``(ids [T], labels [T])``, labels -100 except at the answer positions."""

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.seq_len, BLANK, dtype=np.int64), np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)


@TASKS.register("associative_recall")
class AssociativeRecall(SyntheticTask):
    """Associative recall as in H3 / Hyena (Fu et al. 2023; Poli et al. 2023, Sec. 4.1).

    Each sequence draws a random map key -> value (``num_keys`` keys in ``[2, 2+K)``, values in
    ``[2+K, 2+K+num_values)``), then ``(T-1)//2`` pairs ``k v`` with keys drawn uniformly (so keys
    repeat, always with the same value), then one query key taken from the pairs. The answer is the
    query's value, predicted at the last position. An even ``seq_len`` starts with one blank.
    """

    def __init__(self, seq_len: int, vocab_size: int, *, num_keys: int | None = None,
                 num_values: int | None = None):
        super().__init__(seq_len, vocab_size)
        room = vocab_size - 2
        self.num_keys = _positive_int(num_keys if num_keys is not None else room // 2, f"{_KEY}.num_keys")
        self.num_values = _positive_int(num_values if num_values is not None else room - self.num_keys,
                                        f"{_KEY}.num_values")
        _require(2 + self.num_keys + self.num_values <= vocab_size, f"{_KEY}.num_keys",
                 f"2 + num_keys ({self.num_keys}) + num_values ({self.num_values}) exceeds data.vocab_size={vocab_size}")
        _require(seq_len >= 3, "data.seq_len", f"associative_recall needs seq_len >= 3 (one pair and a query), got {seq_len}")

    def sample(self, rng):
        ids, labels = self._empty()
        T = self.seq_len
        n = (T - 1) // 2
        values = rng.integers(0, self.num_values, self.num_keys) + 2 + self.num_keys
        keys = rng.integers(0, self.num_keys, n) + 2
        start = T - 1 - 2 * n  # 0 or 1 (a leading blank)
        ids[start:T - 1:2], ids[start + 1:T - 1:2] = keys, values[keys - 2]
        q = keys[rng.integers(0, n)]
        ids[T - 1], labels[T - 1] = q, values[q - 2]
        return ids, labels


@TASKS.register("mqar")
class MultiQueryAssociativeRecall(SyntheticTask):
    """Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology", Sec. 3).

    ``num_pairs`` pairs ``k v`` with distinct keys open the sequence; the rest is blank except for
    ``num_pairs`` queries placed at random non-overlapping slots, each key once in random order, each
    followed by its value in the input. The answer to a query is its value, predicted at the query.
    Keys come from ``[2, 2+K)``, values from ``[2+K, V)`` with ``K = (V-2)//2``.
    """

    def __init__(self, seq_len: int, vocab_size: int, *, num_pairs: int = 8):
        super().__init__(seq_len, vocab_size)
        self.num_pairs = _positive_int(num_pairs, f"{_KEY}.num_pairs")
        self.num_keys = (vocab_size - 2) // 2
        self.num_values = vocab_size - 2 - self.num_keys
        _require(self.num_pairs <= self.num_keys, f"{_KEY}.num_pairs",
                 f"{num_pairs} distinct keys need data.vocab_size >= {2 + 2 * num_pairs}, got {vocab_size}")
        _require(4 * self.num_pairs <= seq_len, f"{_KEY}.num_pairs",
                 f"{num_pairs} pairs and their queries need seq_len >= 4 * num_pairs = {4 * num_pairs}, got {seq_len}")

    def sample(self, rng):
        ids, labels = self._empty()
        P, T = self.num_pairs, self.seq_len
        keys = rng.choice(self.num_keys, P, replace=False) + 2
        values = rng.integers(0, self.num_values, P) + 2 + self.num_keys
        ids[0:2 * P:2], ids[1:2 * P:2] = keys, values
        # P query slots of 2 tokens in the T - 2P tail: choose P of the (tail - P) gaps, then spread
        free = T - 2 * P - 2 * P
        offsets = np.sort(rng.choice(free + P, P, replace=False)) - np.arange(P)  # non-decreasing, in [0, free]
        pos = 2 * P + offsets + 2 * np.arange(P)
        order = rng.permutation(P)
        ids[pos], ids[pos + 1] = keys[order], values[order]
        labels[pos] = values[order]
        return ids, labels


@TASKS.register("induction_heads")
class InductionHeads(SyntheticTask):
    """Induction heads as in Mamba (Gu & Dao 2023, Sec. 4.1.2; Olsson et al. 2022).

    Random tokens from ``[2, V)``; the trigger (token 1) appears at a random position followed by the
    answer token, and again at the last position, where the model must predict the answer
    (``num_queries=1``, Mamba's task). ``num_queries > 1`` adds ``num_queries - 1`` earlier
    recurrences of the trigger at random positions after the first, each followed by the answer in
    the input (``A B ... A B ... A -> B``) and each scored: a denser signal for the same mechanism.
    """

    def __init__(self, seq_len: int, vocab_size: int, *, num_queries: int = 1):
        super().__init__(seq_len, vocab_size)
        self.num_queries = _positive_int(num_queries, f"{_KEY}.num_queries")
        _require(vocab_size >= 4, "data.vocab_size", f"induction_heads needs vocab_size >= 4, got {vocab_size}")
        _require(2 * self.num_queries + 1 <= seq_len, f"{_KEY}.num_queries",
                 f"{num_queries} queries need seq_len >= 2 * num_queries + 1 = {2 * num_queries + 1}, got {seq_len}")

    def sample(self, rng):
        ids, labels = self._empty()
        T, n = self.seq_len, self.num_queries
        ids[:] = rng.integers(2, self.vocab_size, T)
        answer = int(rng.integers(2, self.vocab_size))
        # n blocks "trigger answer" at random non-overlapping places of the first T - 1 positions
        c = np.sort(rng.choice(T - 1 - n, n, replace=False))
        pos = c + np.arange(n)  # block starts, pairwise >= 2 apart, last one <= T - 3
        ids[pos], ids[pos + 1] = MARKER, answer
        labels[pos[1:]] = answer  # every recurrence of the trigger after the first is a query
        ids[T - 1], labels[T - 1] = MARKER, answer
        return ids, labels


@TASKS.register("selective_copying")
class SelectiveCopying(SyntheticTask):
    """Selective copying as in Mamba (Gu & Dao 2023, Sec. 4.1.1, Fig. 2).

    ``num_tokens`` content tokens from ``[2, V)`` at random (sorted) positions of a blank context of
    ``T - num_tokens`` tokens, then ``num_tokens`` copy cues (token 1); at the i-th cue the model must
    output the i-th content token. Content-dependent spacing is what an LTI convolution cannot model.
    """

    def __init__(self, seq_len: int, vocab_size: int, *, num_tokens: int = 16):
        super().__init__(seq_len, vocab_size)
        self.num_tokens = _positive_int(num_tokens, f"{_KEY}.num_tokens")
        _require(vocab_size >= 3, "data.vocab_size", f"selective_copying needs vocab_size >= 3, got {vocab_size}")
        _require(2 * self.num_tokens <= seq_len, f"{_KEY}.num_tokens",
                 f"{num_tokens} tokens and their copy cues need seq_len >= 2 * num_tokens = {2 * num_tokens}, "
                 f"got {seq_len}")

    def sample(self, rng):
        ids, labels = self._empty()
        N, T = self.num_tokens, self.seq_len
        ctx = T - N
        pos = np.sort(rng.choice(ctx, N, replace=False))
        content = rng.integers(2, self.vocab_size, N)
        ids[pos] = content
        ids[ctx:] = MARKER
        labels[ctx:] = content
        return ids, labels


@TASKS.register("copy_at_distance")
class CopyAtDistance(SyntheticTask):
    """Copying across a gap (the copy task of Arjovsky et al. 2016 / Jelassi et al. 2024).

    ``num_tokens`` random tokens from ``[2, V)``, ``distance`` blanks, the separator (token 1), then the
    same tokens again (teacher forcing): from the separator on, every position predicts the next
    token of the copy. ``distance`` defaults to filling the sequence (``T - 2 * num_tokens``); a
    smaller one left-pads with blanks.
    """

    def __init__(self, seq_len: int, vocab_size: int, *, num_tokens: int = 16, distance: int | None = None):
        super().__init__(seq_len, vocab_size)
        self.num_tokens = _positive_int(num_tokens, f"{_KEY}.num_tokens")
        _require(vocab_size >= 3, "data.vocab_size", f"copy_at_distance needs vocab_size >= 3, got {vocab_size}")
        _require(2 * self.num_tokens <= seq_len, f"{_KEY}.num_tokens",
                 f"{num_tokens} tokens and their copy need seq_len >= 2 * num_tokens = {2 * num_tokens}, got {seq_len}")
        if distance is None:
            distance = seq_len - 2 * self.num_tokens
        _require(isinstance(distance, int) and not isinstance(distance, bool) and distance >= 0,
                 f"{_KEY}.distance", f"must be a non-negative integer, got {distance!r}")
        _require(2 * self.num_tokens + distance <= seq_len, f"{_KEY}.distance",
                 f"num_tokens={num_tokens} and distance={distance} need seq_len >= {2 * num_tokens + distance}, "
                 f"got {seq_len}")
        self.distance = distance

    def sample(self, rng):
        ids, labels = self._empty()
        N, T = self.num_tokens, self.seq_len
        s = T - 2 * N - self.distance  # leading blanks
        content = rng.integers(2, self.vocab_size, N)
        ids[s:s + N] = content
        sep = s + N + self.distance
        ids[sep] = MARKER
        ids[sep + 1:] = content[:-1]
        labels[sep:] = content
        return ids, labels


def build_task(name: str, seq_len: int, vocab_size: int, options: dict | None = None) -> SyntheticTask:
    """``TASKS[name](seq_len, vocab_size, **options)``; unknown names or options fail naming the key."""
    return TASKS.build(name, seq_len, vocab_size, key=_KEY if name in TASKS else "data.task",
                       options=options)


SPLITS = {"train": 0, "val": 1, "test": 2}


class SyntheticDataset(Dataset):
    """``num_samples`` samples of ``task``; item ``i`` is ``{"input_ids", "labels"}`` (int64 [T]) drawn
    from ``default_rng([seed, split, seq_len, i])`` — the same for a given index whatever the order,
    worker or rank that asks for it."""

    def __init__(self, task: SyntheticTask, num_samples: int, seed: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split: one of {sorted(SPLITS)}, got {split!r}")
        self.task, self.num_samples, self.seed, self.split = task, int(num_samples), int(seed), split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], self.task.seq_len, int(i)])
        ids, labels = self.task.sample(rng)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
