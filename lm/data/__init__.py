"""Data pipeline: sources -> documents -> BPE tokenizer -> packed samples -> resumable loaders.

``TextDataModule`` is the entry point for text; the pieces are exported for synthetic tasks and
tools that need one step (e.g. a tokenizer for a given corpus, or a resumable loader over any
map-style dataset).
"""

from lm.data.corpus import BUILTIN_STDLIB, Document, build_corpus, split_documents, text_hash
from lm.data.document_stream import DocumentStreamDataModule
from lm.data.loader import ResumableLoader, ResumableSampler
from lm.data.packing import PackedDataset, build_packed, tokenize_stream
from lm.data.text import TextDataModule
from lm.data.tokenizer import EOS, default_cache_dir, get_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BUILTIN_STDLIB", "EOS", "Document", "DocumentStreamDataModule", "PackedDataset", "ResumableLoader",
    "ResumableSampler", "TextDataModule", "build_corpus", "build_packed", "default_cache_dir", "get_tokenizer",
    "load_tokenizer", "split_documents", "text_hash", "tokenize_stream", "train_tokenizer",
]
import lm.data.listops  # noqa: E402,F401  (registers the listops task in lm.data.synthetic.TASKS)
