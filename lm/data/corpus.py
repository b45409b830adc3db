"""Sources -> documents, the built-in offline corpus, and the deterministic train/val split.

A *source* is a local file, a local folder (searched recursively) or ``"builtin:stdlib"``: the
running CPython's own documentation and standard-library sources, which exist on every machine
with Python, so the default recipes need no download.  A *document* is one unit of text with a
stable ``id``; the split hashes that id, so a document lands on the same side on every machine
and every run, whatever else is in the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

BUILTIN_STDLIB = "builtin:stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
# Parts of the stdlib that are third-party code, huge test suites or GUI glue: not "the stdlib".
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "tkinter",
     "lib2to3", "ensurepip", "__pycache__",
     "encodings"}  # encodings: 3 MB of generated codec tables, not code anyone writes
)
_STDLIB_SKIP_FILES = frozenset({"pydoc_data/topics.py"})  # already included as English documents


@dataclass(frozen=True)
class Document:
    """One unit of text. ``id`` is stable across machines (no absolute paths) and drives the split."""

    id: str
    text: str


def _stdlib_documents() -> Iterator[Document]:
    """pydoc's topic help (English prose) first, then the stdlib ``.py`` sources in sorted order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"{BUILTIN_STDLIB}/topics/{name}", topics[name])
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune: site-packages is huge
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.endswith(".py") and rel not in _STDLIB_SKIP_FILES:
                files.append(rel)
    for rel in sorted(files):  # sorted posix paths: same order on every machine with this Python
        yield Document(f"{BUILTIN_STDLIB}/{rel}", (root / rel).read_text("utf-8", errors="replace"))


def _file_documents(path: Path, doc_id: str) -> Iterator[Document]:
    if path.suffix == JSONL_SUFFIX:
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"data.sources: '{path}' line {lineno} is not a JSON object with a \"text\" field"
                    ) from None
                yield Document(f"{doc_id}:{lineno}", str(text))
    elif path.suffix in TEXT_SUFFIXES:
        yield Document(doc_id, path.read_text("utf-8", errors="replace"))


def _folder_files(root: Path) -> list[Path]:
    """Text files under ``root``, recursively, sorted, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if not name.startswith(".") and (p.suffix in TEXT_SUFFIXES or p.suffix == JSONL_SUFFIX):
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _source_documents(source: str) -> Iterator[Document]:
    if source == BUILTIN_STDLIB:
        yield from _stdlib_documents()
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"data.sources: '{source}' does not exist")
    # ids start at the source's own name (``corpus/sub/a.txt``, ``notes.jsonl:3``), never at the
    # folders above it: the same data gets the same split wherever it sits and however it is written
    name = path.resolve().name
    if path.is_dir():
        for f in _folder_files(path):
            yield from _file_documents(f, f"{name}/{f.relative_to(path).as_posix()}")
    else:
        yield from _file_documents(path, name)


def build_corpus(sources: Sequence[str] = (BUILTIN_STDLIB,), max_bytes: int | None = None) -> list[Document]:
    """Read ``sources`` in order into documents, stopping once ``max_bytes`` (UTF-8) is reached.

    The document that crosses the budget is cut to fit, so the total never exceeds ``max_bytes``.
    Raises ``ValueError`` naming ``data.sources`` for a missing path or a source without text.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("data.sources: no source given (use e.g. ['builtin:stdlib'] or a folder)")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"data.max_bytes: must be positive or None, got {max_bytes}")
    for source in sources:  # check every path up front: the budget may end reading early
        if source != BUILTIN_STDLIB and not Path(source).expanduser().exists():
            raise ValueError(f"data.sources: '{source}' does not exist")
    docs: list[Document] = []
    total = 0
    for source in sources:
        found = False
        for doc in _source_documents(source):
            if not doc.text.strip():
                continue
            found = True
            size = len(doc.text.encode("utf-8"))
            if max_bytes is not None and total + size > max_bytes:
                keep = doc.text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
                if keep.strip():
                    docs.append(Document(doc.id, keep))
                return docs
            docs.append(doc)
            total += size
            if max_bytes is not None and total >= max_bytes:
                return docs
        if not found:
            raise ValueError(f"data.sources: '{source}' contains no text (.txt .md .rst .py .jsonl)")
    return docs


def _unit_hash(doc_id: str) -> float:
    """sha1 of the id mapped to [0, 1): stable across processes (unlike ``hash()``) and machines."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic per-document split: a document goes to validation iff its id hashes below
    ``val_fraction``. Each side gets at least one document (the extreme hash moves over)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must be in (0, 1) so both splits get a document, got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(
            f"data.val_fraction: the corpus has {len(docs)} document(s); need at least 2 to split train/val"
        )
    hashes = [_unit_hash(d.id) for d in docs]
    is_val = [h < val_fraction for h in hashes]
    if not any(is_val):
        is_val[min(range(len(docs)), key=hashes.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=hashes.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def text_hash(docs: Sequence[Document]) -> str:
    """sha256 over all texts, length-prefixed so document boundaries are part of the hash."""
    h = hashlib.sha256()
    for d in docs:
        data = d.text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
