"""Tokenize documents with HF ``datasets`` and pack them into fixed-length training samples.

Every document is followed by EOS and all documents are concatenated into one token stream;
sample ``i`` is ``stream[i*T : i*T + T + 1]`` (T = ``seq_len``), whose first T tokens are the
input and last T the labels (next tokens). Consecutive samples overlap by one token so every
stream position is a target exactly once. The stream is cached as a ``.npy`` file (uint16 when
the vocabulary fits) and memory-mapped, so workers and ranks share pages instead of copies.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lm.data.corpus import Document
from lm.data.tokenizer import atomic_write_bytes

PACK_VERSION = 1  # bump when the stream layout changes: invalidates cached streams
# Below this many bytes per worker, process start-up costs more than it saves.
_MIN_BYTES_PER_PROC = 1_000_000

_TOKENIZERS: dict = {}  # per-process cache: each map worker loads the tokenizer file once


def _encode_batch(batch: dict, tokenizer_path: str, eos_id: int) -> dict:
    """``datasets.map`` function: runs in worker processes, so it loads the tokenizer from its file
    (a ``Tokenizer`` object would be pickled to every worker) and appends EOS to each document."""
    tok = _TOKENIZERS.get(tokenizer_path)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _TOKENIZERS[tokenizer_path] = Tokenizer.from_file(tokenizer_path)
    encoded = tok.encode_batch_fast(batch["text"], add_special_tokens=False)
    return {"ids": [e.ids + [eos_id] for e in encoded]}


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def tokenize_stream(
    docs: Sequence[Document], tokenizer_path: str | os.PathLike, eos_id: int, vocab_size: int,
    work_dir: Path, num_proc: int = 2,
) -> np.ndarray:
    """Tokenize ``docs`` with ``datasets.map(batched=True, num_proc)`` into one EOS-separated stream.

    ``datasets`` writes its Arrow shards under ``work_dir`` (inside our cache, not ``~/.cache``);
    they are intermediate and removed once the stream is in memory.
    """
    import pyarrow.compute as pc
    from datasets import Dataset

    total_bytes = sum(len(d.text) for d in docs)
    nproc = max(1, min(num_proc, total_bytes // _MIN_BYTES_PER_PROC, len(docs)))
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work_dir, prefix="map-"))  # unique: ranks may build at once
    try:
        with _quiet_datasets():
            ds = Dataset.from_dict({"text": [d.text for d in docs]})
            fn = functools.partial(_encode_batch, tokenizer_path=str(tokenizer_path), eos_id=eos_id)
            ds = ds.map(
                fn, batched=True, batch_size=64, num_proc=nproc if nproc > 1 else None,
                remove_columns=["text"], cache_file_name=str(tmp / "tokens.arrow"),
                new_fingerprint=hashlib.sha256(str(tmp).encode()).hexdigest()[:32],  # skip hashing fn
            )
            flat = pc.list_flatten(ds.data.column("ids"))  # respects slice offsets of each chunk
            stream = flat.to_numpy().astype(stream_dtype(vocab_size), copy=True)
            del ds, flat  # release the memory-mapped Arrow files before deleting them
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stream


def packed_key(tokenizer_hash: str, split_text_hash: str, seq_len: int) -> str:
    return hashlib.sha256(f"pack-v{PACK_VERSION}|{tokenizer_hash}|{split_text_hash}|{seq_len}".encode()).hexdigest()


def packed_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "packed" / f"{key}.npy"


def build_packed(
    docs: Sequence[Document], *, tokenizer_path: str | os.PathLike, tokenizer_hash: str, split_text_hash: str,
    eos_id: int, vocab_size: int, seq_len: int, cache_dir: Path, num_proc: int = 2,
) -> Path:
    """Return the path of the cached stream for ``docs``, tokenizing and writing it if missing."""
    path = packed_path(cache_dir, packed_key(tokenizer_hash, split_text_hash, seq_len))
    if path.exists():
        return path
    stream = tokenize_stream(docs, tokenizer_path, eos_id, vocab_size, cache_dir / "datasets", num_proc)
    atomic_write_bytes(path, _npy_bytes(stream))
    return path


def _npy_bytes(arr: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, arr, allow_pickle=False)
    return f.getvalue()


class MappedStream(torch.utils.data.Dataset):
    """A dataset over the cached token stream at ``self.path``: the memory map is opened lazily and
    not pickled, so DataLoader workers reopen the file instead of receiving a copy of the stream."""

    path: str
    _stream: np.ndarray | None = None

    @property
    def stream(self) -> np.ndarray:
        if self._stream is None:
            self._stream = np.load(self.path, mmap_mode="r")
        return self._stream

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}


class PackedDataset(MappedStream):
    """Fixed-length samples over a memory-mapped token stream.

    Item ``i`` is ``{"input_ids": stream[i*T : i*T+T], "labels": stream[i*T+1 : i*T+T+1]}`` as int64.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, split: str = "train"):
        if seq_len < 1:
            raise ValueError(f"data.seq_len: must be positive, got {seq_len}")
        self.path = str(path)
        self.seq_len = seq_len
        n = len(self.stream)
        if n < seq_len + 1:
            raise ValueError(
                f"data.seq_len: {seq_len} is too long for the {split} split ({n} tokens, one sample needs"
                f" {seq_len + 1}); lower data.seq_len or add text"
            )
        self._len = (n - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(i)
        T = self.seq_len
        chunk = torch.from_numpy(self.stream[i * T : i * T + T + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}
