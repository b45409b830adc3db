"""Byte-level BPE tokenizer training (HF ``tokenizers``), cached by content hash.

The cache key is the sha256 of (every training text, ``vocab_size``, a format version), so the
same data always maps to the same ``tokenizer.json`` and a second run loads instead of training;
any change to the data, the vocabulary size or this file's training recipe (bump
``FORMAT_VERSION``) gets a new key instead of silently reusing a stale tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from lm.data.corpus import Document, text_hash

EOS = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when the training recipe below changes: invalidates cached tokenizers
_MIN_VOCAB = 257  # 256 byte symbols + EOS


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LM_CACHE``, else ``~/.cache/lm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LM_CACHE") or Path.home() / ".cache" / "lm").expanduser()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then ``os.replace``: concurrent ranks see either
    no file or the whole file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tokenizer_key(train_text_hash: str, vocab_size: int) -> str:
    """Cache key of the tokenizer trained on texts with digest ``train_text_hash``."""
    return hashlib.sha256(f"bpe-v{FORMAT_VERSION}|{vocab_size}|{train_text_hash}".encode()).hexdigest()


def tokenizer_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "tokenizers" / key / "tokenizer.json"


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer; ``<|endoftext|>`` gets id 0 (special tokens come first)."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"data.vocab_size: must be at least {_MIN_VOCAB} (256 bytes + {EOS}), got {vocab_size}")
    if vocab_size > 2**31 - 1:
        raise ValueError(f"data.vocab_size: too large ({vocab_size})")
    bpe = ByteLevelBPETokenizer()  # add_prefix_space=False: decode(encode(text)) == text
    bpe.train_from_iterator(
        iter(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    tok = Tokenizer.from_str(bpe._tokenizer.to_str())  # the plain `tokenizers.Tokenizer` it wraps
    assert tok.token_to_id(EOS) == 0, "EOS must be the first special token"
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def get_tokenizer(
    train_docs: Sequence[Document], vocab_size: int, cache_dir: Path, *, train_text_hash: str | None = None
) -> tuple[Tokenizer, Path]:
    """Load the cached tokenizer for ``train_docs`` or train and cache it. Returns (tokenizer, path)."""
    digest = train_text_hash or text_hash(train_docs)
    path = tokenizer_path(cache_dir, tokenizer_key(digest, vocab_size))
    if path.exists():
        return load_tokenizer(path), path
    tok = train_tokenizer([d.text for d in train_docs], vocab_size)
    atomic_write_bytes(path, tok.to_str().encode("utf-8"))
    return tok, path


def file_sha256(path: str | os.PathLike) -> str:
    """Digest of a tokenizer file: packed-data cache keys depend on the exact tokenizer."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
