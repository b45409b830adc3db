"""``TextDataModule``: sources -> split -> BPE tokenizer -> packed samples -> resumable loaders.

``prepare_data`` (one process per node) does the expensive work and fills the cache;
``setup`` (every process) loads it, building whatever is missing itself, so it also works where
``prepare_data`` never ran (another node, a notebook). All cache files are written atomically,
so ranks racing on a shared cache never read half a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer

from lm.data.corpus import build_corpus, split_documents, text_hash
from lm.data.loader import ResumableLoader, data_shard
from lm.data.packing import PackedDataset, build_packed
from lm.data.tokenizer import EOS, default_cache_dir, file_sha256, get_tokenizer


@dataclass
class _Built:
    tokenizer_path: Path
    train_path: Path
    val_path: Path


class TextDataModule(L.LightningDataModule):
    """Language-model data from local text and/or the built-in stdlib corpus.

    Args:
        sources: files, folders (recursive: .txt .md .rst .py, .jsonl with a "text" field) and/or
            ``"builtin:stdlib"`` (CPython's pydoc topics, then its stdlib sources; no download).
        seq_len: tokens per sample (T); batches are ``{"input_ids", "labels"}`` of shape [B, T].
        batch_size: samples per batch on each rank.
        vocab_size: BPE vocabulary size, including the 256 byte symbols and ``<|endoftext|>``.
        val_fraction: share of documents (by a stable hash of their id) held out for validation.
        max_bytes: stop reading the sources after this many UTF-8 bytes (None: read everything).
        num_workers: DataLoader worker processes.
        num_proc: ``datasets.map`` processes used to tokenize.
        cache_dir: where tokenizers and packed streams live (default ``$LM_CACHE`` or ``~/.cache/lm``).
        seed: seed of the per-epoch shuffle of the train samples.
        val_batches: cap on validation batches (None: the whole split), always the same ones.
    """

    def __init__(self, sources: list[str] = ["builtin:stdlib"], seq_len: int = 256, batch_size: int = 16,  # noqa: B006
                 vocab_size: int = 4096, val_fraction: float = 0.05, max_bytes: int | None = 4_000_000,
                 num_workers: int = 0, num_proc: int = 2, cache_dir: str | None = None, seed: int = 1234,
                 val_batches: int | None = None):
        super().__init__()
        if isinstance(sources, str):
            sources = [sources]
        for key, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                ("num_proc", num_proc, 1)):
            if value < low:
                raise ValueError(f"data.{key}: must be at least {low}, got {value}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"data.val_batches: must be positive or None, got {val_batches}")
        self.sources = list(sources)
        self.seq_len, self.batch_size, self._vocab_size = seq_len, batch_size, vocab_size
        self.val_fraction, self.max_bytes = val_fraction, max_bytes
        self.num_workers, self.num_proc, self.seed, self.val_batches = num_workers, num_proc, seed, val_batches
        self.cache_dir = default_cache_dir(cache_dir)
        self.tokenizer: Tokenizer | None = None
        self.eos_id: int | None = None
        self.train_dataset: PackedDataset | None = None
        self.val_dataset: PackedDataset | None = None

    # -- building ---------------------------------------------------------------------------------

    def _build(self) -> _Built:
        """Read the corpus and make sure every cache file exists; cheap when all are cached
        (reading and hashing a few MB of text), since the keys are content hashes."""
        docs = build_corpus(self.sources, self.max_bytes)
        train_docs, val_docs = split_documents(docs, self.val_fraction)
        train_hash = text_hash(train_docs)
        tok, tok_path = get_tokenizer(train_docs, self._vocab_size, self.cache_dir, train_text_hash=train_hash)
        self._set_tokenizer(tok)
        tok_hash = file_sha256(tok_path)
        paths = [
            build_packed(split_docs, tokenizer_path=tok_path, tokenizer_hash=tok_hash, split_text_hash=digest,
                         eos_id=self.eos_id, vocab_size=tok.get_vocab_size(), seq_len=self.seq_len,
                         cache_dir=self.cache_dir, num_proc=self.num_proc)
            for split_docs, digest in ((train_docs, train_hash), (val_docs, text_hash(val_docs)))
        ]
        return _Built(tok_path, *paths)

    def _set_tokenizer(self, tok: Tokenizer) -> None:
        self.tokenizer = tok
        eos = tok.token_to_id(EOS)
        assert eos is not None, f"tokenizer lacks {EOS}"
        self.eos_id = eos

    def prepare_data(self) -> None:
        """Build the caches (Lightning runs this on one process per node)."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load tokenizer and packed splits (building any that are missing) on every process."""
        if self.train_dataset is not None:
            return
        built = self._build()  # also sets self.tokenizer (loaded from the cache when it exists)
        self.train_dataset = PackedDataset(built.train_path, self.seq_len, "train")
        self.val_dataset = PackedDataset(built.val_path, self.seq_len, "validation")

    # -- API --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the trained vocabulary (may be below the requested ``vocab_size`` on tiny corpora)."""
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.vocab_size is known after prepare_data() or setup()")
        return self.tokenizer.get_vocab_size()

    def _rank_world(self) -> tuple[int, int]:
        return data_shard(getattr(self, "trainer", None))

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            self.setup("fit")

    def train_dataloader(self) -> ResumableLoader:
        self._require_setup()
        rank, world = self._rank_world()
        n = len(self.train_dataset)
        if n < self.batch_size * world:
            raise ValueError(
                f"data.batch_size: the train split has {n} samples of data.seq_len={self.seq_len}, fewer than"
                f" batch_size * world_size = {self.batch_size} * {world}; lower either or add text"
            )
        return ResumableLoader(self.train_dataset, self.batch_size, shuffle=True, seed=self.seed,
                               rank=rank, world_size=world, num_workers=self.num_workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        """Deterministic: the first ``val_batches * batch_size`` samples, in order, no shuffle."""
        self._require_setup()
        ds = self.val_dataset
        if self.val_batches is not None:
            ds = torch.utils.data.Subset(ds, range(min(len(ds), self.val_batches * self.batch_size)))
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                                           num_workers=self.num_workers, drop_last=False)


    def test_dataloader(self) -> torch.utils.data.DataLoader:
        """``lm test`` scores the held-out (validation) split."""
        return self.val_dataloader()
